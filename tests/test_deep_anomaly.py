"""Tests for deep_anomaly.py: D_t, AlexNet names/shapes and weight loading, receptive fields, Mahalanobis,
sparse AE loss, the cascade, the zeta rule, training plumbing and an end-to-end synthetic run."""

import argparse
import json
import os
import subprocess
import sys

import cv2
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


def test_make_dt_uses_six_frames_three_disjoint_pairs():
    """D_t = <I'_t-4, I'_t-2, I'_t>: six consecutive frames, each entering one pair average once.
    Mutation caught: D_t from three consecutive averaged frames <I'_t-2, I'_t-1, I'_t> (four frames, the
    previous construction), and any lag or channel-order change in network_input."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (11, 5, 7), dtype=np.uint8)
    d = da.make_dt(torch.from_numpy(frames)).numpy()
    assert d.shape == (6, 3, 5, 7)
    f = frames.astype(np.float64) / 255
    for n in range(6):
        t = n + 5                                   # target frame of row n
        for c, lag in enumerate((4, 2, 0)):         # channel c = I'_{t-lag} = (I_{t-lag} + I_{t-lag-1}) / 2
            np.testing.assert_allclose(d[n, c], (f[t - lag] + f[t - lag - 1]) / 2, atol=1e-6)
    assert da.FRAMES_BEFORE == 5                    # frames t-5 .. t, all six used
    # the fused, channels-last network input equals the plain construction followed by per-channel normalisation,
    # also for target positions that are not consecutive (batches that run across videos)
    mean, std = torch.tensor(da.IMAGENET_MEAN), torch.tensor(da.IMAGENET_STD)
    plain = (torch.from_numpy(d) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    pos = torch.tensor([5, 7, 10, 6])
    fused = da.network_input(torch.from_numpy(frames), pos, mean, std)
    torch.testing.assert_close(fused, plain[pos - 5], rtol=1e-5, atol=1e-5)
    assert fused.is_contiguous(memory_format=torch.channels_last)


def test_regional_feature_shapes_per_layer():
    frames = torch.randint(0, 256, (2 + 5, 240, 320), dtype=torch.uint8)
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


def test_float32_mahalanobis_against_float64_reference():
    """The test path's float32 distance (precomputed inverse Cholesky factor, one matrix product) against the
    float64 distance of the same regularised Gaussian, at the paper's sizes (C2: 192, CT: 500), with ReLU-like
    features far from the origin, dead channels and a condition number of ~1e6: relative error < 1e-4.
    Mutation caught: the quadratic form expanded in float32 (x'Px - 2 mu'Px + mu'P mu with P = Sigma^-1),
    or the Cholesky factor computed in float32."""
    rng = np.random.default_rng(5)
    for d in (192, 500):
        basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
        spectrum = np.logspace(0, -6, d)
        cov = (basis * spectrum) @ basis.T
        cov[:, :7] = cov[:7, :] = 0.0                        # dead channels
        mean = np.abs(rng.normal(3.0, 1.0, d))
        mean[:7] = 0.0
        g = da.GaussianClassifier(d)
        ridge = g.fit(torch.from_numpy(mean), torch.from_numpy(cov), 1e-3)
        chol = np.linalg.cholesky(cov + ridge * np.eye(d))
        x = mean + rng.standard_normal((200, d)) @ chol.T * rng.uniform(0.2, 5.0, (200, 1))
        ref = np.linalg.norm(np.linalg.solve(chol, (x - mean).T), axis=0)
        got = g.distance(torch.from_numpy(x).float()).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_classifiers_stay_float32_under_autocast():
    """--amp runs the convolutions in bf16; G1, CT and G2 must not follow. Mutation caught: removing the
    autocast-disabled region in GaussianClassifier.distance or SparseAutoencoder.encode (F.linear would run in
    bf16, errors ~1e-2), or folding CT's standardisation (W m) into its bias outside that region (~1e-3)."""
    torch.manual_seed(1)
    d = 192
    g = da.GaussianClassifier(d)
    a = torch.randn(d, d, dtype=torch.float64)
    g.fit(torch.rand(d, dtype=torch.float64) * 3, a @ a.T / d, 1e-3)
    ae = da.SparseAutoencoder(d, 64)
    ae.in_mean.uniform_(1.0, 2.0)                           # a standardisation that is not the identity
    ae.in_std.uniform_(0.3, 0.5)
    x = torch.rand(300, d) * 3
    plain_d, plain_h = g.distance(x), ae.encode(x)
    with torch.autocast("cpu", torch.bfloat16):
        amp_d, amp_h = g.distance(x.bfloat16()), ae.encode(x)
    assert amp_d.dtype == torch.float32 and amp_h.dtype == torch.float32
    torch.testing.assert_close(amp_d, g.distance(x.bfloat16().float()))
    torch.testing.assert_close(amp_h, plain_h)
    assert torch.equal(plain_d, g.distance(x))


# ------------------------------------------------------------------------------------------ sparse AE


def test_autoencoder_epochs_lower_the_loss():
    """train_autoencoder on features with low-rank structure (8 factors in 64 dimensions): five epochs at the
    script's defaults lower the sparse auto-encoder loss J and its reconstruction part on the whole set, with
    every epoch saved. Catches: epochs that never update the auto-encoder (missing step, optimizer on other
    parameters), the loss computed on unstandardised features, a run that returns before its last epoch."""
    gen = torch.Generator().manual_seed(0)
    data = 10.0 + 3.0 * (torch.randn(1000, 8, generator=gen) @ torch.randn(8, 64, generator=gen)
                         + 0.1 * torch.randn(1000, 64, generator=gen))  # off zero mean and unit scale
    ae = da.SparseAutoencoder(64, 32)
    ae.in_mean.copy_(data.mean(0))
    ae.in_std.copy_(data.std(0))
    args = argparse.Namespace(epochs=5, batch_size=100, rho=0.05, sparsity_weight=3.0, weight_decay=3e-3)

    @torch.no_grad()
    def whole_set_loss():
        x = ae.standardise(data)
        hidden, recon = da._ae_forward_std(ae, x)
        return da.sparse_ae_loss(x, hidden, recon, [ae.encoder.weight, ae.decoder.weight], args.rho,
                                 args.sparsity_weight, args.weight_decay)

    loss_before, parts_before = whole_set_loss()
    saved_epochs, progress = [], {"epoch": 1, "step": 0, "shuffle": None}
    done = da.train_autoencoder(argparse.Namespace(ct=ae), data, torch.optim.Adam(ae.parameters(), lr=1e-3),
                                torch.Generator().manual_seed(1), progress, args, common.TimeBudget(None),
                                lambda: saved_epochs.append(progress["epoch"]))
    loss_after, parts_after = whole_set_loss()
    assert done and saved_epochs == [2, 3, 4, 5, 6]
    assert loss_after < 0.95 * loss_before and parts_after["recon"] < 0.85 * parts_before["recon"]


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
    """Mutation caught: CT/G2 scores outside the suspicious band, a wrong band, the masked (CUDA) and the
    gathered (CPU) computation disagreeing, single-classifier branches swapped."""
    torch.manual_seed(0)
    model = da.DeepAnomaly(2, hidden=8).eval()
    frames = torch.randint(0, 256, (4 + 5, 120, 180), dtype=torch.uint8)
    with torch.inference_mode():
        feats = model.regional_features(frames)
        d1, d2 = model.distances(feats)
        # thresholds inside the observed range so that every branch occurs (nudged off the samples: no ties)
        alpha, beta, phi = (d1.quantile(0.8).item() * 1.00001, d1.quantile(0.4).item() * 1.00001,
                            d2.median().item() * 1.00001)
        model.thresholds.copy_(torch.tensor([alpha, beta, phi]))
        exact = model.region_scores(feats, ct_regions="all")
        torch.testing.assert_close(exact, da.cascade_score(d1, d2, alpha, beta, phi))
        # the paper's computation: CT/G2 only in the suspicious band, the lower bound d1/alpha elsewhere
        band = (d1 > beta) & (d1 < alpha)
        assert band.any() and (~band).any()
        for gather in (True, False):          # the default (gather the band) and the fixed-shape masked select
            fast = model.region_scores(feats, ct_regions="suspicious", gather=gather)
            torch.testing.assert_close(fast[band], exact[band])
            torch.testing.assert_close(fast[~band], d1[~band] / alpha)
            assert torch.equal(fast >= 1, exact >= 1)          # identical decisions at the paper's thresholds
        torch.testing.assert_close(model.region_scores(feats, cascade=False, single="g1"), d1 / alpha)
        torch.testing.assert_close(model.region_scores(feats, cascade=False, single="g2"), d2 / phi)


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


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("size", [(240, 320), (120, 180), (240, 360)])
def test_map_grid_samples_every_distinct_covering_set(layer, size):
    """The stored map must hold every distinct value of the full-resolution zeta map (so the frame score, its
    maximum, is the full-resolution maximum): along each axis every distinct set of covering receptive
    fields, computed here by brute force from the unit intervals, is sampled. C2 keeps the 4-pixel grid.
    The grid must also sit where eval.py's bilinear upsampling (cv2, pixel-centre convention) puts the map's
    cells, or the localisation is shifted: upsampled to the frame, a map holding each cell's index must give
    back at every sampled pixel its cell's index to within half a pixel's worth (an even step puts the cell
    centre between two pixels).
    Mutations caught: the fixed rule "every jump/2 pixels from jump/4", which misses C3's 3-pixel runs; the
    earlier rule that took any offset (C3 at 240x320 sampled from pixel 6 every 8: shifted by 2 pixels)."""
    loc = da.Localizer(da.DeepAnomaly(layer, hidden=8), size, torch.device("cpu"))
    for length, (lo, hi), sampled in [(size[0], loc.row_intervals, loc.rows_px), (size[1], loc.col_intervals, loc.cols_px)]:
        sets = [tuple(np.flatnonzero((lo <= p) & (p <= hi))) for p in range(length)]
        assert set(sets) == {sets[p] for p in sampled}, (layer, size, length)
        steps = np.diff(sampled)
        assert (steps == steps[0]).all()                # a regular grid: eval upsamples it bilinearly
        step = int(steps[0])
        assert len(sampled) * step == length          # eval's scale (length / cells) is the sampling step
        ramp = np.arange(len(sampled), dtype=np.float32)[:, None].repeat(2, 1)
        at_pixels = cv2.resize(ramp, (2, length), interpolation=cv2.INTER_LINEAR)[sampled, 0]
        assert np.abs(at_pixels - ramp[:, 0]).max() <= 0.5 / step + 1e-6, (layer, size, length, sampled[:2])
    if layer == 2:
        assert loc.rows_px[0] == 2 and loc.rows_px[1] - loc.rows_px[0] == 4


# ------------------------------------------------------------------------------------------ training runs


def _small_args(cache, out, *extra):
    return ["--dataset", "synthetic", "--cache-dir", cache, "--out", str(out), "--device", "cpu",
            "--ae-samples", "3000", "--threshold-samples", "3000", "--hidden", "32", "--num-panels", "0",
            "--image-size", "32", "48", *extra]      # a 3 x 5 C2 grid: small and fast, every code path


def _fitted_model(layer=2, hidden=8, size=(64, 96), seed=0):
    """A random-backbone model with G1, CT and G2 fitted to random frames and thresholds inside the observed
    distance range, so that every cascade branch occurs."""
    torch.manual_seed(seed)
    model = da.DeepAnomaly(layer, hidden).eval()
    frames = torch.randint(0, 256, (12, *size), dtype=torch.uint8)
    with torch.inference_mode():
        feats = model.regional_features(frames).reshape(-1, da.LAYER_CHANNELS[layer]).double()
        model.g1.fit(feats.mean(0), torch.cov(feats.T, correction=0))
        codes = model.ct.encode(feats.float()).double()
        model.g2.fit(codes.mean(0), torch.cov(codes.T, correction=0))
        d1, d2 = model.distances(feats.float())
        model.thresholds.copy_(torch.tensor([d1.quantile(0.9).item(), d1.quantile(0.3).item(), d2.median().item()]))
    return model


def test_score_split_equals_per_frame_computation():
    """score_split streams all videos through fixed-size batches that cross video boundaries, with padding,
    maps and scores kept on the device. It must equal the straightforward computation: per video and target
    frame, make_dt -> normalise -> C1-S1-C2 -> cascade -> zeta map; frame score = float32 map maximum; frames
    t < 5 NaN with the first scored frame's map; videos too short to score all NaN.
    Mutation caught: an off-by-one in BatchPlan positions or segment offsets, padding rows written into the
    outputs, frame scores taken from the float16 map, the t < 5 fill or the short-video case broken."""
    model = _fitted_model()
    size = (64, 96)
    loc = da.Localizer(model, size, torch.device("cpu"))
    rng = np.random.default_rng(6)
    videos = {"a": rng.integers(0, 256, (9, *size), dtype=np.uint8), "short": rng.integers(0, 256, (4, *size), dtype=np.uint8),
              "b": rng.integers(0, 256, (13, *size), dtype=np.uint8), "c": rng.integers(0, 256, (6, *size), dtype=np.uint8)}
    mean, std = model.input_mean, model.input_std
    expected = {}
    with torch.inference_mode():
        for name, v in videos.items():
            maps = []
            for t in range(5, len(v)):
                x = (da.make_dt(torch.from_numpy(v[t - 5:t + 1])) - mean) / std
                feats = model.backbone(x, 2).permute(0, 2, 3, 1)
                maps.append(loc(model.region_scores(feats, gather=True), 3)[0])
            expected[name] = torch.stack(maps).numpy() if maps else None
    for batch in (3, 64):
        args = da.resolve_defaults(common.parse_args(da.build_parser(), ["--device", "cpu", "--test-batch-size",
                                                                          str(batch)]))
        scores, maps = da.score_split(model, loc, videos, args)
        assert list(scores) == list(videos)
        for name, v in videos.items():
            assert scores[name].dtype == np.float32 and maps[name].dtype == np.float16
            assert scores[name].shape == (len(v),) and maps[name].shape == (len(v), 16, 24)
            assert np.isnan(scores[name][:5]).all()
            if expected[name] is None:
                assert np.isnan(scores[name]).all()
                continue
            want = expected[name]
            np.testing.assert_allclose(maps[name][5:].astype(np.float32), want, rtol=2e-3, atol=1e-4)
            np.testing.assert_allclose(scores[name][5:], want.reshape(len(want), -1).max(1), rtol=1e-5)
            assert (maps[name][:5] == maps[name][5]).all()


def test_gaussian_fit_refuses_a_covariance_it_cannot_factor():
    """A zero ridge on a singular covariance (a constant feature) used to leave NaN distances behind and fail
    later with a confusing threshold error. Mutation caught: the loop's else branch removed."""
    g = da.GaussianClassifier(3)
    cov = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(common.DataError, match="not positive definite"):
        g.fit(torch.zeros(3, dtype=torch.float64), cov, 0.0)
    assert g.fit(torch.zeros(3, dtype=torch.float64), cov, 1e-3) > 0
    assert torch.isfinite(g.distance(torch.ones(2, 3))).all()


def test_stored_map_keeps_scores_below_one_below_one(monkeypatch):
    """float16 rounds 1 - 1e-4 up to 1.0: the stored map would mark a pixel abnormal at the paper's thresholds
    (map >= 1) that the float32 score calls normal. Mutation caught: the plain float16 cast."""
    model = _fitted_model()
    size = (64, 96)
    loc = da.Localizer(model, size, torch.device("cpu"))
    ny, nx = len(loc.rows_px), len(loc.cols_px)
    values = torch.tensor([0.5, 1 - 1e-4, 1 - 3e-4, 1.0, 1.0 + 1e-4, 3.0])
    grid = values.repeat_interleave(ny * nx // len(values) + 1)[:ny * nx].reshape(ny, nx)
    monkeypatch.setattr(da, "score_batch", lambda model, localizer, frames, pos, args: grid.expand(len(pos), ny, nx))
    args = da.resolve_defaults(common.parse_args(da.build_parser(), ["--device", "cpu"]))
    video = np.zeros((7, *size), np.uint8)
    scores, maps = da.score_split(model, loc, {"v": video}, args)
    want = grid.numpy()
    stored = maps["v"][5].astype(np.float32)
    assert ((stored >= 1) == (want >= 1)).all()
    assert (np.float16(1 - 1e-4) == 1) and np.abs(stored - want).max() < 1e-3


def test_batch_plan_crosses_videos_with_one_buffer_shape():
    """Mutation caught: batches restarted per video (short videos padded to a whole batch), a buffer length
    that varies between batches, segments missing their 5 context frames."""
    plan = da.BatchPlan([9, 4, 13, 6], batch=5)
    assert plan.num_targets == 4 + 0 + 8 + 1 and plan.counts == [5, 5, 3]
    assert plan.segments[0] == [(0, 5, 9), (2, 5, 6)] and plan.segments[1] == [(2, 6, 11)]
    assert plan.segments[2] == [(2, 11, 13), (3, 5, 6)]
    assert plan.buffer_len == max(4 + 5 + 1 + 5, 5 + 5, 2 + 5 + 1 + 5)
    videos = [np.full((n, 2, 2), 10 * v + np.arange(n)[:, None, None], np.uint8) for v, n in enumerate([9, 4, 13, 6])]
    bufs = list(plan.buffers(videos))
    assert {b.shape for b in bufs} == {(plan.buffer_len, 2, 2)}
    for k, segs in enumerate(plan.segments):        # every target's six frames are t-5 .. t of its own video
        row = 0
        for v, t0, t1 in segs:
            for t in range(t0, t1):
                p = plan.positions[k, row]
                assert [int(bufs[k][p - j, 0, 0]) for j in range(6)] == [10 * v + t - j for j in range(6)]
                row += 1
        assert (plan.positions[k, row:] == plan.positions[k, row - 1]).all()
    # the device-resident path (the whole split copied once, buffers gathered on the device) yields the
    # same buffers and positions as the host-assembled one. Mutation caught: rows offset by one video,
    # padding rows not repeating the last frame.
    streamed = list(da.stream_batches(plan, videos, torch.device("cpu"), resident=False))
    resident = list(da.stream_batches(plan, videos, torch.device("cpu"), resident=True))
    assert len(streamed) == len(resident) == len(plan.segments)
    for (f1, p1, first1, n1), (f2, p2, first2, n2), buf in zip(streamed, resident, bufs):
        assert torch.equal(f1, f2) and torch.equal(f2, torch.from_numpy(buf)) and torch.equal(p1, p2)
        assert (first1, n1) == (first2, n2)


def test_fit_g1_uses_every_training_region_once():
    """Pass 1 streams the training videos through padded batches that cross video boundaries. G1's moments
    must come from every regional feature exactly once (no padding rows, no short-video frames), and the
    auto-encoder's subset must be exactly the drawn regions, without repeats. Mutation caught: padding rows
    kept (feats instead of feats[:n]), regions drawn with replacement."""
    torch.manual_seed(2)
    model = da.DeepAnomaly(2, hidden=8).eval()
    size = (64, 96)
    rng = np.random.default_rng(7)
    videos = [rng.integers(0, 256, (n, *size), dtype=np.uint8) for n in (9, 4, 14)]    # 13 targets: 3 padding rows
    args = da.resolve_defaults(common.parse_args(da.build_parser(), ["--device", "cpu", "--test-batch-size", "4",
                                                                      "--image-size", "64", "96", "--ae-samples", "150"]))
    with torch.inference_mode():
        every = torch.cat([model.regional_features(torch.from_numpy(v)).reshape(-1, 192) for v in videos if len(v) > 5])
    subset = da.fit_g1(model, videos, args)
    ids = da.region_subset(len(every), 150, args.seed)
    assert len(ids) == 150 and len(np.unique(ids)) == 150
    torch.testing.assert_close(subset, every[torch.from_numpy(ids)])
    torch.testing.assert_close(model.ct.in_mean, every.double().mean(0).float(), rtol=1e-5, atol=1e-5)
    cov = torch.cov(every.double().T, correction=0)
    ref = da.GaussianClassifier(192)
    ref.fit(every.double().mean(0), cov, args.cov_eps)
    torch.testing.assert_close(model.g1.whiten, ref.whiten, rtol=1e-3, atol=1e-3)


def test_image_size_flag_replaces_input_size(tmp_path):
    """One name for the input size. Mutation caught: the old --input-size kept, or --image-size ignored."""
    parser = da.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--input-size", "64", "96"])
    args = da.resolve_defaults(common.parse_args(parser, ["--device", "cpu", "--image-size", "64"]))
    assert args.image_size == (64, 64)
    args = da.resolve_defaults(common.parse_args(parser, ["--device", "cpu", "--dataset", "ped2"]))
    assert args.image_size == (240, 320)


def test_older_checkpoint_is_refused(tmp_path):
    """A model.pt of the older D_t layout (no format tag) must not be scored with the new D_t.
    Mutation caught: dropping the format check in load_model_checkpoint."""
    common.save_checkpoint(str(tmp_path / "model.pt"), {"model": {}, "stage": "done", "args": {"layer": 2}})
    with pytest.raises(common.DataError, match="older deep_anomaly"):
        da.main(["--dataset", "synthetic", "--out", str(tmp_path), "--device", "cpu", "--test"])


def test_nan_loss_stops_training(shared_cache, tmp_path, monkeypatch):
    """Mutation caught: the loss monitor not checked before an epoch's checkpoint (a NaN model saved)."""
    def nan_loss(x, hidden, recon, weights, *a, **k):
        total = (recon - x).sum() * float("nan")
        return total, {"recon": total, "decay": total, "kl": total}
    monkeypatch.setattr(da, "sparse_ae_loss", nan_loss)
    with pytest.raises(common.TrainingError, match="non-finite"):
        da.main(_small_args(shared_cache, tmp_path, "--train", "--epochs", "1"))
    assert not (tmp_path / "model.pt").exists()


def test_time_sliced_training_equals_uninterrupted(shared_cache, tmp_path, monkeypatch, capsys):
    """--max-minutes slices (the budget "expires" at every 4th check: after the G1 pass, inside epochs, at an
    epoch end, before G2) resumed with --resume end bit for bit where one uninterrupted run ends: G1, the
    auto-encoder (CT), G2, thresholds and the optimiser state. A stopped slice exits without testing and
    prints the continue command.
    Mutation caught: the shuffling generator re-seeded on resume (the previous behaviour), the position in the
    epoch or the optimiser state not restored, the subset redrawn, G1 refitted on resume."""
    extra = ["--train", "--epochs", "2", "--batch-size", "256"]
    whole = tmp_path / "whole"
    da.main(_small_args(shared_cache, whole, *extra))
    calls = {"n": 0}

    def expired(self):
        calls["n"] += 1
        return calls["n"] % 4 == 0
    monkeypatch.setattr(common.TimeBudget, "expired", expired)
    sliced = tmp_path / "sliced"
    capsys.readouterr()
    steps_seen, argv = set(), _small_args(shared_cache, sliced, *extra, "--max-minutes", "1")
    for slice_number in range(30):
        da.main(argv + (["--resume"] if slice_number else []))
        ckpt = common.load_checkpoint(str(sliced / "model.pt"))
        if ckpt["stage"] == "done":
            break
        steps_seen.add((ckpt["stage"], ckpt["step"]))
        if ckpt["stage"] == "autoencoder":      # the regions live beside model.pt, not in every checkpoint
            assert "subset" not in ckpt and (sliced / da.SUBSET_FILE).is_file()
    printed = capsys.readouterr().out
    assert slice_number >= 3 and any(stage == "autoencoder" and step > 0 for stage, step in steps_seen)
    assert "continue with: python deep_anomaly.py" in printed and "--resume" in printed
    assert "frames/s" not in printed                          # a stopped slice does not test
    a, b = common.load_checkpoint(str(whole / "model.pt")), common.load_checkpoint(str(sliced / "model.pt"))
    assert list(a["model"]) == list(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)
    assert "subset" not in b and not (sliced / da.SUBSET_FILE).exists()  # done: the AE's data is dropped


def test_resume_without_the_autoencoder_regions_names_the_file(shared_cache, tmp_path, monkeypatch):
    """A model.pt stopped in the auto-encoder stage continues on the regions saved in ae_subset.pt; without
    that file (e.g. only model.pt was copied) the resume must stop with an error naming it, not redraw.
    Mutation caught: the file not written, or a missing / foreign one loaded silently."""
    monkeypatch.setattr(common.TimeBudget, "expired", lambda self: True)     # stop after the G1 pass
    out = tmp_path / "run"
    argv = _small_args(shared_cache, out, "--train", "--epochs", "1", "--max-minutes", "1")
    da.main(argv)
    assert common.load_checkpoint(str(out / "model.pt"))["stage"] == "autoencoder"
    regions = out / da.SUBSET_FILE
    saved = regions.read_bytes()
    regions.unlink()
    with pytest.raises(common.DataError, match="ae_subset.pt: not found"):
        da.main(argv + ["--resume"])
    common.save_checkpoint(str(regions), {"subset": torch.zeros(3, 192)})
    with pytest.raises(common.DataError, match=r"ae_subset.pt: shape \[3, 192\]"):
        da.main(argv + ["--resume"])
    regions.write_bytes(saved)
    da.main(argv + ["--resume"])                                              # continues


def test_end_to_end_synthetic(shared_cache, tmp_path, capsys):
    """The synthetic defaults except a shorter auto-encoder schedule (5 epochs on 20,000 regions) for CI time.
    Mutation caught (besides a broken pipeline): a test-only run reporting the command line's training settings
    instead of the checkpoint's; the protocol string not naming the random backbone."""
    out = tmp_path / "run"
    da.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu",
             "--epochs", "5", "--ae-samples", "20000", "--threshold-samples", "20000"])
    printed = capsys.readouterr().out
    assert "frames/s" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frame_auc_micro"] >= 0.75, metrics
    assert metrics["pixel_auc"] is not None
    assert metrics["test_fps"] > 0 and metrics["backbone"] == "alexnet-random"
    with np.load(out / "scores.npz") as z:
        frame = z["frame/Test001"]
        vmap = z["map/Test001"]
    assert np.isnan(frame[:5]).all() and np.isfinite(frame[5:]).all()
    assert vmap.dtype == np.float16 and vmap.shape == (len(frame), 30, 45)
    # frame score = float32 maximum of the map, stored as float16
    np.testing.assert_allclose(frame[5:], vmap[5:].astype(np.float32).reshape(len(frame) - 5, -1).max(1), rtol=1e-3)
    assert "paper architecture" in metrics["run_protocol"] and "RANDOM" in metrics["run_protocol"]
    assert "5 epochs" in metrics["run_protocol"] and "20000 regions" in metrics["run_protocol"]
    # a test-only run reloads model.pt, reports the training settings stored there (warning about the
    # command line's --epochs) and reproduces the scores
    da.main(["--dataset", "synthetic", "--cache-dir", shared_cache, "--out", str(out), "--device", "cpu", "--test",
             "--num-panels", "0", "--epochs", "7"])
    assert "--epochs 7 ignored" in capsys.readouterr().err
    again = json.loads((out / "metrics.json").read_text())
    assert again["frame_auc_micro"] == pytest.approx(metrics["frame_auc_micro"])
    assert "5 epochs" in again["run_protocol"] and "20000 regions" in again["run_protocol"]


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
