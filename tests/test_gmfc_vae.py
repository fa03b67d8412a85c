"""Tests for gmfc_vae.py (Fan et al. 2020): maths against independent computations, Table I shapes, the patch
grid, checkpoint/resume, NaN handling and an end-to-end synthetic run."""

import json
import os

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import common
import gmfc_vae as gm
from gmfc_vae import GMFCVAE


# ------------------------------------------------------------------------------------------ rank pooling
def test_rank_pool_coefficients_hand_worked():
    np.testing.assert_allclose(gm.rank_pool_coefficients(2), [-0.5, 0.5])
    np.testing.assert_allclose(gm.rank_pool_coefficients(3), [-4 / 3, 2 / 3, 2 / 3])
    for T in (1, 2, 3, 5, 20, 37):
        alpha = gm.rank_pool_coefficients(T)
        assert alpha.shape == (T,)
        assert abs(alpha.sum()) < 1e-9          # constant input (e.g. the +128 offset) pools to zero


def test_rank_pool_coefficients_match_time_varying_mean_definition():
    # Bilen et al.: alpha_t = sum_{s >= t} (2s - T - 1) / s, i.e. the rank-pooling weights of the
    # time-varying means V_s = (1/s) sum_{tau <= s} psi_tau, written back on the frames.
    for T in (2, 3, 7, 20):
        direct = np.array([sum((2 * s - T - 1) / s for s in range(t, T + 1)) for t in range(1, T + 1)])
        np.testing.assert_allclose(gm.rank_pool_coefficients(T), direct, atol=1e-9)


def test_dynamic_flow_window_alignment_and_values():
    rng = np.random.default_rng(0)
    n_flows, H, W, t = 26, 4, 5, 20
    flows = rng.normal(0, 3, (n_flows, H, W, 2)).astype(np.float16)
    starts, T = gm.dynamic_flow_starts(n_flows, t)
    assert T == t and len(starts) == n_flows + 1
    assert starts[0] == 0 and starts[6] == 6                      # frame i pools flows i..i+t-1
    assert (starts[6:] == n_flows - t).all()                      # clamped to the last full window
    ids = np.array([0, 3, 6, 26])
    pooled = gm.rank_pool_flows(flows, ids, t).numpy()            # (4, 2, H, W)
    alpha = gm.rank_pool_coefficients(t)
    mapped = np.clip(np.round(16.0 * flows.astype(np.float32) + 128.0), 0, 255)
    for row, i in enumerate(ids):
        s = min(i, n_flows - t)
        expect = np.tensordot(alpha, mapped[s:s + t], axes=(0, 0)).transpose(2, 0, 1)
        np.testing.assert_allclose(pooled[row], expect, rtol=1e-5, atol=1e-2)
    # tensor (device) path equals the memmap/numpy path
    pooled_t = gm.rank_pool_flows(torch.from_numpy(flows.astype(np.float32)), ids, t).numpy()
    np.testing.assert_allclose(pooled_t, pooled, rtol=1e-5, atol=1e-2)
    # third channel = magnitude, all channels linearly normalised into [0, 1]
    scale = 100.0
    img = gm.normalize_dynamic_flow(torch.from_numpy(pooled), scale).numpy()
    np.testing.assert_allclose(img[:, 0], np.clip(0.5 + pooled[:, 0] / (2 * scale), 0, 1), atol=1e-6)
    np.testing.assert_allclose(img[:, 2], np.clip(np.hypot(pooled[:, 0], pooled[:, 1]) / scale, 0, 1), atol=1e-5)
    # short video: all flows pooled
    starts, T = gm.dynamic_flow_starts(5, t)
    assert T == 5 and (starts == 0).all()


# ---------------------------------------------------------------------------------------------- patches
def test_test_patch_grid_is_15x10_and_matches_slicing():
    assert gm.test_grid_shape((280, 420), 28) == (10, 15)          # 15 wide x 10 high = 150 patches
    images = torch.arange(2 * 3 * 280 * 420, dtype=torch.float32).reshape(2, 3, 280, 420)
    tiles, (gh, gw) = gm.grid_patches(images, 28)
    assert (gh, gw) == (10, 15) and tiles.shape == (2 * 150, 3, 28, 28)
    k = 1 * 150 + 4 * 15 + 7                                      # frame 1, row 4, column 7
    assert torch.equal(tiles[k], images[1, :, 4 * 28:5 * 28, 7 * 28:8 * 28])
    tiles7, (gh7, gw7) = gm.grid_patches(images[:1], 7)           # the training stride
    assert (gh7, gw7) == ((280 - 28) // 7 + 1, (420 - 28) // 7 + 1)
    assert torch.equal(tiles7[3 * gw7 + 5], images[0, :, 21:49, 35:63])


def test_moving_patch_positions_against_brute_force():
    rng = np.random.default_rng(1)
    frames = np.full((4, 56, 70), 100, np.uint8)
    frames[1, 10:13, 30:33] = 200          # a blob that appears in frame 1 (moving between frames 0/1 and 1/2)
    frames[3, 50, 5] = 110                 # a change below the threshold
    frames = frames + rng.integers(0, 3, frames.shape).astype(np.uint8)
    pos = gm.moving_patch_positions(frames, 7, threshold=15, min_pixels=1)
    expect = []
    for i in range(3):
        moving = np.abs(frames[i + 1].astype(int) - frames[i].astype(int)) > 15
        for y in range(0, 56 - 28 + 1, 7):
            for x in range(0, 70 - 28 + 1, 7):
                if moving[y:y + 28, x:x + 28].sum() >= 1:
                    expect.append((i, y, x))
    assert sorted(map(tuple, pos.tolist())) == sorted(expect) and len(expect) > 0
    patches = gm.gather_patches(frames, pos)
    f, y, x = pos[0]
    assert patches.shape == (len(pos), 1, 28, 28)
    np.testing.assert_array_equal(patches[0, 0], frames[f, y:y + 28, x:x + 28])


def test_sample_positions_caps_and_keeps_rows():
    cands = {"a": np.arange(30).reshape(10, 3), "b": np.zeros((0, 3), int), "c": np.arange(60).reshape(20, 3) + 100}
    out = gm.sample_positions(cands, 12, seed=0)
    assert sum(len(v) for v in out.values()) == 12
    allrows = {tuple(r) for v in cands.values() for r in v.tolist()}
    assert all(tuple(r) in allrows for v in out.values() for r in v.tolist())
    assert sum(len(v) for v in gm.sample_positions(cands, 1000, seed=0).values()) == 30


# ---------------------------------------------------------------------------------------------- network
TABLE_I = {   # layer: (output shape, kernel, stride, padding used)
    "c1": ((64, 14, 14), 3, 2), "c2": ((128, 7, 7), 3, 2), "c3": ((256, 4, 4), 3, 2), "c4": ((64, 1, 1), 4, 1),
    "f5": ((64, 1, 1), 1, 1), "f6": ((64, 1, 1), 1, 1),
    "d8": ((256, 4, 4), 4, 1), "d9": ((128, 7, 7), 3, 2), "d10": ((64, 14, 14), 3, 2), "d11": ((3, 28, 28), 3, 2),
}


def test_every_layer_matches_table_I():
    model = GMFCVAE(components=20)
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n in TABLE_I]
    x_rec, mu, logvar, z = model(torch.rand(5, 3, 28, 28))
    for h in hooks:
        h.remove()
    for name, (shape, kernel, stride) in TABLE_I.items():
        layer = getattr(model, name)
        assert shapes[name] == shape, name
        assert layer.kernel_size == (kernel, kernel) and layer.stride == (stride, stride), name
    assert model.c1.in_channels == 3
    assert x_rec.shape == (5, 3, 28, 28) and mu.shape == logvar.shape == z.shape == (5, 64)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())     # fully convolutional
    assert model.mu_c.shape == model.logvar_c.shape == (20, 64) and model.pi_logits.shape == (20,)


def _random_mixture(K=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64),
            0.3 * torch.randn(K, D, generator=g, dtype=torch.float64))


def test_sample_energy_against_scipy_logsumexp():
    pi_logits, mu_c, logvar_c = _random_mixture()
    z = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    energy = gm.sample_energy(z, pi_logits, mu_c, logvar_c).numpy()
    pi = np.exp(pi_logits.numpy()) / np.exp(pi_logits.numpy()).sum()
    expect = []
    for zi in z.numpy():
        logp = [np.log(pi[c]) + multivariate_normal.logpdf(zi, mu_c[c].numpy(), np.diag(np.exp(logvar_c[c].numpy())))
                for c in range(len(pi))]
        expect.append(-logsumexp(logp))
    np.testing.assert_allclose(energy, expect, rtol=1e-10)
    # a latent far from every component has a higher energy than one at a component mean
    far = gm.sample_energy(mu_c[:1] + 50, pi_logits, mu_c, logvar_c)
    near = gm.sample_energy(mu_c[:1], pi_logits, mu_c, logvar_c)
    assert far.item() > near.item()


def test_vade_loss_against_numpy():
    rng = np.random.default_rng(4)
    N, K, D = 5, 4, 6
    pi_logits, mu_c, logvar_c = _random_mixture(K, D, seed=5)
    x, x_rec = rng.random((N, 3, 28, 28)), rng.random((N, 3, 28, 28))
    mu, logvar, z = rng.normal(size=(N, D)), 0.4 * rng.normal(size=(N, D)), rng.normal(size=(N, D))
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    loss, rec, kl = gm.vade_loss(t(x), t(x_rec), t(mu), t(logvar), t(z), pi_logits, mu_c, logvar_c)

    # independent form: rec + sum_c gamma_c KL(q(z|x) || p(z|c)) + KL(gamma || pi), gamma from p(c|z) (eq. 15)
    pi = np.exp(pi_logits.numpy()); pi /= pi.sum()
    mc, vc = mu_c.numpy(), np.exp(logvar_c.numpy())
    total = []
    for i in range(N):
        lik = np.array([pi[c] * np.prod(np.exp(-(z[i] - mc[c]) ** 2 / (2 * vc[c])) / np.sqrt(2 * np.pi * vc[c]))
                        for c in range(K)])
        gamma = lik / lik.sum()
        v = np.exp(logvar[i])
        kl_c = np.array([0.5 * np.sum(np.log(vc[c] / v) + v / vc[c] + (mu[i] - mc[c]) ** 2 / vc[c] - 1)
                         for c in range(K)])
        total.append(np.sum((x[i] - x_rec[i]) ** 2) + gamma @ kl_c + np.sum(gamma * np.log(gamma / pi)))
    np.testing.assert_allclose(loss.item(), np.mean(total), rtol=1e-10)
    np.testing.assert_allclose(rec.item(), np.mean(np.sum((x - x_rec) ** 2, axis=(1, 2, 3))), rtol=1e-12)


def test_gmm_initialisation_copies_a_diagonal_gmm():
    torch.manual_seed(0)
    model = GMFCVAE(components=3)
    patches = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (300, 1, 28, 28), dtype=np.uint8))
    gmm = gm.init_mixture_from_latents(model, patches, 3, 1000, 0, torch.device("cpu"))
    np.testing.assert_allclose(torch.softmax(model.pi_logits, 0).detach().numpy(), gmm.weights_, rtol=1e-5)
    np.testing.assert_allclose(model.mu_c.detach().numpy(), gmm.means_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(torch.exp(model.logvar_c).detach().numpy(), gmm.covariances_, rtol=1e-4)


# ------------------------------------------------------------------------------------- training plumbing
TINY = ["--dataset", "synthetic", "--max-train-patches", "300", "--pretrain-epochs", "1", "--gmm-fit-patches", "300",
        "--num-panels", "0"]


def test_nan_loss_stops_training_and_saves_nothing(shared_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(GMFCVAE, "decode", lambda self, z: torch.full((z.shape[0], 3, 28, 28), float("nan")))
    out = tmp_path / "run"
    with pytest.raises(common.TrainingError):
        gm.main(TINY + ["--stream", "rgb", "--epochs", "1", "--train", "--cache-dir", shared_cache, "--out", str(out)])
    assert not (out / "model.pt").exists()


def test_checkpoint_and_resume(shared_cache, tmp_path):
    out = str(tmp_path / "run")
    gm.main(TINY + ["--stream", "rgb", "--epochs", "1", "--train", "--cache-dir", shared_cache, "--out", out])
    state = common.load_checkpoint(os.path.join(out, "model.pt"))
    assert state["progress"]["rgb"] == {"phase": "vade", "epoch": 1}
    assert state["args"]["stream"] == "rgb" and state["optimizer"]["stream"] == "rgb"
    first = {k: v.clone() for k, v in state["models"]["rgb"].items()}
    # resume asks for one more VaDE epoch: only that epoch runs and the weights move on from the saved ones
    gm.main(TINY + ["--stream", "rgb", "--epochs", "2", "--train", "--resume", "--cache-dir", shared_cache, "--out", out])
    state = common.load_checkpoint(os.path.join(out, "model.pt"))
    assert state["progress"]["rgb"] == {"phase": "vade", "epoch": 2}
    assert any(not torch.equal(first[k], v) for k, v in state["models"]["rgb"].items())


def test_end_to_end_synthetic_defaults(shared_cache, tmp_path):
    out = tmp_path / "run"
    gm.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    frame_scores, maps, meta = __import__("eval").read_scores(str(out / "scores.npz"))
    assert maps["Test001"].shape == (80, 4 * 4, 6 * 4)            # 4x6 grid (112x168 frames), x4 nearest
    assert meta["method"] == "gmfc_vae" and metrics["test_fps"] > 0
    assert metrics["frame_auc_micro"] >= 0.75, metrics


def test_moving_grid_matches_training_rule():
    frames = np.full((3, 56, 84), 90, np.uint8)
    frames[1, 30:33, 60:63] = 200                                  # changes between frames 0/1 and 1/2
    grid = gm.moving_grid(torch.from_numpy(frames[:, None]), 28, 15.0, 1).numpy()
    assert grid.shape == (3, 2, 3)
    expect = np.zeros((3, 2, 3), bool)
    expect[0, 1, 2] = expect[1, 1, 2] = True                       # the last frame reuses the pair (1, 2)
    expect[2] = expect[1]
    np.testing.assert_array_equal(grid, expect)
