"""Deep-Anomaly: a fully convolutional network with a Gaussian cascade for fast anomaly detection (Sabokrou et al. 2018).

Citation:
    M. Sabokrou, M. Fayyaz, M. Fathy, Z. Moayed, R. Klette. "Deep-anomaly: Fully convolutional neural
    network for fast anomaly detection in crowded scenes." Computer Vision and Image Understanding 172
    (2018) 88-97. arXiv:1609.00866.

Deviations from the paper (in brief; the full, numbered list with reasons is further down): torchvision's
ImageNet AlexNet instead of the Caffe ImageNet+Places model, CT read as a 1x1 convolution, our own
continuous score for ROC sweeps, auto-encoder trained on a random subset of regions, frames at 320x240.

What the method does:
    Every frame I_t is averaged with its predecessor, I'_t = (I_t + I_t-1) / 2, and three consecutive averaged
    frames form the three channels of the network input D_t = <I'_t-2, I'_t-1, I'_t> (six frames per pass).
    A frozen, ImageNet-pretrained AlexNet cut after conv2 (C1, S1, C2) turns D_t into a grid of regional
    feature vectors in one fully convolutional pass. G1, a Gaussian fitted to every normal regional feature of
    the training videos, labels a region normal when its Mahalanobis distance d1 <= beta, abnormal when
    d1 >= alpha, and "suspicious" in between (eq. 5). Suspicious regions go through CT, a convolutional layer on
    top of C2 whose kernels are the encoder of a sparse auto-encoder trained on normal C2 features, and G2, a
    Gaussian on CT features, calls them abnormal when d2 >= phi (eq. 6). Abnormal regions are rolled back to
    their receptive fields in the frame (51 x 51 pixels for C2); a pixel is abnormal when more than zeta = 3
    abnormal receptive fields cover it (section 3.3). A frame is abnormal when any of its pixels is.

    Continuous scores for ROC curves (the paper sweeps its thresholds but does not say how). We scale all
    three thresholds together, (lambda alpha, lambda beta, lambda phi), and give every region the largest
    lambda at which the cascade still calls it abnormal. Solving eq. 5-6 for lambda gives, exactly,
        s = max(d1 / alpha, min(d1 / beta, d2 / phi))
    (abnormal at lambda <=> s >= lambda; abnormal at the paper's thresholds <=> s >= 1). This needs d2 for
    every region (`--ct-regions all`). By default (`--ct-regions suspicious`) CT and G2 run, as in the paper,
    only on the regions that are suspicious at the paper's thresholds (beta < d1 < alpha), which is what makes
    the cascade fast; the other regions get s = d1 / alpha, the formula's lower bound. Both variants make
    exactly the paper's decisions at lambda = 1; they differ only in how regions outside the band rank
    below or above it when the thresholds are swept. The zeta rule at
    scale lambda marks a pixel when at least zeta + 1 covering receptive fields have s >= lambda, i.e. when
    the (zeta + 1)-th largest s among them is >= lambda: that order statistic is the continuous pixel map
    written to scores.npz, and the frame score is its maximum (the frame-level rule "one abnormal pixel makes
    an abnormal frame"). Thresholding map and frame score at 1 reproduces the paper's binary detector and
    localization exactly (up to ties at the thresholds); the rate at 1 is reported as `operating_point`.

    Map grid: one sample per (jump / 2) pixels, at offset jump / 4 (C2: every 4 pixels from pixel 2, a
    60 x 80 map for a 240 x 320 input). For C2 (jump 8, receptive field 51 = 6 x 8 + 3) the set of covering
    receptive fields is constant on alternating 5- and 3-pixel runs and this grid samples every run once, so
    the stored map holds every distinct value of the full-resolution map and its maximum equals the
    full-resolution maximum (checked against brute force in the tests).

Speed (the paper's point: 370 frames/s on a TITAN): one fully convolutional pass per frame over batches of
frames; D_t is built on the device straight from the uint8 frame cache, normalised and laid out channels-last
in one step; G1 is one matrix product per region (precomputed inverse Cholesky factor); CT and G2 run only
on the suspicious regions (by default); the zeta rule is two small top-k passes over index tables computed
once. On CUDA: `--amp` (bf16 autocast), 512 frames per batch, every batch padded to the same shape so that
cudnn.benchmark tunes once, pinned host memory. Test throughput is timed from the cached frames to the
written scores.npz.

Implementation choices (documented, not in the paper):
    - Covariance regulariser: Sigma + eps * (trace(Sigma) / d) * I with eps = --cov-eps (1e-3). The Cholesky
      factor L of that matrix is computed once in float64 and the inverse factor W = L^-1 is stored, so
      d(x) = ||W (x - mu)|| is one batched matrix product (a 1 x 1 convolution) on CPU or GPU. ReLU features
      have dead channels (zero variance); the ridge keeps the solve well posed.
    - Thresholds default to percentiles of the training distances (on a random subset of training regions
      drawn independently of the auto-encoder's subset): beta = 90th, alpha = 99.9th percentile of d1, phi = 99.9th percentile of
      d2. The paper gives no values; these are fixed a priori, never chosen on test data.
    - Sparse auto-encoder loss (the paper names a sparse auto-encoder but not its loss; this is the standard
      one of Ng's notes that the authors' earlier work follows): J = 1/2 mean_n ||x_hat_n - x_n||^2
      + (lambda_wd / 2) (||W_enc||^2 + ||W_dec||^2) + beta_sp sum_j KL(rho || rho_hat_j), sigmoid hidden units,
      linear decoder, inputs standardised with G1's mean and per-dimension standard deviation, rho = 0.05,
      beta_sp = 3, lambda_wd = 3e-3. Adam (lr 1e-3, batch 1024, 30 epochs; the paper gives no schedule)
      instead of full-batch L-BFGS.
    - D_t channels are scaled to [0, 1] and normalised with torchvision's ImageNet mean / std of the R, G, B
      channel they feed (I'_t-2 -> R, I'_t-1 -> G, I'_t -> B).
    - Features are taken after the ReLU of the chosen convolution (Caffe's in-place ReLU makes the "conv2"
      blob rectified too). --layer 3 is C3 = conv3 after pool2 (the paper's order C1, S1, C2, S2, C3).
    - Frames t < 3 have no D_t: frame score NaN (eval fills it from the nearest scored frame) and the map of
      the first scored frame.

Deviations from the paper:
    1. Backbone weights: torchvision's ImageNet AlexNet (alexnet-owt-7be5be79.pth: conv2 has 192 kernels, no
       grouping, no LRN) instead of the Caffe reference model trained on ImageNet + MIT Places (conv2 256
       kernels in two groups, LRN after pool1), because that is the published PyTorch model (SPEC section 2).
       Pooling is max pooling as in both pretrained networks (the paper's text calls S1 mean pooling).
    2. No ImageNet weights can be downloaded on the machine these numbers were measured on: the reported
       Ped2 run uses `--backbone-weights none` (random, frozen AlexNet) and is labelled so.
    3. CT is read as a 1 x 1 convolution (the paper: "T(i,j,1:h) the transformed representation of
       f(i,j,1:m_k) by a sparse auto-encoder", one regional vector in, one out).
    4. The continuous frame / pixel score for ROC curves (above) is our construction; the paper sweeps its
       thresholds without saying how. The cascade itself (CT and G2 on the suspicious regions) is the paper's.
    5. The auto-encoder trains on a random subset of the normal training regions (--ae-samples, 200,000 of
       Ped2's ~2.9 million) to bound memory; G1 and G2 are fitted on all training regions.
    6. Frames are resized to the paper's 320 x 240 (width x height; the paper quotes this size for Ped2, whose
       native size is 360 x 240) with cv2.INTER_AREA; the maps are upsampled back to the masks by eval.py.

Synthetic defaults (`--dataset synthetic`, so that the demo trains and tests in well under 3 minutes on
2 CPU cores, offline): native frame size 120 x 180, `--backbone-weights none`, 10 auto-encoder epochs on
50,000 regions, thresholds from 50,000 regions.
Everything else as for real data.

Usage:
    python deep_anomaly.py --dataset synthetic                                   # demo, random backbone
    python deep_anomaly.py --dataset ped2 --data-root ../shared/data             # paper setting, ImageNet AlexNet
    python deep_anomaly.py --dataset ped2 --backbone-weights ~/alexnet-owt-7be5be79.pth
    python deep_anomaly.py --dataset ped2 --backbone-weights none                # offline, random AlexNet
    python deep_anomaly.py --dataset ped2 --layer 1 --no-cascade --single-classifier g1 --out runs/da/c1  # Table 1
    python deep_anomaly.py --dataset ped2 --hidden 256 --no-cascade --out runs/da/h256                   # Table 2
    python deep_anomaly.py --dataset ped2 --test --no-cascade --single-classifier g1   # Table 3, "C2 output"
"""

import math
import os
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

# ----------------------------------------------------------------------------------------------------------
# Model: AlexNet features (torchvision names), Gaussian classifiers, sparse auto-encoder, cascade
# ----------------------------------------------------------------------------------------------------------

# torchvision's ImageNet normalisation, applied per input channel
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# index into `features` just after the ReLU of C1, C2, C3 (the paper's --layer k)
LAYER_END = {1: 2, 2: 5, 3: 8}
LAYER_CHANNELS = {1: 64, 2: 192, 3: 384}
FRAMES_BEFORE = 3          # D_t needs frames t-3 .. t


class AlexNetFeatures(nn.Module):
    """torchvision's `alexnet().features`, same parameter names and shapes, so its published state dict loads."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),      # features.0  C1
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # features.2  S1
            nn.Conv2d(64, 192, kernel_size=5, padding=2),               # features.3  C2
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),                      # features.5  S2
            nn.Conv2d(192, 384, kernel_size=3, padding=1),              # features.6  C3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),              # features.8
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),              # features.10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def forward(self, x, layer=2):
        return self.features[:LAYER_END[layer]](x)


class MomentAccumulator:
    """Streaming mean and covariance in float64 (rows shifted by the first batch's mean against cancellation)."""

    def __init__(self, dim: int):
        self.dim, self.n, self.shift = dim, 0, None
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.shift is None:
            self.shift = x.mean(0).double().cpu()
        centred = x - self.shift.to(x.device, torch.float32)
        self.total += centred.sum(0).double().cpu()
        self.outer += (centred.T @ centred).double().cpu()
        self.n += x.shape[0]

    def finalize(self):
        mean_c = self.total / self.n
        cov = self.outer / self.n - torch.outer(mean_c, mean_c)
        return self.shift + mean_c, 0.5 * (cov + cov.T)


class GaussianClassifier(nn.Module):
    """A Gaussian N(mu, Sigma); distance(x) = Mahalanobis distance, sqrt((x - mu)^T Sigma_reg^-1 (x - mu))."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whiten", torch.eye(dim))         # W = L^-1, Sigma_reg = L L^T
        self.register_buffer("bias", torch.zeros(dim))          # -W mu, so W (x - mu) = F.linear(x, W, bias)

    @torch.no_grad()
    def fit(self, mean: torch.Tensor, cov: torch.Tensor, eps: float = 1e-3) -> float:
        """Regularise (Sigma + eps * trace/d * I), Cholesky-factor in float64, store W = L^-1. Returns the ridge."""
        mean, cov = mean.double().cpu(), cov.double().cpu()
        d = cov.shape[0]
        ridge = eps * max(float(torch.trace(cov)) / d, 1e-12)
        eye = torch.eye(d, dtype=torch.float64)
        for _ in range(8):  # the ridge alone makes Sigma positive definite; the loop only guards rounding
            chol, info = torch.linalg.cholesky_ex(cov + ridge * eye)
            if int(info) == 0:
                break
            ridge *= 10
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False)
        self.mean.copy_(mean.float())
        self.whiten.copy_(whiten.float())
        self.bias.copy_((-whiten @ mean).float())
        return ridge

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (...) Mahalanobis distances; float32 whatever the autocast dtype of the product."""
        z = F.linear(x, self.whiten.to(x.dtype), self.bias.to(x.dtype))
        return torch.linalg.vector_norm(z.float(), dim=-1)


class SparseAutoencoder(nn.Module):
    """One hidden layer of `hidden` sigmoid units, linear decoder. The encoder is the CT layer's kernels."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.decoder = nn.Linear(hidden, dim)
        self.register_buffer("in_mean", torch.zeros(dim))
        self.register_buffer("in_std", torch.ones(dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # standardisation folded into the encoder: W ((x - m) / s) + b = (W / s) x + (b - W (m / s))
        weight = self.encoder.weight / self.in_std
        bias = self.encoder.bias - weight @ self.in_mean
        return torch.sigmoid(F.linear(x, weight.to(x.dtype), bias.to(x.dtype)))

    def forward(self, x: torch.Tensor):
        hidden = self.encode(x)
        return hidden, self.decoder(hidden)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std


def sparse_ae_loss(x_std, hidden, recon, weights, rho=0.05, sparsity_weight=3.0, weight_decay=3e-3):
    """J = 1/2 mean_n ||recon_n - x_n||^2 + wd/2 sum ||W||^2 + beta sum_j KL(rho || rho_hat_j).
    x_std: standardised inputs (N, d); hidden: sigmoid activations (N, h); weights: encoder/decoder matrices.
    Returns (J, dict of the three terms)."""
    reconstruction = 0.5 * (recon - x_std).square().sum(1).mean()
    decay = 0.5 * weight_decay * sum(w.square().sum() for w in weights)
    rho_hat = hidden.mean(0).clamp(1e-6, 1 - 1e-6)
    kl = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    total = reconstruction + decay + sparsity_weight * kl
    return total, {"recon": reconstruction, "decay": decay, "kl": kl}


def cascade_labels(d1, d2, alpha, beta, phi):
    """Eq. 5-6. Returns (abnormal bool, suspicious bool): d1 >= alpha abnormal; d1 <= beta normal; in between
    (suspicious) abnormal iff d2 >= phi."""
    suspicious = (d1 > beta) & (d1 < alpha)
    abnormal = (d1 >= alpha) | (suspicious & (d2 >= phi))
    return abnormal, suspicious


def cascade_score(d1, d2, alpha, beta, phi):
    """The largest lambda at which the cascade with thresholds (lambda alpha, lambda beta, lambda phi) calls
    the region abnormal: max(d1/alpha, min(d1/beta, d2/phi)); >= 1 exactly when cascade_labels says abnormal
    (ties at d1 == beta aside)."""
    return torch.maximum(d1 / alpha, torch.minimum(d1 / beta, d2 / phi))


class DeepAnomaly(nn.Module):
    """Frozen AlexNet C1-S1-C2 (or C1 / C3), G1, CT (sparse-AE encoder as a 1x1 conv), G2 and the cascade."""

    def __init__(self, layer: int = 2, hidden: int = 500):
        super().__init__()
        self.layer, self.hidden = layer, hidden
        self.backbone = AlexNetFeatures()
        dim = LAYER_CHANNELS[layer]
        self.g1 = GaussianClassifier(dim)
        self.ct = SparseAutoencoder(dim, hidden)
        self.g2 = GaussianClassifier(hidden)
        self.register_buffer("thresholds", torch.ones(3))       # alpha, beta, phi
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone.requires_grad_(False)

    def regional_features(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """uint8 frames (N+3, H, W) -> regional features (N, H_k, W_k, m_k) of D_t for the last N frames."""
        feats = self.backbone(network_input(frames_u8, self.input_mean.view(3), self.input_std.view(3)), self.layer)
        return feats.permute(0, 2, 3, 1)          # channels-last storage: this view is contiguous

    def distances(self, feats: torch.Tensor, need_g2: bool = True):
        """feats (..., m_k) -> d1, d2 (...); d2 None when not needed."""
        d1 = self.g1.distance(feats)
        d2 = self.g2.distance(self.ct.encode(feats)) if need_g2 else None
        return d1, d2

    def region_scores(self, frames_u8: torch.Tensor, cascade: bool = True, single: str = "g2",
                      ct_regions: str = "suspicious") -> torch.Tensor:
        """uint8 frames (N+3, H, W) -> continuous region scores s (N, H_k, W_k); s >= 1 = abnormal at the
        paper's thresholds. Cascade, ct_regions='all': s = max(d1/alpha, min(d1/beta, d2/phi)) everywhere
        (CT and G2 on every region). ct_regions='suspicious' (the paper's computation): CT and G2 only where
        beta < d1 < alpha; elsewhere s = d1/alpha, the lower bound of the formula, which leaves every decision
        at the paper's thresholds unchanged. Without the cascade one Gaussian decides: d1/alpha or d2/phi."""
        alpha, beta, phi = self.thresholds.tolist()
        feats = self.regional_features(frames_u8)
        if not cascade:
            if single == "g1":
                return self.g1.distance(feats) / alpha
            return self.g2.distance(self.ct.encode(feats)) / phi
        if ct_regions == "all":
            d1, d2 = self.distances(feats)
            return cascade_score(d1, d2, alpha, beta, phi)
        d1 = self.g1.distance(feats)
        scores = d1 / alpha
        suspicious = (d1 > beta) & (d1 < alpha)
        picked = feats[suspicious]                                   # (n, m_k): only these go through CT
        if len(picked):
            d2 = self.g2.distance(self.ct.encode(picked))
            scores[suspicious] = cascade_score(d1[suspicious], d2, alpha, beta, phi)
        return scores


# ----------------------------------------------------------------------------------------------------------
# Data: D_t from raw frames
# ----------------------------------------------------------------------------------------------------------

def make_dt(frames: torch.Tensor) -> torch.Tensor:
    """frames (N+3, H, W) uint8 (or float in 0..255), consecutive -> D (N, 3, H, W) float in [0, 1]:
    I'_t = (I_t + I_t-1) / 2 and D_t = <I'_t-2, I'_t-1, I'_t> for the last N frames t = 3 .. N+2."""
    f = frames.float() * (1.0 / 255.0)
    averaged = 0.5 * (f[1:] + f[:-1])                            # averaged[i] = I'_{i+1}
    return torch.stack([averaged[:-2], averaged[1:-1], averaged[2:]], dim=1)


def network_input(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(make_dt(frames) - mean[c]) / std[c], built in one pass per channel directly in channels-last memory
    (the layout the convolutions run fastest in); equal to the plain construction (tested)."""
    f = frames.float()
    pair_sums = f[1:] + f[:-1]                                   # 2 * 255 * I'
    scale = 0.5 / 255.0 / std
    channels = [pair_sums[c:len(pair_sums) - 2 + c] * scale[c] - mean[c] / std[c] for c in range(3)]
    return torch.stack(channels, dim=-1).permute(0, 3, 1, 2)      # (N, 3, H, W) view of (N, H, W, 3) memory


def frame_batches(num_frames: int, batch: int):
    """(start, end) ranges of target frames t in [3, num_frames), `batch` at a time."""
    for start in range(FRAMES_BEFORE, num_frames, batch):
        yield start, min(start + batch, num_frames)


def to_device(frames_np: np.ndarray, device: torch.device) -> torch.Tensor:
    """A whole video's uint8 frames on the device (pinned + non_blocking on CUDA)."""
    t = torch.from_numpy(np.array(frames_np, dtype=np.uint8, copy=True))      # the cache is a read-only memmap
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# ----------------------------------------------------------------------------------------------------------
# Localization: receptive-field arithmetic and the zeta rule
# ----------------------------------------------------------------------------------------------------------

def receptive_field(layers) -> tuple:
    """(size, jump, first) along one axis after a stack of Conv2d / MaxPool2d (ReLUs ignored): unit c sees input
    pixels first + c * jump .. first + c * jump + size - 1 (first may be negative: padding)."""
    size, jump, first = 1, 1, 0
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            first -= p * jump
            size += (k - 1) * jump
            jump *= s
    return size, jump, first


def unit_intervals(layers, length: int):
    """Exact input-pixel interval [lo, hi] seen by every unit along one axis of length `length`. Unlike the
    nominal receptive field this is clipped where padding sits and where a floor-mode layer drops the last
    units of its input (e.g. the right-most conv1 column of a 180-pixel-wide frame feeds no pool1 unit)."""
    lo, hi = np.arange(length), np.arange(length)              # each input pixel sees itself
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            n = (len(lo) + 2 * p - k) // s + 1
            first = np.arange(n) * s - p                        # first input unit of each window
            lo = lo[np.clip(first, 0, len(lo) - 1)]
            hi = hi[np.clip(first + k - 1, 0, len(hi) - 1)]
    return lo, hi


def map_sample_positions(length: int, jump: int) -> np.ndarray:
    """Pixel positions sampled by the stored map along one axis: every jump/2 pixels from jump/4."""
    step, offset = max(1, jump // 2), jump // 4
    return np.arange(offset, length, step)


def covering_table(positions: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(len(positions), K) indices of the units whose receptive field [lo, hi] covers each position; unused
    slots hold len(lo) (a zero-score padding unit). K = the most units covering one position."""
    covers = (lo[None, :] <= positions[:, None]) & (positions[:, None] <= hi[None, :])
    k_max = max(1, int(covers.sum(1).max()))
    table = np.full((len(positions), k_max), len(lo), np.int64)
    for row, units in enumerate(covers):
        idx = np.flatnonzero(units)
        table[row, :len(idx)] = idx
    return table


def zeta_map(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, zeta: int) -> torch.Tensor:
    """scores (N, H_k, W_k) >= 0 -> (N, len(rows), len(cols)): per sampled pixel the (zeta+1)-th largest score
    of the receptive fields covering it (0 when fewer than zeta + 1 cover it). map >= lambda <=> more than zeta
    covering receptive fields have score >= lambda. Separable: the top zeta+1 of a rectangle of units is the
    top zeta+1 of the per-row top zeta+1 values."""
    k = zeta + 1
    padded = F.pad(scores, (0, 1, 0, 1))                      # the padding unit (last row/column), score 0
    g = padded[:, :, cols]                                     # (N, H_k+1, C, Kx)
    g = g.topk(min(k, g.shape[-1]), dim=-1).values             # (N, H_k+1, C, kx): best per unit row
    g = g[:, rows]                                             # (N, R, Ky, C, kx)
    n, r, ky, c, kx = g.shape
    g = g.permute(0, 1, 3, 2, 4).reshape(n, r, c, ky * kx)
    if g.shape[-1] < k:                                        # fewer than zeta+1 units can ever cover a pixel
        return torch.zeros(n, r, c, dtype=scores.dtype, device=scores.device)
    return g.topk(k, dim=-1).values[..., zeta]


class Localizer:
    """Index tables of the zeta rule for one input size and layer."""

    def __init__(self, model: DeepAnomaly, input_size: tuple, device: torch.device):
        H, W = input_size
        layers = model.backbone.features[:LAYER_END[model.layer]]
        self.rf = receptive_field(layers)
        self.row_intervals, self.col_intervals = unit_intervals(layers, H), unit_intervals(layers, W)
        self.grid = (len(self.row_intervals[0]), len(self.col_intervals[0]))
        jump = self.rf[1]
        self.rows_px = map_sample_positions(H, jump)
        self.cols_px = map_sample_positions(W, jump)
        self.rows = torch.from_numpy(covering_table(self.rows_px, *self.row_intervals)).to(device)
        self.cols = torch.from_numpy(covering_table(self.cols_px, *self.col_intervals)).to(device)

    def __call__(self, scores: torch.Tensor, zeta: int) -> torch.Tensor:
        return zeta_map(scores, self.rows, self.cols, zeta)


# ----------------------------------------------------------------------------------------------------------
# Training: G1 on all normal regions, sparse AE (CT) on a subset, G2 on all CT features, thresholds
# ----------------------------------------------------------------------------------------------------------

def training_passes(model, videos_frames, args, desc):
    """Yield regional features (N*H_k*W_k, m_k) of every training D_t, batch by batch (frozen backbone)."""
    device = args.device
    total = sum(max(0, len(v) - FRAMES_BEFORE) for v in videos_frames.values())
    bar = tqdm(total=total, desc=desc, unit="frame", leave=False)
    for frames_np in videos_frames.values():
        frames = to_device(frames_np, device)
        for start, end in frame_batches(len(frames), args.test_batch_size):
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp(args)):
                feats = model.regional_features(frames[start - FRAMES_BEFORE:end])
            yield feats.reshape(-1, feats.shape[-1]).float()
            bar.update(end - start)
    bar.close()


def use_amp(args) -> bool:
    return bool(args.amp) and args.device.type == "cuda"


def fit_g1(model, train_frames, args):
    """Pass 1: G1 moments over every training region + a random subset (about --ae-samples) for the AE."""
    regions_per_frame = math.prod(Localizer(model, args.input_size, torch.device("cpu")).grid)
    total = sum(max(0, len(v) - FRAMES_BEFORE) for v in train_frames.values()) * regions_per_frame
    keep = min(1.0, args.ae_samples / max(1, total))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    moments, subset = MomentAccumulator(LAYER_CHANNELS[model.layer]), []
    for x in training_passes(model, train_frames, args, "G1 (all regions)"):
        moments.update(x)
        subset.append(x[torch.rand(len(x), generator=gen, device=x.device) < keep].cpu())
    mean, cov = moments.finalize()
    ridge = model.g1.fit(mean, cov, args.cov_eps)
    subset = torch.cat(subset)[:args.ae_samples]
    model.ct.in_mean.copy_(mean.float())
    std = cov.diagonal().clamp_min(0).sqrt()
    model.ct.in_std.copy_(std.clamp_min(1e-2 * float(std.mean()) + 1e-12).float())   # dead ReLU channels: std 0
    print(f"G1: {moments.n} regions of dim {moments.dim}, ridge {ridge:.3g}; auto-encoder subset {len(subset)} regions")
    return subset


def train_autoencoder(model, subset, optimizer, start_epoch, args, save):
    """Sparse AE on standardised normal C2 features; one checkpoint per epoch."""
    ae = model.ct
    device = args.device
    data = subset.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    for epoch in range(start_epoch, args.epochs + 1):
        order = torch.randperm(len(data), generator=gen).to(device)
        sums, batches = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "rho_hat": 0.0}, 0
        bar = tqdm(range(0, len(data), args.batch_size), desc=f"AE epoch {epoch}/{args.epochs}", leave=False)
        for i in bar:
            x = ae.standardise(data[order[i:i + args.batch_size]])
            hidden, recon = _ae_forward_std(ae, x)
            loss, parts = sparse_ae_loss(x, hidden, recon, [ae.encoder.weight, ae.decoder.weight],
                                         args.rho, args.sparsity_weight, args.weight_decay)
            common.check_finite(loss, f"auto-encoder epoch {epoch} batch {i // args.batch_size}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item()
            sums["recon"] += parts["recon"].item()
            sums["kl"] += parts["kl"].item()
            sums["rho_hat"] += hidden.detach().mean().item()
            batches += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        print(f"epoch {epoch}/{args.epochs}  loss {sums['loss'] / batches:.4f}  recon {sums['recon'] / batches:.4f}  "
              f"KL {sums['kl'] / batches:.4f}  mean activation {sums['rho_hat'] / batches:.4f}", flush=True)
        save(epoch, "autoencoder")


def _ae_forward_std(ae: SparseAutoencoder, x_std: torch.Tensor):
    """Forward pass on already standardised inputs (training): sigmoid(W x + b), linear decoder."""
    hidden = torch.sigmoid(ae.encoder(x_std))
    return hidden, ae.decoder(hidden)


def fit_g2_and_thresholds(model, train_frames, args):
    """Pass 2: G2 moments over the CT features of every training region; then alpha, beta, phi from the
    distances of a fresh random subset of training regions."""
    moments, held = MomentAccumulator(model.hidden), []
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 2)
    regions_per_frame = math.prod(Localizer(model, args.input_size, torch.device("cpu")).grid)
    total = sum(max(0, len(v) - FRAMES_BEFORE) for v in train_frames.values()) * regions_per_frame
    keep = min(1.0, args.threshold_samples / max(1, total))
    for x in training_passes(model, train_frames, args, "G2 (all regions)"):
        with torch.inference_mode():
            moments.update(model.ct.encode(x))
        held.append(x[torch.rand(len(x), generator=gen, device=x.device) < keep])
    mean, cov = moments.finalize()
    ridge = model.g2.fit(mean, cov, args.cov_eps)
    with torch.inference_mode():
        held = torch.cat(held)
        d1, d2 = model.distances(held)
    d1, d2 = d1.cpu().double().numpy(), d2.cpu().double().numpy()
    alpha = args.alpha if args.alpha is not None else float(np.percentile(d1, args.alpha_pct))
    beta = args.beta if args.beta is not None else float(np.percentile(d1, args.beta_pct))
    phi = args.phi if args.phi is not None else float(np.percentile(d2, args.phi_pct))
    if not beta < alpha:
        raise common.DataError(f"thresholds: beta {beta:.4g} must be below alpha {alpha:.4g} (check --alpha/--beta)")
    model.thresholds.copy_(torch.tensor([alpha, beta, phi]))
    print(f"G2: {moments.n} regions of dim {moments.dim}, ridge {ridge:.3g}; thresholds from {len(d1)} held regions: "
          f"alpha {alpha:.4g} (d1 p{args.alpha_pct}), beta {beta:.4g} (d1 p{args.beta_pct}), "
          f"phi {phi:.4g} (d2 p{args.phi_pct})")


def train(model, ds, args):
    t0 = time.time()
    ckpt_path = os.path.join(args.out, "model.pt")
    optimizer = torch.optim.Adam(model.ct.parameters(), lr=args.lr)
    start_epoch, stage = 1, "autoencoder"
    if args.resume and os.path.isfile(ckpt_path):
        ckpt = common.load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, stage = int(ckpt["epoch"]) + 1, ckpt.get("stage", "autoencoder")
        print(f"resumed from {ckpt_path} (epoch {ckpt['epoch']}, stage {stage})")
    elif args.resume:
        print(f"--resume: no {ckpt_path} yet, training from scratch")

    def save(epoch, stage_name):
        common.save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                           "epoch": epoch, "stage": stage_name, "backbone": args.backbone_source,
                                           "args": common.args_to_dict(args)})

    if stage == "done" and start_epoch > args.epochs:
        print("model.pt is complete: nothing to train")
        return float(ckpt.get("train_time_s") or 0.0)

    train_frames = common.load_split_frames(ds, "train", args.input_size, cache_dir=args.cache_dir)
    model.to(args.device)
    subset = fit_g1(model, train_frames, args)
    needs_ct = not (args.no_cascade and args.single_classifier == "g1")
    if needs_ct:
        train_autoencoder(model, subset, optimizer, start_epoch, args, save)
        del subset
        fit_g2_and_thresholds(model, train_frames, args)
    else:   # Table 1 / Table 3 "C2 output": one Gaussian on C_k, no CT; alpha from d1, the others unused
        with torch.inference_mode():
            d1 = model.g1.distance(subset.to(args.device)).cpu().double().numpy()
        alpha = args.alpha if args.alpha is not None else float(np.percentile(d1, args.alpha_pct))
        model.thresholds.copy_(torch.tensor([alpha, 0.5 * alpha, 1.0]))
        print(f"single classifier G1: alpha {alpha:.4g} (d1 p{args.alpha_pct} on the training subset)")
    train_time = time.time() - t0
    common.save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "epoch": args.epochs, "stage": "done", "backbone": args.backbone_source,
                                       "train_time_s": train_time, "args": common.args_to_dict(args)})
    print(f"training done in {train_time:.1f} s -> {ckpt_path}")
    return train_time


# ----------------------------------------------------------------------------------------------------------
# Scoring and localization at test time
# ----------------------------------------------------------------------------------------------------------

def score_video(model, localizer, frames: torch.Tensor, args):
    """frames (T, H, W) uint8 on the device -> (frame scores (T,) float32 with NaN for t < 3,
    maps (T, h, w) float16). Map = (zeta+1)-th largest covering region score; frame score = its maximum."""
    T = len(frames)
    ny, nx = len(localizer.rows_px), len(localizer.cols_px)
    maps = torch.zeros(T, ny, nx, dtype=torch.float16, device=frames.device)
    for start, end in frame_batches(T, args.test_batch_size):
        chunk = frames[start - FRAMES_BEFORE:end]
        if frames.device.type == "cuda" and end - start < args.test_batch_size:
            # one input shape for every batch: cudnn.benchmark tunes once, not once per video tail
            chunk = torch.cat([chunk, chunk[-1:].expand(args.test_batch_size - (end - start), *chunk.shape[1:])])
        with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16, enabled=use_amp(args)):
            s = model.region_scores(chunk, cascade=not args.no_cascade, single=args.single_classifier,
                                    ct_regions=args.ct_regions)
            maps[start:end] = localizer(s[:end - start].float(), args.zeta).to(torch.float16)
    if T > FRAMES_BEFORE:
        maps[:FRAMES_BEFORE] = maps[FRAMES_BEFORE]            # unscorable frames: first scored frame's map
    scores = maps.float().amax(dim=(1, 2))
    scores[:FRAMES_BEFORE] = float("nan")
    return scores, maps


def write_panels(test_frames, frame_scores, maps, ds, out_dir, count):
    """The `count` highest-scoring test frames: frame, red = pixels abnormal at the paper's thresholds
    (map >= 1: more than zeta abnormal receptive fields), green outline = ground-truth mask."""
    if count <= 0:
        return 0
    ranked = sorted(((float(s), name, t) for name, v in frame_scores.items() for t, s in enumerate(v) if np.isfinite(s)),
                    reverse=True)
    step = max(1, len(ranked) // (4 * count))      # spread the panels out instead of neighbouring frames
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for score, name, t in ranked[::step][:count]:
        frame = np.asarray(test_frames[name][t])
        H, W = frame.shape
        binary = cv2.resize(np.asarray(maps[name][t], np.float32), (W, H), interpolation=cv2.INTER_NEAREST) >= 1.0
        img = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        img[binary] = (0.5 * img[binary] + 0.5 * np.array([0, 0, 255])).astype(np.uint8)
        video = ds.video(name)
        if video.has_masks:
            mask = video.read_masks()[t].astype(np.uint8)
            mask = cv2.resize(mask, (W, H), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
        cv2.imwrite(os.path.join(out_dir, f"{name}_{t:04d}_s{score:.2f}.png"), img)
        written += 1
    return written


def test(model, ds, args, train_time):
    device = args.device
    model.to(device).eval()
    test_frames = common.load_split_frames(ds, "test", args.input_size, cache_dir=args.cache_dir)
    localizer = Localizer(model, args.input_size, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # warm-up (kernel selection, allocator) on a dummy batch, outside the timed region
    warm = args.test_batch_size if device.type == "cuda" else min(args.test_batch_size, 8)
    dummy = torch.zeros(warm + FRAMES_BEFORE, *args.input_size, dtype=torch.uint8, device=device)
    score_video(model, localizer, dummy, args)
    if device.type == "cuda":
        torch.cuda.synchronize()

    t0 = time.time()            # timed: cached frames -> scores.npz
    frame_scores, maps = {}, {}
    for name, frames_np in tqdm(test_frames.items(), desc="test", unit="video", leave=False):
        scores, vmaps = score_video(model, localizer, to_device(frames_np, device), args)
        frame_scores[name] = scores.cpu().numpy()
        maps[name] = vmaps.cpu().numpy()
    meta = {"method": "deep_anomaly", "dataset": args.dataset, "protocol": {"normalize": args.normalize, "smooth": args.smooth},
            "map": f"(zeta+1)-th largest cascade score of the covering receptive fields, zeta={args.zeta}, "
                   f"sampled every {localizer.rows_px[1] - localizer.rows_px[0]} px from pixel {localizer.rows_px[0]} "
                   f"of the {args.input_size[0]}x{args.input_size[1]} input; >= 1 = abnormal at the paper's thresholds",
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), frame_scores, maps, meta)
    elapsed = time.time() - t0
    num_frames = sum(len(v) for v in test_frames.values())
    fps = num_frames / elapsed
    print(f"test: {num_frames} frames in {elapsed:.2f} s = {fps:.1f} frames/s (cached frames -> scores.npz, "
          f"{device.type}{', bf16 autocast' if use_amp(args) else ', float32'}, batch {args.test_batch_size})")

    # the paper's binary detector: a frame is abnormal when its score (max of the map) is >= 1
    labels = np.concatenate([ds.video(n).labels for n in frame_scores]).astype(bool)
    scores = np.concatenate(list(frame_scores.values()))
    valid = np.isfinite(scores)
    pred = scores[valid] >= 1.0
    op = {"frame_tpr": float(pred[labels[valid]].mean()) if labels[valid].any() else None,
          "frame_fpr": float(pred[~labels[valid]].mean()) if (~labels[valid]).any() else None}
    alpha, beta, phi = model.thresholds.tolist()
    protocol = (f"{args.dataset} test split, frames resized to {args.input_size[0]}x{args.input_size[1]}, "
                f"layer C{args.layer}, {'cascade G1+CT(h=%d)+G2 on %s regions' % (model.hidden, args.ct_regions) if not args.no_cascade else 'single Gaussian ' + args.single_classifier}, "
                f"zeta {args.zeta}, AE epochs {args.epochs} on {args.ae_samples} regions, backbone: {args.backbone_source}, "
                f"normalize {args.normalize}")
    extra = {"train_time_s": train_time, "test_fps": fps, "protocol": protocol,
             "thresholds": {"alpha": alpha, "beta": beta, "phi": phi},
             "operating_point": op, "device": str(device),
             "command": "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    result = vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)
    print(f"operating point (paper thresholds, map >= 1): frame TPR {op['frame_tpr']}, FPR {op['frame_fpr']}")
    n = write_panels(test_frames, frame_scores, maps, ds, os.path.join(args.out, "panels"), args.num_panels)
    if n:
        print(f"{n} localization panels -> {os.path.join(args.out, 'panels')}")
    return result


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def build_parser():
    parser = common.build_parser("deep_anomaly", __doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, choices=(1, 2, 3), default=2,
                        help="AlexNet layer C_k giving the regional features (Table 1); the paper uses 2")
    parser.add_argument("--hidden", type=int, default=500, help="CT kernels = sparse-AE hidden size (Table 2: 100, 256, 500)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="frame size fed to the network (default: the paper's 240 320; synthetic: native 120 180)")
    parser.add_argument("--backbone-weights", default=None,
                        help="'imagenet' (torchvision alexnet-owt-7be5be79.pth via torch.hub), PATH, or 'none' = random "
                             "(default: imagenet; synthetic: none)")
    parser.add_argument("--backbone-url", default=common.ALEXNET_URL, help="URL for --backbone-weights imagenet")
    parser.add_argument("--no-cascade", action="store_true", help="one Gaussian classifier instead of the G1/G2 cascade")
    parser.add_argument("--single-classifier", choices=("g1", "g2"), default="g2",
                        help="with --no-cascade: g1 = Gaussian on C_k (Table 1, Table 3 'C2 output'), g2 = Gaussian on CT (Table 2)")
    parser.add_argument("--ct-regions", choices=("suspicious", "all"), default="suspicious",
                        help="regions that go through CT and G2: the suspicious ones (the paper; fast) or all (exact "
                             "joint-threshold ROC score everywhere)")
    parser.add_argument("--alpha", type=float, default=None, help="G1 'abnormal' threshold (default: percentile --alpha-pct)")
    parser.add_argument("--beta", type=float, default=None, help="G1 'normal' threshold (default: percentile --beta-pct)")
    parser.add_argument("--phi", type=float, default=None, help="G2 threshold (default: percentile --phi-pct)")
    parser.add_argument("--alpha-pct", type=float, default=99.9, help="alpha = this percentile of training d1")
    parser.add_argument("--beta-pct", type=float, default=90.0, help="beta = this percentile of training d1")
    parser.add_argument("--phi-pct", type=float, default=99.9, help="phi = this percentile of training d2")
    parser.add_argument("--zeta", type=int, default=3, help="a pixel is abnormal when MORE than zeta abnormal receptive fields cover it")
    parser.add_argument("--cov-eps", type=float, default=1e-3, help="covariance ridge, in units of trace/d")
    parser.add_argument("--rho", type=float, default=0.05, help="sparse AE target activation")
    parser.add_argument("--sparsity-weight", type=float, default=3.0, help="weight of the KL sparsity term")
    parser.add_argument("--weight-decay", type=float, default=3e-3, help="sparse AE weight decay lambda (J has lambda/2 ||W||^2)")
    parser.add_argument("--ae-samples", type=int, default=None, help="training regions the auto-encoder learns from "
                        "(default 200000; synthetic 50000)")
    parser.add_argument("--threshold-samples", type=int, default=None, help="training regions for the threshold percentiles "
                        "(default 200000; synthetic 50000)")
    parser.add_argument("--test-batch-size", type=int, default=None, help="frames per forward pass (default 32 on CPU, 512 on CUDA)")
    return parser


def resolve_defaults(args):
    synthetic = args.dataset == "synthetic"
    if args.input_size is None:
        args.input_size = [120, 180] if synthetic else [240, 320]
    args.input_size = tuple(int(v) for v in args.input_size)
    if args.backbone_weights is None:
        args.backbone_weights = "none" if synthetic else "imagenet"
    if args.epochs is None:
        args.epochs = 10 if synthetic else 30
    args.ae_samples = args.ae_samples or (50_000 if synthetic else 200_000)
    args.threshold_samples = args.threshold_samples or (50_000 if synthetic else 200_000)
    args.batch_size = args.batch_size or 1024
    args.lr = args.lr or 1e-3
    args.normalize = args.normalize or "none"      # the paper thresholds raw distances over the whole test set
    if args.test_batch_size is None:
        args.test_batch_size = 512 if args.device.type == "cuda" else 32
    if args.zeta < 0:
        raise common.DataError(f"--zeta {args.zeta}: expected >= 0")
    return args


def main(argv=None):
    args = resolve_defaults(common.parse_args(build_parser(), argv))
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    ckpt_path = os.path.join(args.out, "model.pt")
    train_time = 0.0
    if args.train:
        model = DeepAnomaly(args.layer, args.hidden)
        resuming = args.resume and os.path.isfile(ckpt_path)
        if resuming:
            args.backbone_source = common.load_checkpoint(ckpt_path).get("backbone", "from model.pt")
        else:
            args.backbone_source = common.load_alexnet_features(model.backbone, args.backbone_weights, args.backbone_url)
        print(f"deep_anomaly: {args.dataset}, input {args.input_size[0]}x{args.input_size[1]}, layer C{args.layer}, "
              f"hidden {args.hidden}, {args.backbone_source}, device {args.device}")
        train_time = train(model, ds, args)
    if args.test:
        ckpt = common.load_checkpoint(ckpt_path)
        saved = ckpt["args"]
        if ckpt.get("stage") != "done":
            raise common.DataError(f"{ckpt_path}: training did not finish (stage {ckpt.get('stage')}); run --train --resume")
        model = DeepAnomaly(int(saved["layer"]), int(saved["hidden"]))
        model.load_state_dict(ckpt["model"])
        trained_ct = not (saved.get("no_cascade") and saved.get("single_classifier") == "g1")
        if not trained_ct and not (args.no_cascade and args.single_classifier == "g1"):
            raise common.DataError(f"{ckpt_path}: trained without CT/G2 (--no-cascade --single-classifier g1); "
                                   "test with the same flags or retrain")
        args.layer, args.input_size = int(saved["layer"]), tuple(saved["input_size"])
        args.backbone_source = ckpt.get("backbone", "?")
        if args.alpha is not None or args.beta is not None or args.phi is not None:
            a, b, p = model.thresholds.tolist()
            model.thresholds.copy_(torch.tensor([args.alpha or a, args.beta or b, args.phi or p]))
        if not args.train:
            train_time = float(ckpt.get("train_time_s") or 0.0)
        test(model, ds, args, train_time)


if __name__ == "__main__":
    common.run_main(main)
