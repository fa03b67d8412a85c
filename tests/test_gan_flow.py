"""Tests for gan_flow.py (Ravanbakhsh et al. 2017): pix2pix shapes, losses, flow image, fusion, AlexNet
weights, checkpoint/resume, NaN handling and an end-to-end synthetic run."""

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import gan_flow
from gan_flow import (AlexNetConv5, PatchDiscriminator, UNetGenerator, discriminator_loss, flow_to_image,
                      fuse_video, generator_loss)
from torchvision_alexnet import TORCHVISION_ALEXNET_FEATURES


# ----------------------------------------------------------------------------------------------- shapes
def test_unet256_shapes_and_layout():
    torch.manual_seed(0)
    g = UNetGenerator(1, 3, image_size=256, ngf=64)
    assert len(g.down) == 8 and len(g.up) == 7  # + the final up-convolution = 8 up
    convs = [m for m in g.down.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    # pix2pix decoder CD512-CD1024-CD1024-C1024-C1024-C512-C256-C128: inputs incl. skips, then output 3
    assert [u.in_channels for u in ups] == [512, 1024, 1024, 1024, 1024, 512, 256, 128]
    assert ups[-1].out_channels == 3
    dropouts = [i for i, block in enumerate(g.up) if any(isinstance(m, gan_flow.AlwaysDropout) for m in block)]
    assert dropouts == [0, 1, 2]
    with torch.inference_mode():
        out = g(torch.randn(1, 1, 256, 256))
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1.0
    with torch.inference_mode():
        assert UNetGenerator(3, 1, image_size=256, ngf=8)(torch.randn(2, 3, 256, 256)).shape == (2, 1, 256, 256)
    # the synthetic default: 64x64 with 6 levels
    small = UNetGenerator(1, 3, image_size=64, ngf=32)
    assert len(small.down) == 6
    with torch.inference_mode():
        assert small(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_dropout_is_noise_z_kept_at_test_time():
    torch.manual_seed(0)
    g = UNetGenerator(1, 3, image_size=64, ngf=8).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        assert not torch.allclose(g(x), g(x))
    g0 = UNetGenerator(1, 3, image_size=64, ngf=8, dropout=0.0).eval()
    with torch.inference_mode():
        assert torch.allclose(g0(x), g0(x))


def test_patchgan_grid_and_receptive_field():
    d = PatchDiscriminator(1 + 3, ndf=64)
    with torch.inference_mode():
        out = d(torch.randn(1, 1, 256, 256), torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    receptive = 1
    for c in reversed(convs):
        receptive = receptive * c.stride[0] + (c.kernel_size[0] - c.stride[0])
    assert receptive == 70


# ----------------------------------------------------------------------------------------------- losses
def test_pix2pix_losses_hand_checked():
    real, fake = torch.tensor([[[[2.0]]]]), torch.tensor([[[[-1.0]]]])
    # D: 0.5 * (-log sigmoid(2) - log(1 - sigmoid(-1))) = 0.5 * (log(1 + e^-2) + log(1 + e^-1))
    expected_d = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)))
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    generated = torch.tensor([0.5, -0.5, 0.25, 0.0])
    target = torch.zeros(4)
    total, adversarial, l1 = generator_loss(fake, generated, target, l1_weight=100.0)
    # G: -log sigmoid(-1) = log(1 + e); L1 mean = (0.5 + 0.5 + 0.25 + 0) / 4 = 0.3125
    assert adversarial.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert l1.item() == pytest.approx(0.3125)
    assert total.item() == pytest.approx(math.log(1 + math.e) + 31.25, rel=1e-6)


# ----------------------------------------------------------------------------------------------- scoring maths
def test_flow_image_encoding():
    flow = np.array([[[[0.0, 0.0], [1.0, 0.0]], [[-3.0, 4.0], [10.0, -0.5]]]], np.float16)  # (1, 2, 2, 2)
    img = flow_to_image(torch.from_numpy(flow), scale=5.0).numpy()
    s = 5.0
    dx, dy = flow[..., 0].astype(np.float64) / s, flow[..., 1].astype(np.float64) / s
    expected = np.clip(np.stack([dx, dy, 2 * np.hypot(dx, dy) - 1], axis=1), -1, 1)
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert img[0, :, 0, 0].tolist() == [0.0, 0.0, -1.0]       # no motion
    assert img[0, 2, 1, 0] == pytest.approx(1.0)               # |(-3, 4)| = 5 = s -> top of the range


def reference_fusion(delta_O, delta_S, lam, streams):
    """Equations 4-5 with numpy and OpenCV (bilinear upsampling with pixel-centre alignment)."""
    size = delta_O.shape[-1]
    up = np.stack([cv2.resize(d, (size, size), interpolation=cv2.INTER_LINEAR) for d in delta_S])
    N_O = delta_O / delta_O.max()
    N_S = up / up.max()
    return {"both": N_S + lam * N_O, "motion": N_O, "appearance": N_S}[streams]


@pytest.mark.parametrize("streams", ["both", "motion", "appearance"])
def test_normalisation_and_fusion_match_numpy(streams):
    rng = np.random.default_rng(0)
    delta_O = rng.gamma(2.0, 1.0, (7, 32, 32)).astype(np.float32)
    delta_S = rng.gamma(2.0, 3.0, (7, 5, 5)).astype(np.float32)
    chunks = list(fuse_video(torch.from_numpy(delta_O) if streams != "appearance" else None,
                             torch.from_numpy(delta_S) if streams != "motion" else None,
                             32, 2.0, streams, chunk=3))
    A = torch.cat(chunks).numpy()
    expected = reference_fusion(delta_O, delta_S, 2.0, streams)
    np.testing.assert_allclose(A, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(A.reshape(7, -1).max(1), expected.reshape(7, -1).max(1), rtol=1e-5)


def test_score_video_assembles_scores_and_maps():
    """score_video with stand-in generators against a direct computation: Delta_O, Delta_S, the per-video
    maxima, frame score = max A, the pooled map, NaN + copied map for the last frame."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    flows = rng.normal(0, 1.5, (4, 64, 64, 2)).astype(np.float16)
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    G_f2o = lambda x: torch.zeros(x.shape[0], 3, *x.shape[2:])   # predicts "no motion"
    G_o2f = lambda o: o[:, 2:3]                                   # the magnitude channel as a frame
    args = type("A", (), dict(device=torch.device("cpu"), amp=False, test_batch_size=3, streams="both",
                              lambda_motion=2.0, map_size=16, semantic_size=64))()
    with torch.inference_mode():
        scores, maps = gan_flow.score_video(frames, flows, G_f2o, G_o2f, alexnet, 2.0, args)
        O = flow_to_image(torch.from_numpy(flows), 2.0)
        Fimg = torch.from_numpy(frames[:4]).float()[:, None] / 127.5 - 1
        delta_O = O.norm(dim=1).numpy()
        delta_S = (alexnet(Fimg) - alexnet(O[:, 2:3])).norm(dim=1).numpy()
    A = reference_fusion(delta_O, delta_S, 2.0, "both")
    np.testing.assert_allclose(scores[:4], A.reshape(4, -1).max(1), rtol=1e-4)
    assert np.isnan(scores[4])
    pooled = A.reshape(4, 16, 4, 16, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(maps[:4].astype(np.float32), pooled, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(maps[4], maps[3])
    assert maps.dtype == np.float16


# ----------------------------------------------------------------------------------------------- AlexNet
def test_alexnet_keys_and_shapes_match_torchvision():
    model = AlexNetConv5()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == TORCHVISION_ALEXNET_FEATURES
    assert [type(m).__name__ for m in model.features] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d", "ReLU",
        "Conv2d", "ReLU", "MaxPool2d"]
    conv1 = model.features[0]
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((11, 11), (4, 4), (2, 2))
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 256, 256)).shape == (2, 256, 15, 15)   # conv5, before pool5
        assert model(torch.zeros(1, 1, 227, 227)).shape == (1, 256, 13, 13)


# ----------------------------------------------------------------------------------------------- training
def tiny_argv(shared_cache, out, *extra):
    return ["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--ngf", "8", "--ndf", "8",
            "--train-stride", "40", "--num-panels", "0", *extra]


def test_checkpoint_then_resume(shared_cache, tmp_path):
    out = tmp_path / "run"
    gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "1"))
    first = common.load_checkpoint(str(out / "model.pt"))
    assert first["epoch"] == 1 and first["config"]["flow_scale"] > 0
    assert set(first["f2o"]) == {"G", "D", "opt_G", "opt_D"} and set(first["o2f"]) == {"G", "D", "opt_G", "opt_D"}
    assert first["args"]["dataset"] == "synthetic"
    gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "2", "--resume"))
    second = common.load_checkpoint(str(out / "model.pt"))
    assert second["epoch"] == 2
    assert second["config"] == first["config"]
    key = "final.1.weight"
    assert not torch.equal(first["o2f"]["G"][key], second["o2f"]["G"][key])
    step = lambda ck: max(s["step"].item() for s in ck["f2o"]["opt_G"]["state"].values())
    assert step(second) == 2 * step(first)          # Adam continued from the saved state


def test_nan_loss_stops_training_and_saves_nothing(shared_cache, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setattr(gan_flow, "discriminator_loss", lambda real, fake: (real.mean() + fake.mean()) * float("nan"))
    with pytest.raises(common.TrainingError, match="non-finite"):
        gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "1"))
    assert not (out / "model.pt").exists()


def test_end_to_end_synthetic(shared_cache, tmp_path):
    out = tmp_path / "e2e"
    gan_flow.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--epochs", "1",
                   "--num-panels", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    assert metrics["test_fps"] > 0 and "alexnet-random" in metrics["protocol"]
    assert len(list((out / "panels").glob("*.png"))) == 2
    with np.load(out / "scores.npz") as z:
        assert z["map/Test001"].dtype == np.float16 and z["map/Test001"].shape[1:] == (64, 64)
        assert np.isnan(z["frame/Test001"][-1]) and np.isfinite(z["frame/Test001"][:-1]).all()
