"""Tests for gan_flow.py (Ravanbakhsh et al. 2017): pix2pix shapes, losses, flow image, jitter, training pairs,
AlexNet input and layer, fusion, the batched test path against the straightforward computation, panels,
checkpoint/resume, time-boxed slices, test-only runs, NaN handling and an end-to-end synthetic run."""

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import gan_flow
from gan_flow import (AlexNetConv5, PatchDiscriminator, UNetGenerator, discriminator_loss, flow_to_image,
                      fuse_video, generator_loss)
from toy_data import moving_squares
from torchvision_alexnet import TORCHVISION_ALEXNET_FEATURES


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tiny networks run fastest on one thread (and the machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    # the noise z: dropout on the outputs of the first three decoder blocks (CD512-CD1024-CD1024 with skips)
    assert not any(isinstance(m, gan_flow.AlwaysDropout) for m in g.up.modules())
    noise_inputs = []
    for module in g.noise:
        module.register_forward_hook(lambda m, i, o: noise_inputs.append(tuple(i[0].shape)))
    with torch.inference_mode():
        out = g(torch.randn(1, 1, 256, 256))
    assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1.0
    assert noise_inputs == [(1, 512, 2, 2), (1, 512, 4, 4), (1, 512, 8, 8)]
    with torch.inference_mode():
        assert UNetGenerator(3, 1, image_size=256, ngf=8)(torch.randn(2, 3, 256, 256)).shape == (2, 1, 256, 256)
    # the synthetic default: 64x64 with 6 levels
    small = UNetGenerator(1, 3, image_size=64, ngf=32)
    assert len(small.down) == 6
    with torch.inference_mode():
        assert small(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_dropout_is_noise_z_kept_at_test_time():
    """In eval mode dropout stays on: fresh draws without keys, the same draw for the same key, another draw
    for another key. Mutation caught: the keys ignored (a global draw) or dropout off in eval mode."""
    torch.manual_seed(0)
    g = UNetGenerator(1, 3, image_size=64, ngf=8).eval()
    x = torch.randn(1, 1, 64, 64)
    keys = torch.tensor([7])
    with torch.inference_mode():
        assert not torch.allclose(g(x), g(x))
        torch.manual_seed(1)
        first = g(x, keys)
        torch.manual_seed(2)
        torch.testing.assert_close(g(x, keys), first, rtol=0, atol=0)
        assert not torch.allclose(g(x, keys + 1), first)
    g0 = UNetGenerator(1, 3, image_size=64, ngf=8, dropout=0.0).eval()
    with torch.inference_mode():
        assert torch.allclose(g0(x), g0(x))


def numpy_hash32(x):
    """The same hash in uint32 arithmetic, whose products wrap modulo 2^32 by themselves."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = ((x >> np.uint32(16)) ^ x) * np.uint32(0x45D9F3B)
        x = ((x >> np.uint32(16)) ^ x) * np.uint32(0x45D9F3B)
    return (x >> np.uint32(16)) ^ x


def test_test_time_noise_is_a_function_of_its_key():
    """AlwaysDropout with keys against an independent uint32 computation of the mask; the kept fraction is
    1 - p; masks differ across layers and keys; noise_keys depends on seed, video, frame and generator only.
    Mutations caught: a product that overflows int64 (the masked multiply dropped), the layer not mixed in,
    the mask reused for every sample, no 1 / (1 - p) rescaling."""
    keys = torch.tensor([0, 1, 2 ** 32 - 1, 123456789], dtype=torch.int64)
    x = torch.ones(4, 5, 6, 7)
    layer = gan_flow.AlwaysDropout(0.5, layer=2)
    out = layer(x, keys)
    element = np.arange(5 * 6 * 7, dtype=np.uint32)
    sample = numpy_hash32(keys.numpy().astype(np.uint32)[:, None] ^ numpy_hash32(3))
    keep = numpy_hash32(sample ^ element) >= np.uint32(2 ** 31)
    np.testing.assert_array_equal(out.reshape(4, -1).numpy(), 2.0 * keep)
    assert not np.array_equal(keep[0], keep[1])
    assert not torch.equal(gan_flow.AlwaysDropout(0.5, layer=1)(x, keys), out)
    big = gan_flow.AlwaysDropout(0.3)(torch.ones(2, 512, 8, 8), torch.tensor([5, 6]))
    assert abs((big > 0).float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(big[big > 0], torch.full_like(big[big > 0], 1 / 0.7))
    a = gan_flow.noise_keys(0, "Test001", range(3), 0)
    assert a.dtype == torch.int64 and len(set(a.tolist())) == 3
    torch.testing.assert_close(gan_flow.noise_keys(0, "Test001", [1, 2], 0), a[1:], rtol=0, atol=0)
    for other in (gan_flow.noise_keys(1, "Test001", range(3), 0), gan_flow.noise_keys(0, "Test002", range(3), 0),
                  gan_flow.noise_keys(0, "Test001", range(3), 1)):
        assert not set(other.tolist()) & set(a.tolist())


def test_instance_norm_makes_a_frame_independent_of_its_batch():
    """Mutation caught: BatchNorm2d in norm_layer (the test path pads and batches frames, which is exact only
    when a frame's output does not depend on the rest of its batch)."""
    torch.manual_seed(0)
    g = UNetGenerator(1, 3, image_size=64, ngf=8, dropout=0.0).train()
    x = torch.randn(3, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(g(x)[:1], g(x[:1]), rtol=1e-5, atol=1e-6)


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


def test_pix2pix_steps_lower_the_losses():
    """Steps on one fixed (frame, flow image) pair at the paper's Adam settings: the L1 term and L_D fall, and
    with the L1 weight at 0 the cGAN term alone still moves G. Catches: a step that never updates G or D
    (optimizer on the wrong parameters, missing step), the generated image detached in G's step (no
    gradient from D into G)."""
    torch.manual_seed(0)
    squares = moving_squares(1, 2, 32)
    frame, flow_image = squares[:, :1], torch.cat([squares[:, 1:], -squares[:, 1:], squares[:, :1]], 1)
    net = gan_flow.Pix2Pix(1, 3, image_size=32, ngf=8, ndf=8)
    opt_G, opt_D = gan_flow.make_optimizers(net, lr=2e-4, beta1=0.5)
    losses = torch.tensor([[v.item() for v in gan_flow.pix2pix_step(net, opt_G, opt_D, frame, flow_image, 100.0, False)]
                           for _ in range(30)])          # columns: loss_D, loss_G, L1
    assert losses[-5:, 2].mean() < 0.9 * losses[:5, 2].mean()
    assert losses[-5:, 0].mean() < 0.5 * losses[:5, 0].mean()
    before = [p.detach().clone() for p in net.G.parameters()]
    fresh_opt_G = torch.optim.Adam(net.G.parameters(), lr=2e-4, betas=(0.5, 0.999))   # no momentum left over
    gan_flow.pix2pix_step(net, fresh_opt_G, opt_D, frame, flow_image, 0.0, False)
    assert all(not torch.equal(b, p) for b, p in zip(before, net.G.parameters()))


def test_pix2pix_step_leaves_d_trainable_when_g_half_raises(monkeypatch):
    """A step that fails in G's half (as a failed CUDA-graph capture does, before common.GraphedStep steps
    eagerly instead) must leave D trainable. Catches: D left frozen, so the next step's loss_D.backward()
    fails ("does not require grad")."""
    net = gan_flow.Pix2Pix(1, 3, image_size=32, ngf=8, ndf=8)
    opt_G, opt_D = gan_flow.make_optimizers(net, lr=2e-4, beta1=0.5)
    x, y = torch.zeros(1, 1, 32, 32), torch.zeros(1, 3, 32, 32)

    def failing_generator_loss(*args):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(gan_flow, "generator_loss", failing_generator_loss)
    with pytest.raises(RuntimeError, match="capturing"):
        gan_flow.pix2pix_step(net, opt_G, opt_D, x, y, 100.0, False)
    assert all(p.requires_grad for p in net.D.parameters())


# ----------------------------------------------------------------------------------------------- data
def test_flow_image_encoding():
    flow = np.array([[[[0.0, 0.0], [1.0, 0.0]], [[-3.0, 4.0], [10.0, -0.5]]]], np.float16)  # (1, 2, 2, 2)
    img = flow_to_image(torch.from_numpy(flow), scale=5.0).numpy()
    s = 5.0
    dx, dy = flow[..., 0].astype(np.float64) / s, flow[..., 1].astype(np.float64) / s
    expected = np.clip(np.stack([dx, dy, 2 * np.hypot(dx, dy) - 1], axis=1), -1, 1)
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert img[0, :, 0, 0].tolist() == [0.0, 0.0, -1.0]       # no motion
    assert img[0, 2, 1, 0] == pytest.approx(1.0)               # |(-3, 4)| = 5 = s -> top of the range


@pytest.mark.parametrize("hold", [False, True])
def test_training_pairs_frame_t_with_its_own_flow(hold):
    """Frame t is paired with O_t, the flow from t to t+1, on both the memmap path and the on-device path.
    Mutation caught: gathering flow t+1 (or frame t+1) for pair (v, t); wrong per-video offsets when the split
    is held on the device."""
    frames = {f"v{v}": np.stack([np.full((4, 4), 10 * v + t, np.uint8) for t in range(n)]) for v, n in
              enumerate((5, 3, 6))}
    flows = {name: np.stack([np.full((4, 4, 2), float(f[t, 0, 0]), np.float16) for t in range(len(f) - 1)])
             for name, f in frames.items()}
    split = gan_flow.TrainingSplit(frames, flows, step=1, device=torch.device("cpu"), hold=hold)
    assert split.on_device == hold
    assert len(split.pairs) == 4 + 2 + 5      # T - 1 pairs per video: the last frame has no flow
    order = np.random.default_rng(0).permutation(len(split.pairs))
    f_u8, o_f16 = split.batch(split.order_indices(order))
    expected = 10 * split.pairs[order, 0] + split.pairs[order, 1]
    np.testing.assert_array_equal(f_u8[:, 0, 0].numpy(), expected)
    np.testing.assert_array_equal(o_f16[:, 0, 0, 0].float().numpy(), expected)
    assert f_u8.dtype == torch.uint8 and o_f16.dtype == torch.float16
    every_second = gan_flow.training_pairs(flows, 2)
    assert every_second.tolist() == [[0, 0], [0, 2], [1, 0], [2, 0], [2, 2], [2, 4]]


def test_jitter_shares_crop_and_mirror_negates_dx():
    """pix2pix jitter: one crop for the frame and its flow, mirroring flips both and negates dx only.
    Mutations caught: dx not negated on a mirror (or dy / magnitude negated), a crop offset applied as (x, y)
    instead of (y, x), different crops for frame and flow, no resize to the load size."""
    S, L = 16, gan_flow.jitter_load_size(16)
    assert gan_flow.jitter_load_size(256) == 286 and L == 18
    yy, xx = np.meshgrid(np.arange(S, dtype=np.float32), np.arange(S, dtype=np.float32), indexing="ij")
    frame = torch.from_numpy(xx / S - 0.5)[None, None]                          # encodes x
    flow = torch.from_numpy(np.stack([yy / S - 0.3, yy / S * 0.5, xx / S - 0.9]))[None]  # dx, dy, |f| channels
    frames, flows = frame.repeat(2, 1, 1, 1), flow.repeat(2, 1, 1, 1)
    offsets, flips = np.array([[2, 1], [0, 2]]), np.array([False, True])
    out_frame, out_flow = gan_flow.apply_jitter(frames, flows, offsets, flips, L)
    big_f = F.interpolate(frames, size=(L, L), mode="bilinear", align_corners=False)
    big_o = F.interpolate(flows, size=(L, L), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out_frame[0], big_f[0, :, 2:2 + S, 1:1 + S])
    torch.testing.assert_close(out_flow[0], big_o[0, :, 2:2 + S, 1:1 + S])
    torch.testing.assert_close(out_frame[1], big_f[1, :, 0:S, 2:2 + S].flip(-1))
    expected = big_o[1, :, 0:S, 2:2 + S].flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(out_flow[1], expected)
    assert out_frame.shape == (2, 1, S, S) and out_flow.shape == (2, 3, S, S)


def test_jitter_draws_span_pix2pix_range():
    """Crop offsets are uniform over every position 0..load - size (both ends included), mirrors p = 1/2.
    Mutation caught: an exclusive upper bound (the last crop position never drawn), mirroring always/never."""
    rng = np.random.default_rng(0)
    offsets, flips = gan_flow.draw_jitter(rng, 4000, 256, 286)
    assert offsets.min() == 0 and offsets.max() == 30
    assert len(np.unique(offsets[:, 0])) == 31
    assert 0.45 < flips.mean() < 0.55


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


def test_alexnet_sees_imagenet_normalised_rgb_and_returns_relu5():
    """h(F) = relu5 of AlexNet on the gray frame mapped to [0, 1], replicated to RGB and normalised with
    ImageNet's mean/std. Mutations caught: removing the ImageNet normalisation (or swapping mean and std),
    feeding [-1, 1] instead of [0, 1], cutting conv5 before its ReLU (features[:11]), returning pool5."""
    torch.manual_seed(0)
    model = AlexNetConv5().eval()
    gray = torch.rand(2, 1, 96, 96) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((gray + 1) / 2).repeat(1, 3, 1, 1)
    x = (x - mean) / std
    for layer in model.features[:10]:
        x = layer(x)
    conv5 = model.features[10](x)
    with torch.inference_mode():
        out = model(gray)
    torch.testing.assert_close(out, torch.relu(conv5), rtol=1e-5, atol=1e-6)
    assert (conv5 < 0).any() and (out >= 0).all()   # the ReLU matters for these weights


def test_alexnet_sees_frames_at_the_semantic_size():
    """Delta_S: F and p_F are resized to --semantic-size before AlexNet (the paper's 256x256 frames -> 15x15
    conv5 even when the GANs run at 64x64), and AlexNet runs once on both stacked. Mutations caught: disabling
    the semantic-size resize (a 1x1 grid at 64x64), resizing only one of the two, calling AlexNet twice."""
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    calls = []
    alexnet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    frame = torch.rand(3, 1, 64, 64) * 2 - 1
    flow = torch.rand(3, 3, 64, 64) * 2 - 1
    G_o2f = lambda o, keys=None: o[:, 1:2] * 0.5
    with torch.inference_mode():
        _, delta_S, _, p_F = gan_flow.difference_maps(frame, flow, None, G_o2f, alexnet, "appearance", 256)
        assert calls == [torch.Size([6, 1, 256, 256])]
        up = lambda x: F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
        expected = (alexnet(up(frame)) - alexnet(up(G_o2f(flow)))).norm(dim=1)   # the straightforward way
    assert delta_S.shape == (3, 15, 15)
    torch.testing.assert_close(delta_S, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_F, G_o2f(flow))


# ----------------------------------------------------------------------------------------------- scoring maths
def reference_fusion(delta_O, delta_S, lam, streams):
    """Equations 4-5 with numpy and OpenCV (bilinear upsampling with pixel-centre alignment)."""
    size = delta_O.shape[-1]
    up = np.stack([cv2.resize(d, (size, size), interpolation=cv2.INTER_LINEAR) for d in delta_S])
    N_O = delta_O / delta_O.max()
    N_S = up / up.max()
    return {"both": N_S + lam * N_O, "motion": N_O, "appearance": N_S}[streams]


def test_normalisation_and_fusion_match_numpy(monkeypatch):
    """Eq. 4-5 against numpy/OpenCV, with Delta_S upsampled exactly once per video (the saving checked
    against the straightforward computation). Mutations caught: normalising by the per-frame instead of the
    per-video maximum, lambda on the wrong stream, upsampling Delta_S a second time for its maximum."""
    rng = np.random.default_rng(0)
    delta_O = rng.gamma(2.0, 1.0, (7, 32, 32)).astype(np.float32)
    delta_S = rng.gamma(2.0, 3.0, (7, 5, 5)).astype(np.float32)
    calls = []
    real_interpolate = F.interpolate
    monkeypatch.setattr(gan_flow.F, "interpolate", lambda *a, **k: calls.append(1) or real_interpolate(*a, **k))
    maps = fuse_video(torch.from_numpy(delta_O), torch.from_numpy(delta_S), 32, 2.0)
    assert len(calls) == 1 and set(maps) == {"both", "motion", "appearance"}
    for streams in ("both", "motion", "appearance"):
        np.testing.assert_allclose(maps[streams].numpy(), reference_fusion(delta_O, delta_S, 2.0, streams),
                                   rtol=1e-5, atol=1e-5)
    assert set(fuse_video(torch.from_numpy(delta_O), None, 32, 2.0)) == {"motion"}
    assert set(fuse_video(None, torch.from_numpy(delta_S), 32, 2.0)) == {"appearance"}


def score_args(**overrides):
    values = dict(device=torch.device("cpu"), amp=False, test_batch_size=3, streams="both", lambda_motion=2.0,
                  map_size=16, semantic_size=64, seed=0)
    values.update(overrides)
    return type("Args", (), values)()


def test_score_video_assembles_scores_and_maps():
    """score_video with stand-in generators against a direct computation: Delta_O, Delta_S, the per-video
    maxima, frame score = max A, the pooled map, NaN + copied map for the last frame; 4 pairs in batches of 3
    (the last batch padded). Mutations caught: padded rows kept in the video's maxima or scores, frame score
    from the pooled instead of the full-resolution map, the last frame scored, its map not copied."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    flows = rng.normal(0, 1.5, (4, 64, 64, 2)).astype(np.float16)
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    G_f2o = lambda x, keys: torch.zeros(x.shape[0], 3, *x.shape[2:])   # predicts "no motion"
    G_o2f = lambda o, keys: o[:, 2:3]                                   # the magnitude channel as a frame
    with torch.inference_mode():
        scores, maps = gan_flow.score_video(frames, flows, G_f2o, G_o2f, alexnet, 2.0, score_args())
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
    assert maps.dtype == np.float16 and scores.dtype == np.float32


def tiny_generators(seed=0, dropout=0.5):
    torch.manual_seed(seed)
    return (UNetGenerator(1, 3, image_size=32, ngf=4, dropout=dropout).eval(),
            UNetGenerator(3, 1, image_size=32, ngf=4, dropout=dropout).eval())


def test_batched_streamed_scoring_equals_frame_by_frame():
    """The fixed-shape, padded, prefetched test path over several videos gives the scores of a plain
    frame-by-frame loop (dropout off), for all three streams from one pass; a one-frame video gets NaN.
    Mutations caught: a video's rows taken from the wrong place of a batch that spans two videos, padding
    rows leaking into a video, batches restarted per video, the motion/appearance streams swapped, lambda
    applied to a single stream."""
    rng = np.random.default_rng(2)
    frames = {"a": rng.integers(0, 256, (7, 32, 32), dtype=np.uint8), "b": rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
              "c": rng.integers(0, 256, (1, 32, 32), dtype=np.uint8)}
    flows = {k: rng.normal(0, 1.0, (len(v) - 1, 32, 32, 2)).astype(np.float16) for k, v in frames.items()}
    G_f2o, G_o2f = tiny_generators(dropout=0.0)
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    args = score_args(test_batch_size=4, map_size=8, semantic_size=64)
    # 6 + 3 + 0 pairs in batches of 4 that run across videos: 3 batches, not one padded batch per video
    assert common.batch_segments([("a", 0, 6), ("b", 0, 3), ("c", 0, 0)], 4) == \
        [[("a", 0, 4)], [("a", 4, 6), ("b", 0, 2)], [("b", 2, 3)]]
    batches = []
    hook = G_f2o.register_forward_hook(lambda module, inputs, output: batches.append(len(output)))
    with torch.inference_mode():
        gan_flow.score_videos(frames, flows, G_f2o, G_o2f, alexnet, 1.5, score_args(test_batch_size=5, map_size=8,
                                                                                       semantic_size=64))
    hook.remove()
    assert batches == [5, 5]           # batches restarted per video would make three: 5 + 5 (a), 5 (b)
    with torch.inference_mode():
        results = gan_flow.score_videos(frames, flows, G_f2o, G_o2f, alexnet, 1.5, args)
        for name in ("a", "b"):
            delta_O, delta_S = [], []
            for t in range(len(flows[name])):   # the straightforward computation: one frame at a time
                d_O, d_S, _, _ = gan_flow.difference_maps(
                    gan_flow.frames_to_image(torch.from_numpy(frames[name][t:t + 1])),
                    flow_to_image(torch.from_numpy(flows[name][t:t + 1]), 1.5), G_f2o, G_o2f, alexnet, "both", 64)
                delta_O.append(d_O.numpy())
                delta_S.append(d_S.numpy())
            delta_O, delta_S = np.concatenate(delta_O), np.concatenate(delta_S)
            for stream in ("both", "motion", "appearance"):
                A = reference_fusion(delta_O, delta_S, 2.0, stream)
                scores, maps = results[name][stream]
                np.testing.assert_allclose(scores[:-1], A.reshape(len(A), -1).max(1), rtol=1e-4, atol=1e-5)
                assert np.isnan(scores[-1])
    assert np.isnan(results["c"]["both"][0]).all() and results["c"]["both"][1].shape == (1, 8, 8)


def test_panels_show_the_scored_outputs():
    """The generated frame and flow drawn in a panel are the very outputs that were scored (same dropout
    draw), for the best-scoring frames of the video. Mutation caught: re-running the generators for the panels
    (a fresh dropout draw), keeping the outputs of the wrong frames or of the wrong generator."""
    rng = np.random.default_rng(3)
    # video "z" (3 pairs) comes first, so "a"'s pairs start in the middle of a batch of 2
    frames = {"z": rng.integers(0, 256, (4, 32, 32), dtype=np.uint8), "a": rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)}
    flows = {"z": rng.normal(0, 1.0, (3, 32, 32, 2)).astype(np.float16),
             "a": rng.normal(0, 1.0, (5, 32, 32, 2)).astype(np.float16)}
    G_f2o, G_o2f = tiny_generators(dropout=0.5)
    seen = {"f2o": [], "o2f": []}
    G_f2o.register_forward_hook(lambda m, i, o: seen["f2o"].append(o.clone()))
    G_o2f.register_forward_hook(lambda m, i, o: seen["o2f"].append(o.clone()))
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    with torch.inference_mode():
        results = gan_flow.score_videos(frames, flows, G_f2o, G_o2f, alexnet, 1.5, score_args(test_batch_size=2),
                                        panels={"a": 2})
    scored_flow = torch.cat(seen["f2o"]).numpy()[3:8]  # 8 pairs in batches of 2: "a" is rows 3..7
    scored_frame = torch.cat(seen["o2f"]).numpy()[3:8]
    assert results["z"]["panels"] == {}
    scores = results["a"]["both"][0]
    best = list(np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:2])
    assert list(results["a"]["panels"]) == best
    for t, (gen_frame, gen_flow) in results["a"]["panels"].items():
        np.testing.assert_array_equal(gen_flow, scored_flow[t])
        np.testing.assert_array_equal(gen_frame, scored_frame[t, 0])
    assert gan_flow.panels_per_video(["a", "b", "c"], 4) == {"a": 2, "b": 1, "c": 1}


def test_scores_with_noise_do_not_depend_on_the_batching():
    """With the noise z on, a video's scores and maps are the same whatever the test batch size, whatever
    video shares its batches and however the global generator was seeded; --seed changes them. Mutations
    caught: dropout drawn from torch's generator at test, keys taken by position in the batch."""
    rng = np.random.default_rng(4)
    frames = {"a": rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), "b": rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)}
    flows = {k: rng.normal(0, 1.0, (len(v) - 1, 32, 32, 2)).astype(np.float16) for k, v in frames.items()}
    G_f2o, G_o2f = tiny_generators(dropout=0.5)
    torch.manual_seed(0)
    alexnet = AlexNetConv5().eval()
    runs = []
    with torch.inference_mode():
        for batch, videos, seed in ((2, ("a", "b"), 0), (5, ("a", "b"), 0), (3, ("b",), 0), (4, ("a", "b"), 1)):
            torch.manual_seed(100 + batch)
            runs.append(gan_flow.score_videos({k: frames[k] for k in videos}, {k: flows[k] for k in videos},
                                              G_f2o, G_o2f, alexnet, 1.5, score_args(test_batch_size=batch, seed=seed)))
    for stream in ("both", "motion", "appearance"):
        for run in runs[1:3]:
            for name in run:
                np.testing.assert_allclose(run[name][stream][0], runs[0][name][stream][0], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(run[name][stream][1].astype(np.float32),
                                           runs[0][name][stream][1].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert not np.allclose(runs[3]["a"]["both"][0][:-1], runs[0]["a"]["both"][0][:-1])


# ----------------------------------------------------------------------------------------------- training
def tiny_argv(shared_cache, out, *extra):
    return ["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--ngf", "8", "--ndf", "8",
            "--image-size", "32", "--train-step", "40", "--num-panels", "0", *extra]


def test_checkpoint_then_resume(shared_cache, tmp_path):
    out = tmp_path / "run"
    gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "1"))
    first = common.load_checkpoint(str(out / "model.pt"))
    assert first["epoch"] == 1 and first["step"] == 0 and first["config"]["flow_scale"] > 0
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


def all_tensors(ck):
    out = {}
    for name in ("f2o", "o2f"):
        for part in ("G", "D"):
            out.update({f"{name}.{part}.{k}": v for k, v in ck[name][part].items()})
        for part in ("opt_G", "opt_D"):
            for index, state in ck[name][part]["state"].items():
                out.update({f"{name}.{part}.{index}.{k}": v for k, v in state.items()})
    return out


def test_time_boxed_slices_equal_one_uninterrupted_run(shared_cache, tmp_path, monkeypatch, capsys):
    """--max-minutes stops at a step boundary (mid-epoch and at an epoch end), writes the checkpoint, prints the
    continue command and exits without testing; --resume slices end with the weights and Adam states of one
    uninterrupted run, bit for bit (jitter on, dropout on, both cGANs). Mutations caught: not restoring the
    torch RNG (dropout), the sampler (order, jitter) or the position within the epoch; re-drawing the epoch
    order on resume; re-seeding the sampler per epoch from the epoch number."""
    argv = tiny_argv(shared_cache, tmp_path / "whole", "--train", "--epochs", "2", "--train-step", "80")
    gan_flow.main(argv)
    whole = common.load_checkpoint(str(tmp_path / "whole" / "model.pt"))
    capsys.readouterr()

    calls = {"n": 0}

    def expired(self):   # a budget that runs out after every 3rd step (8 steps per epoch)
        calls["n"] += 1
        return calls["n"] % 3 == 0 and self.seconds is not None

    monkeypatch.setattr(common.TimeBudget, "expired", expired)
    sliced_out = tmp_path / "sliced"
    argv = tiny_argv(shared_cache, sliced_out, "--train", "--epochs", "2", "--train-step", "80",
                     "--max-minutes", "1", "--resume")
    stops = []
    for _ in range(20):
        gan_flow.main(argv)
        ck = common.load_checkpoint(str(sliced_out / "model.pt"))
        text = capsys.readouterr().out
        if "continue with:" not in text:
            break
        assert "--resume" in text.split("continue with:")[1] and "gan_flow.py" in text
        stops.append((ck["epoch"], ck["step"]))
    assert ck["epoch"] == 2 and not (sliced_out / "scores.npz").exists()
    assert len(stops) >= 3 and any(step > 0 for _, step in stops)
    a, b = all_tensors(whole), all_tensors(ck)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_nan_loss_stops_training_and_saves_nothing(shared_cache, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    monkeypatch.setattr(gan_flow, "discriminator_loss", lambda real, fake: (real.mean() + fake.mean()) * float("nan"))
    with pytest.raises(common.TrainingError, match="non-finite"):
        gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "1"))
    assert not (out / "model.pt").exists()


def test_image_size_is_commons_flag_and_must_be_a_square_power_of_two(shared_cache, tmp_path):
    """Mutation caught: gan_flow defining its own --image-size again (argparse conflict), accepting H != W."""
    for bad in (["64", "32"], ["48"]):
        with pytest.raises(common.DataError, match="--image-size"):
            gan_flow.main(tiny_argv(shared_cache, tmp_path / "bad", "--train", "--image-size", *bad))


def test_protocol_label_names_every_setting_that_is_not_the_papers():
    """Mutation caught: calling a run "paper settings" with a random AlexNet or reduced settings."""
    args = type("Args", (), dict(gan_flow.PAPER_SETTINGS, normalize=None, smooth="none"))()
    assert gan_flow.protocol_label(args, "alexnet-imagenet") == "paper settings"
    label = gan_flow.protocol_label(args, "alexnet-random")
    assert label.startswith("not the paper's") and "backbone_weights alexnet-random" in label
    args.ngf, args.epochs = 32, 2
    assert "ngf 32" in gan_flow.protocol_label(args, "alexnet-imagenet")


def test_test_only_run_takes_training_settings_from_checkpoint(shared_cache, tmp_path, monkeypatch, capsys):
    """A --test run builds no discriminators or optimisers and loads no optimiser state, and reports the
    training settings saved in model.pt, warning about a differing flag. Mutations caught: building the
    Adam optimisers (or loading their states) when only testing; reporting the command line's --epochs."""
    out = tmp_path / "testonly"
    gan_flow.main(tiny_argv(shared_cache, out, "--train", "--epochs", "1", "--jitter", "off"))

    def no_adam(*a, **k):
        raise AssertionError("an optimiser was built for a test-only run")

    monkeypatch.setattr(torch.optim, "Adam", no_adam)
    capsys.readouterr()
    gan_flow.main(tiny_argv(shared_cache, out, "--test", "--epochs", "7", "--streams", "motion"))
    err = capsys.readouterr().err
    assert "--epochs 7 ignored" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "trained 1 epochs" in metrics["run_protocol"] and "jitter off" in metrics["run_protocol"]
    assert "of 7" not in metrics["run_protocol"]


@pytest.mark.slow
def test_end_to_end_synthetic_detects_anomalies(shared_cache, tmp_path):
    """The synthetic demo at its default settings (one epoch) separates abnormal frames."""
    out = tmp_path / "e2e_full"
    gan_flow.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--epochs", "1",
                   "--num-panels", "0", "--streams", "motion"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics


def test_end_to_end_synthetic(shared_cache, tmp_path):
    """Train + test at tiny settings: scores.npz, metrics.json with both pixel rules and the two single-stream
    ablations, panels. Mutations caught: the paper comparison evaluated with the ucsd pixel rule (or the rule
    not recorded in the meta), the single streams not evaluated, panels not written."""
    out = tmp_path / "e2e"
    gan_flow.main(tiny_argv(shared_cache, out, "--epochs", "1", "--num-panels", "2", "--semantic-size", "96",
                            "--map-size", "16"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "alexnet-random" in metrics["run_protocol"] and "not the paper's settings" in metrics["run_protocol"]
    assert metrics["pixel_rule"] == "strict" and metrics["protocol"]["pixel_rule"] == "strict"
    assert metrics["pixel_auc_ucsd"] >= metrics["pixel_auc"]   # the strict rule's AUC is never above the ucsd one
    assert set(metrics["streams"]) == {"motion", "appearance"}
    assert metrics["streams"]["motion"]["frame_auc_micro"] != metrics["frame_auc_micro"]
    assert len(list((out / "panels").glob("*.png"))) == 2
    with np.load(out / "scores.npz") as z:
        assert z["map/Test001"].dtype == np.float16 and z["map/Test001"].shape[1:] == (16, 16)
        assert np.isnan(z["frame/Test001"][-1]) and np.isfinite(z["frame/Test001"][:-1]).all()
        assert json.loads(str(z["meta"]))["pixel_rule"] == "strict"
    for stream in ("motion", "appearance"):
        assert (out / f"scores_{stream}.npz").exists()
