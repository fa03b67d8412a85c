"""Tests for adv3dae.py (Sun et al., IEEE TMM 2021): shapes of Fig. 2 / Table VII, max-unpooling at the recorded
locations, the denoising noise (training only), eq. 14, the losses of eq. 7-12, Hasan's strided clips, the clip
aggregation at test time, time-boxed slices == one uninterrupted run, test-only runs that report the
checkpoint's settings, NaN handling, an untrained model scoring as mean-image background subtraction and an
end-to-end synthetic run.

Each test that guards against a specific bug names the mutation it catches ("Catches: ...")."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import adv3dae
import common
from adv3dae import Adv3DAE, Discriminator3D, FlowStream, FrameStream, paper_score
from toy_data import moving_squares


def tiny_args(tmp_path, cache, *extra, out="run"):
    """A fast configuration for plumbing tests (not for accuracy)."""
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(tmp_path / out), "--image-size", "32", "48",
            "--channels", "4", "4", "4", "4", "4", "--train-step", "40", "--batch-size", "4", "--device", "cpu",
            "--map-pool", "2", *extra]


def parsed(*argv):
    """Parsed args with the script's defaults filled in, without loading any data."""
    args = common.parse_args(adv3dae.build_arg_parser(), ["--device", "cpu", *argv])
    adv3dae.fill_defaults(args)
    return args


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
    """Table VII: "the last two layers of the encoder and the corresponding decoder layers are removed". The
    6-layer net's parameters are exactly the 10-layer net's conv1-3 / deconv1-3 (same names, same shapes), the
    removed ones are conv4, conv5, deconv4, deconv5, and the 6-layer net keeps the first two pools.
    Catches: dropping the first layers instead of the last (channels[-3:]), keeping a third pool, a decoder
    that is not the mirror of the kept encoder."""
    ten, six = Adv3DAE(1, layers=10), Adv3DAE(1, layers=6)
    shapes10 = {k: tuple(v.shape) for k, v in ten.state_dict().items()}
    shapes6 = {k: tuple(v.shape) for k, v in six.state_dict().items()}
    assert shapes6 == {k: s for k, s in shapes10.items() if k in shapes6}
    removed = {k.split(".")[0] + "." + k.split(".")[1] for k in set(shapes10) - set(shapes6)}
    assert removed == {"encoder_convs.3", "encoder_convs.4", "decoder_deconvs.3", "decoder_deconvs.4"}
    assert [tuple(c[0].weight.shape) for c in six.encoder_convs] == [(32, 1, 3, 3, 3), (64, 32, 3, 3, 3),
                                                                     (128, 64, 3, 3, 3)]
    assert [p.kernel_size for p in six.pools] == [(1, 2, 2), (2, 2, 2)]
    assert [p.kernel_size for p in six.unpools] == [(1, 2, 2), (2, 2, 2)]
    # with the 10-layer net's first three layers loaded, the 6-layer net's encoder computes the same conv3 output
    six.load_state_dict({k: v for k, v in ten.state_dict().items() if k in shapes6})
    ten.eval(), six.eval()
    x = torch.randn(1, 1, 8, 16, 16)
    seen = {}
    ten.encoder_convs[2].register_forward_hook(lambda m, i, o: seen.__setitem__("ten", o))
    with torch.no_grad():
        code6, _ = six.encode(x)
        ten.encode(x)
    assert code6.shape == (1, 128, 4, 4, 4)
    torch.testing.assert_close(code6, seen["ten"])


def test_conv_macs_matches_a_counted_forward_and_the_documented_ratio():
    """conv_macs counts the multiply-adds a real forward performs (counted by hooks on every (de)convolution);
    at 16x224x224 it gives the docstring's 37.8 G (10 layers) and 34.7 G (6 layers), ratio 1.09.
    Catches: not shrinking the voxel count after a pool, pool1 treated as 2x2x2, decoder costs not mirrored."""
    for layers in (10, 6):
        ae = Adv3DAE(1, (4, 6, 8, 8, 8), layers=layers).eval()
        counted = []

        def hook(m, inp, out):
            counted.append(m.weight.shape[2] * m.weight.shape[3] * m.weight.shape[4] * m.in_channels
                           * m.out_channels * out.shape[2] * out.shape[3] * out.shape[4])
        for m in ae.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                m.register_forward_hook(hook)
        with torch.no_grad():
            ae(torch.randn(1, 1, 8, 16, 24))
        assert [m for _, m in adv3dae.conv_macs(1, (4, 6, 8, 8, 8), layers, 8, (16, 24))] == counted
    ten = sum(m for _, m in adv3dae.conv_macs(1, adv3dae.DEFAULT_CHANNELS, 10, 16, (224, 224)))
    six = sum(m for _, m in adv3dae.conv_macs(1, adv3dae.DEFAULT_CHANNELS, 6, 16, (224, 224)))
    assert round(ten / 1e9, 1) == 37.8 and round(six / 1e9, 1) == 34.7 and round(ten / six, 2) == 1.09


def test_discriminator_output_shape_and_structure():
    torch.manual_seed(0)
    d = Discriminator3D(1, 16, (224, 224))
    kinds = [type(m) for m in d.modules()]
    assert kinds.count(nn.Conv3d) == 3 and kinds.count(nn.MaxPool3d) == 3 and kinds.count(nn.Linear) == 2
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    with torch.inference_mode():
        logits = d(torch.randn(2, 1, 16, 224, 224))
    assert logits.shape == (2, 1)
    small = Discriminator3D(3, 8, (64, 96))
    with torch.inference_mode():
        p = small.probability(torch.randn(3, 3, 8, 64, 96))
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
    """Inside the model, the unpooled map is non-zero only where the encoder's pool found its maxima.
    Catches: un-pooling at the fixed upper-left position of each window (Table V "w/o recording locations"),
    or with indices from another pool; the input is checked to have maxima off the upper-left corner, so the
    two placements are distinguishable."""
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
    upper_left = torch.zeros_like(is_max)
    upper_left[..., ::2, ::2] = True
    assert (is_max & ~upper_left).float().mean() > 0.1      # most maxima are not at the upper left
    assert bool((unpooled[~is_max] == 0).all())
    assert bool((unpooled[is_max] != 0).float().mean() > 0.9)


@pytest.mark.parametrize("takes_bf16", [True, False])
def test_amp_unpools_in_float32_where_the_kernel_lacks_bfloat16(monkeypatch, takes_bf16):
    """Under bf16 autocast every unpooling gets bfloat16 where the kernel takes it and float32 where it does not
    (CUDA before PyTorch 2.5), and the output stays the autocast one. Catches: the float32 fallback dropped
    (a crash on those CUDA builds) or applied everywhere (float32 maps in memory on every --amp run)."""
    monkeypatch.setattr(adv3dae, "UNPOOL_TAKES_BF16", takes_bf16)
    torch.manual_seed(3)
    ae = Adv3DAE(1, (4, 4, 4, 4, 4), layers=10).eval()
    dtypes = []
    for unpool in ae.unpools:
        unpool.register_forward_hook(lambda m, inp, out: dtypes.append(inp[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(torch.randn(1, 1, 16, 32, 32))
    assert dtypes == [torch.bfloat16 if takes_bf16 else torch.float32] * 4
    assert out.dtype == torch.bfloat16


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


def test_gradient_norms_match_separate_backward_passes_and_change_nothing():
    """The per-epoch diagnostic: the two norms equal those of separate backward passes of L_rec and
    lambda L_adv, and computing them leaves the weights, BatchNorm's running statistics and the random state
    as they were. Catches: lambda left out, the norms of the summed loss, BN statistics updated by the extra
    forward pass (which would move the test scores), the noise draw consuming the training RNG."""
    torch.manual_seed(6)
    ae = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.01).train()
    d = Discriminator3D(1, 8, (32, 32), channels=(4, 4, 4), hidden=8)
    with torch.no_grad():
        nn.init.normal_(ae.decoder_deconvs[0].weight, std=0.1)
    x = torch.randn(2, 1, 8, 32, 32) * 0.1
    state = {k: v.clone() for k, v in ae.state_dict().items()}
    rng = torch.get_rng_state()
    rec, adv = adv3dae.gradient_norms(ae, d, x, 0.3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in ae.state_dict().items())
    ref = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.01).train()
    ref.load_state_dict(state)
    torch.set_rng_state(rng)
    recon = ref(x)                     # the same noise draw as inside gradient_norms
    g_rec = torch.autograd.grad(adv3dae.reconstruction_loss(recon, x), list(ref.parameters()), retain_graph=True)
    g_adv = torch.autograd.grad(0.3 * adv3dae.adversarial_loss(d(recon)), list(ref.parameters()))
    norm = lambda grads: torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert rec == pytest.approx(norm(g_rec), rel=1e-5) and adv == pytest.approx(norm(g_adv), rel=1e-5)
    assert adv > 0


def test_train_step_one_discriminator_call_equals_separate_calls():
    """train_step runs D once on [x, R] stacked; the updates equal the straightforward computation with three
    separate D calls: theta by grad of L_rec + lambda L_adv(D(R)), phi by grad of L_D(D(x), D(R.detach())),
    both from the same forward pass. Catches: real and fake halves swapped, the adversarial term computed on a
    detached R (no realism gradient), L_D back-propagated into theta or L_R into phi, lambda dropped."""
    torch.manual_seed(5)
    ae = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.0)
    d = Discriminator3D(1, 8, (32, 32), channels=(4, 4, 4), hidden=8)
    with torch.no_grad():
        nn.init.normal_(ae.decoder_deconvs[0].weight, std=0.1)
    ae_ref, d_ref = Adv3DAE(1, (4, 4, 4), layers=6, noise_sigma=0.0), Discriminator3D(1, 8, (32, 32), (4, 4, 4), 8)
    ae_ref.load_state_dict(ae.state_dict()), d_ref.load_state_dict(d.state_dict())
    x = torch.randn(2, 1, 8, 32, 32) * 0.1
    opt_ae, opt_d = torch.optim.SGD(ae.parameters(), lr=0.01), torch.optim.SGD(d.parameters(), lr=0.01)
    lam = 0.7
    losses = adv3dae.train_step(ae, d, opt_ae, opt_d, x, lam)
    # reference, computed separately
    ae_ref.train(), d_ref.train()
    recon = ae_ref(x)
    l_adv = adv3dae.adversarial_loss(d_ref(recon))
    l_r = adv3dae.reconstruction_loss(recon, x) + lam * l_adv
    g_ae = torch.autograd.grad(l_r, list(ae_ref.parameters()))
    l_d = adv3dae.discriminator_loss(d_ref(x), d_ref(recon.detach()))
    g_d = torch.autograd.grad(l_d, list(d_ref.parameters()))
    torch.testing.assert_close(losses["adv"], l_adv.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["d"], l_d.detach(), rtol=1e-5, atol=1e-7)
    assert all(v.device == x.device and not v.requires_grad for v in losses.values())
    with torch.no_grad():
        for p, p0, g in zip(ae.parameters(), ae_ref.parameters(), g_ae):
            torch.testing.assert_close(p, p0 - 0.01 * g, rtol=1e-5, atol=1e-7)
        for p, p0, g in zip(d.parameters(), d_ref.parameters(), g_d):
            torch.testing.assert_close(p, p0 - 0.01 * g, rtol=1e-5, atol=1e-7)
    # the realism term reaches theta: without it the auto-encoder update is different
    g_rec_only = torch.autograd.grad(adv3dae.reconstruction_loss(ae_ref(x), x), list(ae_ref.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(g_ae, g_rec_only)) > 1e-6


def test_discriminator_training_memory_matches_a_count_by_hand():
    """What D adds to a training step's saved activations (train_step's forward, each storage counted once),
    counted by hand for one clip at 16x64x96. D sees the clip and its reconstruction (2 clips; float32
    values, int64 pooling indices). At each of its three levels it keeps the conv's input, the conv's output
    once (the LeakyReLU runs in place, so the pool's input is that storage) and the pool's indices at the
    pooled size (2x4x4, ceil mode); then the FC layers' three (2, 256) inputs, and the weights the convs and
    FC layers keep for the input gradient. Catches: the full-resolution activation saved twice again (+86% for
    D, 0.2 GiB more per clip at 224x224: 3.3 GiB at the default batch), or any layer that starts saving more."""
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 16, 64, 96)
    ae, disc = Adv3DAE(layers=10), Discriminator3D(size=(64, 96))
    saved = []            # every saved tensor, in the order autograd saves them; held, so no address is reused

    def keep(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        recon = ae(x)
        adv3dae.reconstruction_loss(recon, x)
        num_ae = len(saved)
        logits = disc(torch.cat([x, recon]))
        adv3dae.adversarial_loss(logits[1:]), adv3dae.discriminator_loss(logits[:1], logits[1:])
    storage = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in saved]
    ae_storages = {ptr for ptr, _ in storage[:num_ae]}
    added = sum(dict((ptr, n) for ptr, n in storage[num_ae:] if ptr not in ae_storages).values())
    expected, widths, (t, h, w) = 0, (1, 32, 64, 64), (16, 64, 96)
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        voxels = t * h * w
        t, h, w = -(-t // 2), -(-h // 4), -(-w // 4)
        expected += 2 * (c_in * voxels * 4 + c_out * voxels * 4 + c_out * t * h * w * 8)
    expected += 3 * 2 * 256 * 4
    expected += 4 * sum(m.weight.numel() for m in disc.modules() if isinstance(m, (nn.Conv3d, nn.Linear)))
    assert abs(added - expected) < 0.001 * expected, (added, expected)


@pytest.mark.parametrize("with_gan", [True, False])
def test_training_steps_lower_the_reconstruction_loss(with_gan):
    """Steps of Algorithm 1 at the paper's RMSprop lr on one fixed batch of moving-square clips lower L_rec,
    with the adversarial term and without it (--no-gan), and D learns to tell input clips from
    reconstructions. Catches: the auto-encoder or D never updated (optimizer on the wrong parameters, a
    missing step), the no-GAN path skipping the update."""
    torch.manual_seed(0)
    clips = 0.5 * moving_squares(2, 16, 32)[:, None]
    ae = Adv3DAE(1, (4, 4, 4, 4, 4), layers=10, noise_sigma=0.005).train()
    disc = Discriminator3D(1, 16, (32, 32)) if with_gan else None
    opt_ae = torch.optim.RMSprop(ae.parameters(), lr=2e-4)
    opt_d = torch.optim.RMSprop(disc.parameters(), lr=2e-4) if with_gan else None
    steps = [adv3dae.train_step(ae, disc, opt_ae, opt_d, clips, lambda_adv=0.1) for _ in range(25)]
    assert steps[-1]["rec"] < 0.92 * steps[0]["rec"]
    if with_gan:
        assert steps[-1]["d"] < 0.5 * steps[0]["d"]


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


def test_device_split_gathers_the_same_clips_as_the_host():
    """The training split held on the device (one concatenated tensor + offsets) gives the same clips as
    gather_clips on the per-video arrays, including the clamp at a video's end (flow has one entry fewer).
    Catches: a missing per-video offset, the clamp dropped or taken against the whole split."""
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (t, 3, 4), dtype=np.uint8) for t in (20, 9, 31)]
    flows = [rng.standard_normal((t - 1, 3, 4, 2)).astype(np.float16) for t in (20, 9, 31)]
    specs = np.array([[0, 0, 1], [2, 5, 2], [1, 0, 1], [0, 4, 1], [2, 0, 3]], dtype=np.int64)
    for src in (videos, flows):
        split = adv3dae.DeviceSplit(src, "cpu")
        got = split.gather(torch.from_numpy(specs), 8).numpy()
        np.testing.assert_array_equal(got, adv3dae.gather_clips(src, specs, 8))
    assert not adv3dae.DeviceSplit.fits(videos, "cpu")


class ChunkOnly:
    """A video that may only be read in slices of at most `chunk` frames (never converted whole)."""

    def __init__(self, array, chunk):
        self.array, self.chunk, self.shape = array, chunk, array.shape

    def __len__(self):
        return len(self.array)

    def __getitem__(self, s):
        assert isinstance(s, slice) and len(range(*s.indices(len(self.array)))) <= self.chunk
        return self.array[s]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole video was converted at once")


def test_fit_stats_accumulate_in_chunks(monkeypatch):
    """The training mean image / flow statistics equal the whole-split float64 computation, read CHUNK frames
    at a time. Catches: np.asarray(video, float64) of a whole video (0.5 GB for one Avenue video), a partial
    last chunk dropped or counted twice."""
    rng = np.random.default_rng(0)
    vids = [rng.integers(0, 256, (10, 4, 6), dtype=np.uint8), rng.integers(0, 256, (3, 4, 6), dtype=np.uint8)]
    monkeypatch.setattr(FrameStream, "CHUNK", 4)
    mean = FrameStream.fit_stats([ChunkOnly(v, 4) for v in vids])["mean_image"].numpy()
    np.testing.assert_allclose(mean, np.concatenate(vids).astype(np.float64).mean(0) / 255.0, rtol=1e-6)
    x = FrameStream(torch.from_numpy(mean)).to_input(torch.from_numpy(vids[0][None]))
    assert x.shape == (1, 1, 10, 4, 6)
    np.testing.assert_allclose(x[0, 0].numpy(), vids[0] / 255.0 - mean, atol=1e-6)

    flows = [rng.standard_normal((9, 4, 6, 2)).astype(np.float16), rng.standard_normal((2, 4, 6, 2)).astype(np.float16)]
    monkeypatch.setattr(FlowStream, "CHUNK", 4)
    stats = FlowStream.fit_stats([ChunkOnly(f, 4) for f in flows])
    f = np.concatenate(flows).astype(np.float64)
    f3 = np.concatenate([f, np.sqrt((f ** 2).sum(-1, keepdims=True))], -1)
    np.testing.assert_allclose(stats["flow_mean_image"].numpy(), f3.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["flow_channel_std"].numpy(), f3.reshape(-1, 3).std(0), rtol=1e-4)

    # make_streams moves the statistics to the compute device once (a host tensor in to_input would be a
    # blocking copy, a GPU sync, per batch); the meta device shows where they live without a GPU.
    streams = adv3dae.make_streams(["rgb", "flow"], {"mean_image": torch.from_numpy(mean), **stats}, torch.device("meta"))
    assert {t.device.type for t in (streams["rgb"].mean_image, streams["flow"].mean_image,
                                    streams["flow"].channel_std)} == {"meta"}
    assert streams["flow"].to_input(torch.empty((1, 16, 4, 6, 2), dtype=torch.float16, device="meta")).shape \
        == (1, 3, 16, 4, 6)


class ClipMeanAE(nn.Module):
    """Eval mode: reconstructs each clip as its temporal mean, so a frame's error differs from clip to clip and
    the aggregation over clips matters. Training mode: returns its input (error 0), so a forgotten ae.eval()
    shows. Records the shape of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        if self.training:
            return x
        return x.mean(2, keepdim=True).expand_as(x)


def reference_scores(videos, mean, clip_len, stride, pool):
    """Straightforward per-video computation: every test clip (last aligned to the video's end; a short video
    padded by repeating its last frame), its per-pixel squared error, averaged per frame over its clips."""
    errors, maps = [], []
    for v in videos:
        t = len(v)
        starts = [0] if t < clip_len else sorted(set(list(range(0, t - clip_len + 1, stride)) + [t - clip_len]))
        total, count = np.zeros(v.shape, np.float64), np.zeros(t)
        for s in starts:
            idx = np.minimum(np.arange(s, s + clip_len), t - 1)
            clip = v[idx] / 255.0 - mean
            sq = (clip - clip.mean(0)) ** 2
            for j, f in enumerate(idx):
                total[f] += sq[j]
                count[f] += 1
        per_pixel = total / count[:, None, None]
        h, w = v.shape[1:]
        errors.append(per_pixel.mean((1, 2)))
        maps.append(per_pixel.reshape(t, h // pool, pool, w // pool, pool).mean((2, 4)))
    return errors, maps


@pytest.mark.parametrize("stride", [16, 5])
def test_score_videos_against_straightforward_computation(stride):
    """score_videos (clips of all videos streamed through fixed-shape batches, padded last batch, sums on the
    device) equals the per-video reference; every batch has exactly --test-batch-size clips.
    Catches: a missing ae.eval(), the mean over overlapping clips replaced by the max (or by the last clip),
    padded rows accumulated, a short last batch (shape change), the short-video padding dropped."""
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (37, 8, 12), dtype=np.uint8), rng.integers(0, 256, (9, 8, 12), dtype=np.uint8),
              rng.integers(0, 256, (21, 8, 12), dtype=np.uint8)]
    mean = np.full((8, 12), 0.5, np.float32)
    # 6 clips (stride 16) / 9 clips (stride 5) in batches of 4: the last batch is padded
    args = parsed("--image-size", "8", "12", "--test-stride", str(stride), "--test-batch-size", "4", "--map-pool", "2",
                  "--layers", "6")
    ae = ClipMeanAE()
    errors, maps = adv3dae.score_videos(ae, FrameStream(torch.from_numpy(mean)), videos, [len(v) for v in videos], args)
    want_e, want_m = reference_scores(videos, mean, 16, stride, 2)
    for e, m, we, wm in zip(errors, maps, want_e, want_m):
        np.testing.assert_allclose(e, we, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(m, wm, rtol=1e-5, atol=1e-7)
    assert {s[0] for s in ae.shapes} == {4} and len(set(ae.shapes)) == 1


def test_channels_last_scores_equal_default():
    """--channels-last (channels_last_3d) changes the memory layout only: same errors and maps."""
    torch.manual_seed(6)
    rng = np.random.default_rng(2)
    videos = [rng.integers(0, 256, (20, 16, 16), dtype=np.uint8)]
    ae = Adv3DAE(1, (4, 4, 4, 4, 4), layers=10)
    with torch.no_grad():
        nn.init.normal_(ae.decoder_deconvs[0].weight, std=0.1)
    stream = FrameStream(torch.full((16, 16), 0.4))
    outs = []
    for flag in ([], ["--channels-last"]):
        args = parsed("--image-size", "16", "--test-batch-size", "2", "--map-pool", "2", *flag)
        model = ae.to(memory_format=torch.channels_last_3d) if flag else ae
        outs.append(adv3dae.score_videos(model, stream, videos, [20], args))
    np.testing.assert_allclose(outs[0][0][0], outs[1][0][0], rtol=1e-5)
    np.testing.assert_allclose(outs[0][1][0], outs[1][1][0], rtol=1e-5, atol=1e-8)


def test_fresh_model_scores_as_mean_image_background_subtraction():
    """The last de-convolution starts at zero, so an untrained auto-encoder reconstructs every clip as the
    training mean image and its e_t is mean over pixels of (frame / 255 - mean image)^2, computed here
    directly: the baseline the docstring's short-budget Ped2 figures are compared with.
    Catches: PyTorch's default (or Xavier) init left on the last layer, a non-zero bias there."""
    torch.manual_seed(7)
    rng = np.random.default_rng(3)
    videos = [rng.integers(0, 256, (24, 16, 16), dtype=np.uint8), rng.integers(0, 256, (16, 16, 16), dtype=np.uint8)]
    mean = rng.uniform(0.2, 0.8, (16, 16)).astype(np.float32)
    args = parsed("--image-size", "16", "--test-batch-size", "2", "--map-pool", "2")
    ae = Adv3DAE(1, (4, 4, 4, 4, 4), layers=10)
    errors, _ = adv3dae.score_videos(ae, FrameStream(torch.from_numpy(mean)), videos, [24, 16], args)
    for e, v in zip(errors, videos):
        np.testing.assert_allclose(e, ((v / 255.0 - mean) ** 2).mean((1, 2)), rtol=1e-5)


def test_combine_streams_averages_eq14_scores():
    e = {"rgb": [np.array([1.0, 2.0, 4.0])], "flow": [np.array([10.0, 30.0, 20.0])]}
    maps = {"rgb": [np.ones((3, 2, 2))], "flow": [np.full((3, 2, 2), 3.0)]}
    scores, out = adv3dae.combine_streams(e, maps, 1)
    np.testing.assert_allclose(scores[0], (np.array([0, 0.25, 0.75]) + np.array([0, 2 / 3, 1 / 3])) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[0].astype(np.float32), (1 / 4 + 3 / 30) / 2, rtol=1e-3)
    single, _ = adv3dae.combine_streams({"rgb": e["rgb"]}, {"rgb": maps["rgb"]}, 1)
    np.testing.assert_allclose(single[0], [0, 0.25, 0.75], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- settings

def test_protocol_label_is_honest():
    """"paper settings" only when every setting the paper gives is the paper's; each change is named; our own
    choices are always listed; --no-gan / --layers 6 are named as the paper's ablation / variant.
    Catches: a reduced input size, clip length or test stride still labelled "paper settings"."""
    label = adv3dae.protocol_label(parsed("--dataset", "ped2"), ["rgb"], "none", "none")
    assert label.startswith("adv3dae paper settings;") and "our choices (not in the paper): 20 epochs, batch 16" in label
    assert "widths (32, 64, 128, 128, 128)" in label and "lambda 1.0" in label
    for extra, named in [(["--image-size", "64", "96"], "input 64x96 (paper 224x224)"),
                         (["--clip-len", "8"], "8-frame clips (paper 16)"),
                         (["--test-stride", "4"], "test stride 4"),
                         (["--lr", "1e-3"], "lr 0.001 (paper 2e-4)")]:
        label = adv3dae.protocol_label(parsed("--dataset", "ped2", *extra), ["rgb"], "none", "none")
        assert label.startswith("adv3dae changed from the paper: ") and named in label, (extra, label)
    label = adv3dae.protocol_label(parsed("--dataset", "ped2", "--no-gan", "--layers", "6"), ["rgb"], "none", "none")
    assert "no GAN (Table V ablation)" in label and "6 layers (Table VII)" in label and "lambda" not in label


def test_bad_sizes_are_one_clear_error():
    with pytest.raises(common.DataError, match="--image-size 36 52"):
        parsed("--image-size", "36", "52")                              # 10 layers: divisible by 16
    parsed("--image-size", "36", "52", "--layers", "6", "--map-pool", "2")  # 6 layers: by 4
    with pytest.raises(common.DataError, match="--clip-len 12"):
        parsed("--clip-len", "12")                                      # 10 layers: three temporal pools
    with pytest.raises(common.DataError, match="--channels"):
        parsed("--channels", "8", "8")
    with pytest.raises(common.DataError, match="--test-stride 17"):
        parsed("--test-stride", "17")                                   # frames between clips: no error to score
    parsed("--test-stride", "16")


# ----------------------------------------------------------------------------------------------- runs

def all_tensors(obj, prefix=""):
    """Every tensor of a nested state (state_dicts, optimiser states) by a path name."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(all_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(all_tensors(v, f"{prefix}/{i}"))
    return out


def test_time_boxed_slices_equal_one_uninterrupted_run(tmp_path, shared_cache, monkeypatch, capsys):
    """--max-minutes slices resumed with --resume end with the same auto-encoder, discriminator and optimiser
    states, bit for bit, as one uninterrupted run (GAN on, noise on, 2 epochs). The budget is faked to expire
    at every fourth check, so slices stop mid-epoch and at an epoch's end. The first slice is started with
    --resume and no checkpoint (starts fresh and says so); a stopped slice prints the continue command and
    writes no scores. Catches: torch's RNG (the input noise) not restored, the shuffling generator re-seeded
    on resume, the cut epoch reshuffled instead of continued, the optimiser state not saved."""
    settings = ["--epochs", "2", "--train", "--clip-len", "8", "--train-step", "80", "--image-size", "16", "32"]
    adv3dae.main(tiny_args(tmp_path, shared_cache, *settings, out="whole"))
    whole = common.load_checkpoint(str(tmp_path / "whole" / "model.pt"))

    checks = []

    def fake_expired(budget):
        if budget.seconds is None:
            return False
        checks.append(1)
        return len(checks) % 4 == 0
    monkeypatch.setattr(common.TimeBudget, "expired", fake_expired)
    capsys.readouterr()
    argv = tiny_args(tmp_path, shared_cache, *settings, "--max-minutes", "5", "--resume", out="sliced")
    assert adv3dae.main(argv) is None
    first = capsys.readouterr().out
    assert "no " in first and "starting fresh" in first
    assert "continue with: python adv3dae.py" in first and "--resume" in first.split("continue with:")[1]
    progress = [common.load_checkpoint(str(tmp_path / "sliced" / "model.pt"))["progress"]]
    for _ in range(40):
        if progress[-1]["epoch"] >= 2:
            break
        adv3dae.main(argv)
        progress.append(common.load_checkpoint(str(tmp_path / "sliced" / "model.pt"))["progress"])
    assert progress[-1] == {"epoch": 2, "step": 0}
    assert any(p["step"] > 0 for p in progress) and len(progress) >= 3, progress
    assert not os.path.exists(tmp_path / "sliced" / "scores.npz")
    sliced = common.load_checkpoint(str(tmp_path / "sliced" / "model.pt"))
    want, got = all_tensors(whole["streams"]), all_tensors(sliced["streams"])
    assert set(want) == set(got) and any("/disc/" in k for k in want) and any("opt_d" in k for k in want)
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, different[:5]


def test_test_only_takes_training_settings_from_the_checkpoint(tmp_path, shared_cache, capsys):
    """A test-only run builds the net and reports the settings the model was trained with (layers, clip length,
    size, epochs, GAN off), runs its size check after restoring them (36x52 is valid for 6 layers, not for
    the default 10), and warns when the command line disagrees. Catches: test-only runs reporting the command
    line's epochs / protocol note, the size check run before the architecture is restored, --no-gan not
    recorded, a scoring that detects no event (events are counted from the scores)."""
    train = tiny_args(tmp_path, shared_cache, "--epochs", "1", "--train", "--layers", "6", "--clip-len", "8",
                      "--no-gan", "--protocol-note", "tiny test run")
    train[train.index("--image-size") + 1:train.index("--image-size") + 3] = ["36", "52"]
    adv3dae.main(train)
    state = common.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert state["args"]["no_gan"] is True and state["streams"]["rgb"]["disc"] is None
    capsys.readouterr()
    result = adv3dae.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(tmp_path / "run"),
                           "--device", "cpu", "--test", "--epochs", "7"])
    err = capsys.readouterr().err
    assert "--epochs 7 ignored" in err
    assert result["events"]["detected"] >= 1, result["events"]       # detections, not the ground-truth count
    protocol = result["run_protocol"]
    for part in ("input 36x52", "8-frame clips", "6 layers (Table VII)", "no GAN (Table V ablation)", "1 epochs",
                 "batch 4", "training clip start step 40", "tiny test run"):
        assert part in protocol, (part, protocol)
    with np.load(tmp_path / "run" / "scores.npz") as z:
        assert z["map/Test001"].shape[1:] == (18, 26) and z["map/Test001"].dtype == np.float16
        f = z["frame/Test001"]
        assert np.isfinite(f).all() and f.min() == 0.0 and f.max() < 1.0     # eq. 14
        assert json.loads(str(z["meta"]))["protocol"]["normalize"] == "none"


def test_resume_extends_training_and_refuses_a_different_architecture(tmp_path, shared_cache, capsys):
    fast = ["--clip-len", "8", "--train-step", "80", "--image-size", "16", "32"]
    adv3dae.main(tiny_args(tmp_path, shared_cache, *fast, "--epochs", "1", "--train", "--layers", "6"))
    first = common.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert first["progress"] == {"epoch": 1, "step": 0}
    with pytest.raises(common.DataError, match="--layers"):
        adv3dae.main(tiny_args(tmp_path, shared_cache, *fast, "--epochs", "2", "--train", "--resume"))
    adv3dae.main(tiny_args(tmp_path, shared_cache, *fast, "--epochs", "2", "--train", "--resume", "--layers", "6"))
    assert "resumed from" in capsys.readouterr().out
    second = common.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert second["progress"] == {"epoch": 2, "step": 0} and second["train_time_s"] >= first["train_time_s"]


def test_nan_loss_stops_training(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setattr(adv3dae, "reconstruction_loss", lambda recon, clean: (recon - clean).sum() * float("nan"))
    with pytest.raises(common.TrainingError, match="non-finite"):
        adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "1", "--train", "--clip-len", "8", "--train-step", "80",
                               "--image-size", "16", "32"))
    assert not os.path.exists(tmp_path / "run" / "model.pt")


@pytest.mark.slow
def test_end_to_end_synthetic_defaults(tmp_path, shared_cache):
    """`python adv3dae.py --dataset synthetic` with its defaults (2-3 minutes on 2 free cores, hence slow)
    reaches frame AUC >= 0.75 and detects events.
    Catches: a scoring that loses the anomalies (e.g. eq. 14 applied twice, maps/frames misaligned across
    clips): detected events are counted from the scores, not from the ground truth."""
    out = tmp_path / "e2e"
    adv3dae.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    assert metrics["test_fps"] > 0 and metrics["train_time_s"] > 0
    assert metrics["events"]["detected"] >= 1, metrics["events"]
    assert metrics["run_protocol"].startswith("adv3dae changed from the paper: input 64x96")


def test_flow_variant_two_streams(tmp_path, shared_cache):
    """--flow (Table IX): an independent flow auto-encoder + discriminator, scores combined per eq. 14."""
    result = adv3dae.main(tiny_args(tmp_path, shared_cache, "--epochs", "1", "--flow", "--workers", "1",
                                    "--layers", "6", "--no-gan"))
    state = common.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert set(state["streams"]) == {"rgb", "flow"} and state["streams"]["flow"]["disc"] is None
    assert state["stats"]["flow_mean_image"].shape == (32, 48, 3)
    assert 0.0 <= result["frame_auc_micro"] <= 1.0 and "streams rgb+flow (Table IX)" in result["run_protocol"]
    with np.load(tmp_path / "run" / "raw_errors.npz") as z:
        assert {"rgb/Test001", "flow/Test001"} <= set(z.files)
