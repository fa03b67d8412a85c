"""Tests for stan.py (Lee et al. 2018): Table 1 shapes and activations, ConvLSTM maths, bidirectional ordering,
the losses and their gradients, eq. 5-6 scoring with lambda_s from the training split, the exact test-path
rewrites against the per-window computation, localization, time-boxed/resumed training and an end-to-end run.
Each test that guards a fix names, in its docstring, the code change (mutation) it catches."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import stan
from toy_data import moving_squares


def _seeded_models(seed=0):
    torch.manual_seed(seed)
    return stan.Generator().eval(), stan.Discriminator().eval()


# ---------------------------------------------------------------------------------------------- Table 1

def test_generator_layer_shapes_match_table1():
    generator, _ = _seeded_models()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, tuple((output[0] if isinstance(output, tuple) else output).shape[1:]))
        return hook

    for i, conv in enumerate(generator.encoder):
        conv.register_forward_hook(record(f"conv{i + 1}"))
    for i, deconv in enumerate(generator.decoder):
        deconv.register_forward_hook(record(f"deconv{i + 1}"))
    generator.forward_cell.register_forward_hook(record("forward"))
    generator.backward_cell.register_forward_hook(record("backward"))
    generator.combined_cell.register_forward_hook(record("combined"))
    with torch.no_grad():
        out = generator(torch.zeros(1, 11, 224, 224))
    # Table 1 lists (h, w, c); torch tensors are (c, h, w).
    assert seen == {
        "conv1": (16, 112, 112), "conv2": (32, 56, 56), "conv3": (64, 28, 28), "conv4": (128, 28, 28),
        "forward": (64, 28, 28), "backward": (64, 28, 28), "combined": (128, 28, 28),
        "deconv1": (64, 28, 28), "deconv2": (32, 56, 56), "deconv3": (16, 112, 112), "deconv4": (1, 224, 224),
    }
    assert out.shape == (1, 224, 224)
    # Kernel sizes and strides of Table 1.
    assert [(c.kernel_size, c.stride) for c in generator.encoder] == [
        ((5, 5), (2, 2)), ((5, 5), (2, 2)), ((3, 3), (2, 2)), ((3, 3), (1, 1))]
    assert [(d.kernel_size, d.stride) for d in generator.decoder] == [
        ((3, 3), (1, 1)), ((3, 3), (2, 2)), ((5, 5), (2, 2)), ((5, 5), (2, 2))]
    for cell in (generator.forward_cell, generator.backward_cell, generator.combined_cell):
        assert cell.gates.kernel_size == (3, 3) and cell.gates.stride == (1, 1)


def test_discriminator_layer_shapes_match_table1():
    _, discriminator = _seeded_models()
    seen = []
    for conv in list(discriminator.convs) + [discriminator.output]:
        conv.register_forward_hook(lambda m, i, o: seen.append((tuple(o.shape[1:]), m.kernel_size, m.stride)))
    with torch.no_grad():
        logits = discriminator(torch.zeros(2, 11, 224, 224))
    # Table 1 lists (l, h, w, c); torch tensors are (c, l, h, w).
    assert seen == [
        ((32, 7, 112, 112), (5, 5, 5), (1, 2, 2)),
        ((64, 5, 56, 56), (3, 5, 5), (1, 2, 2)),
        ((128, 3, 28, 28), (3, 3, 3), (1, 2, 2)),
        ((256, 1, 14, 14), (3, 3, 3), (1, 2, 2)),
        ((512, 1, 7, 7), (1, 3, 3), (1, 2, 2)),
        ((1, 1, 7, 7), (1, 3, 3), (1, 1, 1)),
    ]
    assert logits.shape == (2, 1, 7, 7)


def test_activations_are_elu_between_layers_tanh_at_g_and_logits_at_d():
    """Every layer's input is ELU of the previous layer's output (encoder, decoder, discriminator), G ends in
    tanh and D returns the last layer's raw output (the sigmoid is in the losses).
    Mutations caught: F.elu -> F.leaky_relu / F.relu in encode, decode or D; tanh dropped; a sigmoid added to D."""
    generator, discriminator = _seeded_models(2)
    layers = list(generator.encoder) + list(generator.decoder) + list(discriminator.convs) + [discriminator.output]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(4.0)          # larger pre-activations, both signs, so the units are told apart
    inputs, outputs = {}, {}
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, i: inputs.__setitem__(m, i[0].detach().clone()))
        layer.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o.detach().clone()))
    window = torch.rand(2, 11, 32, 32) * 2 - 1
    with torch.no_grad():
        generated = generator(window)
        logits = discriminator(window)

    def check_chain(chain):
        for previous, following in zip(chain, chain[1:]):
            pre = outputs[previous]
            assert (pre < -0.5).any(), "need negative pre-activations to tell ELU from other units"
            torch.testing.assert_close(inputs[following], F.elu(pre), rtol=1e-6, atol=1e-6)

    check_chain(list(generator.encoder))
    check_chain(list(generator.decoder))
    check_chain(list(discriminator.convs) + [discriminator.output])
    with torch.no_grad():
        features = generator.encode(window[0])
    torch.testing.assert_close(features, F.elu(generator.encoder[-1](F.elu(generator.encoder[-2](
        F.elu(generator.encoder[1](F.elu(generator.encoder[0](window[0].unsqueeze(1))))))))))
    torch.testing.assert_close(generated, torch.tanh(outputs[generator.decoder[-1]]).squeeze(1))
    torch.testing.assert_close(logits, outputs[discriminator.output][:, 0])


def test_non_square_input_and_size_checks(shared_cache, tmp_path):
    """H W sizes work end to end through G and D; a size that is not a multiple of 8 is one DataError.
    Mutation caught: the multiple-of-8 check removed or applied to H only."""
    generator, discriminator = _seeded_models()
    with torch.no_grad():
        assert generator(torch.zeros(1, 11, 32, 48)).shape == (1, 32, 48)
        assert discriminator(torch.zeros(1, 11, 32, 64)).shape == (1, 1, 1, 2)
    for size in (["30"], ["32", "44"]):
        with pytest.raises(common.DataError, match="multiples of 8"):
            stan.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(tmp_path),
                       "--image-size", *size])


# ---------------------------------------------------------------------------------------------- ConvLSTM

def _conv2d_reference(x, weight, bias):
    """Plain numpy 'same' 2D cross-correlation: x (C, H, W), weight (O, C, k, k)."""
    k = weight.shape[-1]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[1:]
    out = np.zeros((weight.shape[0], height, width)) + bias[:, None, None]
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,chw->ohw", weight[:, :, dy, dx], padded[:, dy:dy + height, dx:dx + width])
    return out


def test_convlstm_cell_matches_stepwise_reference():
    torch.manual_seed(1)
    cell = stan.ConvLSTMCell(in_channels=3, hidden_channels=4).double()
    sequence = torch.randn(5, 1, 3, 6, 7, dtype=torch.float64)
    weight = cell.gates.weight.detach().numpy()
    bias = cell.gates.bias.detach().numpy()
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
    h_ref = np.zeros((4, 6, 7))
    c_ref = np.zeros((4, 6, 7))
    state = cell.zero_state(sequence[0])
    for x in sequence:
        state = cell(x, state)
        # Gate order of the cell's single convolution: input, forget, output, candidate (4 channels each).
        z = _conv2d_reference(np.concatenate([x[0].numpy(), h_ref]), weight, bias)
        i, f, o, g = sigmoid(z[0:4]), sigmoid(z[4:8]), sigmoid(z[8:12]), np.tanh(z[12:16])
        c_ref = f * c_ref + i * g
        h_ref = o * np.tanh(c_ref)
        np.testing.assert_allclose(state[0][0].detach().numpy(), h_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state[1][0].detach().numpy(), c_ref, rtol=1e-10, atol=1e-12)


def test_convlstm_exact_rewrites_equal_the_cell():
    """x-part + h-part = the gate convolution of [x, h]; forward_same_input(h, c) = forward(h, (h, c)) with the
    summed weight halves. Mutations caught: the weight split at the wrong channel or its halves swapped, the
    bias counted twice or dropped, one weight half left out of the sum."""
    torch.manual_seed(4)
    cell = stan.ConvLSTMCell(in_channels=6, hidden_channels=5).double()
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64)
    h, c = torch.randn(3, 5, 7, 9, dtype=torch.float64), torch.randn(3, 5, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cell.input_part(x) + cell.recurrent_part(h), cell.gates(torch.cat([x, h], 1)))
        expected = cell(x, (h, c))
        rewritten = cell.update(cell.input_part(x) + cell.recurrent_part(h), c)
        for a, b in zip(rewritten, expected):
            torch.testing.assert_close(a, b)
        square = stan.ConvLSTMCell(in_channels=5, hidden_channels=5).double()
        for a, b in zip(square.forward_same_input(h, c), square(h, (h, c))):
            torch.testing.assert_close(a, b)


def test_temporal_consecutive_equals_per_window_temporal():
    """The shared per-frame x-parts give every window's latent exactly as Generator.temporal on that window.
    Mutations caught: a backward step reading frame i + 9 - s (off by one), the forward order reversed, the
    first step not from zero state."""
    generator, _ = _seeded_models(5)
    generator.double()
    features = torch.randn(15, 128, 4, 5, dtype=torch.float64)          # 15 consecutive frames -> 5 windows
    with torch.no_grad():
        latent = generator.temporal_consecutive(features)
        assert latent.shape == (5, 128, 4, 5)
        for i in range(5):
            window = features[i:i + 11].unsqueeze(0)
            expected = generator.temporal(window[:, stan.FORWARD_POSITIONS], window[:, stan.BACKWARD_POSITIONS])
            torch.testing.assert_close(latent[i:i + 1], expected, rtol=1e-10, atol=1e-12)


def test_discriminator_once_over_consecutive_frames_equals_per_window():
    """D over L consecutive frames gives the map of each of the L - 10 windows. Mutations caught: temporal
    padding or a temporal stride in any 3D convolution (wrong count or shifted windows)."""
    _, discriminator = _seeded_models(6)
    frames = torch.rand(1, 17, 64, 64) * 2 - 1
    with torch.no_grad():
        chunk = discriminator(frames)
        assert chunk.shape == (1, 7, 2, 2)
        for i in range(7):
            torch.testing.assert_close(chunk[:, i], discriminator(frames[:, i:i + 11])[:, 0], rtol=1e-5, atol=3e-7)


# ---------------------------------------------------------------------------------------------- ordering

def test_bidirectional_ordering_and_state_concatenation():
    generator, _ = _seeded_models()
    window = torch.stack([torch.full((32, 32), -1.0 + 0.15 * k) for k in range(11)]).unsqueeze(0)
    window = window + 0.05 * torch.randn(1, 11, 32, 32)      # every frame distinct
    with torch.no_grad():
        per_frame = generator.encode(window[0])               # (11, 128, 4, 4), frame k at row k
    calls = {"forward": [], "backward": [], "combined": []}

    def spy(name):
        def hook(module, inputs, output):
            x, (h, c) = inputs
            calls[name].append((x.detach().clone(), h.detach().clone(), c.detach().clone(),
                                output[0].detach().clone(), output[1].detach().clone()))
        return hook

    generator.forward_cell.register_forward_hook(spy("forward"))
    generator.backward_cell.register_forward_hook(spy("backward"))
    generator.combined_cell.register_forward_hook(spy("combined"))
    with torch.no_grad():
        generator(window)

    def which_frame(x):
        matches = [k for k in range(11) if torch.allclose(x[0], per_frame[k], atol=1e-5)]
        assert len(matches) == 1
        return matches[0]

    # Forward ConvLSTM reads t-5 .. t-1 (window positions 0..4), backward reads t+5 .. t+1 (10..6).
    assert [which_frame(call[0]) for call in calls["forward"]] == [0, 1, 2, 3, 4]
    assert [which_frame(call[0]) for call in calls["backward"]] == [10, 9, 8, 7, 6]
    # Each direction starts from zeros and carries its state step to step.
    for name in ("forward", "backward"):
        assert calls[name][0][1].abs().max() == 0 and calls[name][0][2].abs().max() == 0
        for prev, nxt in zip(calls[name], calls[name][1:]):
            assert torch.equal(nxt[1], prev[3]) and torch.equal(nxt[2], prev[4])
    # The combined ConvLSTM starts from the pairwise-concatenated final states (forward first).
    (x, h, c, _, _), = calls["combined"]
    last_f, last_b = calls["forward"][-1], calls["backward"][-1]
    assert torch.equal(h, torch.cat([last_f[3], last_b[3]], 1))
    assert torch.equal(c, torch.cat([last_f[4], last_b[4]], 1))
    assert torch.equal(x, h)


def test_generator_never_reads_the_middle_frame():
    generator, _ = _seeded_models()
    window = torch.rand(2, 11, 32, 32) * 2 - 1
    changed = window.clone()
    changed[:, stan.MIDDLE] = torch.rand(2, 32, 32)
    with torch.no_grad():
        assert torch.equal(generator(window), generator(changed))
        # ... but it does read every neighbour.
        for k in list(range(5)) + list(range(6, 11)):
            other = window.clone()
            other[:, k] = 0.3
            assert not torch.allclose(generator(window), generator(other))


def test_fake_sequence_replaces_only_the_middle_frame():
    window = torch.rand(2, 11, 8, 8)
    generated = torch.full((2, 8, 8), 7.0)
    fake = stan.replace_middle(window, generated)
    assert torch.equal(fake[:, 5], generated)
    keep = [k for k in range(11) if k != 5]
    assert torch.equal(fake[:, keep], window[:, keep])


# ---------------------------------------------------------------------------------------------- losses, scores

def test_losses_match_hand_computation():
    """-log D is summed over D's map (the cited local adversarial loss). Mutation caught: .mean() over the map."""
    generated = torch.tensor([[[0.5, -0.5], [0.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, -1.0]]])
    assert stan.pixel_loss(generated, target).item() == pytest.approx(0.25 + 0.25 + 0 + 4.0)
    logits = torch.tensor([[[0.3, -1.2], [2.0, 0.0]]])
    probs = 1 / (1 + np.exp(-np.array([0.3, -1.2, 2.0, 0.0])))
    assert stan.neg_log_d(logits).item() == pytest.approx(np.sum(-np.log(probs)))
    assert stan.neg_log_one_minus_d(logits).item() == pytest.approx(np.sum(-np.log(1 - probs)))
    fake_logits = torch.tensor([[[-0.7]]])
    real_logits = torch.tensor([[[1.1]]])
    d_fake, d_real = 1 / (1 + math.exp(0.7)), 1 / (1 + math.exp(-1.1))
    assert stan.discriminator_loss(real_logits, fake_logits).item() == pytest.approx(
        -math.log(1 - d_fake) - math.log(d_real))
    total, realism, pixel = stan.generator_loss(fake_logits, generated, target, lambda_pixel=0.5)
    assert total.item() == pytest.approx(-math.log(d_fake) + 2.25)
    assert realism.item() == pytest.approx(-math.log(d_fake)) and pixel.item() == pytest.approx(4.5)


def test_training_steps_lower_the_losses():
    """A few steps on one fixed batch of moving squares: pixel-loss pre-training lowers the pixel loss, the
    alternating steps teach D to tell real from generated (L_D falls, D(real) > D(fake)) while the pixel loss
    keeps falling, and with lambda = 0 the realism term alone still moves G. Catches: a step that never
    updates a network (optimizer on the wrong parameters, missing step, zero_grad after backward), real and
    fake swapped in L_D, the realism gradient cut off from G (generated frame detached in G's step)."""
    torch.manual_seed(0)
    window = moving_squares(2, 11, 32)
    generator, discriminator = stan.Generator(), stan.Discriminator()
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4)
    pixel = [stan.pretrain_step(generator, opt_g, window)["pixel"].item() for _ in range(25)]
    assert pixel[-1] < 0.6 * pixel[0]
    steps = [stan.adversarial_step(generator, discriminator, opt_g, opt_d, window, lambda_pixel=1.0)
             for _ in range(15)]
    assert steps[-1]["d"] < 0.5 * steps[0]["d"]
    assert steps[-1]["d_real"] > 0.7 > 0.3 > steps[-1]["d_fake"]
    assert steps[-1]["pixel"] < pixel[-1]
    before = [p.detach().clone() for p in generator.parameters()]
    fresh_opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4)     # no momentum left from the steps above
    stan.adversarial_step(generator, discriminator, fresh_opt_g, opt_d, window, lambda_pixel=0.0)
    moved = [not torch.equal(b, p) for b, p in zip(before, generator.parameters())]
    assert all(moved)


def test_lambda_s_rule_and_abnormality_loss():
    pixel = [np.array([np.nan, 2.0, 4.0, np.nan]), np.array([np.nan, 10.0, 1.0, np.nan]), np.full(3, np.nan)]
    disc = [np.array([np.nan, 0.5, 1.0, np.nan]), np.array([np.nan, 0.25, 0.5, np.nan]), np.full(3, np.nan)]
    maxima = stan.term_maxima(pixel, disc)
    assert maxima == {"pixel": 10.0, "disc": 1.0}
    # max pixel term 10, max discriminator term 1 -> (10 / 1) / 10 = 1.0
    assert stan.lambda_s_rule(maxima["pixel"], maxima["disc"]) == pytest.approx(1.0)
    assert stan.lambda_s_rule(10.0, 1.0, divisor=4.0) == pytest.approx(2.5)
    ls = stan.abnormality_loss(pixel[0], disc[0], 2.0)
    np.testing.assert_allclose(ls, [np.nan, 3.0, 6.0, np.nan])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "g", 2.0), pixel[1])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "d", 2.0), disc[1])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "gd", 2.0), [np.nan, 10.5, 2.0, np.nan])


class _RecordingOptimizer:
    """Stands in for Adam: records the gradients step() sees and leaves the weights unchanged."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


def test_adversarial_step_gradients_include_the_realism_term():
    """The G step's gradient is that of L_G = -log D(S^) + lambda * pixel loss through D (as computed by hand),
    and differs from the pixel-only gradient; the D step's gradient is that of L_D with the fake detached.
    Mutations caught: the fake detached in the G step (no realism gradient), lambda_pixel dropped or applied
    to the realism term, G's step taken on the D-step graph, the D step fed an undetached fake (G grads
    leaking), real/fake swapped in L_D."""
    generator, discriminator = _seeded_models(7)
    generator.train()
    discriminator.train()
    window = torch.rand(2, 11, 32, 32) * 2 - 1
    lambda_pixel = 1e-5                    # random weights: the pixel gradient would otherwise swamp the realism one
    g_ref, d_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)
    opt_g, opt_d = _RecordingOptimizer(generator.parameters()), _RecordingOptimizer(discriminator.parameters())
    losses = stan.adversarial_step(generator, discriminator, opt_g, opt_d, window, lambda_pixel)
    assert set(losses) == {"pixel", "realism", "d", "d_real", "d_fake"}
    assert all(p.requires_grad for p in discriminator.parameters())          # re-enabled after the G step

    generated = g_ref(window)
    fake = stan.replace_middle(window, generated)
    realism = stan.neg_log_d(d_ref(fake)).mean()
    pixel = stan.pixel_loss(generated, window[:, stan.MIDDLE]).mean()
    full = torch.autograd.grad(realism + lambda_pixel * pixel, list(g_ref.parameters()), retain_graph=True)
    pixel_only = torch.autograd.grad(lambda_pixel * pixel, list(g_ref.parameters()))
    for got, want in zip(opt_g.grads, full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    difference = max(float((w - p).abs().max()) for w, p in zip(full, pixel_only))
    scale = max(float(w.abs().max()) for w in full)
    assert difference > 0.2 * scale, "the realism term must move G's gradient"

    d_loss = stan.discriminator_loss(d_ref(window), d_ref(fake.detach()))
    for got, want in zip(opt_d.grads, torch.autograd.grad(d_loss, list(d_ref.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert losses["realism"].item() == pytest.approx(realism.item(), rel=1e-5)
    assert losses["d"].item() == pytest.approx(d_loss.item(), rel=1e-5)


def test_guided_elu_backward_passes_only_positive_gradients():
    x = torch.tensor([1.0, -1.0, 2.0, -0.5], requires_grad=True)
    y = stan._GuidedELU.apply(x)
    assert torch.allclose(y, F.elu(x.detach()))
    y.backward(torch.tensor([1.0, 1.0, -3.0, 2.0]))
    expected = torch.tensor([1.0, math.exp(-1.0), 0.0, 2.0 * math.exp(-0.5)])
    assert torch.allclose(x.grad, expected)


def test_guided_backprop_matches_hook_reference():
    """guided_backprop = the input gradient of D's summed logits when every ELU's incoming gradient is clamped
    at 0 (a tensor-hook implementation), at the middle frame; it differs from the plain gradient. Mutations
    caught: guided=False (plain gradient), the gradient of another frame, the sigmoid included."""
    _, discriminator = _seeded_models(8)
    sequence = torch.rand(11, 64, 64) * 2 - 1
    inputs = sequence.unsqueeze(0).clone().requires_grad_(True)
    x = inputs.unsqueeze(1)
    for conv in discriminator.convs:
        x = F.elu(conv(x))
        x.register_hook(lambda g: g.clamp(min=0))
    discriminator.output(x).sum().backward()
    expected = inputs.grad[0, stan.MIDDLE]
    plain_inputs = sequence.unsqueeze(0).clone().requires_grad_(True)
    discriminator(plain_inputs).sum().backward()
    got = stan.guided_backprop(discriminator, sequence)
    assert got.shape == (64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(got, plain_inputs.grad[0, stan.MIDDLE], rtol=1e-2, atol=1e-6)


def test_panels_rank_videos_by_raw_score():
    """The panel frames are the videos' highest raw losses, highest first. Mutation caught: ranking by the
    per-video min-max score (1.0 in every video, so the alphabetically first videos were drawn)."""
    scores = {"Test001": np.array([np.nan, 1.0, 2.0, np.nan]), "Test002": np.array([np.nan, 40.0, 90.0, 3.0]),
              "Test003": np.array([np.nan, 5.0, 1.0, np.nan]), "Test004": np.full(4, np.nan)}
    assert stan.panel_frames(scores, 2) == [("Test002", 2), ("Test003", 1)]
    assert stan.panel_frames(scores, 10) == [("Test002", 2), ("Test003", 1), ("Test001", 2)]


# ---------------------------------------------------------------------------------------------- test path

def test_score_videos_equals_per_window_forward():
    """The chunked test path (exact rewrites, padded last chunk) gives each window's straightforward
    Generator/Discriminator result. Mutations caught: padding windows kept, a chunk's windows shifted by one,
    edge maps not copied, the D term not summed over the map."""
    generator, discriminator = _seeded_models(3)
    frames = torch.randint(0, 256, (17, 64, 64), dtype=torch.uint8)
    pixel, disc, maps = stan.score_videos(generator, discriminator, {"v": frames.numpy()}, batch_size=4, map_pool=4,
                                          device=torch.device("cpu"))
    pixel, disc, maps = pixel["v"], disc["v"], maps["v"]
    assert np.isnan(pixel[:5]).all() and np.isnan(pixel[-5:]).all() and np.isfinite(pixel[5:-5]).all()
    assert np.isnan(disc[:5]).all() and np.isnan(disc[-5:]).all() and np.isfinite(disc[5:-5]).all()
    assert maps.shape == (17, 16, 16) and np.isfinite(maps).all()
    with torch.no_grad():
        for t in range(5, 12):
            window = stan.to_unit_range(frames[t - 5:t + 6]).unsqueeze(0)
            generated = generator(window)
            assert pixel[t] == pytest.approx(stan.pixel_loss(generated, window[:, 5]).item(), rel=1e-5)
            assert disc[t] == pytest.approx(stan.neg_log_d(discriminator(window)).item(), rel=1e-5)
            expected_map = F.avg_pool2d((generated - window[:, 5]).pow(2).unsqueeze(1), 4)[0, 0]
            np.testing.assert_allclose(maps[t], expected_map.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(maps[0], maps[5])
    np.testing.assert_array_equal(maps[16], maps[11])
    # the one-video library entry point: eq. 5's gd score from the same terms, and the same maps
    scores, video_maps = stan.score_video(generator, discriminator, frames.numpy(), lambda_s=0.3, batch_size=4)
    np.testing.assert_allclose(scores[5:-5], pixel[5:-5] + 0.3 * disc[5:-5], rtol=1e-12)
    assert np.isnan(scores[:5]).all() and np.isnan(scores[-5:]).all()
    np.testing.assert_array_equal(video_maps, maps)


def test_score_videos_does_not_depend_on_the_chunk_size_or_the_other_videos():
    """Chunks run across video boundaries: scoring the videos together, with one chunk for the split, several
    chunks, or two windows per chunk, gives each video the scores it gets alone; a video too short for a
    window stays NaN with zero maps. Mutations caught: a window that straddles two videos kept, a video's
    windows read from the wrong offset, a last chunk dropped, a short video's frames left out of the
    sequence, chunks restarted (and padded) per video."""
    generator, discriminator = _seeded_models(9)
    rng = np.random.default_rng(0)
    videos = {name: rng.integers(0, 256, (length, 32, 32), dtype=np.uint8) for name, length in (("a", 23), ("b", 8),
                                                                                               ("c", 14), ("d", 11))}
    cpu = torch.device("cpu")
    alone = {name: stan.score_videos(generator, discriminator, {name: frames}, batch_size=64, map_pool=2, device=cpu)
             for name, frames in videos.items()}
    assert np.isnan(alone["b"][0]["b"]).all() and not alone["b"][2]["b"].any()
    assert np.isfinite(alone["d"][0]["d"][5]) and np.isnan(alone["d"][0]["d"][[4, 6]]).all()
    # the split's 56 frames give 46 windows: one chunk of 64, ten of 5 (the last one short and padded)
    offsets, chunks = stan.chunk_plan(videos, 64)
    assert offsets == {"a": 0, "b": 23, "c": 31, "d": 45} and chunks == [(0, 46)]
    assert len(stan.chunk_plan(videos, 5)[1]) == 10 and stan.chunk_plan(videos, 5)[1][-1] == (45, 1)
    for b in (64, 5, 2):
        together = stan.score_videos(generator, discriminator, videos, batch_size=b, map_pool=2, device=cpu)
        for part in range(3):
            for name in videos:
                np.testing.assert_allclose(together[part][name], alone[name][part][name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- training runs

def _tiny_argv(cache, out, *extra):
    # 32x32 input (latent 4x4, D map 1x1) and few steps per epoch: exercises the loop, not the method.
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(out), "--image-size", "32",
            "--num-panels", "0", *extra]


def _expire_at(monkeypatch, checks):
    """TimeBudget.expired() returns True at the given (1-based) calls only."""
    calls = {"n": 0}

    def expired(self):
        calls["n"] += 1
        return calls["n"] in checks

    monkeypatch.setattr(common.TimeBudget, "expired", expired)


def test_time_boxed_slices_equal_one_uninterrupted_run(shared_cache, tmp_path, monkeypatch, capsys):
    """Slices stopped mid pre-training, at an epoch boundary and mid adversarial epoch, each resumed, end bit for
    bit with the weights and optimiser states of one uninterrupted run; a stopped slice prints the continue
    command and does not test. Mutations caught: resuming at the start of the epoch instead of the saved step,
    the step counter not saved, re-seeding the epoch order from the slice, the optimiser state not restored."""
    settings = ["--steps-per-epoch", "3", "--pretrain-epochs", "1", "--epochs", "2"]
    straight = tmp_path / "straight"
    stan.main(_tiny_argv(shared_cache, straight, "--train", *settings))
    sliced = tmp_path / "sliced"
    # Checks happen after every step except an epoch's last, and after every epoch but the last.
    _expire_at(monkeypatch, {2})                  # after epoch 1 step 2
    # Train + test requested, and --resume with no checkpoint yet: a fresh start.
    stan.main(_tiny_argv(shared_cache, sliced, *settings, "--max-minutes", "5", "--resume"))
    out = capsys.readouterr().out
    assert "no " in out and "starting fresh" in out
    assert "stopped after" in out and "epoch 1/3 step 2/3" in out and "continue with: python stan.py" in out
    assert out.split("continue with:")[1].count("--resume") == 1
    assert not (sliced / "scores.npz").exists() and not (sliced / "metrics.json").exists()
    saved = torch.load(sliced / "model.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2) and saved["lambda_s_maxima"] is None
    _expire_at(monkeypatch, {4})                  # epoch 1 step 3, boundary, epoch 2 steps 1, 2, boundary -> stop
    stan.main(_tiny_argv(shared_cache, sliced, "--train", *settings, "--max-minutes", "5", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    saved = torch.load(sliced / "model.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 0)
    _expire_at(monkeypatch, {1})                  # after epoch 3 step 1
    stan.main(_tiny_argv(shared_cache, sliced, "--train", *settings, "--max-minutes", "5", "--resume"))
    assert (torch.load(sliced / "model.pt", weights_only=True)["step"]) == 1
    _expire_at(monkeypatch, set())
    stan.main(_tiny_argv(shared_cache, sliced, "--train", *settings, "--resume"))
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(sliced / "model.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 0)
    for part in ("generator", "discriminator"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for part in ("opt_g", "opt_d"):
        for index, state in a[part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b[part]["state"][index][key]), (part, index, key)
    assert a["lambda_s_maxima"] == b["lambda_s_maxima"] and a["lambda_s_maxima"]["split"] == "train"
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert json.loads((sliced / "train_log.json").read_text())[-1]["phase"] == "adversarial"


@pytest.mark.parametrize("broken", ["pixel_loss", "discriminator_loss", "generator_loss"])
def test_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(shared_cache, tmp_path, monkeypatch,
                                                                           broken):
    """A NaN/inf loss in pre-training, in the D step or in the G step stops with a TrainingError; model.pt is
    the last finite epoch's (none when the first epoch fails). Mutation caught: train() computing L_G inline
    instead of through generator_loss (the broken generator_loss would go unnoticed)."""
    nan = float("nan")
    argv = _tiny_argv(shared_cache, tmp_path, "--train", "--steps-per-epoch", "2")
    if broken == "pixel_loss":
        monkeypatch.setattr(stan, "pixel_loss", lambda g, t: (g - t).pow(2).flatten(1).sum(1) * nan)
        argv += ["--pretrain-epochs", "1", "--epochs", "0"]
    else:
        if broken == "discriminator_loss":
            monkeypatch.setattr(stan, "discriminator_loss", lambda r, f: torch.tensor(float("inf"), requires_grad=True))
        else:
            real_loss = stan.generator_loss

            def nan_generator_loss(*args):
                total, realism, pixel = real_loss(*args)
                return total * nan, realism, pixel

            monkeypatch.setattr(stan, "generator_loss", nan_generator_loss)
        argv += ["--pretrain-epochs", "1", "--epochs", "1"]
    with pytest.raises(common.TrainingError, match="non-finite"):
        stan.main(argv)
    if broken == "pixel_loss":
        assert not (tmp_path / "model.pt").exists()
    else:
        kept = torch.load(tmp_path / "model.pt", weights_only=True)
        assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["generator"].values())


@pytest.fixture(scope="module")
def tiny_run(shared_cache, tmp_path_factory):
    """One tiny train + test run (32x32, 1 pixel-loss + 1 adversarial epoch of 2 steps) shared by the tests below."""
    out = tmp_path_factory.mktemp("stan_tiny") / "run"
    stan.main(_tiny_argv(shared_cache, out, "--steps-per-epoch", "2", "--pretrain-epochs", "1", "--epochs", "1",
                         "--num-panels", "2"))                  # the later --num-panels wins
    return out


def test_tiny_run_writes_every_output(tiny_run):
    """scores.npz layout (NaN edges, float16 maps), metrics.json with Table 2's three detectors, the
    un-normalised result and the per-epoch losses, panels, train_log.json; the easy synthetic anomalies are
    found even by this barely trained model."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75
    assert set(metrics["detectors"]) == {"g", "d", "gd"}
    assert metrics["detectors"]["gd"]["frame_auc_micro"] == pytest.approx(metrics["frame_auc_micro"])
    assert metrics["unnormalized"]["frame_auc_micro"] is not None and metrics["pixel_auc"] is not None
    assert [h["phase"] for h in metrics["train_history"]] == ["pretrain", "adversarial"]
    assert {"pixel", "realism", "d", "d_real", "d_fake"} <= set(metrics["train_history"][-1])
    assert json.loads((tiny_run / "train_log.json").read_text()) == metrics["train_history"]
    scores = np.load(tiny_run / "scores.npz")
    meta = json.loads(str(scores["meta"]))
    assert meta["method"] == "stan" and meta["detector"] == "gd" and meta["lambda_s"] > 0
    assert meta["protocol"] == {"normalize": "video_minmax", "smooth": "none"}
    frame = scores["frame/Test001"]
    assert np.isnan(frame[:5]).all() and np.isnan(frame[-5:]).all() and np.isfinite(frame[5:-5]).all()
    assert scores["map/Test001"].dtype == np.float16 and scores["map/Test001"].shape == (len(frame), 8, 8)
    assert len(list((tiny_run / "panels").glob("*.png"))) == 2


def _copy_run(run, tmp_path):
    import shutil
    return shutil.copytree(run, tmp_path / "run")


def test_lambda_s_comes_from_the_training_split(shared_cache, tiny_run, tmp_path, capsys):
    """model.pt holds the two maxima over the training windows scored by the final model, and the test uses
    them; --lambda-s-split test is the only way to the test-split rule and says so. Mutations caught: maxima
    taken over the test split, taken before the last epoch, or the test recomputing the rule on test scores."""
    out = _copy_run(tiny_run, tmp_path)
    state = torch.load(out / "model.pt", weights_only=True)
    generator, discriminator = stan.Generator().eval(), stan.Discriminator().eval()
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    ds = common.load_dataset("synthetic", cache_dir=shared_cache, seed=0)
    frames = common.load_split_frames(ds, "train", (32, 32), cache_dir=shared_cache)
    pixel, disc, _ = stan.score_videos(generator, discriminator, frames, 32, 4, torch.device("cpu"))
    train_terms = stan.term_maxima(pixel.values(), disc.values())
    maxima = state["lambda_s_maxima"]
    assert maxima["split"] == "train"
    assert maxima["pixel"] == pytest.approx(train_terms["pixel"], rel=1e-5)
    assert maxima["disc"] == pytest.approx(train_terms["disc"], rel=1e-5)
    meta = json.loads(str(np.load(out / "scores.npz")["meta"]))
    train_rule = stan.lambda_s_rule(maxima["pixel"], maxima["disc"])
    assert meta["lambda_s"] == pytest.approx(train_rule) and meta["lambda_s_maxima"]["split"] == "train"
    capsys.readouterr()
    stan.main(_tiny_argv(shared_cache, out, "--test", "--lambda-s-split", "test"))
    metrics = json.loads((out / "metrics.json").read_text())
    test_maxima = metrics["lambda_s_maxima"]
    assert test_maxima["split"] == "test" and "TEST split" in metrics["run_protocol"]
    assert metrics["lambda_s"] == pytest.approx(stan.lambda_s_rule(test_maxima["pixel"], test_maxima["disc"]))
    assert abs(metrics["lambda_s"] - train_rule) > 1e-3 * train_rule       # the two rules really differ here


def test_test_only_run_takes_training_settings_from_the_checkpoint(shared_cache, tiny_run, tmp_path, capsys):
    """A test-only run reports the checkpoint's size and epochs and warns about a disagreeing flag. Mutation
    caught: restore_training_args not called (the command line's --image-size/--epochs used)."""
    out = _copy_run(tiny_run, tmp_path)
    capsys.readouterr()
    before = json.loads((out / "metrics.json").read_text())
    stan.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--test", "--num-panels", "0",
               "--image-size", "48", "--epochs", "7", "--detector", "d"])
    err = capsys.readouterr().err
    assert "--image-size 48 48 ignored" in err and "--epochs 7 ignored" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_size"] == [32, 32]
    assert "1 pixel-loss pre-training epochs then 1 alternating" in metrics["run_protocol"]
    assert "epochs capped at 2 steps" in metrics["run_protocol"] and "REDUCED" in metrics["run_protocol"]
    assert [h["phase"] for h in metrics["train_history"]] == ["pretrain", "adversarial"]
    # The discriminator-only row (Table 2) on top equals the "d" entry of the train + test run.
    assert metrics["detector"] == "d"
    assert metrics["frame_auc_micro"] == pytest.approx(before["detectors"]["d"]["frame_auc_micro"])


def test_protocol_label_is_honest():
    """Defaults on real data are 'paper settings with our epoch counts' (never 'paper protocol'); any
    departure is named. Mutation caught: a setting missing from the comparison (e.g. batch size)."""
    parser = stan.build_parser()

    def label(*argv):
        args = common.parse_args(parser, ["--dataset", "ped2", "--device", "cpu", *argv])
        return stan.resolve_defaults(args).protocol

    default = label()
    assert default.startswith("STAN paper settings with our epoch counts") and "not the paper's" not in default
    assert "224x224" in default and "batch 3" in default and "10 pixel-loss" in default and "20 alternating" in default
    assert "paper protocol" not in default
    for argv, words in ((["--batch-size", "4"], "batch size 4 (paper 3)"), (["--image-size", "96"], "image size"),
                        (["--lambda-s", "2"], "lambda_s fixed"), (["--steps-per-epoch", "9"], "capped at 9"),
                        (["--lr", "1e-3"], "lr 0.001 (paper 0.0002)")):
        text = label(*argv)
        assert text.startswith("STAN REDUCED") and words in text, (argv, text)


@pytest.mark.slow
def test_end_to_end_synthetic(shared_cache, tmp_path):
    """Synthetic defaults (64x64, 3 pixel-loss + 1 adversarial epochs), with 12 instead of 40 steps per epoch
    to keep CI short, train, score and reach frame AUC >= 0.75; all three detectors of Table 2 are recorded."""
    out = tmp_path / "run"
    stan.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--num-panels", "2",
               "--steps-per-epoch", "12"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75
    assert metrics["unnormalized"]["frame_auc_micro"] is not None
    assert set(metrics["detectors"]) == {"g", "d", "gd"}
    assert metrics["detectors"]["gd"]["frame_auc_micro"] == pytest.approx(metrics["frame_auc_micro"])
    assert metrics["pixel_auc"] is not None and metrics["test_fps"] > 0
    assert len(metrics["train_history"]) == 4 and "d_fake" in metrics["train_history"][-1]
    scores = np.load(out / "scores.npz")
    meta = json.loads(str(scores["meta"]))
    assert meta["method"] == "stan" and meta["detector"] == "gd" and meta["lambda_s"] > 0
    frame = scores["frame/Test001"]
    assert np.isnan(frame[:5]).all() and np.isfinite(frame[5:-5]).all()
    assert scores["map/Test001"].dtype == np.float16 and scores["map/Test001"].shape == (len(frame), 16, 16)
    assert len(list((out / "panels").glob("*.png"))) == 2


@pytest.mark.slow
def test_default_synthetic_command_runs_under_three_minutes(tmp_path):
    import subprocess
    import sys
    import time
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.time()
    subprocess.run([sys.executable, os.path.join(repo, "stan.py"), "--dataset", "synthetic", "--out", str(tmp_path),
                    "--cache-dir", str(tmp_path / "cache")], check=True, cwd=repo)
    assert time.time() - started < 180
    assert json.loads((tmp_path / "metrics.json").read_text())["frame_auc_micro"] >= 0.75
