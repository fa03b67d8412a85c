"""Tests for gmfc_vae.py (Fan et al. 2020): maths against independent computations, Table I shapes and
activations, the dynamic-flow window, the patch grid, score_video against a straightforward per-patch
computation, the stored maps, checkpoint / resume / time-boxed slices, test-only settings and an end-to-end
synthetic run."""

import argparse
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
from toy_data import moving_squares


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


def test_dynamic_flow_window_is_the_papers_t_plus_1_flows_and_centred_option():
    """Sec. III-A: F_i pools f_i..f_{i+t} (t + 1 flows); n flows give n - t full windows.
    Mutations caught: pooling t flows (length = min(window, n)); the centred option not shifting by t // 2;
    clamped frames marked complete; a wrong pooled value (window start off by one)."""
    rng = np.random.default_rng(0)
    n_flows, H, W, t = 26, 4, 5, 20
    flows = rng.normal(0, 3, (n_flows, H, W, 2)).astype(np.float16)
    starts, L, complete = gm.dynamic_flow_windows(n_flows, t, "forward")
    assert L == t + 1 and len(starts) == n_flows + 1
    assert list(starts[:6]) == [0, 1, 2, 3, 4, 5] and (starts[5:] == n_flows - t - 1).all()
    assert complete.sum() == n_flows - t and complete[:n_flows - t].all()          # F_1..F_{n-t}
    starts_c, Lc, complete_c = gm.dynamic_flow_windows(n_flows, t, "centred")
    assert Lc == t + 1 and starts_c[10] == 0 and starts_c[12] == 2 and starts_c[0] == 0
    assert (starts_c[15:] == n_flows - t - 1).all() and list(np.flatnonzero(complete_c)) == list(range(10, 16))
    alpha = gm.rank_pool_coefficients(t + 1)
    mapped = np.clip(np.round(16.0 * flows.astype(np.float32) + 128.0), 0, 255)
    ids = np.array([0, 3, 5, 26])
    for align, first in (("forward", lambda i: min(i, 5)), ("centred", lambda i: min(max(i - 10, 0), 5))):
        pooled = gm.rank_pool_flows(flows, ids, t, align).numpy()                     # (4, 2, H, W)
        for row, i in enumerate(ids):
            s = first(i)
            expect = np.tensordot(alpha, mapped[s:s + t + 1], axes=(0, 0)).transpose(2, 0, 1)
            np.testing.assert_allclose(pooled[row], expect, rtol=1e-5, atol=1e-2)
        # tensor (device) path equals the memmap/numpy path
        pooled_t = gm.rank_pool_flows(torch.from_numpy(flows.astype(np.float32)), ids, t, align).numpy()
        np.testing.assert_allclose(pooled_t, pooled, rtol=1e-5, atol=1e-2)
    # third channel = magnitude, all channels linearly normalised into [0, 1]
    scale = 100.0
    img = gm.normalize_dynamic_flow(torch.from_numpy(pooled), scale).numpy()
    np.testing.assert_allclose(img[:, 0], np.clip(0.5 + pooled[:, 0] / (2 * scale), 0, 1), atol=1e-6)
    np.testing.assert_allclose(img[:, 2], np.clip(np.hypot(pooled[:, 0], pooled[:, 1]) / scale, 0, 1), atol=1e-5)
    # short video: all flows pooled, no frame has a full window
    starts, L, complete = gm.dynamic_flow_windows(5, t, "forward")
    assert L == 5 and (starts == 0).all() and not complete.any()


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
    patches = gm.gather_patches(torch.from_numpy(frames[:, None]), torch.from_numpy(pos))
    assert patches.shape == (len(pos), 1, 28, 28)
    for r in (0, len(pos) - 1):
        f, y, x = pos[r]
        np.testing.assert_array_equal(patches[r, 0].numpy(), frames[f, y:y + 28, x:x + 28])


def test_sample_positions_caps_and_keeps_rows():
    cands = {"a": np.arange(30).reshape(10, 3), "b": np.zeros((0, 3), int), "c": np.arange(60).reshape(20, 3) + 100}
    out = gm.sample_positions(cands, 12, seed=0)
    assert sum(len(v) for v in out.values()) == 12
    allrows = {tuple(r) for v in cands.values() for r in v.tolist()}
    assert all(tuple(r) in allrows for v in out.values() for r in v.tolist())
    assert sum(len(v) for v in gm.sample_positions(cands, 1000, seed=0).values()) == 30


def _args(**kw):
    base = dict(window=3, flow_window="forward", flow_a=16.0, flow_b=128.0, test_stride=28, alpha=0.5, beta=0.5,
                amp=False, static_test_patches="score", motion_threshold=15.0, min_moving_pixels=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_training_patches_cut_on_device_match_slicing():
    """Device extraction against numpy slicing of each sampled frame's dynamic flow / frame.
    Mutations caught: the frame index of a chunk not mapped back (searchsorted dropped); positions of a
    chunk taken from another chunk (chunk bounds); x and y swapped in gather_patches."""
    rng = np.random.default_rng(2)
    frames = {"v": rng.integers(0, 256, (9, 56, 84), dtype=np.uint8)}
    flows = {"v": (rng.integers(-40, 40, (8, 56, 84, 2)) / 16).astype(np.float16)}
    pos = np.array([[0, 0, 7], [2, 14, 49], [2, 28, 0], [5, 21, 56], [6, 7, 14]], np.int64)
    args = _args()
    rgb = gm.extract_patches("rgb", frames, flows, {"v": pos}, 1.0, args, torch.device("cpu"))
    flow = gm.extract_patches("flow", frames, flows, {"v": pos}, 40.0, args, torch.device("cpu"), chunk=2)
    assert rgb.shape == (5, 1, 28, 28) and flow.shape == (5, 3, 28, 28) and flow.dtype == torch.uint8
    for r, (f, y, x) in enumerate(pos):
        np.testing.assert_array_equal(rgb[r, 0].numpy(), frames["v"][f, y:y + 28, x:x + 28])
        image = gm.dynamic_flow_uint8(gm.rank_pool_flows(flows["v"], [f], 3, "forward"), 40.0)[0]
        np.testing.assert_array_equal(flow[r].numpy(), image[:, y:y + 28, x:x + 28].numpy())


# ---------------------------------------------------------------------------------------------- network
TABLE_I = {   # layer: (output shape, kernel, stride)
    "c1": ((64, 14, 14), 3, 2), "c2": ((128, 7, 7), 3, 2), "c3": ((256, 4, 4), 3, 2), "c4": ((64, 1, 1), 4, 1),
    "f5": ((64, 1, 1), 1, 1), "f6": ((64, 1, 1), 1, 1),
    "d8": ((256, 4, 4), 4, 1), "d9": ((128, 7, 7), 3, 2), "d10": ((64, 14, 14), 3, 2), "d11": ((3, 28, 28), 3, 2),
}


def test_every_layer_matches_table_I_with_its_activation():
    """Shapes, kernels, strides, and the non-linearities: ReLU after every conv incl. C4 (F5/F6 see
    relu(C4)), linear F5/F6, ReLU between deconvolutions, sigmoid output.
    Mutations caught: the ReLU after C4 removed; the output sigmoid removed; a ReLU on F5; LeakyReLU."""
    torch.manual_seed(0)
    model = GMFCVAE(components=20)
    outputs, inputs = {}, {}

    def record(name):
        def hook(module, args, output):
            outputs[name], inputs[name] = output, args[0]
        return hook
    hooks = [getattr(model, n).register_forward_hook(record(n)) for n in TABLE_I]
    x_rec, mu, logvar, z = model(torch.rand(5, 3, 28, 28))
    for h in hooks:
        h.remove()
    for name, (shape, kernel, stride) in TABLE_I.items():
        layer = getattr(model, name)
        assert tuple(outputs[name].shape[1:]) == shape, name
        assert layer.kernel_size == (kernel, kernel) and layer.stride == (stride, stride), name
    for before, after in (("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "f5"), ("c4", "f6"),
                          ("d8", "d9"), ("d9", "d10"), ("d10", "d11")):
        assert (outputs[before] < 0).any(), before                  # the check below is not vacuous
        assert torch.equal(inputs[after], torch.relu(outputs[before])), f"{before} -> ReLU -> {after}"
    assert (outputs["f5"] < 0).any() and torch.equal(mu, outputs["f5"].flatten(1))           # F5 linear
    assert torch.equal(logvar, outputs["f6"].flatten(1))
    torch.testing.assert_close(x_rec, torch.sigmoid(outputs["d11"]), rtol=0, atol=0)
    assert model.c1.in_channels == 3
    assert x_rec.shape == (5, 3, 28, 28) and mu.shape == logvar.shape == z.shape == (5, 64)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())     # fully convolutional
    assert model.mu_c.shape == model.logvar_c.shape == (20, 64) and model.pi_logits.shape == (20,)


def test_amp_keeps_f5_f6_in_fp32():
    """Under bf16 autocast the trunk runs in bf16 but F5/F6 (and so z and the energy) stay fp32.
    Mutation caught: encode()/encode_mean() without the autocast-disabled fp32 block."""
    torch.manual_seed(1)
    model = GMFCVAE(components=3)
    x = torch.rand(4, 3, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.trunk(x)
        mu, logvar = model.encode(x)
        mean_only = model.encode_mean(x)
    assert h.dtype == torch.bfloat16                                # autocast is really on
    assert mu.dtype == logvar.dtype == mean_only.dtype == torch.float32
    assert torch.equal(mu, model.f5(h.float()).flatten(1)) and torch.equal(mean_only, mu)


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


def test_sample_energy_far_from_every_component_is_finite_and_exact():
    """A latent 200 sigma from a tight mixture (all densities underflow to 0 in float32) still gets its exact
    energy, the nearest component's -log pi_c N(z | c). Mutation caught: -log(sum(pi * exp(log N))) instead
    of logsumexp (inf)."""
    mu_c = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    logvar_c = torch.full((2, 2), float(np.log(0.01)))
    pi_logits = torch.log(torch.tensor([0.25, 0.75]))
    z = torch.tensor([[21.0, 21.0]])                        # 200 sigma from component 1
    energy = gm.sample_energy(z, pi_logits, mu_c, logvar_c)
    nearest = -(np.log(0.75) - np.log(2 * np.pi * 0.01) - 0.5 * 2 * 20.0 ** 2 / 0.01)   # component 1
    assert torch.isfinite(energy).all()
    np.testing.assert_allclose(energy.item(), nearest, rtol=1e-6)


def test_training_epochs_lower_the_losses():
    """run_epoch on 400 square patches: auto-encoder pre-training lowers the squared error, then, from the
    mixture fitted to the pre-trained latents, VaDE epochs lower the loss of eq. 14 and move the mixture
    parameters too. Catches: an epoch that never updates the network (missing step, optimizer on the wrong
    parameters), the mixture left out of the VaDE optimizer or of the loss's graph."""
    torch.manual_seed(0)
    squares = moving_squares(400, 1, 28)            # one frame each: a bright 8x8 square on a dark patch
    patches = ((squares + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    cpu = torch.device("cpu")
    model = GMFCVAE(3, components=4)
    args = argparse.Namespace(seed=0, batch_size=100, amp=False)
    budget = common.TimeBudget(None)

    def epoch_means(optimizer, phase, epochs):
        return [gm.run_epoch(model, optimizer, patches, args, cpu, phase, {"epoch": e, "step": 0}, budget, phase)[1]
                for e in range(epochs)]

    optimizer = torch.optim.Adam(model.non_mixture_parameters(), lr=1e-3, weight_decay=5e-4)
    pretrain = epoch_means(optimizer, "pretrain", 4)
    assert pretrain[-1]["loss"] < 0.7 * pretrain[0]["loss"]
    gm.init_mixture_from_latents(model, patches, 4, 400, 0, cpu)
    mixture_before = [p.detach().clone() for p in model.mixture_params()]
    optimizer = torch.optim.Adam([{"params": model.non_mixture_parameters(), "weight_decay": 5e-4},
                                  {"params": list(model.mixture_params()), "weight_decay": 0.0}], lr=1e-4)
    vade = epoch_means(optimizer, "vade", 4)
    assert vade[-1]["loss"] < 0.8 * vade[0]["loss"]
    assert all(not torch.equal(b, p) for b, p in zip(mixture_before, model.mixture_params()))


def test_run_epoch_feeds_every_batch_to_the_given_step_and_times_it():
    """run_epoch with a step_fn (the CUDA-graph step's way in): every batch of the epoch's permutation goes
    to it in order, as float inputs in [0, 1] with the short batch last, and a steps/s figure comes back
    (common.StepRate's own test checks how it is timed). Catches: step_fn ignored (the eager step run
    instead), a batch skipped or repeated, the wrong permutation."""
    patches = torch.arange(250, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 28, 28).contiguous()
    args = argparse.Namespace(seed=3, batch_size=100, amp=False)
    seen = []

    def step_fn(x):
        seen.append(x)
        return torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0)

    done, stats = gm.run_epoch(torch.nn.Identity(), None, patches, args, torch.device("cpu"), "vade",
                               {"epoch": 2, "step": 0}, common.TimeBudget(None), "test", step_fn)
    assert done and [tuple(x.shape) for x in seen] == [(100, 3, 28, 28), (100, 3, 28, 28), (50, 3, 28, 28)]
    order = gm.epoch_order(250, 3, "vade", 2)
    np.testing.assert_allclose(torch.cat(seen)[:, 0, 0, 0].numpy(), order.numpy() / 255, rtol=1e-6)
    assert stats["loss"] == 1.0 and stats["steps_per_s"] > 0


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


# ----------------------------------------------------------------------------------------------- scoring
def _scoring_setup(T=6, K=3, seed=0):
    torch.manual_seed(seed)
    models = {s: GMFCVAE(components=K).eval() for s in ("rgb", "flow")}
    with torch.no_grad():
        for m in models.values():
            m.logvar_c.fill_(-1.0)
            m.mu_c.normal_()
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (T, 56, 84), dtype=np.uint8)
    flows = (rng.integers(-60, 60, (T - 1, 56, 84, 2)) / 16).astype(np.float16)
    return models, frames, flows


def _straightforward_grids(models, frames, flows, args, scale):
    """One frame, one patch at a time: the energy of every 28x28 cell by slicing."""
    T, H, W = frames.shape
    gh, gw = H // 28, W // 28
    out = {s: np.zeros((T, gh, gw)) for s in models}
    with torch.no_grad():
        for i in range(T):
            image = gm.dynamic_flow_uint8(gm.rank_pool_flows(flows, [i], args.window, args.flow_window), scale)[0]
            for r in range(gh):
                for c in range(gw):
                    cell = (slice(r * 28, (r + 1) * 28), slice(c * 28, (c + 1) * 28))
                    rgb = torch.from_numpy(np.repeat(frames[i][cell][None, None], 3, 1)).float() / 255
                    out["rgb"][i, r, c] = gm.sample_energy(models["rgb"].encode(rgb)[0], *models["rgb"].mixture_params())
                    flow = image[(slice(None),) + cell][None].float() / 255
                    out["flow"][i, r, c] = gm.sample_energy(models["flow"].encode(flow)[0],
                                                            *models["flow"].mixture_params())
    return out


def test_score_video_against_straightforward_per_patch_computation():
    """Device dynamic flow + grid patches + batched energies + fusion weights equal a per-frame, per-patch
    computation, for any frames-per-batch with and without the fixed-shape padding (chunk invariance).
    Mutations caught: fusion with 0.5/0.5 or swapped weights instead of alpha/beta; the padded rows of the
    last batch written back (no [:n]); the chunk's frame ids offset by one (window misaligned); grid rows and
    columns transposed."""
    models, frames, flows = _scoring_setup()
    args = _args(alpha=0.3, beta=0.7)
    expect = _straightforward_grids(models, frames, flows, args, 40.0)
    frames_t = torch.from_numpy(frames[:, None])
    for fpb, fixed in ((1, False), (4, True), (4, False), (6, True), (8, True)):
        grids = gm.score_video(models, frames_t, torch.from_numpy(flows), args, 40.0, fpb, fixed)
        for s in ("rgb", "flow"):
            np.testing.assert_allclose(grids[s].numpy(), expect[s], rtol=1e-4, atol=1e-3, err_msg=f"{s} {fpb}")
        np.testing.assert_allclose(grids["fused"].numpy(), 0.3 * expect["rgb"] + 0.7 * expect["flow"],
                                   rtol=1e-4, atol=1e-3)


def test_score_video_does_not_evaluate_f6():
    """Mutation caught: the test path calling encode() (F5 and F6) instead of encode_mean()."""
    models, frames, flows = _scoring_setup(T=3)
    calls = []
    for m in models.values():
        m.f6.register_forward_hook(lambda *a: calls.append(1))
        m.f5.register_forward_hook(lambda *a: calls.append(5))
    gm.score_video(models, torch.from_numpy(frames[:, None]), torch.from_numpy(flows), _args(), 40.0, 3, False)
    assert 5 in calls and 1 not in calls


def test_static_cells_and_unscorable_frames_are_filled_as_documented():
    """skip mode: static cells are -inf in score_video and take the run's lowest energy in finish_scores;
    a one-frame video (no flow) keeps NaN motion and fused frame scores, with finite maps.
    Mutations caught: NaN frames overwritten by the floor (the old np.where(isnan, floor)); static cells
    left at their energy in skip mode; the floor taken from -inf cells."""
    models, frames, flows = _scoring_setup(T=4)
    frames = frames.copy()
    frames[:] = frames[0]                                   # nothing moves ...
    frames[1:, 28:56, 0:28] = 255 - frames[0, 28:56, 0:28]  # ... except cell (1, 0) between frames 0 and 1
    args = _args(static_test_patches="skip")
    grids = gm.score_video(models, torch.from_numpy(frames[:, None]), torch.from_numpy(flows), args, 40.0, 4, False)
    moving = np.zeros((4, 2, 3), bool)
    moving[0:1, 1, 0] = True                                # frame pair (0, 1) only
    for s in ("rgb", "flow", "fused"):
        g = grids[s].numpy()
        assert np.isneginf(g[~moving]).all() and np.isfinite(g[moving]).all(), s
    one = gm.score_video(models, torch.from_numpy(frames[:1, None]), torch.zeros(0, 56, 84, 2), _args(), 40.0, 4,
                         False)
    assert np.isfinite(one["rgb"].numpy()).all() and np.isnan(one["flow"].numpy()).all()
    assert np.isnan(one["fused"].numpy()).all()
    scores, maps = gm.finish_scores({"a": grids["fused"].numpy(), "b": one["fused"].numpy()}, reference=0.0)
    lowest = grids["fused"].numpy()[moving].min()
    assert np.isnan(scores["b"]).all() and np.isfinite(scores["a"]).all()
    np.testing.assert_allclose(scores["a"][1:], lowest)     # frames with no moving cell: the run's floor
    assert all(np.isfinite(m.astype(np.float16)).all() for m in maps.values())


def test_stored_maps_fit_float16_and_keep_the_order():
    """Energies from below the reference to 3e38 stay finite and strictly ordered once written as float16
    (scores.npz), including two energies 0.4 apart near 2000 that float16 itself cannot tell apart.
    Mutation caught: storing raw energies (inf above 65504, ties at 2000 / 2000.4)."""
    energies = np.array([1500.0, 1980.0, 1995.0, 2000.0, 2000.4, 7e4, 1e6, 3e38], np.float32)
    stored = gm.map_values(energies[:, None, None], reference=1990.0).astype(np.float16)   # what write_scores keeps
    assert stored.shape == (8, 4, 4) and (stored == stored[:, :1, :1]).all()              # x4 nearest blocks
    values = stored[:, 0, 0].astype(np.float64)
    assert np.isfinite(values).all() and (np.diff(values) > 0).all(), values


# ------------------------------------------------------------------------------------------ settings / flags
def _parse(argv):
    return gm.fill_defaults(common.parse_args(gm.build_parser(), argv + ["--device", "cpu"]))


def test_paper_defaults_static_patches_and_protocol_label():
    """Real data: every cell scored (paper) and 'paper protocol' with our epoch choice named; skip is an option
    recorded with its threshold. Mutations caught: skip as the real-data default; a protocol string that says
    'paper protocol' with skipped patches or a reduced patch count; the old --frame-size flag still accepted."""
    args = _parse(["--dataset", "ped2"])
    assert args.static_test_patches == "score" and args.image_size == (280, 420) and args.window == 20
    label = gm.protocol_string(args)
    assert label.startswith("paper protocol;") and "10 AE pre-training + 10 VaDE epochs" in label
    skip = gm.protocol_string(_parse(["--dataset", "ped2", "--static-test-patches", "skip", "--motion-threshold", "9"]))
    assert skip.startswith("REDUCED") and "static test patches skipped" in skip and "difference > 9" in skip
    assert gm.protocol_string(_parse(["--dataset", "ped2", "--max-train-patches", "40000"])).startswith("REDUCED")
    assert _parse(["--dataset", "synthetic"]).static_test_patches == "skip"
    assert _parse(["--dataset", "ped2", "--image-size", "140"]).image_size == (140, 140)
    with pytest.raises(SystemExit):
        _parse(["--dataset", "ped2", "--frame-size", "280", "420"])


def test_image_size_must_tile_the_frame():
    """A frame size that is not a multiple of 28 would leave the grid short of the frame while the map is
    stretched over it: one clear error. Mutation caught: the divisibility check removed."""
    with pytest.raises(common.DataError, match="multiples of 28"):
        _parse(["--dataset", "ped2", "--image-size", "240", "360"])
    with pytest.raises(common.DataError, match="test-stride"):
        _parse(["--dataset", "ped2", "--test-stride", "10"])


# ------------------------------------------------------------------------------------- training plumbing
class StopTest(Exception):
    pass


TINY = ["--dataset", "synthetic", "--max-train-patches", "300", "--pretrain-epochs", "1", "--gmm-fit-patches", "300",
        "--num-panels", "0", "--device", "cpu"]


def test_nan_loss_stops_training_and_saves_nothing(shared_cache, tmp_path, monkeypatch):
    """Mutation caught: no finiteness check of the summed losses (LossMonitor) before the checkpoint is saved."""
    monkeypatch.setattr(GMFCVAE, "decode", lambda self, z: (z[:, :1, None, None] * float("nan")).expand(-1, 3, 28, 28))
    out = tmp_path / "run"
    with pytest.raises(common.TrainingError):
        gm.main(TINY + ["--streams", "rgb", "--epochs", "1", "--train", "--cache-dir", shared_cache, "--out", str(out)])
    assert not (out / "model.pt").exists()


def test_checkpoint_resume_flow_scale_and_test_only_settings(shared_cache, tmp_path, capsys, monkeypatch):
    """An appearance-only model.pt, then a two-stream --resume in the same folder: the flow scale is estimated
    (not the 1.0 the old code saved and kept); a resume with another --window is refused; a test-only run
    takes window and size from model.pt and warns. Mutations caught: saving flow_scale 1.0 for an rgb-only
    run; no restore_training_args in a test-only run; no RESUME_KEYS check."""
    out = str(tmp_path / "run")
    gm.main(TINY + ["--streams", "rgb", "--epochs", "1", "--train", "--cache-dir", shared_cache, "--out", out])
    state = common.load_checkpoint(os.path.join(out, "model.pt"))
    assert state["progress"]["rgb"] == {"phase": "vade", "epoch": 1, "step": 0} and state["flow_scale"] is None
    assert state["optimizer"]["stream"] == "rgb" and "rgb" in state["energy_reference"]
    first = {k: v.clone() for k, v in state["models"]["rgb"].items()}
    with pytest.raises(common.DataError, match="--window"):
        gm.main(TINY + ["--streams", "both", "--window", "5", "--epochs", "1", "--train", "--resume",
                        "--cache-dir", shared_cache, "--out", out])
    # resume with both streams: rgb goes on for a second epoch, flow trains with an estimated scale
    gm.main(TINY + ["--streams", "both", "--epochs", "2", "--train", "--resume", "--cache-dir", shared_cache,
                    "--out", out])
    state = common.load_checkpoint(os.path.join(out, "model.pt"))
    assert state["progress"]["rgb"]["epoch"] == 2 and state["progress"]["flow"]["epoch"] == 2
    assert any(not torch.equal(first[k], v) for k, v in state["models"]["rgb"].items())
    ds = common.load_dataset("synthetic", cache_dir=shared_cache)
    flows = common.load_split_flows(ds, "train", (112, 168), cache_dir=shared_cache)
    expect = gm.estimate_flow_scale(flows, _parse(["--dataset", "synthetic"]))
    assert state["flow_scale"] == pytest.approx(expect) and expect > 1.0
    # test-only: the training settings come from model.pt (the test itself is stubbed out: settings only)
    seen = {}

    def fake_test(args, ds, models, checkpoint, gray, device):
        seen.update(args=args, streams=set(models))
        raise StopTest
    monkeypatch.setattr(gm, "test", fake_test)
    capsys.readouterr()
    with pytest.raises(StopTest):
        gm.main(["--dataset", "synthetic", "--test", "--window", "7", "--image-size", "56", "--epochs", "9",
                 "--device", "cpu", "--cache-dir", shared_cache, "--out", out])
    err = capsys.readouterr().err
    assert "--window 7 ignored" in err and "--image-size 56 56 ignored" in err
    args = seen["args"]
    assert args.window == 8 and args.image_size == (112, 168) and args.epochs == 2 and seen["streams"] == {"rgb", "flow"}
    assert "1 AE pre-training + 2 VaDE epochs" in gm.protocol_string(args)


def test_sliced_training_equals_uninterrupted(shared_cache, tmp_path, monkeypatch, capsys):
    """--max-minutes slices + --resume end with the same weights (both streams, AE pre-training and VaDE,
    mixture, Adam state, RNG incl. the VaDE sampling noise) as one uninterrupted run, bit for bit on CPU.
    Mutations caught: RNG state not restored on resume; the optimizer state not saved at a stop; the epoch
    restarted from step 0; the step counter advanced past a step that did not run."""
    argv = TINY + ["--streams", "both", "--epochs", "1", "--train", "--cache-dir", shared_cache]
    whole = str(tmp_path / "whole")
    gm.main(argv + ["--out", whole])
    sliced = str(tmp_path / "sliced")
    calls = {"n": 0}

    def expired(self):
        calls["n"] += 1
        return calls["n"] % 3 == 0                     # every slice runs 2 steps, then the budget is spent
    monkeypatch.setattr(common.TimeBudget, "expired", expired)
    slices = 0
    while True:
        capsys.readouterr()
        gm.main(argv + ["--out", sliced, "--max-minutes", "5"] + (["--resume"] if slices else []))
        slices += 1
        if "continue with:" not in capsys.readouterr().out:
            break
        assert slices < 40
    assert slices >= 5                                  # stops in both phases of both streams
    a = common.load_checkpoint(os.path.join(whole, "model.pt"))
    b = common.load_checkpoint(os.path.join(sliced, "model.pt"))
    for s in ("rgb", "flow"):
        for k, v in a["models"][s].items():
            assert torch.equal(v, b["models"][s][k]), (s, k)
    assert a["flow_scale"] == b["flow_scale"] and a["energy_reference"] == b["energy_reference"]


def test_end_to_end_synthetic_defaults(shared_cache, tmp_path):
    """`python gmfc_vae.py --dataset synthetic` reaches frame AUC >= 0.75 and reports each stream alone.
    Unlike stan's, adv3dae's and gan_flow's synthetic runs, this bar also needs the training: the same run
    stopped after its first step scores 0.672 (trained: 0.966)."""
    out = tmp_path / "run"
    gm.main(["--dataset", "synthetic", "--device", "cpu", "--cache-dir", shared_cache, "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    frame_scores, maps, meta = __import__("eval").read_scores(str(out / "scores.npz"))
    assert maps["Test001"].shape == (80, 4 * 4, 6 * 4)            # 4x6 grid (112x168 frames), x4 nearest
    assert meta["method"] == "gmfc_vae" and meta["streams"] == "both"
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    # each stream alone from the same run (Table VI), with its own scores file
    for s in ("rgb", "flow"):
        alone = metrics["streams"][s]
        assert 0.0 <= alone["frame_auc_micro"] <= 1.0 and alone["pixel_auc"] is not None
        assert (out / f"scores_{s}.npz").exists()
    assert metrics["run_protocol"].startswith("REDUCED")


def test_moving_grid_matches_training_rule():
    frames = np.full((3, 56, 84), 90, np.uint8)
    frames[1, 30:33, 60:63] = 200                                  # changes between frames 0/1 and 1/2
    grid = gm.moving_grid(torch.from_numpy(frames[:, None]), 28, 15.0, 1).numpy()
    assert grid.shape == (3, 2, 3)
    expect = np.zeros((3, 2, 3), bool)
    expect[0, 1, 2] = expect[1, 1, 2] = True                       # the last frame reuses the pair (1, 2)
    expect[2] = expect[1]
    np.testing.assert_array_equal(grid, expect)
