"""Tests for deep_anomaly.py: D_t, AlexNet names/shapes and weight loading, receptive fields, Mahalanobis,
sparse AE loss, the cascade, the zeta rule, training plumbing and an end-to-end synthetic run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.spatial.distance import mahalanobis

import common
import deep_anomaly as da
from torchvision_alexnet import TORCHVISION_ALEXNET_FEATURES


# ------------------------------------------------------------------------------------------ backbone


def test_alexnet_state_dict_matches_torchvision_table():
    sd = da.AlexNetFeatures().state_dict()
    assert list(sd) == list(TORCHVISION_ALEXNET_FEATURES)
    assert {k: tuple(v.shape) for k, v in sd.items()} == TORCHVISION_ALEXNET_FEATURES


def test_import_needs_no_torchvision():
    code = "import sys, deep_anomaly; assert 'torchvision' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(da.__file__)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ------------------------------------------------------------------------------------------ D_t


def test_make_dt_averages_pairs_and_stacks_three():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 5, 7), dtype=np.uint8)
    d = da.make_dt(torch.from_numpy(frames)).numpy()
    assert d.shape == (6, 3, 5, 7)
    f = frames.astype(np.float64) / 255
    for n in range(6):
        t = n + 3                                   # target frame of row n
        for c in range(3):                          # channel c = I'_{t-2+c}
            s = t - 2 + c
            np.testing.assert_allclose(d[n, c], (f[s] + f[s - 1]) / 2, atol=1e-6)
    # six frame slots per pass, frames t-3 .. t: all influence D_t
    assert da.FRAMES_BEFORE == 3
    # the fused, channels-last network input equals the plain construction followed by per-channel normalisation
    mean, std = torch.tensor(da.IMAGENET_MEAN), torch.tensor(da.IMAGENET_STD)
    fused = da.network_input(torch.from_numpy(frames), mean, std)
    plain = (torch.from_numpy(d) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def test_regional_feature_shapes_per_layer():
    frames = torch.randint(0, 256, (2 + 3, 240, 320), dtype=torch.uint8)
    expected = {1: (59, 79, 64), 2: (29, 39, 192), 3: (14, 19, 384)}
    for layer, shape in expected.items():
        model = da.DeepAnomaly(layer, hidden=16).eval()
        with torch.inference_mode():
            feats = model.regional_features(frames)
        assert tuple(feats.shape) == (2,) + shape


# ------------------------------------------------------------------------------------------ receptive fields


def _geometry_copy(layers):
    """Same kernel sizes, strides, paddings and pooling as `layers`, one channel, all-ones weights."""
    out = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            conv = nn.Conv2d(1, 1, m.kernel_size, m.stride, m.padding)
            nn.init.ones_(conv.weight)
            nn.init.zeros_(conv.bias)
            out.append(conv)
        elif isinstance(m, nn.MaxPool2d):
            out.append(nn.MaxPool2d(m.kernel_size, m.stride, m.padding))
        else:
            out.append(nn.ReLU())
    return nn.Sequential(*out)


@pytest.mark.parametrize("layer,expected", [(1, (11, 4, -2)), (2, (51, 8, -18)), (3, (99, 16, -34))])
def test_receptive_field_against_impulse_brute_force(layer, expected):
    layers = da.AlexNetFeatures().features[:da.LAYER_END[layer]]
    rf = da.receptive_field(layers)
    assert rf == expected                            # C2: the paper's 51 x 51 receptive field
    size, jump, first = rf
    net = _geometry_copy(layers)
    H, W = 70, 77
    impulses = torch.zeros(H * W, 1, H, W)
    impulses.view(H * W, -1)[torch.arange(H * W), torch.arange(H * W)] = 1.0
    with torch.no_grad():
        response = torch.cat([net(chunk) for chunk in impulses.split(1024)])    # (H*W, 1, h, w)
    h, w = response.shape[2:]
    support = (response[:, 0] > 0).reshape(H, W, h, w).numpy()
    (rlo, rhi), (clo, chi) = da.unit_intervals(layers, H), da.unit_intervals(layers, W)
    assert (len(rlo), len(clo)) == (h, w)
    interior = 0
    for i in range(h):
        for j in range(w):
            expect = np.zeros((H, W), bool)
            expect[rlo[i]:rhi[i] + 1, clo[j]:chi[j] + 1] = True
            assert np.array_equal(support[:, :, i, j], expect), (layer, i, j)
            nominal = (first + i * jump, first + i * jump + size - 1, first + j * jump, first + j * jump + size - 1)
            if nominal[0] >= 0 and nominal[1] < H and nominal[2] >= 0 and nominal[3] < W:
                assert (rlo[i], rhi[i], clo[j], chi[j]) == nominal       # away from the borders: the nominal field
                interior += 1
    assert interior > 0 or layer == 3
    # border clipping is real: with W = 77 the last conv1 column feeds no pool1 unit, so C2 sees less than W
    if layer == 2:
        assert chi[-1] < W - 1


def test_receptive_field_gradient_support_of_real_model():
    """Gradient of one C2 unit of the real AlexNet w.r.t. the input: with positive weights and the max-pools
    swapped for average pools of the same geometry (a max-pool routes the gradient to one input only), the
    non-zero support is exactly the computed 51 x 51 receptive field."""
    model = da.AlexNetFeatures()
    layers = []
    for m in model.features[:da.LAYER_END[2]]:
        if isinstance(m, nn.Conv2d):
            m.weight.data.abs_()
            m.bias.data.abs_()
            layers.append(m)
        elif isinstance(m, nn.MaxPool2d):
            layers.append(nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
        else:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    x = torch.rand(1, 3, 120, 160, requires_grad=True)
    out = net(x)
    i, j = 5, 7
    out[0, :, i, j].sum().backward()
    support = (x.grad[0].abs().sum(0) > 0).numpy()
    size, jump, first = da.receptive_field(model.features[:da.LAYER_END[2]])
    expect = np.zeros_like(support)
    expect[first + i * jump:first + i * jump + size, first + j * jump:first + j * jump + size] = True
    assert np.array_equal(support, expect)


# ------------------------------------------------------------------------------------------ Gaussians


def test_moment_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, (1000, 4)) @ rng.normal(size=(4, 4))
    acc = da.MomentAccumulator(4)
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk).float())
    mean, cov = acc.finalize()
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.T, bias=True), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_mahalanobis_matches_scipy(eps):
    rng = np.random.default_rng(2)
    d = 6
    x = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    mean, cov = x.mean(0), np.cov(x.T, bias=True)
    g = da.GaussianClassifier(d)
    ridge = g.fit(torch.from_numpy(mean), torch.from_numpy(cov), eps)
    assert ridge == pytest.approx(eps * np.trace(cov) / d)
    vi = np.linalg.inv(cov + ridge * np.eye(d))
    queries = rng.normal(size=(20, d)) * 3
    got = g.distance(torch.from_numpy(queries).float()).numpy()
    want = [mahalanobis(q, mean, vi) for q in queries]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # batched over any leading shape, as on a (N, H, W, d) feature grid
    grid = torch.from_numpy(queries).float().reshape(2, 5, 2, d)
    np.testing.assert_allclose(g.distance(grid).numpy().ravel(), want, rtol=1e-4)


def test_mahalanobis_is_finite_with_dead_channels():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(size=(300, 8)), 0)
    x[:, 2] = 0.0                                     # a dead ReLU channel: zero variance
    x[:, 5] = x[:, 4]                                 # and an exactly collinear pair
    g = da.GaussianClassifier(8)
    ridge = g.fit(torch.from_numpy(x.mean(0)), torch.from_numpy(np.cov(x.T, bias=True)), 1e-3)
    assert ridge > 0
    q = torch.from_numpy(rng.normal(size=(10, 8))).float()
    assert torch.isfinite(g.distance(q)).all()
    vi = np.linalg.inv(np.cov(x.T, bias=True) + ridge * np.eye(8))
    np.testing.assert_allclose(g.distance(q).numpy(), [mahalanobis(v, x.mean(0), vi) for v in q.numpy()], rtol=2e-3)


# ------------------------------------------------------------------------------------------ sparse AE


def test_sparse_ae_loss_hand_checked():
    # 2 inputs, 2 hidden units, W_enc = 0, b = 0 -> every hidden activation sigmoid(0) = 0.5;
    # W_dec = I, b_dec = 0 -> reconstruction (0.5, 0.5) of x = (1, 2).
    # recon  = 1/2 ((0.5 - 1)^2 + (0.5 - 2)^2) = 1/2 (0.25 + 2.25) = 1.25
    # decay  = lambda/2 (||0||^2 + ||I||^2) = 0.1/2 * 2 = 0.1
    # KL per unit, rho = 0.25, rho_hat = 0.5: 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = 0.1308120...
    # total  = 1.25 + 0.1 + 3 * 2 * 0.1308120 = 2.1348721
    ae = da.SparseAutoencoder(2, 2)
    with torch.no_grad():
        ae.encoder.weight.zero_()
        ae.encoder.bias.zero_()
        ae.decoder.weight.copy_(torch.eye(2))
        ae.decoder.bias.zero_()
    x = torch.tensor([[1.0, 2.0]])
    hidden, recon = da._ae_forward_std(ae, x)
    total, parts = da.sparse_ae_loss(x, hidden, recon, [ae.encoder.weight, ae.decoder.weight],
                                     rho=0.25, sparsity_weight=3.0, weight_decay=0.1)
    assert parts["recon"].item() == pytest.approx(1.25)
    assert parts["decay"].item() == pytest.approx(0.1)
    assert parts["kl"].item() == pytest.approx(2 * 0.1308120, abs=1e-6)
    assert total.item() == pytest.approx(2.1348721, abs=1e-6)


def test_ct_encode_folds_standardisation():
    ae = da.SparseAutoencoder(5, 7)
    ae.in_mean.copy_(torch.arange(5.0))
    ae.in_std.copy_(torch.linspace(0.5, 2.0, 5))
    x = torch.randn(11, 5)
    hidden, _ = da._ae_forward_std(ae, ae.standardise(x))
    torch.testing.assert_close(ae.encode(x), hidden)


# ------------------------------------------------------------------------------------------ cascade


def test_cascade_three_branches_and_score():
    alpha, beta, phi = 10.0, 4.0, 6.0
    #                      normal   normal,    susp.->normal  susp.->abnormal  abnormal  abnormal
    d1 = torch.tensor([2.0, 3.9, 7.0, 7.0, 10.0, 25.0])
    d2 = torch.tensor([100.0, 100.0, 5.9, 6.0, 0.0, 0.0])         # G2 ignored outside (beta, alpha)
    abnormal, suspicious = da.cascade_labels(d1, d2, alpha, beta, phi)
    assert suspicious.tolist() == [False, False, True, True, False, False]
    assert abnormal.tolist() == [False, False, False, True, True, True]
    s = da.cascade_score(d1, d2, alpha, beta, phi)
    assert ((s >= 1) == abnormal).all()
    # s is the largest lambda at which the scaled cascade still says abnormal (brute force over lambda)
    lambdas = torch.linspace(0.01, 5, 5000)
    for k in range(len(d1)):
        flags = [bool(da.cascade_labels(d1[k], d2[k], l * alpha, l * beta, l * phi)[0]) for l in lambdas.tolist()]
        sup = max((l for l, f in zip(lambdas.tolist(), flags) if f), default=0.0)
        assert float(s[k]) == pytest.approx(sup, abs=2e-3)


def test_single_classifier_and_cascade_region_scores():
    torch.manual_seed(0)
    model = da.DeepAnomaly(2, hidden=8).eval()
    frames = torch.randint(0, 256, (4 + 3, 120, 180), dtype=torch.uint8)
    with torch.inference_mode():
        feats = model.regional_features(frames)
        d1, d2 = model.distances(feats)
        # thresholds inside the observed range so that every branch occurs (nudged off the samples: no ties)
        alpha, beta, phi = (d1.quantile(0.8).item() * 1.00001, d1.quantile(0.4).item() * 1.00001,
                            d2.median().item() * 1.00001)
        model.thresholds.copy_(torch.tensor([alpha, beta, phi]))
        exact = model.region_scores(frames, ct_regions="all")
        torch.testing.assert_close(exact, da.cascade_score(d1, d2, alpha, beta, phi))
        # the paper's computation: CT/G2 only in the suspicious band, the lower bound d1/alpha elsewhere
        fast = model.region_scores(frames, ct_regions="suspicious")
        band = (d1 > beta) & (d1 < alpha)
        assert band.any() and (~band).any()
        torch.testing.assert_close(fast[band], exact[band])
        torch.testing.assert_close(fast[~band], d1[~band] / alpha)
        assert torch.equal(fast >= 1, exact >= 1)          # identical decisions at the paper's thresholds
        torch.testing.assert_close(model.region_scores(frames, cascade=False, single="g1"), d1 / alpha)
        torch.testing.assert_close(model.region_scores(frames, cascade=False, single="g2"), d2 / phi)


# ------------------------------------------------------------------------------------------ localization


def _brute_force_zeta(scores, supports, H, W, zeta):
    """Per pixel: scores of every unit whose (brute-force) support covers it -> (zeta+1)-th largest (0 if
    fewer) and the number of covering units with score >= 1."""
    gh, gw = scores.shape
    covering = [[[] for _ in range(W)] for _ in range(H)]
    for i in range(gh):
        for j in range(gw):
            for y, x in zip(*np.nonzero(supports[:, :, i, j])):
                covering[y][x].append(scores[i, j])
    kth = np.zeros((H, W))
    count = np.zeros((H, W), int)
    for y in range(H):
        for x in range(W):
            vals = sorted(covering[y][x], reverse=True)
            kth[y, x] = vals[zeta] if len(vals) > zeta else 0.0
            count[y, x] = sum(v >= 1.0 for v in vals)
    return kth, count


def test_zeta_map_matches_brute_force():
    model = da.DeepAnomaly(2, hidden=8)
    H, W, zeta = 120, 180, 3
    loc = da.Localizer(model, (H, W), torch.device("cpu"))
    assert loc.grid == (14, 21)
    rng = np.random.default_rng(4)
    scores = rng.gamma(2.0, 0.4, loc.grid)
    # receptive fields by brute force: impulse responses of a one-channel copy of C1-S1-C2 (all-ones weights)
    net = _geometry_copy(model.backbone.features[:da.LAYER_END[2]])
    rows = torch.zeros(H, 1, H, 1)
    rows[torch.arange(H), 0, torch.arange(H), 0] = 1.0
    cols = torch.zeros(W, 1, 1, W)
    cols[torch.arange(W), 0, 0, torch.arange(W)] = 1.0
    with torch.no_grad():   # separable geometry: rows from a full-width stripe, columns from a full-height one
        row_support = net(rows.expand(H, 1, H, W)).amax(3)[:, 0] > 0        # (H, gh)
        col_support = net(cols.expand(W, 1, H, W)).amax(2)[:, 0] > 0        # (W, gw)
    supports = (row_support[:, None, :, None] & col_support[None, :, None, :]).numpy()
    kth, count = _brute_force_zeta(scores, supports, H, W, zeta)
    got = loc(torch.from_numpy(scores).float()[None], zeta)[0].numpy()
    assert got.shape == (len(loc.rows_px), len(loc.cols_px)) == (30, 45)
    np.testing.assert_allclose(got, kth[np.ix_(loc.rows_px, loc.cols_px)], rtol=1e-6)
    # the sampled map holds the full-resolution maximum (every distinct covering set is sampled for C2)
    assert got.max() == pytest.approx(kth.max())
    assert all(np.abs(got - v).min() < 1e-6 for v in np.unique(kth))      # every distinct value is sampled
    # map >= 1 <=> more than zeta abnormal (score >= 1) receptive fields cover the pixel
    np.testing.assert_array_equal(got >= 1.0, (count > zeta)[np.ix_(loc.rows_px, loc.cols_px)])


# ------------------------------------------------------------------------------------------ training runs


def _small_args(cache, out, *extra):
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(out), "--device", "cpu",
            "--ae-samples", "3000", "--threshold-samples", "3000", "--hidden", "32", "--num-panels", "0",
            "--input-size", "64", "96", *extra]


def test_nan_loss_stops_training(shared_cache, tmp_path, monkeypatch):
    def nan_loss(x, hidden, recon, weights, *a, **k):
        total = (recon - x).sum() * float("nan")
        return total, {"recon": total, "decay": total, "kl": total}
    monkeypatch.setattr(da, "sparse_ae_loss", nan_loss)
    with pytest.raises(common.TrainingError, match="non-finite"):
        da.main(_small_args(shared_cache, tmp_path, "--train", "--epochs", "1"))
    assert not (tmp_path / "model.pt").exists()


def test_checkpoint_then_resume(shared_cache, tmp_path, capsys):
    da.main(_small_args(shared_cache, tmp_path, "--train", "--epochs", "1"))
    first = common.load_checkpoint(str(tmp_path / "model.pt"))
    assert first["stage"] == "done" and first["epoch"] == 1
    steps_1 = max(s["step"] for s in first["optimizer"]["state"].values())
    da.main(_small_args(shared_cache, tmp_path, "--train", "--epochs", "2", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    second = common.load_checkpoint(str(tmp_path / "model.pt"))
    assert second["epoch"] == 2
    steps_2 = max(s["step"] for s in second["optimizer"]["state"].values())
    assert steps_2 == 2 * steps_1                     # epoch 2 continued the same optimizer
    assert not torch.equal(first["model"]["ct.encoder.weight"], second["model"]["ct.encoder.weight"])
    # the backbone came from the checkpoint, unchanged
    assert torch.equal(first["model"]["backbone.features.3.weight"], second["model"]["backbone.features.3.weight"])


def test_end_to_end_synthetic(shared_cache, tmp_path, capsys):
    """The synthetic defaults except a shorter auto-encoder schedule (5 epochs on 20,000 regions) for CI time."""
    out = tmp_path / "run"
    da.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu",
             "--epochs", "5", "--ae-samples", "20000", "--threshold-samples", "20000"])
    printed = capsys.readouterr().out
    assert "frames/s" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    assert metrics["pixel_auc"] is not None
    assert metrics["test_fps"] > 0 and "alexnet-random" in metrics["protocol"]
    with np.load(out / "scores.npz") as z:
        frame = z["frame/Test001"]
        vmap = z["map/Test001"]
    assert np.isnan(frame[:3]).all() and np.isfinite(frame[3:]).all()
    assert vmap.dtype == np.float16 and vmap.shape == (len(frame), 30, 45)
    np.testing.assert_allclose(frame[3:], vmap[3:].astype(np.float32).reshape(len(frame) - 3, -1).max(1), rtol=1e-6)
    # a test-only run reloads model.pt and reproduces the scores
    da.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu", "--test",
             "--num-panels", "0"])
    again = json.loads((out / "metrics.json").read_text())
    assert again["frame_auc_micro"] == pytest.approx(metrics["frame_auc_micro"])


@pytest.mark.slow
def test_real_ped2_reduced(tmp_path):
    """Real UCSD Ped2 with a random backbone (no ImageNet weights offline) and a short AE schedule."""
    from conftest import real_ped2_root
    root = real_ped2_root()
    if root is None:
        pytest.skip("VAD_DATA_ROOT does not hold UCSDped2")
    out = tmp_path / "ped2"
    da.main(["--dataset", "ped2", "--data-root", root, "--out", str(out), "--backbone-weights", "none",
             "--epochs", "3", "--ae-samples", "30000", "--threshold-samples", "30000", "--num-panels", "0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_frames"] == 2010 and metrics["pixel_auc"] is not None
    assert metrics["frame_auc_micro"] > 0.5 and metrics["test_fps"] > 0
