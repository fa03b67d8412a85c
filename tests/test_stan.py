"""Tests for stan.py (Lee et al. 2018): Table 1 shapes, ConvLSTM maths, bidirectional ordering, the
losses and eq. 5-6 scoring, test-time batching, checkpoint/resume, NaN handling and an end-to-end run."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stan


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
    assert logits.shape == (2, 7, 7)


def test_activations_tanh_generator_output_and_elu_elsewhere():
    generator, discriminator = _seeded_models()
    with torch.no_grad():
        for p in generator.decoder[-1].parameters():
            p.add_(5.0)                                   # drive the output layer into saturation
        out = generator(torch.rand(1, 11, 64, 64) * 2 - 1)
    assert out.abs().max() <= 1.0
    # ELU (not ReLU) in the encoder: a negative pre-activation gives a value in (-1, 0).
    features = generator.encode(torch.full((1, 64, 64), -1.0))
    assert (features < 0).any() and features.min() > -1.0


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
    generated = torch.tensor([[[0.5, -0.5], [0.0, 1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, -1.0]]])
    assert stan.pixel_loss(generated, target).item() == pytest.approx(0.25 + 0.25 + 0 + 4.0)
    logits = torch.tensor([[[0.3, -1.2], [2.0, 0.0]]])
    probs = 1 / (1 + np.exp(-np.array([0.3, -1.2, 2.0, 0.0])))
    assert stan.neg_log_d(logits).item() == pytest.approx(np.mean(-np.log(probs)))
    assert stan.neg_log_one_minus_d(logits).item() == pytest.approx(np.mean(-np.log(1 - probs)))
    fake_logits = torch.tensor([[[-0.7]]])
    real_logits = torch.tensor([[[1.1]]])
    d_fake, d_real = 1 / (1 + math.exp(0.7)), 1 / (1 + math.exp(-1.1))
    assert stan.discriminator_loss(real_logits, fake_logits).item() == pytest.approx(
        -math.log(1 - d_fake) - math.log(d_real))
    assert stan.generator_loss(fake_logits, generated, target, lambda_pixel=1.0).item() == pytest.approx(
        -math.log(d_fake) + 4.5)
    assert stan.generator_loss(fake_logits, generated, target, lambda_pixel=0.5).item() == pytest.approx(
        -math.log(d_fake) + 2.25)


def test_lambda_s_rule_and_abnormality_loss():
    pixel = [np.array([np.nan, 2.0, 4.0, np.nan]), np.array([np.nan, 10.0, 1.0, np.nan])]
    disc = [np.array([np.nan, 0.5, 1.0, np.nan]), np.array([np.nan, 0.25, 0.5, np.nan])]
    # max pixel term 10, max discriminator term 1 -> (10 / 1) / 10 = 1.0
    assert stan.lambda_s_rule(pixel, disc) == pytest.approx(1.0)
    assert stan.lambda_s_rule(pixel, disc, divisor=4.0) == pytest.approx(2.5)
    assert stan.lambda_s_rule(np.array([3.0, 6.0]), np.array([0.2, 0.3])) == pytest.approx(2.0)
    ls = stan.abnormality_loss(pixel[0], disc[0], 2.0)
    np.testing.assert_allclose(ls, [np.nan, 3.0, 6.0, np.nan])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "g", 2.0), pixel[1])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "d", 2.0), disc[1])
    np.testing.assert_allclose(stan.detector_scores(pixel[1], disc[1], "gd", 2.0), [np.nan, 10.5, 2.0, np.nan])
    # Eq. 6 on l_s = [nan, 3, 6, 4.5]: (l - 3) / (6 - 3)
    np.testing.assert_allclose(stan.minmax_per_video([np.nan, 3.0, 6.0, 4.5]), [np.nan, 0.0, 1.0, 0.5])


def test_guided_elu_backward_passes_only_positive_gradients():
    x = torch.tensor([1.0, -1.0, 2.0, -0.5], requires_grad=True)
    y = stan._GuidedELU.apply(x)
    assert torch.allclose(y, F.elu(x.detach()))
    y.backward(torch.tensor([1.0, 1.0, -3.0, 2.0]))
    expected = torch.tensor([1.0, math.exp(-1.0), 0.0, 2.0 * math.exp(-0.5)])
    assert torch.allclose(x.grad, expected)


def test_score_video_equals_per_window_forward():
    generator, discriminator = _seeded_models(3)
    frames = torch.randint(0, 256, (16, 32, 32), dtype=torch.uint8)
    pixel, disc, maps = stan.score_video(generator, discriminator, frames, batch_size=4, map_pool=4)
    assert np.isnan(pixel[:5]).all() and np.isnan(pixel[-5:]).all() and np.isfinite(pixel[5:-5]).all()
    assert np.isnan(disc[:5]).all() and np.isnan(disc[-5:]).all()
    assert maps.shape == (16, 8, 8) and np.isfinite(maps).all()
    with torch.no_grad():
        for t in range(5, 11):
            window = stan.to_unit_range(frames[t - 5:t + 6]).unsqueeze(0)
            generated = generator(window)
            assert pixel[t] == pytest.approx(stan.pixel_loss(generated, window[:, 5]).item(), rel=1e-4)
            assert disc[t] == pytest.approx(stan.neg_log_d(discriminator(window)).item(), rel=1e-4)
            # The stored map is the average-pooled pixel-loss map: its sum x pool^2 is the pixel term.
            assert maps[t].sum() * 16 == pytest.approx(pixel[t], rel=1e-4)
    np.testing.assert_array_equal(maps[0], maps[5])
    np.testing.assert_array_equal(maps[15], maps[10])


def test_guided_backprop_map_shape_and_nonnegative():
    _, discriminator = _seeded_models()
    sequence = torch.rand(11, 64, 64) * 2 - 1
    saliency = stan.guided_backprop_map(discriminator, sequence)
    assert saliency.shape == (64, 64) and (saliency >= 0).all() and saliency.sum() > 0


# ---------------------------------------------------------------------------------------------- training runs

def _tiny_argv(cache, out, *extra):
    # 32x32 input (latent 4x4, D map 1x1) and two steps per epoch: exercises the loop, not the method.
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(out), "--image-size", "32",
            "--steps-per-epoch", "2", "--train", *extra]


def test_checkpoint_resume_matches_uninterrupted_training(shared_cache, tmp_path, capsys):
    straight = tmp_path / "straight"
    stan.main(_tiny_argv(shared_cache, straight, "--pretrain-epochs", "1", "--epochs", "1"))
    split = tmp_path / "split"
    stan.main(_tiny_argv(shared_cache, split, "--pretrain-epochs", "1", "--epochs", "0"))
    first = torch.load(split / "model.pt", weights_only=True)
    assert first["epoch"] == 1 and first["args"]["image_size"] == 32 and "opt_d" in first
    stan.main(_tiny_argv(shared_cache, split, "--pretrain-epochs", "1", "--epochs", "1", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(split / "model.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("generator", "discriminator"):
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-6), (part, key)
    # The adversarial epoch really changed the weights that pre-training left.
    assert not torch.equal(first["discriminator"]["output.weight"], b["discriminator"]["output.weight"])


@pytest.mark.parametrize("phase", ["pretrain", "adversarial"])
def test_non_finite_loss_stops_training_and_saves_nothing(shared_cache, tmp_path, monkeypatch, phase):
    if phase == "pretrain":
        monkeypatch.setattr(stan, "pixel_loss", lambda g, t: torch.full((g.shape[0],), float("nan")))
        argv = _tiny_argv(shared_cache, tmp_path, "--pretrain-epochs", "1", "--epochs", "0")
    else:
        monkeypatch.setattr(stan, "discriminator_loss", lambda r, f: torch.tensor(float("inf")))
        argv = _tiny_argv(shared_cache, tmp_path, "--pretrain-epochs", "0", "--epochs", "1")
    with pytest.raises(stan.common.TrainingError, match="non-finite"):
        stan.main(argv)
    assert not (tmp_path / "model.pt").exists()


def test_end_to_end_synthetic(shared_cache, tmp_path):
    """Synthetic defaults (64x64, 3 pixel-loss + 1 adversarial epochs), with 25 instead of 40 steps per epoch
    to keep CI short, train, score and reach frame AUC >= 0.75."""
    out = tmp_path / "run"
    stan.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--num-panels", "2",
               "--steps-per-epoch", "25"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75
    assert metrics["normalize"] == "video_minmax"
    assert metrics["unnormalized"]["normalize"] == "none"
    assert set(metrics["detectors"]) == {"g", "d", "gd"}
    assert metrics["pixel_auc"] is not None and metrics["events"]["total"] > 0
    assert metrics["test_fps"] > 0 and metrics["train_time_s"] > 0
    scores = np.load(out / "scores.npz")
    meta = json.loads(str(scores["meta"]))
    assert meta["method"] == "stan" and meta["detector"] == "gd" and meta["lambda_s"] > 0
    frame = scores["frame/Test001"]
    assert np.isnan(frame[:5]).all() and np.isfinite(frame[5:-5]).all()
    assert scores["map/Test001"].dtype == np.float16 and scores["map/Test001"].shape == (len(frame), 16, 16)
    assert len(list((out / "panels").glob("*.png"))) == 2
    # Test-only rerun from model.pt with the discriminator-only detector (Table 2, second row).
    stan.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--test",
               "--detector", "d", "--num-panels", "0"])
    metrics_d = json.loads((out / "metrics.json").read_text())
    assert metrics_d["detector"] == "d"
    assert metrics_d["frame_auc_micro"] == pytest.approx(metrics["detectors"]["d"]["frame_auc_micro"])


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
