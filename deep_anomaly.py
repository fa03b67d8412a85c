"""Deep-Anomaly: a fully convolutional network with a Gaussian cascade for fast anomaly detection (Sabokrou et al. 2018).

Citation:
    M. Sabokrou, M. Fayyaz, M. Fathy, Z. Moayed, R. Klette. "Deep-anomaly: Fully convolutional neural
    network for fast anomaly detection in crowded scenes." Computer Vision and Image Understanding 172
    (2018) 88-97. arXiv:1609.00866.

Deviations from the paper (in brief; the full, numbered list with reasons is further down): torchvision's
ImageNet AlexNet instead of the Caffe ImageNet+Places model, CT read as a 1x1 convolution, our own
continuous score for ROC sweeps, auto-encoder trained on a random subset of regions, frames at 320x240.

What the method does:
    Every frame I_t is averaged with its predecessor, I'_t = (I_t + I_t-1) / 2, and three averaged frames built
    from six consecutive frames form the three channels of the network input, D_t = <I'_t-4, I'_t-2, I'_t> (our
    reading, see the choices below; frames t-5 .. t: "combining six frames into a three-channel input, we
    process a cubic patch of video frames at just one forward-pass", section 4.4; the pairs do not overlap, so
    every one of the six frames enters once). A frozen, ImageNet-pretrained AlexNet cut after conv2 (C1, S1, C2)
    turns D_t into a grid of regional feature vectors in one fully convolutional pass. G1, a Gaussian fitted to
    every normal regional feature of the training videos, labels a region normal when its Mahalanobis distance
    d1 <= beta, abnormal when d1 >= alpha, and "suspicious" in between (eq. 5). Suspicious regions go through
    CT, a convolutional layer on top of C2 whose kernels are the encoder of a sparse auto-encoder trained on
    normal C2 features, and G2, a Gaussian on CT features, calls them abnormal when d2 >= phi (eq. 6). Abnormal
    regions are rolled back to their receptive fields in the frame (51 x 51 pixels for C2); a pixel is abnormal
    when more than zeta = 3 abnormal receptive fields cover it (section 3.3). A frame is abnormal when any of
    its pixels is (section 4.2).

    Continuous scores for ROC curves (the paper sweeps its thresholds but does not say how). We scale all
    three thresholds together, (lambda alpha, lambda beta, lambda phi), and give every region the largest
    lambda at which the cascade still calls it abnormal. Solving eq. 5-6 for lambda gives, exactly,
        s = max(d1 / alpha, min(d1 / beta, d2 / phi))
    (abnormal at lambda <=> s >= lambda; abnormal at the paper's thresholds <=> s >= 1). This needs d2 for
    every region (`--ct-regions all`). By default (`--ct-regions suspicious`) only the regions that are
    suspicious at the paper's thresholds (beta < d1 < alpha) take their d2 into account, as in the paper;
    the other regions get s = d1 / alpha, the formula's lower bound. Both variants make exactly the paper's
    decisions at lambda = 1; they differ only in how regions outside the band rank when the thresholds are
    swept. The zeta rule at scale lambda marks a pixel when at least zeta + 1 covering receptive fields have
    s >= lambda, i.e. when the (zeta + 1)-th largest s among them is >= lambda: that order statistic is the
    continuous pixel map written to scores.npz, and the frame score is its maximum (the frame-level rule "one
    abnormal pixel makes an abnormal frame"), taken in float32 before the map is stored as float16 (a score
    below 1 is stored below 1, not rounded up to it). Thresholding map and frame score at 1 reproduces the
    paper's binary detector and localization exactly (up to ties at the thresholds); the rate at 1 is
    reported as `operating_point`.

    Map grid: the covering set of receptive fields is constant on runs of pixels (for C2, jump 8 and
    receptive field 51 = 6 x 8 + 3: alternating 5- and 3-pixel runs). The map is sampled on the coarsest
    regular grid step/2 + i * step (step <= jump / 2 and dividing the frame side) that hits every run of the
    actual frame size, borders included (C1: every 2 pixels from pixel 1; C2: every 4 from pixel 2, a 60 x 80
    map for a 240 x 320 input; C3 at 240 x 320: every 4 from pixel 2, since every 8 from pixel 4 misses a
    run), so the stored map holds every distinct value of the full-resolution map and its maximum equals the
    full-resolution maximum (checked against brute force in the tests), and cell i lies where eval.py's
    bilinear upsampling centres it (within half a pixel: the map is not shifted). So frame scores are
    exact; the pixel level is exact only on that grid: eval.py upsamples every method's maps bilinearly to
    the mask size, which blurs the step edges of this one (a few pixels per run boundary), and the map is
    stored in float16.

Speed (the paper's point: 370 frames/s on a TITAN). The test split goes through batches of a fixed
number of target frames that run across video boundaries (no half-empty batch at the end of every short
video); each batch carries the frames its targets need (targets + 5 context frames per video segment,
padded to one length) as uint8. On CUDA, when the split takes at most half the free GPU memory (Ped2's
test split: 154 MB), it is copied to the GPU once, video by video through pinned buffers, and each batch's
frames are gathered there; otherwise each batch is assembled on the host and copied from reused pinned
buffers with non_blocking copies one batch ahead (common.prefetch_to_device). On the device: D_t is
gathered from the uint8 frames, normalised and laid out channels-last in one step; C1-S1-C2 run channels-last;
G1 is one matrix product per region with a precomputed inverse Cholesky factor; CT and G2 follow, all in
IEEE float32: TF32 is switched off for convolutions and matrix products alike, so that a CUDA run gives
the CPU run's figures. Why: the Mahalanobis distances amplify small feature errors (directions of small
variance), and TF32's 10-bit mantissa in C1-C2 alone (emulated on the CPU by rounding the convolutions'
inputs and weights, accumulating in float32; Ped2, random backbone) moved the frame AUC from 60.7 / 57.3
to 60.5 / 57.2, the EER from 44.8 to 45.0 and the pixel EER from 68.8 to 68.5 (frame scores: median
relative change 2e-4, 1% of frames above 2%). The zeta rule is two small top-k passes
over index tables computed once; maps and frame scores stay on the device until the whole split is done
and come back in one copy. No Python loop over regions, no float64 on the test path. Only the suspicious
regions (beta < d1 < alpha; with the random backbone 18% of the regions of Ped2's test split) are gathered
through CT and G2, the paper's saving: run on every region, G1, CT and G2 cost more than C1-C2 (CPU, one
Ped2 batch of 64 frames with 22% suspicious regions: 0.58 s for them against 0.36 s for C1-C2; 0.14 s
with the gather, 1.9x for the batch). The gather's data-dependent shape costs two host syncs per batch on
CUDA (hundreds of frames each); the fixed-shape alternative (CT and G2 everywhere, then select:
`region_scores(gather=False)`, the same scores, tested) has none. A warm-up batch of the same shape runs
before the timer, so cuDNN autotuning is not timed. `--amp` (bf16 autocast for the convolutions only; G1,
CT and G2 always run in float32) is opt-in, the faster setting: its effect on the metrics has not been
measured. The printed test frames/s covers cached frames
-> scores.npz: reading the frame cache, host-to-device copies, D_t, C1-S1-C2, G1, CT, G2, zeta maps and
frame scores, the copy back and writing scores.npz; it excludes model load, index tables, warm-up and
evaluation.

Implementation choices (documented, not in the paper):
    - Covariance regulariser: Sigma + eps * (trace(Sigma) / d) * I with eps = --cov-eps (1e-3). The Cholesky
      factor L of that matrix is computed once in float64 and the inverse factor W = L^-1 is stored, so
      d(x) = ||W x - W mu|| is one batched float32 matrix product (a 1 x 1 convolution); its error against
      the float64 distance is below 1e-4 relative (tested). ReLU features have dead channels (zero
      variance); the ridge keeps the solve well posed.
    - Thresholds default to percentiles of the training distances on a random subset of training regions
      (drawn independently of the auto-encoder's subset): beta = 90th, alpha = 99.9th percentile of d1, phi =
      99.9th percentile of d2 (over all those regions, not only the suspicious ones that G2 judges). The
      paper gives no values; these are fixed a priori, never chosen on test data.
      The single-G1 ablation (`--no-cascade --single-classifier g1`, which has no second pass over the
      training split) takes alpha from the auto-encoder's subset instead; `--threshold-samples` is unused there.
    - D_t: the stored text of the paper loses the formula (section 3.1 breaks off at "D_t = <I'"). We read
      section 4.4's "combining six frames into a three-channel input" as three averaged frames made of six
      distinct frames, <I'_t-4, I'_t-2, I'_t>; three consecutive averages <I'_t-2, I'_t-1, I'_t> would overlap
      and span only four frames (t-3 .. t). This choice also leaves the first 5 frames of a video unscored
      (3 with the other reading).
    - Sparse auto-encoder loss (the paper names a sparse auto-encoder but not its loss; this is the standard
      one of Ng's notes that the authors' earlier work follows): J = 1/2 mean_n ||x_hat_n - x_n||^2
      + (lambda_wd / 2) (||W_enc||^2 + ||W_dec||^2) + beta_sp sum_j KL(rho || rho_hat_j), sigmoid hidden units,
      linear decoder, inputs standardised with G1's mean and per-dimension standard deviation, rho = 0.05,
      beta_sp = 3, lambda_wd = 3e-3. Adam (lr 1e-3, batch 1024, 30 epochs; the paper gives no schedule)
      instead of full-batch L-BFGS. It has not converged by then: on Ped2 (random backbone) the loss falls
      from 595 to 22.4 and still drops ~8% per epoch at epoch 30, and the mean hidden activation is 0.073
      against the target rho = 0.05; what a longer schedule does to the metrics has not been measured.
    - D_t channels are scaled to [0, 1] and normalised with torchvision's ImageNet mean / std of the R, G, B
      channel they feed, in time order (I'_t-4 -> R, I'_t-2 -> G, I'_t -> B).
    - Features are taken after the ReLU of the chosen convolution (Caffe's in-place ReLU makes the "conv2"
      blob rectified too). --layer 3 is C3 = conv3 after pool2 (the paper's order C1, S1, C2, S2, C3).
    - Frames t < 5 have no D_t: frame score NaN (eval fills it from the nearest scored frame) and the map of
      the first scored frame.
    - Time-boxed training (--max-minutes): the run stops at the next auto-encoder step (the two feature
      passes over the training split, G1 and G2, are not cut), writes model.pt with the optimiser, the
      position in the epoch and the shuffling generator, and prints the command that continues (--resume).
      The auto-encoder's training regions are written once, to ae_subset.pt beside model.pt (deleted when
      training is done), so the checkpoint of every epoch stays small. Slices end with the same weights as
      one uninterrupted run (tested on the CPU, bit for bit).

Deviations from the paper:
    1. Backbone weights: torchvision's ImageNet AlexNet (alexnet-owt-7be5be79.pth: conv1 64 kernels with
       padding 2, conv2 192 kernels, no grouping, no LRN, floor-mode pooling) instead of the Caffe reference
       model trained on ImageNet + MIT Places (conv1 96 kernels without padding, conv2 256 kernels in two
       groups, LRN after pool1, ceil-mode pooling), because that is the published PyTorch model (SPEC
       section 2). At 240 x 320 the C2 grid is the same (29 x 39); receptive fields shift by 2 pixels, and
       C1 features (Table 1's ablation) are 64-, not 96-dimensional.
       Pooling is max pooling as in both pretrained networks (the paper's text calls S1 mean pooling).
    2. No ImageNet weights can be downloaded on the machines our numbers were measured on: those runs use
       `--backbone-weights none` (random, frozen AlexNet) and their protocol string says so; they are not
       the paper's setting. The paper's setting: `--backbone-weights PATH` to torchvision's
       alexnet-owt-7be5be79.pth (or `imagenet` where it can be downloaded).
    3. CT is read as a 1 x 1 convolution (the paper: "T(i,j,1:h) the transformed representation of
       f(i,j,1:m_k) by a sparse auto-encoder", one regional vector in, one out).
    4. The continuous frame / pixel score for ROC curves (above) is our construction; the paper sweeps its
       thresholds without saying how. The cascade itself (CT and G2 decide the suspicious regions) is the
       paper's.
    5. The auto-encoder trains on a random subset of the normal training regions (--ae-samples, 200,000 of
       Ped2's ~2.8 million), which bounds its training time on a CPU (all of them, 2.1 GB of C2 features, would
       fit on a GPU: raise --ae-samples there); G1 and G2 are fitted on all training regions.
    6. Frames are resized to the paper's 320 x 240 (width x height; the paper quotes this size for Ped2, whose
       native size is 360 x 240) with cv2.INTER_AREA; the maps are upsampled back to the masks by eval.py.

Synthetic defaults (`--dataset synthetic`, so that the demo trains and tests in well under 3 minutes on
2 CPU cores, offline): native frame size 120 x 180, `--backbone-weights none`, 10 auto-encoder epochs on
50,000 regions, thresholds from 50,000 regions.
Everything else as for real data.

Usage:
    python deep_anomaly.py --dataset synthetic                                   # demo, random backbone
    python deep_anomaly.py --dataset ped2 --data-root ../shared/data             # ImageNet AlexNet (download)
    python deep_anomaly.py --dataset ped2 --backbone-weights ~/alexnet-owt-7be5be79.pth   # the paper's setting
    python deep_anomaly.py --dataset ped2 --backbone-weights none                # offline, random AlexNet
    python deep_anomaly.py --dataset ped2 --train --max-minutes 5                # a 5-minute training slice
    python deep_anomaly.py --dataset ped2 --train --max-minutes 5 --resume       # ... continued
    python deep_anomaly.py --dataset ped2 --layer 1 --no-cascade --single-classifier g1 --out runs/da/c1  # Table 1
    python deep_anomaly.py --dataset ped2 --hidden 256 --no-cascade --out runs/da/h256                   # Table 2
    python deep_anomaly.py --dataset ped2 --test --no-cascade --single-classifier g1   # Table 3, "C2 output"
"""

import argparse
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
# D_t = <I'_t-4, I'_t-2, I'_t>: channel c is I'_(t-k) = (I_(t-k) + I_(t-k-1)) / 2 with k = DT_LAGS[c]
DT_LAGS = (4, 2, 0)
FRAMES_BEFORE = max(DT_LAGS) + 1          # D_t needs frames t-5 .. t
# written into model.pt; a checkpoint of another layout (e.g. the older D_t of three consecutive I') is refused
FLOAT16_BELOW_ONE = 1 - 2 ** -11          # the largest float16 below 1
CHECKPOINT_FORMAT = "deep_anomaly/2: D_t = <I'_t-4, I'_t-2, I'_t>"


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
    """Streaming mean and covariance, summed in float64 on the features' device (no host copy per batch);
    rows are shifted by the first batch's mean against cancellation."""

    def __init__(self, dim: int):
        self.dim, self.n, self.shift = dim, 0, None
        self.total = self.outer = None

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.shift is None:
            self.shift = x.mean(0)
            self.total = torch.zeros(self.dim, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
        centred = x - self.shift
        self.total += centred.sum(0, dtype=torch.float64)
        self.outer += (centred.T @ centred).double()
        self.n += x.shape[0]

    def finalize(self):
        """(mean, covariance) in float64 on the CPU."""
        mean_c = self.total.cpu() / self.n
        cov = self.outer.cpu() / self.n - torch.outer(mean_c, mean_c)
        return self.shift.double().cpu() + mean_c, 0.5 * (cov + cov.T)


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
        else:
            raise common.DataError(f"the covariance of {d}-d features is not positive definite even with a ridge of "
                                   f"{ridge:g} (constant features? raise --cov-eps)")
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False)
        self.mean.copy_(mean.float())
        self.whiten.copy_(whiten.float())
        self.bias.copy_((-whiten @ mean).float())
        return ridge

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (...) Mahalanobis distances, always in float32 (also inside an autocast region)."""
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.float(), self.whiten, self.bias)
        return torch.linalg.vector_norm(z, dim=-1)


class SparseAutoencoder(nn.Module):
    """One hidden layer of `hidden` sigmoid units, linear decoder. The encoder is the CT layer's kernels."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.decoder = nn.Linear(hidden, dim)
        self.register_buffer("in_mean", torch.zeros(dim))
        self.register_buffer("in_std", torch.ones(dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """CT: sigmoid(W ((x - m) / s) + b) = sigmoid((W / s) x + (b - W (m / s))), in float32."""
        with torch.autocast(x.device.type, enabled=False):
            # the folded standardisation too: W m computed in bf16 shifts every unit's bias by ~1e-3
            weight = self.encoder.weight / self.in_std
            bias = self.encoder.bias - weight @ self.in_mean
            return torch.sigmoid(F.linear(x.float(), weight, bias))

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

    def features(self, frames_u8: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
        """uint8 frames (F, H, W) and the positions (N,) of N target frames t among them (frames t-5 .. t must
        be consecutive frames of one video) -> regional features (N, H_k, W_k, m_k) of D_t."""
        x = network_input(frames_u8, target_pos, self.input_mean.view(3), self.input_std.view(3))
        return self.backbone(x, self.layer).permute(0, 2, 3, 1)     # channels-last storage: a contiguous view

    def regional_features(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """Consecutive uint8 frames (N+5, H, W) of one video -> regional features (N, H_k, W_k, m_k) of the last N."""
        pos = torch.arange(FRAMES_BEFORE, len(frames_u8), device=frames_u8.device)
        return self.features(frames_u8, pos)

    def distances(self, feats: torch.Tensor, need_g2: bool = True):
        """feats (..., m_k) -> d1, d2 (...); d2 None when not needed."""
        d1 = self.g1.distance(feats)
        d2 = self.g2.distance(self.ct.encode(feats)) if need_g2 else None
        return d1, d2

    def region_scores(self, feats: torch.Tensor, cascade: bool = True, single: str = "g2",
                      ct_regions: str = "suspicious", gather: bool = True) -> torch.Tensor:
        """Regional features (N, H_k, W_k, m_k) -> continuous region scores s (N, H_k, W_k); s >= 1 = abnormal
        at the paper's thresholds. Cascade, ct_regions='all': s = max(d1/alpha, min(d1/beta, d2/phi))
        everywhere. ct_regions='suspicious' (the paper's cascade): that formula where beta < d1 < alpha, the
        lower bound d1/alpha elsewhere, which leaves every decision at the paper's thresholds unchanged.
        gather=True (the default) sends only the suspicious regions through CT and G2 (fewer operations; a
        data-dependent shape, so a host sync on CUDA); gather=False evaluates CT and G2 everywhere and selects
        (fixed shapes, no sync; the same scores). Without the cascade one Gaussian decides: d1/alpha or d2/phi.
        Thresholds stay tensors on the device."""
        alpha, beta, phi = self.thresholds.unbind()
        if not cascade:
            if single == "g1":
                return self.g1.distance(feats) / alpha
            return self.g2.distance(self.ct.encode(feats)) / phi
        if ct_regions == "all":
            d1, d2 = self.distances(feats)
            return cascade_score(d1, d2, alpha, beta, phi)
        d1 = self.g1.distance(feats)
        suspicious = (d1 > beta) & (d1 < alpha)
        if not gather:
            d2 = self.g2.distance(self.ct.encode(feats))
            return torch.where(suspicious, cascade_score(d1, d2, alpha, beta, phi), d1 / alpha)
        scores = d1 / alpha
        picked = feats[suspicious]                                   # (n, m_k): only these go through CT
        if len(picked):
            d2 = self.g2.distance(self.ct.encode(picked))
            scores[suspicious] = cascade_score(d1[suspicious], d2, alpha, beta, phi)
        return scores


# ----------------------------------------------------------------------------------------------------------
# Data: D_t from raw frames, batches of target frames across videos
# ----------------------------------------------------------------------------------------------------------

def make_dt(frames: torch.Tensor) -> torch.Tensor:
    """The plain construction (a reference for tests): consecutive frames (N+5, H, W) uint8 (or float in
    0..255) -> D (N, 3, H, W) float in [0, 1], I'_s = (I_s + I_s-1) / 2 and D_t = <I'_t-4, I'_t-2, I'_t> for
    the last N frames t = 5 .. N+4."""
    f = frames.float() * (1.0 / 255.0)
    averaged = 0.5 * (f[1:] + f[:-1])                            # averaged[i] = I'_{i+1}
    n = len(frames) - FRAMES_BEFORE
    t = torch.arange(FRAMES_BEFORE, FRAMES_BEFORE + n)
    return torch.stack([averaged[t - lag - 1] for lag in DT_LAGS], dim=1)


def network_input(frames: torch.Tensor, target_pos: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(D_t - mean[c]) / std[c] for the target frames at `target_pos` of the uint8 frames (F, H, W): each channel
    gathers the two frames of its I', directly into channels-last memory (the layout the convolutions run
    fastest in). Equal to make_dt followed by the normalisation (tested)."""
    scale = 0.5 / 255.0 / std
    shift = mean / std
    f = frames.float()
    pair_sums = torch.add(f[1:], f[:-1])                        # pair_sums[j] = 2 * 255 * I' of frame j + 1
    # advanced indexing, not index_select: the latter is ~30x slower on the CPU for whole-frame rows
    channels = [pair_sums[target_pos - lag - 1].mul_(scale[c]).sub_(shift[c]) for c, lag in enumerate(DT_LAGS)]
    return torch.stack(channels, dim=-1).permute(0, 3, 1, 2)      # (N, 3, H, W) view of (N, H, W, 3) memory


class BatchPlan:
    """Target frames (video v, frame t >= 5) of a list of videos, in order, packed into batches of exactly
    `batch` targets that run across video boundaries (the last one padded). Each batch carries one uint8
    frame buffer of a fixed length: per video segment its targets and their 5 context frames, then padding.
    `positions[k]` holds the buffer index of each target frame of batch k (padding rows repeat the last)."""

    def __init__(self, lengths, batch: int):
        self.batch = batch
        # per batch: [(video, t0, t1)], targets t0 .. t1-1
        self.segments = common.batch_segments([(v, FRAMES_BEFORE, n) for v, n in enumerate(lengths)], batch)
        self.counts = [sum(t1 - t0 for _, t0, t1 in segs) for segs in self.segments]
        self.firsts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64) if self.counts else []
        self.num_targets = int(sum(self.counts))
        self.buffer_len = max((sum(t1 - t0 + FRAMES_BEFORE for _, t0, t1 in segs) for segs in self.segments), default=0)
        self.positions = np.zeros((len(self.segments), batch), np.int64)
        for k, segs in enumerate(self.segments):
            pos, at = [], 0
            for _, t0, t1 in segs:
                pos.extend(range(at + FRAMES_BEFORE, at + FRAMES_BEFORE + t1 - t0))
                at += t1 - t0 + FRAMES_BEFORE
            self.positions[k, :len(pos)] = pos
            self.positions[k, len(pos):] = pos[-1]

    def buffers(self, videos):
        """Host uint8 buffers (buffer_len, H, W), one per batch, read from `videos` (arrays or memmaps)."""
        for segs in self.segments:
            first = videos[segs[0][0]]
            buf = np.empty((self.buffer_len,) + tuple(first.shape[1:]), np.uint8)
            at = 0
            for v, t0, t1 in segs:
                buf[at:at + t1 - t0 + FRAMES_BEFORE] = videos[v][t0 - FRAMES_BEFORE:t1]
                at += t1 - t0 + FRAMES_BEFORE
            buf[at:] = buf[at - 1]                               # padding: repeats of the last frame
            yield buf

    def buffer_rows(self, lengths):
        """(batches, buffer_len) int64: the frame that each row of each batch's buffer holds, as an index
        into the videos laid end to end; the same rows as buffers() (padding repeats the last)."""
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        rows = np.zeros((len(self.segments), self.buffer_len), np.int64)
        for k, segs in enumerate(self.segments):
            idx = np.concatenate([np.arange(offsets[v] + t0 - FRAMES_BEFORE, offsets[v] + t1) for v, t0, t1 in segs])
            rows[k, :len(idx)], rows[k, len(idx):] = idx, idx[-1]
        return rows


def stream_batches(plan: BatchPlan, videos, device, resident: bool | None = None):
    """Yield (frames on the device, target positions on the device, first target index, real targets) per
    batch. When the videos fit on the device (resident, the default on CUDA where they take at most half
    its free memory: Ped2's test split is 154 MB), they are copied there once, video by video, and each
    batch's buffer is a gather on the device, so no frame passes through the host again. Otherwise
    each buffer is assembled on the host and copied (pinned, non_blocking) while the device works on the
    previous batch."""
    positions = common.to_device(plan.positions, device)
    if resident is None:
        resident = bool(videos) and common.fits_on_device(sum(np.asarray(v).nbytes for v in videos), device)
    if not resident:
        for k, frames in enumerate(common.prefetch_to_device(plan.buffers(videos), device)):
            yield frames, positions[k], int(plan.firsts[k]), plan.counts[k]
        return
    split, _ = common.concat_to_device(videos, device)
    rows = common.to_device(plan.buffer_rows([len(v) for v in videos]), device)
    for k in range(len(plan.segments)):
        yield split[rows[k]], positions[k], int(plan.firsts[k]), plan.counts[k]


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


def covering_runs(lo: np.ndarray, hi: np.ndarray, length: int) -> np.ndarray:
    """Per pixel along one axis, an id of the set of units covering it (units [a, b) with lo <= p <= hi; lo and
    hi are non-decreasing, so the set is a range); pixels covered by no unit (map value 0) get -1."""
    pixels = np.arange(length)
    a = np.searchsorted(hi, pixels, side="left")
    b = np.searchsorted(lo, pixels, side="right")
    return np.where(a < b, a * (len(lo) + 1) + b, -1)


def map_sample_positions(lo: np.ndarray, hi: np.ndarray, length: int, jump: int) -> np.ndarray:
    """Pixel positions sampled by the stored map along one axis: the coarsest regular grid step/2 + i * step
    (step <= jump / 2, step dividing the length) that samples every distinct covering set at least once, so
    the map keeps every distinct value of the full-resolution map. Cell i then sits where eval.py's bilinear
    upsampling (pixel-centre convention, scale length / cells = step) puts it: no shift of the map."""
    runs = covering_runs(lo, hi, length)
    distinct = set(runs.tolist())
    for step in range(max(1, jump // 2), 0, -1):
        positions = np.arange(step // 2, length, step)
        if length % step == 0 and distinct <= set(runs[positions].tolist()):
            return positions
    return np.arange(length)                                    # unreachable: step 1 samples every pixel


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
        self.rows_px = map_sample_positions(*self.row_intervals, H, jump)
        self.cols_px = map_sample_positions(*self.col_intervals, W, jump)
        self.rows = torch.from_numpy(covering_table(self.rows_px, *self.row_intervals)).to(device)
        self.cols = torch.from_numpy(covering_table(self.cols_px, *self.col_intervals)).to(device)

    def __call__(self, scores: torch.Tensor, zeta: int) -> torch.Tensor:
        return zeta_map(scores, self.rows, self.cols, zeta)

    def describe(self) -> str:
        def axis(px):
            step = int(px[1] - px[0]) if len(px) > 1 else 1
            return f"every {step} px from pixel {int(px[0])}"
        return f"rows {axis(self.rows_px)}, columns {axis(self.cols_px)}"


# ----------------------------------------------------------------------------------------------------------
# Training: G1 on all normal regions, sparse AE (CT) on a subset, G2 on all CT features, thresholds
# ----------------------------------------------------------------------------------------------------------

def use_amp(args) -> bool:
    return bool(args.amp) and args.device.type == "cuda"


def num_regions(model, videos, args) -> int:
    """Regional feature vectors of all D_t of `videos`: targets x grid cells."""
    cells = math.prod(Localizer(model, args.image_size, torch.device("cpu")).grid)
    return sum(max(0, len(v) - FRAMES_BEFORE) for v in videos) * cells


def region_subset(total: int, count: int, seed: int) -> np.ndarray:
    """Sorted ids of min(count, total) distinct regions out of `total`, drawn by numpy's generator from `seed`."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))


def take_regions(x: torch.Tensor, first: int, ids: np.ndarray) -> torch.Tensor:
    """The rows of x (regions first .. first + len(x) - 1) whose ids are in the sorted `ids`; the index is
    known on the host, so selecting needs no device sync."""
    lo, hi = np.searchsorted(ids, [first, first + len(x)])
    return x[common.to_device(ids[lo:hi] - first, x.device)]


def training_features(model, videos, args, desc):
    """Yield (features (n * H_k * W_k, m_k) float32, id of its first region) for every training D_t (frozen
    backbone), batch by batch, the padding rows of a batch left out."""
    plan = BatchPlan([len(v) for v in videos], args.test_batch_size)
    bar = tqdm(total=plan.num_targets, desc=desc, unit="frame", leave=False)
    for frames, pos, first, n in stream_batches(plan, videos, args.device):
        with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16, enabled=use_amp(args)):
            feats = model.features(frames, pos)
        cells = feats.shape[1] * feats.shape[2]
        yield feats[:n].reshape(-1, feats.shape[-1]).float(), first * cells
        bar.update(n)
    bar.close()


def fit_g1(model, videos, args):
    """Pass 1: G1 moments over every training region, and a random subset of --ae-samples regions for the AE."""
    ids = region_subset(num_regions(model, videos, args), args.ae_samples, args.seed)
    moments, subset = MomentAccumulator(LAYER_CHANNELS[model.layer]), []
    for x, first in training_features(model, videos, args, "G1 (all regions)"):
        moments.update(x)
        subset.append(take_regions(x, first, ids))
    mean, cov = moments.finalize()
    ridge = model.g1.fit(mean, cov, args.cov_eps)
    model.ct.in_mean.copy_(mean.float())
    std = cov.diagonal().clamp_min(0).sqrt()
    model.ct.in_std.copy_(std.clamp_min(1e-2 * float(std.mean()) + 1e-12).float())   # dead ReLU channels: std 0
    subset = torch.cat(subset)
    print(f"G1: {moments.n} regions of dim {moments.dim}, ridge {ridge:.3g}; auto-encoder subset {len(subset)} regions")
    return subset


def _ae_forward_std(ae: SparseAutoencoder, x_std: torch.Tensor):
    """Forward pass on already standardised inputs (training): sigmoid(W x + b), linear decoder."""
    hidden = torch.sigmoid(ae.encoder(x_std))
    return hidden, ae.decoder(hidden)


def train_autoencoder(model, data, optimizer, shuffle, progress, args, budget, save) -> bool:
    """Sparse AE on standardised normal C2 features, from progress = {epoch, step, shuffle: the shuffling
    generator's state at the start of that epoch (None: its current state)}. Checks the time budget after
    every step; saves at every epoch end and when the budget stops it. Returns True when all epochs are done."""
    ae = model.ct
    steps = math.ceil(len(data) / args.batch_size)
    monitor = common.LossMonitor(every=50)
    while progress["epoch"] <= args.epochs:
        epoch = progress["epoch"]
        if progress["shuffle"] is not None:
            shuffle.set_state(progress["shuffle"])
        progress["shuffle"] = shuffle.get_state()           # this epoch's order can be drawn again on resume
        order = torch.randperm(len(data), generator=shuffle).to(data.device)
        bar = tqdm(range(progress["step"], steps), desc=f"AE epoch {epoch}/{args.epochs}", leave=False)
        for step in bar:
            x = ae.standardise(data[order[step * args.batch_size:(step + 1) * args.batch_size]])
            hidden, recon = _ae_forward_std(ae, x)
            loss, parts = sparse_ae_loss(x, hidden, recon, [ae.encoder.weight, ae.decoder.weight],
                                         args.rho, args.sparsity_weight, args.weight_decay)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.add(f"auto-encoder epoch {epoch} step {step}", loss=loss, recon=parts["recon"], kl=parts["kl"],
                        rho_hat=hidden.detach().mean())
            progress["step"] = step + 1
            if budget.expired():
                monitor.check(f"auto-encoder epoch {epoch} step {step}")     # never checkpoint a NaN
                save()
                return False
        means = monitor.means(f"auto-encoder epoch {epoch}")
        print(f"epoch {epoch}/{args.epochs}  loss {means['loss']:.4f}  recon {means['recon']:.4f}  "
              f"KL {means['kl']:.4f}  mean activation {means['rho_hat']:.4f}", flush=True)
        progress.update(epoch=epoch + 1, step=0, shuffle=None)
        save()
    return True


def fit_g2_and_thresholds(model, videos, args):
    """Pass 2: G2 moments over the CT features of every training region; then alpha, beta, phi from the
    distances of a fresh random subset of training regions."""
    ids = region_subset(num_regions(model, videos, args), args.threshold_samples, args.seed + 2)
    moments, sampled = MomentAccumulator(model.hidden), []
    for x, first in training_features(model, videos, args, "G2 (all regions)"):
        with torch.inference_mode():
            moments.update(model.ct.encode(x))
        sampled.append(take_regions(x, first, ids))
    mean, cov = moments.finalize()
    ridge = model.g2.fit(mean, cov, args.cov_eps)
    with torch.inference_mode():
        d1, d2 = model.distances(torch.cat(sampled))
    d1, d2 = d1.cpu().double().numpy(), d2.cpu().double().numpy()
    alpha = args.alpha if args.alpha is not None else float(np.percentile(d1, args.alpha_pct))
    beta = args.beta if args.beta is not None else float(np.percentile(d1, args.beta_pct))
    phi = args.phi if args.phi is not None else float(np.percentile(d2, args.phi_pct))
    if not beta < alpha:
        raise common.DataError(f"thresholds: beta {beta:.4g} must be below alpha {alpha:.4g} (check --alpha/--beta)")
    model.thresholds.copy_(torch.tensor([alpha, beta, phi]))
    print(f"G2: {moments.n} regions of dim {moments.dim}, ridge {ridge:.3g}; thresholds from {len(d1)} sampled training regions: "
          f"alpha {alpha:.4g} (d1 p{args.alpha_pct}), beta {beta:.4g} (d1 p{args.beta_pct}), "
          f"phi {phi:.4g} (d2 p{args.phi_pct})")


def fit_single_g1_threshold(model, subset, args):
    """Table 1 / Table 3 "C2 output": one Gaussian on C_k, no CT; alpha from d1 (beta, phi unused)."""
    with torch.inference_mode():
        d1 = model.g1.distance(subset).cpu().double().numpy()
    alpha = args.alpha if args.alpha is not None else float(np.percentile(d1, args.alpha_pct))
    model.thresholds.copy_(torch.tensor([alpha, 0.5 * alpha, 1.0]))
    print(f"single classifier G1: alpha {alpha:.4g} (d1 p{args.alpha_pct} on the training subset)")


SUBSET_FILE = "ae_subset.pt"      # the auto-encoder's training regions while its training is unfinished


def load_subset(path: str, ckpt_path: str, shape) -> torch.Tensor:
    """The auto-encoder's training regions that an unfinished model.pt (stage autoencoder) continues with."""
    if not os.path.isfile(path):
        raise common.DataError(f"{path}: not found; {ckpt_path} (auto-encoder stage) continues training on the "
                               f"regions saved there; copy it beside model.pt, or retrain with --train --overwrite")
    subset = common.load_checkpoint(path).get("subset")
    if not isinstance(subset, torch.Tensor) or (shape is not None and list(subset.shape) != list(shape)):
        found = "no regions" if not isinstance(subset, torch.Tensor) else f"shape {list(subset.shape)}"
        raise common.DataError(f"{path}: {found}, expected the {shape} regions {ckpt_path} was trained on; "
                               f"retrain with --train --overwrite")
    return subset


def train(model, ds, args, argv=None, ckpt=None):
    """Stages g1 (pass 1) -> autoencoder (epochs of steps) -> g2 (pass 2 and thresholds) -> done, resumable
    from `ckpt` (a model.pt of an unfinished run). Returns the training time in seconds, or None when
    --max-minutes stopped the run (model.pt written, continue command printed)."""
    t0 = time.time()
    budget = common.TimeBudget(args.max_minutes)
    ckpt_path = os.path.join(args.out, "model.pt")
    subset_path = os.path.join(args.out, SUBSET_FILE)
    device = args.device
    stage, spent, subset = "g1", 0.0, None
    progress = {"epoch": 1, "step": 0, "shuffle": None}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        stage, spent = ckpt["stage"], float(ckpt.get("train_time_s") or 0.0)
        if stage == "done":
            if args.epochs > int(ckpt["epoch"]):
                raise common.DataError(f"{ckpt_path}: training finished after {ckpt['epoch']} epochs and does not "
                                       f"keep the auto-encoder's data; to train {args.epochs} epochs use a new --out")
            print(f"{ckpt_path} is complete: nothing to train")
            return spent
        progress = {"epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]), "shuffle": ckpt.get("shuffle_state")}
        if stage == "autoencoder":      # (checkpoints of earlier versions hold the regions themselves)
            subset = ckpt.get("subset")
            if subset is None:
                subset = load_subset(subset_path, ckpt_path, ckpt.get("subset_shape"))
        common.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} (stage {stage}, epoch {progress['epoch']}, step {progress['step']})")
    model.to(device)
    optimizer = torch.optim.Adam(model.ct.parameters(), lr=args.lr)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])            # after model.to: the state follows the parameters
    shuffle = torch.Generator().manual_seed(args.seed + 1)

    def save(stage_name):
        state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "stage": stage_name, "epoch": progress["epoch"],
                 "step": progress["step"], "shuffle_state": progress["shuffle"], "rng": common.get_rng_state(),
                 "backbone": args.backbone_source, "train_time_s": spent + time.time() - t0,
                 "args": common.args_to_dict(args)}
        if stage_name == "autoencoder":
            state["subset_shape"] = list(subset.shape)
        common.save_checkpoint(ckpt_path, state)

    def stopped(where):
        common.report_time_stop(script=__file__, argv=argv, checkpoint=ckpt_path, progress=where, budget=budget)
        return None

    videos = None
    if stage in ("g1", "g2"):
        split = common.load_split_frames(ds, "train", args.image_size, cache_dir=args.cache_dir)
        videos = list(split.values())
    needs_ct = not (args.no_cascade and args.single_classifier == "g1")
    if stage == "g1":
        subset = fit_g1(model, videos, args)
        if not needs_ct:
            fit_single_g1_threshold(model, subset, args)
            stage = "done"
        else:
            # the auto-encoder's data (Ped2: 200,000 x 192 float32, 154 MB) is written once, beside model.pt,
            # so that the checkpoint of every epoch stays small; it is deleted when training is done
            common.save_checkpoint(subset_path, {"subset": subset.cpu()})
            stage = "autoencoder"
            if budget.expired():
                save(stage)
                return stopped("the end of the G1 pass")
    if stage == "autoencoder":
        subset = subset.to(device)
        if not train_autoencoder(model, subset, optimizer, shuffle, progress, args, budget,
                                 lambda: save("autoencoder")):
            return stopped(f"auto-encoder epoch {progress['epoch']} step {progress['step']}")
        subset = None
        stage = "g2"
        if budget.expired():
            save(stage)
            return stopped("the end of auto-encoder training")
    if stage == "g2":
        if videos is None:
            split = common.load_split_frames(ds, "train", args.image_size, cache_dir=args.cache_dir)
            videos = list(split.values())
        fit_g2_and_thresholds(model, videos, args)
    progress.update(epoch=args.epochs if needs_ct else 0, step=0, shuffle=None)
    save("done")
    if os.path.exists(subset_path):
        os.remove(subset_path)                                  # model.pt no longer refers to it
    train_time = spent + time.time() - t0
    print(f"training done in {train_time:.1f} s -> {ckpt_path}")
    return train_time


# ----------------------------------------------------------------------------------------------------------
# Scoring and localization at test time
# ----------------------------------------------------------------------------------------------------------

def score_batch(model, localizer, frames, pos, args) -> torch.Tensor:
    """One batch: uint8 frames (buffer_len, H, W) and target positions (B,) on the device -> zeta maps (B, h, w)
    float32. The convolutions may run under bf16 autocast (--amp); G1, CT and G2 always in float32."""
    with torch.autocast(args.device.type, torch.bfloat16, enabled=use_amp(args)):
        feats = model.features(frames, pos)
    s = model.region_scores(feats.float(), cascade=not args.no_cascade, single=args.single_classifier,
                            ct_regions=args.ct_regions)
    return localizer(s, args.zeta)


def score_split(model, localizer, videos: dict, args, plan: BatchPlan | None = None):
    """videos {name: uint8 (T, H, W)} -> ({name: frame scores (T,) float32, NaN for t < 5},
    {name: maps (T, h, w) float16}). Map = (zeta+1)-th largest covering region score; frame score = its
    maximum, in float32. All batches run on the device (the only host syncs: the suspicious regions' count
    in each batch); maps and scores come back in one copy at the end."""
    names = list(videos)
    arrays = [videos[n] for n in names]
    plan = plan or BatchPlan([len(a) for a in arrays], args.test_batch_size)
    device = args.device
    ny, nx = len(localizer.rows_px), len(localizer.cols_px)
    maps = torch.zeros(plan.num_targets, ny, nx, dtype=torch.float16, device=device)
    scores = torch.zeros(plan.num_targets, dtype=torch.float32, device=device)
    bar = tqdm(total=plan.num_targets, desc="test", unit="frame", leave=False)
    with torch.inference_mode():
        for frames, pos, first, n in stream_batches(plan, arrays, device):
            m = score_batch(model, localizer, frames, pos, args)[:n]
            # float16 rounds scores in [1 - 2^-12, 1) up to 1; keep them below it, so that the stored map
            # and the float32 frame score agree on which pixels are abnormal at the paper's thresholds
            maps[first:first + n] = torch.where(m < 1, m.clamp(max=FLOAT16_BELOW_ONE), m).to(torch.float16)
            scores[first:first + n] = m.amax(dim=(1, 2))
            bar.update(n)
    bar.close()
    maps_np, scores_np = maps.cpu().numpy(), scores.cpu().numpy()      # the one copy back
    frame_scores, frame_maps, at = {}, {}, 0
    for name, frames in zip(names, arrays):
        T, n = len(frames), max(0, len(frames) - FRAMES_BEFORE)
        s = np.full(T, np.nan, np.float32)
        vmap = np.zeros((T, ny, nx), np.float16)
        if n:
            s[FRAMES_BEFORE:] = scores_np[at:at + n]
            vmap[FRAMES_BEFORE:] = maps_np[at:at + n]
            vmap[:FRAMES_BEFORE] = vmap[FRAMES_BEFORE]            # unscorable frames: the first scored frame's map
        frame_scores[name], frame_maps[name] = s, vmap
        at += n
    return frame_scores, frame_maps


def warm_up(model, localizer, plan: BatchPlan, frame_shape, args) -> None:
    """One batch of the test path's exact shape (cuDNN autotuning, allocator), outside the timed region."""
    frames = torch.zeros((max(plan.buffer_len, FRAMES_BEFORE + 1),) + tuple(frame_shape), dtype=torch.uint8,
                         device=args.device)
    pos = torch.from_numpy(plan.positions[0] if len(plan.positions) else np.full(args.test_batch_size, FRAMES_BEFORE))
    with torch.inference_mode():
        score_batch(model, localizer, frames, pos.to(args.device), args)
    common.synchronize(args.device)


def write_panels(test_frames, frame_scores, maps, ds, out_dir, count):
    """The `count` highest-scoring test frames: frame, red = pixels abnormal at the paper's thresholds
    (map >= 1: more than zeta abnormal receptive fields), green outline = ground-truth mask."""
    if count <= 0:
        return 0
    ranked = sorted(((float(s), name, t) for name, v in frame_scores.items() for t, s in enumerate(v)
                     if np.isfinite(s)), reverse=True)
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


def protocol_label(model, args) -> str:
    """What was run, with every setting that is not the paper's named as such."""
    paper_size = tuple(args.image_size) == (240, 320)
    backbone = {"alexnet-random": "RANDOM frozen AlexNet (not the paper's pretrained Caffe ImageNet+Places model)",
                "alexnet-imagenet": "torchvision ImageNet AlexNet (the paper: Caffe ImageNet+Places reference model)"}
    backbone_text = backbone.get(args.backbone_source, f"AlexNet from {args.backbone_source} (the paper: Caffe "
                                                        f"ImageNet+Places reference model)")
    if args.no_cascade:
        classifier = f"single Gaussian {args.single_classifier} (paper ablation, Tables 1-3)"
    else:
        classifier = f"cascade G1 + CT(h={model.hidden}) + G2 on {args.ct_regions} regions"
    paper = args.layer == 2 and model.hidden == 500 and args.zeta == 3 and not args.no_cascade and paper_size
    return (f"{args.dataset} test split; {'paper architecture' if paper else 'NOT the paper architecture'}: "
            f"D_t = <I'_t-4, I'_t-2, I'_t> at {args.image_size[0]}x{args.image_size[1]}, layer C{args.layer}, "
            f"{classifier}, zeta {args.zeta}; backbone: {backbone_text}; our choices (the paper gives none): "
            f"thresholds alpha/beta/phi = training-distance percentiles "
            f"{args.alpha_pct}/{args.beta_pct}/{args.phi_pct}, "
            f"sparse AE {args.epochs} epochs (Adam, batch {args.batch_size}, lr {args.lr}) on {args.ae_samples} "
            f"regions, continuous cascade score for the ROC sweep; normalize {args.normalize}")


def test(model, ds, args, train_time):
    device = args.device
    model.to(device).eval()
    if device.type == "cuda":
        model.backbone.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    test_frames = common.load_split_frames(ds, "test", args.image_size, cache_dir=args.cache_dir)
    localizer = Localizer(model, args.image_size, device)
    plan = BatchPlan([len(v) for v in test_frames.values()], args.test_batch_size)
    warm_up(model, localizer, plan, args.image_size, args)

    t0 = time.time()            # timed: cached frames -> scores.npz
    frame_scores, maps = score_split(model, localizer, test_frames, args, plan)
    meta = {"method": "deep_anomaly", "dataset": args.dataset,
            "protocol": {"normalize": args.normalize, "smooth": args.smooth},
            "map": f"(zeta+1)-th largest cascade score of the covering receptive fields, zeta={args.zeta}, sampled "
                   f"{localizer.describe()} of the {args.image_size[0]}x{args.image_size[1]} input; >= 1 = abnormal at "
                   f"the paper's thresholds; frame score = its maximum (float32)",
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), frame_scores, maps, meta)
    elapsed = time.time() - t0
    num_frames = sum(len(v) for v in test_frames.values())
    fps = num_frames / elapsed
    print(f"test: {num_frames} frames ({plan.num_targets} scored) in {elapsed:.2f} s = {fps:.1f} frames/s "
          f"(cached frames -> scores.npz: frame cache reads, copies to the device, D_t, C1-S1-C2, G1, CT, G2, "
          f"zeta maps, frame scores, copy back, writing scores.npz; excludes model load, warm-up and evaluation; "
          f"{device.type}, {'bf16 autocast convolutions' if use_amp(args) else 'float32'}, "
          f"batch {args.test_batch_size})")

    # the paper's binary detector: a frame is abnormal when its score (max of the map) is >= 1
    labels = np.concatenate([ds.video(n).labels for n in frame_scores]).astype(bool)
    scores = np.concatenate(list(frame_scores.values()))
    valid = np.isfinite(scores)
    pred = scores[valid] >= 1.0
    op = {"frame_tpr": float(pred[labels[valid]].mean()) if labels[valid].any() else None,
          "frame_fpr": float(pred[~labels[valid]].mean()) if (~labels[valid]).any() else None}
    alpha, beta, phi = model.thresholds.tolist()
    extra = {"train_time_s": train_time, "test_fps": fps, "run_protocol": protocol_label(model, args),
             "peak_memory_gib": common.peak_memory(),
             "backbone": args.backbone_source, "thresholds": {"alpha": alpha, "beta": beta, "phi": phi},
             "operating_point": op, "device": str(device),
             "command": "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}
    result = vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)
    shown = {k: "n/a" if v is None else f"{v:.3f}" for k, v in op.items()}
    print(f"operating point (paper thresholds, map >= 1): frame TPR {shown['frame_tpr']}, FPR {shown['frame_fpr']}")
    n = write_panels(test_frames, frame_scores, maps, ds, os.path.join(args.out, "panels"), args.num_panels)
    if n:
        print(f"{n} localization panels -> {os.path.join(args.out, 'panels')}")
    return result


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

# settings a model was trained with: a test-only run reports these from model.pt, a resumed run keeps them
TRAINING_KEYS = ("layer", "hidden", "image_size", "epochs", "batch_size", "lr", "seed", "ae_samples",
                 "threshold_samples", "rho", "sparsity_weight", "weight_decay", "cov_eps", "alpha_pct", "beta_pct",
                 "phi_pct", "backbone_weights")
RESUME_KEYS = tuple(k for k in TRAINING_KEYS if k != "epochs")       # a resumed run may train longer


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser():
    parser = common.build_parser("deep_anomaly", __doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, choices=(1, 2, 3), default=2,
                        help="AlexNet layer C_k giving the regional features (Table 1); the paper uses 2")
    parser.add_argument("--hidden", type=int, default=500,
                        help="CT kernels = sparse-AE hidden size (Table 2: 100, 256, 500)")
    parser.add_argument("--backbone-weights", default=None,
                        help="'imagenet' (torchvision alexnet-owt-7be5be79.pth via torch.hub), PATH, or 'none' = random "
                             "(default: imagenet; synthetic: none)")
    parser.add_argument("--backbone-url", default=common.ALEXNET_URL, help="URL for --backbone-weights imagenet")
    parser.add_argument("--no-cascade", action="store_true",
                        help="one Gaussian classifier instead of the G1/G2 cascade")
    parser.add_argument("--single-classifier", choices=("g1", "g2"), default="g2",
                        help="with --no-cascade: g1 = Gaussian on C_k (Table 1, Table 3 'C2 output'), "
                             "g2 = Gaussian on CT (Table 2)")
    parser.add_argument("--ct-regions", choices=("suspicious", "all"), default="suspicious",
                        help="regions whose CT/G2 distance enters the score: the suspicious ones (the paper) or "
                             "all (exact joint-threshold ROC score everywhere)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="G1 'abnormal' threshold (default: percentile --alpha-pct)")
    parser.add_argument("--beta", type=float, default=None,
                        help="G1 'normal' threshold (default: percentile --beta-pct)")
    parser.add_argument("--phi", type=float, default=None, help="G2 threshold (default: percentile --phi-pct)")
    parser.add_argument("--alpha-pct", type=float, default=99.9, help="alpha = this percentile of training d1")
    parser.add_argument("--beta-pct", type=float, default=90.0, help="beta = this percentile of training d1")
    parser.add_argument("--phi-pct", type=float, default=99.9, help="phi = this percentile of training d2")
    parser.add_argument("--zeta", type=int, default=3,
                        help="a pixel is abnormal when MORE than zeta abnormal receptive fields cover it")
    parser.add_argument("--cov-eps", type=positive_float, default=1e-3,
                        help="covariance ridge, in units of trace/d (> 0)")
    parser.add_argument("--rho", type=float, default=0.05, help="sparse AE target activation")
    parser.add_argument("--sparsity-weight", type=float, default=3.0, help="weight of the KL sparsity term")
    parser.add_argument("--weight-decay", type=float, default=3e-3,
                        help="sparse AE weight decay lambda (J has lambda/2 ||W||^2)")
    parser.add_argument("--ae-samples", type=int, default=None, help="training regions the auto-encoder learns from "
                        "(default 200000; synthetic 50000)")
    parser.add_argument("--threshold-samples", type=int, default=None,
                        help="training regions for the threshold percentiles (default 200000; synthetic 50000)")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="target frames per forward pass, in training passes and at test (default 32 on CPU, "
                             "512 on CUDA)")
    return parser


def resolve_defaults(args):
    synthetic = args.dataset == "synthetic"
    if args.image_size is None:
        args.image_size = (120, 180) if synthetic else (240, 320)
    args.image_size = tuple(int(v) for v in args.image_size)
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
    if args.test_batch_size < 1:
        raise common.DataError(f"--test-batch-size {args.test_batch_size}: expected >= 1")
    return args


def load_model_checkpoint(path: str) -> dict:
    ckpt = common.load_checkpoint(path, method="deep_anomaly")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise common.DataError(f"{path}: written by an older deep_anomaly.py (D_t of three consecutive averaged frames, "
                               f"expected {CHECKPOINT_FORMAT!r}); retrain with --train into a new --out")
    return ckpt


def main(argv=None):
    parser = build_parser()
    args = common.parse_args(parser, argv)
    ckpt_path = os.path.join(args.out, "model.pt")
    resume_ckpt = None
    if args.test and not args.train:            # report the settings the model was trained with
        saved = load_model_checkpoint(ckpt_path)
        common.restore_training_args(args, parser, saved["args"], TRAINING_KEYS)
    elif args.train and args.resume and os.path.isfile(ckpt_path):
        resume_ckpt = load_model_checkpoint(ckpt_path)
        common.restore_training_args(args, parser, resume_ckpt["args"], RESUME_KEYS)
    elif args.train and args.resume:
        common.resume_checkpoint(ckpt_path, True)              # says "no checkpoint yet, starting fresh"
    args = resolve_defaults(args)
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # G1 / CT / G2 products in IEEE float32
        torch.backends.cudnn.allow_tf32 = False         # C1-C2 too: TF32 moves the figures (docstring)
    os.makedirs(args.out, exist_ok=True)
    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    train_time = 0.0
    if args.train:
        model = DeepAnomaly(args.layer, args.hidden)
        if resume_ckpt is not None:
            args.backbone_source = resume_ckpt.get("backbone", "from model.pt")
        else:
            args.backbone_source = common.load_alexnet_features(model.backbone, args.backbone_weights,
                                                                args.backbone_url)
        print(f"deep_anomaly: {args.dataset}, input {args.image_size[0]}x{args.image_size[1]}, layer C{args.layer}, "
              f"hidden {args.hidden}, {args.backbone_source}, device {args.device}")
        train_time = train(model, ds, args, argv, resume_ckpt)
        if train_time is None:                  # --max-minutes: checkpoint written, no testing
            return
    if args.test:
        ckpt = load_model_checkpoint(ckpt_path)
        saved = ckpt["args"]
        if ckpt.get("stage") != "done":
            raise common.DataError(f"{ckpt_path}: training did not finish (stage {ckpt.get('stage')}); "
                                   f"run --train --resume")
        model = DeepAnomaly(int(saved["layer"]), int(saved["hidden"]))
        model.load_state_dict(ckpt["model"])
        trained_ct = not (saved.get("no_cascade") and saved.get("single_classifier") == "g1")
        if not trained_ct and not (args.no_cascade and args.single_classifier == "g1"):
            raise common.DataError(f"{ckpt_path}: trained without CT/G2 (--no-cascade --single-classifier g1); "
                                   "test with the same flags or retrain")
        args.layer, args.image_size = int(saved["layer"]), tuple(saved["image_size"])
        args.backbone_source = ckpt.get("backbone", "?")
        if args.alpha is not None or args.beta is not None or args.phi is not None:
            fitted = model.thresholds.tolist()
            chosen = [fitted[i] if v is None else v for i, v in enumerate((args.alpha, args.beta, args.phi))]
            if not args.no_cascade and not chosen[1] < chosen[0]:
                raise common.DataError(f"--alpha/--beta: beta {chosen[1]:.4g} must be below alpha {chosen[0]:.4g}")
            model.thresholds.copy_(torch.tensor(chosen))
        if not args.train:
            train_time = float(ckpt.get("train_time_s") or 0.0)
        test(model, ds, args, train_time)


if __name__ == "__main__":
    common.run_main(main, report_memory=True)
