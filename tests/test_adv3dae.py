"""Tests for adv3dae.py (Sun et al., IEEE TMM 2021): shapes of Fig. 2 / Table VII, max-unpooling at the recorded
locations, the denoising noise (training only), eq. 14, the losses of eq. 7-12, Hasan's strided clips, the clip
aggregation at test time, checkpoint/resume, NaN handling and an end-to-end synthetic run."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import adv3dae
import common
from adv3dae import Adv3DAE, Discriminator3D, FrameStream, paper_score


def tiny_args(tmp_path, cache, *extra):
    """A fast configuration for plumbing tests (not for accuracy)."""
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(tmp_path / "run"), "--size", "32,48",
            "--channels", "4,4,4,4,4", "--train-step", "40", "--batch-size", "4", "--device", "cpu",
            "--map-pool", "2", *extra]


# ----------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("layers, code_shape, pooled_sizes", [
    (10, (128, 2, 14, 14), [(32, 16, 224, 224), (64, 16, 112, 112), (128, 8, 56, 56), (128, 4, 28, 28)]),
    (6, (128, 8, 56, 56), [(32, 16, 224, 224), (64, 16, 112, 112)]),
])
def test_encoder_decoder_shapes_224(layers, code_shape, pooled_sizes):
    torch.manual_seed(0)
    ae = Adv3DAE(1, layers=layers).eval()
    convs = sum(isinstance(m, nn.Conv3d) for m in ae.modules())
    deconvs = sum(isinstance(m, nn.ConvTranspose3d) for m in ae.modules())
    assert convs + deconvs == layers and convs == deconvs
    assert [p.kernel_size for p in ae.pools] == [(1, 2, 2)] + [(2, 2, 2)] * (layers // 2 - 2)
    assert all(m.kernel_size == (3, 3, 3) and m.stride == (1, 1, 1)
               for m in ae.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)))
    # BN + tanh after every layer except the last (linear) de-convolution
    assert sum(isinstance(m, nn.BatchNorm3d) for m in ae.modules()) == layers - 1
    assert isinstance(ae.decoder_deconvs[0], nn.ConvTranspose3d)
    x = torch.randn(1, 1, 16, 224, 224)
    with torch.inference_mode():
        code, switches = ae.encode(x)
        assert tuple(code.shape) == (1,) + code_shape
        assert [tuple(size[1:]) for _, size in switches] == pooled_sizes
        out = ae.decode(code, switches)
    assert out.shape == x.shape


def test_six_layer_is_ten_layer_without_last_two_encoder_layers():
    ten, six = Adv3DAE(1, layers=10), Adv3DAE(1, layers=6)
    assert six.channels == ten.channels[:3]
    assert len(six.pools) == 2 and len(ten.pools) == 4
    assert sum(p.numel() for p in six.parameters()) < sum(p.numel() for p in ten.parameters())


def test_discriminator_output_shape_and_structure():
    torch.manual_seed(0)
    d = Discriminator3D(1, 16, (224, 224))
    kinds = [type(m) for m in d.modules()]
    assert kinds.count(nn.Conv3d) == 3 and kinds.count(nn.MaxPool3d) == 3 and kinds.count(nn.Linear) == 2
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    with torch.inference_mode():
        logits = d(torch.randn(2, 1, 16, 224, 224))
    assert logits.shape == (2, 1)
    small = Discriminator3D(3, 16, (64, 96))
    with torch.inference_mode():
        p = small.probability(torch.randn(3, 3, 16, 64, 96))
    assert p.shape == (3, 1) and bool(((p > 0) & (p < 1)).all())


# ----------------------------------------------------------------------------------------------- unpooling

def test_unpool_restores_values_at_recorded_indices():
    torch.manual_seed(1)
    ae = Adv3DAE(1, (3, 3, 3), layers=6)
    x = torch.randn(1, 3, 4, 6, 8)
    for pool, unpool in zip(ae.pools, ae.unpools):
        pooled, idx = pool(x)
        y = unpool(pooled, idx, output_size=x.shape).numpy()
        # independent reference: every window's maximum stays where it was, everything else is 0
        kt, kh, kw = pool.kernel_size
        xn = x.numpy()
        ref = np.zeros_like(xn)
        for c in range(3):
            for t in range(0, 4, kt):
                for i in range(0, 6, kh):
                    for j in range(0, 8, kw):
                        win = xn[0, c, t:t + kt, i:i + kh, j:j + kw]
                        a, b, d = np.unravel_index(np.argmax(win), win.shape)
                        ref[0, c, t + a, i + b, j + d] = win[a, b, d]
        np.testing.assert_array_equal(y, ref)


def test_decoder_unpools_at_the_encoders_locations():
    """Inside the model, the unpooled map is non-zero only where the encoder's pool found its maxima."""
    torch.manual_seed(2)
    ae = Adv3DAE(1, (4, 4, 4, 4, 4), layers=10).eval()
    seen = {}
    ae.pools[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("pre", inp[0].detach().clone()))
    ae.unpools[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("unpooled", out.detach().clone()))
    with torch.no_grad():
        ae(torch.randn(2, 1, 16, 32, 32))
    pre, unpooled = seen["pre"], seen["unpooled"]
    # the argmax positions of every 1x2x2 window of the pre-pool activation
    _, idx = nn.functional.max_pool3d(pre, (1, 2, 2), return_indices=True)
    is_max = torch.zeros_like(pre).flatten(2)
    is_max.scatter_(2, idx.flatten(2), 1.0)
    is_max = is_max.view_as(pre).bool()
    assert bool((unpooled[~is_max] == 0).all())
    assert bool((unpooled[is_max] != 0).float().mean() > 0.9)
    # putting the values at the upper-left corner instead (Table V "w/o recording locations") is different
    assert not torch.equal(is_max, torch.zeros_like(is_max).index_fill_(3, torch.arange(0, 32, 2), True)
                           .logical_and(torch.zeros_like(is_max).index_fill_(4, torch.arange(0, 32, 2), True)))


# ----------------------------------------------------------------------------------------------- noise

def test_noise_on_in_training_off_in_testing():
    torch.manual_seed(3)
    noise = adv3dae.GaussianNoise(0.005)
    x = torch.zeros(200_000)
    noise.train()
    eta = noise(x)
    assert abs(eta.std().item() - 0.005) < 2e-4 and abs(eta.mean().item()) < 1e-4
    noise.eval()
    assert torch.equal(noise(x), x)

    ae = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.005)
    with torch.no_grad():                       # make the output depend on the input
        nn.init.normal_(ae.decoder_deconvs[0].weight, std=0.1)
    clean = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.0)
    clean.load_state_dict(ae.state_dict())
    x = torch.randn(2, 1, 16, 16, 16) * 0.05
    with torch.no_grad():
        ae.train()
        a, b = ae(x), ae(x)
        assert not torch.equal(a, b)            # fresh noise each call (BN in train mode is deterministic)
        clean.train()
        assert torch.equal(clean(x), clean(x))  # --no-noise: deterministic in training too
        clean.load_state_dict(ae.state_dict())  # same BN running statistics
        ae.eval(), clean.eval()
        assert torch.equal(ae(x), ae(x))
        assert torch.equal(ae(x), clean(x))     # no noise at test time


# ----------------------------------------------------------------------------------------------- maths

def test_paper_score_eq14_hand_worked():
    np.testing.assert_allclose(paper_score(np.array([2.0, 4.0, 6.0])), [0.0, 1 / 3, 2 / 3], rtol=1e-6)
    # not min-max: (e - min) / max never reaches 1 unless min is 0
    e = np.array([5.0, 10.0, 7.5])
    np.testing.assert_allclose(paper_score(e), [0.0, 0.5, 0.25], rtol=1e-6)
    assert paper_score(e).max() < 1.0
    np.testing.assert_allclose(paper_score(np.array([0.0, 1.0, 4.0])), [0.0, 0.25, 1.0])
    s = paper_score(np.array([1.0, np.nan, 3.0]))
    assert np.isnan(s[1]) and np.allclose(s[[0, 2]], [0.0, 2 / 3])
    assert np.all(paper_score(np.zeros(4)) == 0)


def test_paper_score_random_against_direct_formula():
    rng = np.random.default_rng(0)
    e = rng.gamma(2.0, 0.01, size=300)
    np.testing.assert_allclose(paper_score(e), (e - e.min()) / e.max(), rtol=1e-5)


def test_losses_match_hand_computation():
    torch.manual_seed(4)
    r, s = torch.randn(3, 1, 16, 8, 8), torch.randn(3, 1, 16, 8, 8)
    np.testing.assert_allclose(adv3dae.reconstruction_loss(r, s).item(),
                               ((r - s).numpy() ** 2).reshape(3, -1).sum(1).mean(), rtol=1e-5)
    real, fake = torch.tensor([[0.3], [-1.2]]), torch.tensor([[2.0], [-0.5]])
    sig = lambda z: 1 / (1 + np.exp(-z.numpy()))
    want_d = np.mean(-np.log(sig(real))) + np.mean(-np.log(1 - sig(fake)))
    np.testing.assert_allclose(adv3dae.discriminator_loss(real, fake).item(), want_d, rtol=1e-5)
    np.testing.assert_allclose(adv3dae.adversarial_loss(fake).item(), np.mean(-np.log(sig(fake))), rtol=1e-5)
    # a fully confused discriminator (D = 1/2) gives L_D = 2 ln 2, the level of the paper's Fig. 3
    z = torch.zeros(4, 1)
    np.testing.assert_allclose(adv3dae.discriminator_loss(z, z).item(), 2 * np.log(2), rtol=1e-6)


def test_train_step_simultaneous_updates_without_cross_talk():
    """theta moves by L_R = L_rec + lambda L_adv only, phi by L_D only, both from the same forward pass."""
    torch.manual_seed(5)
    ae = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.0)
    d = Discriminator3D(1, 16, (64, 64), channels=(4, 4, 4), hidden=8)
    with torch.no_grad():
        nn.init.normal_(ae.decoder_deconvs[0].weight, std=0.1)
    ae_ref, d_ref = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.0), Discriminator3D(1, 16, (64, 64), (4, 4, 4), 8)
    ae_ref.load_state_dict(ae.state_dict()), d_ref.load_state_dict(d.state_dict())
    x = torch.randn(2, 1, 16, 64, 64) * 0.1
    opt_ae, opt_d = torch.optim.SGD(ae.parameters(), lr=0.01), torch.optim.SGD(d.parameters(), lr=0.01)
    lam = 0.7
    adv3dae.train_step(ae, d, opt_ae, opt_d, x, lam)
    # reference, computed separately
    ae_ref.train(), d_ref.train()
    recon = ae_ref(x)
    l_r = adv3dae.reconstruction_loss(recon, x) + lam * adv3dae.adversarial_loss(d_ref(recon))
    g_ae = torch.autograd.grad(l_r, list(ae_ref.parameters()))
    l_d = adv3dae.discriminator_loss(d_ref(x), d_ref(recon.detach()))
    g_d = torch.autograd.grad(l_d, list(d_ref.parameters()))
    with torch.no_grad():
        for p, p0, g in zip(ae.parameters(), ae_ref.parameters(), g_ae):
            torch.testing.assert_close(p, p0 - 0.01 * g, rtol=1e-4, atol=1e-6)
        for p, p0, g in zip(d.parameters(), d_ref.parameters(), g_d):
            torch.testing.assert_close(p, p0 - 0.01 * g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- data

def test_hasan_strided_training_clips():
    specs = adv3dae.training_clip_specs([40, 20], 16, skips=(1, 2, 3), step=1)
    want = [(v, s, k) for v, t in enumerate([40, 20]) for k in (1, 2, 3) for s in range(t)
            if s + k * 15 <= t - 1]
    assert sorted(map(tuple, specs.tolist())) == sorted(want)
    idx = adv3dae.clip_frame_indices(specs, 16)
    row = [i for i, r in enumerate(specs.tolist()) if r == [0, 3, 2]][0]
    assert idx[row].tolist() == list(range(3, 34, 2))
    stepped = adv3dae.training_clip_specs([40], 16, skips=(1,), step=8)
    assert stepped[:, 1].tolist() == [0, 8, 16, 24]
    frames = [np.arange(40)[:, None, None] * np.ones((1, 2, 3), np.uint8)]
    clips = adv3dae.gather_clips(frames, np.array([[0, 3, 2]]), 16)
    assert clips.shape == (1, 16, 2, 3) and clips[0, :, 0, 0].tolist() == list(range(3, 34, 2))


def test_frame_stream_mean_image():
    rng = np.random.default_rng(0)
    vids = [rng.integers(0, 256, (5, 4, 6), dtype=np.uint8), rng.integers(0, 256, (3, 4, 6), dtype=np.uint8)]
    mean = FrameStream.fit_stats(vids)["mean_image"].numpy()
    np.testing.assert_allclose(mean, np.concatenate(vids).astype(np.float64).mean(0) / 255.0, rtol=1e-6)
    x = FrameStream(torch.from_numpy(mean)).to_input(torch.from_numpy(vids[0][None]))
    assert x.shape == (1, 1, 5, 4, 6)
    np.testing.assert_allclose(x[0, 0].numpy(), vids[0] / 255.0 - mean, atol=1e-6)


class ZeroAE(nn.Module):
    """Reconstructs every clip as 0, so the squared error is the (mean-subtracted) input squared."""

    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("stride", [16, 5])
def test_score_videos_aggregates_clips_per_frame(stride):
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (37, 8, 12), dtype=np.uint8), rng.integers(0, 256, (9, 8, 12), dtype=np.uint8)]
    mean = np.full((8, 12), 0.5, np.float32)
    args = type("A", (), dict(device=torch.device("cpu"), amp=False, test_stride=stride, test_batch_size=3, map_pool=2))
    errors, maps = adv3dae.score_videos(ZeroAE(), FrameStream(torch.from_numpy(mean)), videos, [37, 9], args)
    for v, e, m in zip(videos, errors, maps):
        sq = (v / 255.0 - mean) ** 2
        # each clip gives the same per-frame error, so the mean over the clips holding a frame is that error
        np.testing.assert_allclose(e, sq.mean((1, 2)), rtol=1e-5)
        np.testing.assert_allclose(m, sq.reshape(len(v), 4, 2, 6, 2).mean((2, 4)), rtol=1e-5)


def test_combine_streams_averages_eq14_scores():
    e = {"rgb": [np.array([1.0, 2.0, 4.0])], "flow": [np.array([10.0, 30.0, 20.0])]}
    maps = {"rgb": [np.ones((3, 2, 2))], "flow": [np.full((3, 2, 2), 3.0)]}
    scores, out = adv3dae.combine_streams(e, maps, 1)
    np.testing.assert_allclose(scores[0], (np.array([0, 0.25, 0.75]) + np.array([0, 2 / 3, 1 / 3])) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[0].astype(np.float32), (1 / 4 + 3 / 30) / 2, rtol=1e-3)
    single, _ = adv3dae.combine_streams({"rgb": e["rgb"]}, {"rgb": maps["rgb"]}, 1)
    np.testing.assert_allclose(single[0], [0, 0.25, 0.75], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- runs

def test_checkpoint_resume_and_test_only(tmp_path, shared_cache, capsys):
    out = tmp_path / "run"
    adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "1", "--train"))
    state = common.load_checkpoint(str(out / "model.pt"))
    assert state["epoch"] == 0 and state["args"]["epochs"] == 1
    assert set(state["streams"]["rgb"]) == {"ae", "disc", "opt_ae", "opt_d"}
    adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "2", "--train", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    state2 = common.load_checkpoint(str(out / "model.pt"))
    assert state2["epoch"] == 1 and state2["train_time_s"] >= state["train_time_s"]
    # test-only takes the architecture from model.pt even when the command line says otherwise
    args = tiny_args(tmp_path, shared_cache, "--test")
    args[args.index("--channels") + 1] = "8,8,8,8,8"
    result = adv3dae.main(args)
    assert os.path.exists(out / "scores.npz") and os.path.exists(out / "metrics.json")
    assert 0.0 <= result["frame_auc_micro"] <= 1.0
    with np.load(out / "scores.npz") as z:
        assert z["map/Test001"].dtype == np.float16 and z["map/Test001"].shape[1:] == (16, 24)
        f = z["frame/Test001"]
        assert np.isfinite(f).all() and f.min() == 0.0 and f.max() < 1.0     # eq. 14
        assert json.loads(str(z["meta"]))["protocol"]["normalize"] == "none"


def test_nan_loss_stops_training(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setattr(adv3dae, "reconstruction_loss", lambda recon, clean: (recon - clean).sum() * float("nan"))
    with pytest.raises(common.TrainingError, match="non-finite"):
        adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "1", "--train"))
    assert not os.path.exists(tmp_path / "run" / "model.pt")


def test_end_to_end_synthetic_defaults(tmp_path, shared_cache):
    """`python adv3dae.py --dataset synthetic` with its defaults reaches frame AUC >= 0.75."""
    out = tmp_path / "e2e"
    adv3dae.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    assert metrics["test_fps"] > 0 and metrics["train_time_s"] > 0
    assert metrics["events"]["total"] > 0


def test_flow_variant_two_streams(tmp_path, shared_cache):
    """--flow (Table IX): an independent flow auto-encoder + discriminator, scores combined per eq. 14."""
    result = adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "1", "--flow", "--workers", "1",
                                    "--layers", "6", "--no-gan"))
    state = common.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert set(state["streams"]) == {"rgb", "flow"} and state["streams"]["flow"]["disc"] is None
    assert state["stats"]["flow_mean_image"].shape == (32, 48, 3)
    assert 0.0 <= result["frame_auc_micro"] <= 1.0
    with np.load(tmp_path / "run" / "raw_errors.npz") as z:
        assert {"rgb/Test001", "flow/Test001"} <= set(z.files)
