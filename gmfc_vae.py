"""GMFC-VAE: two-stream Gaussian-mixture fully-convolutional VAE for video anomaly detection (Fan et al. 2020).

Citation
--------
Yaxiang Fan, Gongjian Wen, Deren Li, Shaohua Qiu, Martin D. Levine, Fei Xiao. "Video anomaly detection and
localization via Gaussian Mixture Fully Convolutional Variational Autoencoder". Computer Vision and Image
Understanding 195 (2020) 102920. arXiv:1805.11223. Training objective from Jiang et al., "Variational Deep
Embedding: an unsupervised and generative approach to clustering" (VaDE), IJCAI 2017. Dynamic flow by the
approximate rank pooling of Bilen et al., "Dynamic image networks for action recognition", CVPR 2016.

Method
------
Two identical networks (Table I) see 28x28 patches: one sees the frames (appearance stream), the other sees
"dynamic flow" images (motion stream). A dynamic flow summarises a window of t = 20 optical-flow fields: each
flow is mapped to [0, 255] by 16 f + 128, the horizontal and vertical channels are each rank-pooled over the
window, and the magnitude of the pooled (u, v) is the third channel. Each network is a fully convolutional VAE
(C1..C4 encoder, F5/F6 1x1 mean / log-variance of a 64-d latent, a sampling layer, D8..D11 deconvolution
decoder) whose prior is a K = 20 component Gaussian mixture learned jointly (VaDE): the network is first
pre-trained as a plain auto-encoder, the mixture (pi, mu, sigma^2) is initialised by fitting a diagonal GMM to
the pre-trained latents, then everything is trained on the VaDE loss (equation 14) on patches of normal
training video. At test each frame is cut into a grid of non-overlapping 28x28 patches (15x10 at 420x280), each
patch's latent gets the sample energy E = -log sum_c pi_c N(z | mu_c, sigma_c^2) (equation 17) in each stream,
the streams are fused by E = 0.5 E_appearance + 0.5 E_motion (equation 18), the frame score is the maximum over
the grid and the grid itself is the anomaly map (localisation).

Choices the paper leaves open (documented, not deviations)
-------------------------------------------------------
- Rank pooling: approximate rank pooling (Bilen et al. 2016, eq. "alpha_t = 2(T - t + 1) - (T + 1)(H_T -
  H_{t-1})", H_t the t-th harmonic number), which already includes the time-varying means of eq. (4); no
  RankSVM is solved. Window alignment as in Sec. III-A: the dynamic flow of frame i pools flows f_i..f_{i+t-1}
  (flow f_i goes from frame i to i+1, so frames i..i+t are covered).
- The 16 f + 128 mapping is rounded and clipped to the integers 0..255 ("discrete range"). Because the
  coefficients sum to 0 the offset 128 cancels except where clipping occurred.
- "All patches are linearly normalized into [0, 1]": frames by /255; dynamic flow (u, v) by 0.5 + D / (2 s),
  magnitude by M / s, clipped to [0, 1], with ONE global scale s = 99.9th percentile of |D| over a sample of
  training dynamic flows (stored in the checkpoint). A per-image min-max (as in Bilen's dynamic images) would
  erase the motion magnitude an anomaly detector needs.
- Static patches (Sec. IV-C): a training patch is kept when at least `--min-moving-pixels` (default 1, the
  paper's "any moving pixel") of its pixels change by more than `--motion-threshold` (default 15 of 255) between
  frame i and frame i+1 (the frame pair of the first flow of frame i's window), i.e. on the gray frames at the
  working size. The same positions are used for both streams (the motion stream only takes frames with a full
  window).
- Output non-linearity of D11: sigmoid (targets are in [0, 1]); F5/F6 are linear; ReLU after every other
  conv/deconv as the paper says ("each convolutional layer is followed by a ReLU").
- Reconstruction term of eq. 14: sum over pixels of the squared error, L = 1 Monte-Carlo sample (VaDE's
  default); gamma_c = q(c|x) = p(c|z) of eq. 15 at the sampled z (as VaDE does, gradients pass through it).
- Mixture weights stay on the simplex through a softmax parametrisation (pi = softmax(pi_logits));
  variances through log-variances.
- Weight decay 5e-4 (L2, torch Adam) applies to the network weights only, not to the mixture parameters
  (decaying mu_c / log sigma_c^2 towards 0 would bias the prior). Note the paper used Keras, where Adam's
  `decay=5e-4` means a learning-rate decay; we follow the wording "weight decay".
- Epochs: the paper gives none. Defaults: 10 pre-training epochs (`--pretrain-epochs`) and 10 VaDE epochs
  (`--epochs`) over the sampled patches.
- Test latent: the encoder mean (F5), not a sample, so scores are deterministic.
- F6 (log-variance) is not used by the deterministic auto-encoder pre-training; when the mixture is initialised
  its weights are zeroed and its bias set to the mean log-variance of the fitted components, so the sampling
  layer starts at the scale of the latent clusters instead of unit variance (which would be orders of magnitude
  wider than the clusters and swamp eq. 14's KL term in the first VaDE steps).
- Two learning-rate flags: `--pretrain-lr` (auto-encoder) and `--lr` (VaDE); both 1e-4 as in the paper.
- Ped1/Ped2 are gray: the appearance stream replicates the gray frame into 3 channels (Table I's 3-channel
  input). Colour datasets use RGB frames.
- Maps: the fused energy grid (15x10 per frame at 420x280) is written nearest-upsampled by 4 (40x60) so the
  evaluator's bilinear upsampling keeps the patch blocks instead of smearing them across patches.

Deviations
----------
- Table I lists pad 0 for C1/C2 (and D10/D11) but also their outputs 14x14 / 7x7; a 3x3/2 convolution without
  padding would give 13x13 / 6x6. We use pad 1 (output_padding 1 in D10/D11) to keep Table I's feature sizes,
  which is what Keras' padding="same" does. The text of Sec. IV-C gives other widths (32/64/128/256); we follow
  Table I (64/128/256/64), as asked.
- Static test patches: the networks only ever see moving patches in training (Sec. IV-C), so a test patch
  with no moving pixel (same frame-difference rule as training, frame pair (i, i+1)) is not encoded and gets
  the run's lowest energy (`--static-test-patches skip`, default; `score` encodes all 150 patches as a literal
  reading would). The paper is silent on this; scoring static background that never moved in training (grass,
  benches) puts its energy at the top of every frame's maximum: on the synthetic data the appearance stream's
  frame maximum then always sat on the same two background cells (frame AUC ~0.6 vs ~0.9).
- Frames at the end of a video, whose forward window of t flows would run past the last frame, reuse the last
  full window (window start clamped to n_flows - t); videos with fewer than t + 1 frames pool all their flows.
  The paper only defines dynamic flows for i <= n - t; clamping lets every frame (and its map) be scored.
- Synthetic dataset defaults (for a < 3 min CPU demo; the paper's values stay the defaults for real datasets):
  frames resized to 112x168 (a 6x4 test grid; synthetic frames are 120x180), dynamic-flow window t = 8 (the
  videos are 80 frames long and a fast mover crosses the frame in ~20, so t = 20 smeared it over most of the
  window: motion-stream frame AUC 0.63-0.69 with t = 20 vs 0.75 with t = 8), at most 2,500 training patches per
  stream, 1 pre-training epoch at lr 1e-3 (too few steps at 1e-4) + 2 VaDE epochs at the paper's 1e-4 (1e-3
  wrecked the pre-trained latent space in the first VaDE epoch: frame AUC 0.94 -> 0.50), batch 100. Patch
  size, network (Table I), K = 20 and the scoring are unchanged.
- Real UCSD Ped2 on the 2-core CPU used a reduced protocol, labelled "REDUCED" in metrics.json's "protocol":
  40,000 of the 960K training patches per stream, 2 AE epochs at lr 1e-3 + 2 VaDE epochs at 1e-4 (about 5 min
  of training). Measured (flows cached, 2 shared CPU cores): frame AUC 74.1% micro / 80.8% macro, EER 30.1%,
  pixel AUC 36.6% / EER 58.7%; appearance stream alone 50.6%, motion stream alone 76.1% (paper: 92.2 / 12.6,
  pixel 78.2 / 19.2). Command:
      python gmfc_vae.py --dataset ped2 --data-root ../shared/data --out /tmp/runs/gmfc_vae/ped2 \
          --max-train-patches 40000 --pretrain-epochs 2 --epochs 2 --pretrain-lr 1e-3

Usage
-----
    python gmfc_vae.py --dataset synthetic                          # train + test, < 3 min on 2 CPU cores
    python gmfc_vae.py --dataset ped2 --data-root ../shared/data    # the paper's protocol (use a GPU)
    python gmfc_vae.py --dataset ped2 --data-root ../shared/data --test          # score with runs/.../model.pt
    python gmfc_vae.py --dataset ped2 --stream rgb --components 10  # Table VI / Table V variants
    python gmfc_vae.py --dataset ped2 --max-train-patches 40000 --pretrain-epochs 2 --epochs 2 \
        --pretrain-lr 1e-3                                          # the reduced CPU protocol
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

PATCH = 28            # Table I input/output patch size
LATENT_DIM = 64       # Table I: F5/F6 output 64x1x1
STREAMS = {"rgb": ("rgb",), "flow": ("flow",), "both": ("rgb", "flow")}
GRAY_DATASETS = ("ped1", "ped2", "synthetic")   # gray footage: replicated to 3 channels for the RGB stream


# ----------------------------------------------------------------------------------------------------- model
class GMFCVAE(nn.Module):
    """One stream of Table I plus the Gaussian-mixture prior (pi, mu_c, sigma_c^2) of VaDE."""

    def __init__(self, in_channels: int = 3, latent_dim: int = LATENT_DIM, components: int = 20):
        super().__init__()
        # encoder C1..C4 (ReLU after each), then F5 (mean) / F6 (log-variance) as 1x1 convolutions
        self.c1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1)      # 3x28x28   -> 64x14x14
        self.c2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)              # 64x14x14  -> 128x7x7
        self.c3 = nn.Conv2d(128, 256, 3, stride=2, padding=1)             # 128x7x7   -> 256x4x4
        self.c4 = nn.Conv2d(256, latent_dim, 4, stride=1, padding=0)      # 256x4x4   -> 64x1x1
        self.f5 = nn.Conv2d(latent_dim, latent_dim, 1)                    # mean        64x1x1
        self.f6 = nn.Conv2d(latent_dim, latent_dim, 1)                    # log-variance 64x1x1
        # decoder D8..D11 mirrors the encoder back to 3x28x28
        self.d8 = nn.ConvTranspose2d(latent_dim, 256, 4, stride=1, padding=0)                    # -> 256x4x4
        self.d9 = nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1)                           # -> 128x7x7
        self.d10 = nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1)         # -> 64x14x14
        self.d11 = nn.ConvTranspose2d(64, in_channels, 3, stride=2, padding=1, output_padding=1)  # -> 3x28x28
        # Gaussian-mixture prior: pi = softmax(pi_logits) keeps the weights on the simplex
        self.pi_logits = nn.Parameter(torch.zeros(components))
        self.mu_c = nn.Parameter(torch.zeros(components, latent_dim))
        self.logvar_c = nn.Parameter(torch.zeros(components, latent_dim))

    def encode(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = F.relu(self.c3(h))
        h = F.relu(self.c4(h))
        return self.f5(h).flatten(1), self.f6(h).flatten(1)

    def decode(self, z):
        h = F.relu(self.d8(z[:, :, None, None]))
        h = F.relu(self.d9(h))
        h = F.relu(self.d10(h))
        return torch.sigmoid(self.d11(h))

    def forward(self, x, sample: bool = True):
        mu, logvar = self.encode(x)
        # S7 sampling layer (reparameterisation trick); without sampling this is the pre-training auto-encoder
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode(z), mu, logvar, z

    def mixture_params(self):
        return self.pi_logits, self.mu_c, self.logvar_c

    def non_mixture_parameters(self):
        return [p for n, p in self.named_parameters() if n not in ("pi_logits", "mu_c", "logvar_c")]


def log_gaussians(z, mu_c, logvar_c):
    """log N(z | mu_c, diag sigma_c^2) for every sample and component: (N, K)."""
    diff2 = (z[:, None, :] - mu_c[None]) ** 2
    return -0.5 * (math.log(2 * math.pi) + logvar_c[None] + diff2 / torch.exp(logvar_c)[None]).sum(-1)


def sample_energy(z, pi_logits, mu_c, logvar_c):
    """Equation 17: E(z) = -log sum_c pi_c N(z | mu_c, sigma_c^2), computed with logsumexp: (N,)."""
    log_pi = torch.log_softmax(pi_logits, 0)
    return -torch.logsumexp(log_pi[None] + log_gaussians(z, mu_c, logvar_c), dim=1)


def vade_loss(x, x_rec, mu, logvar, z, pi_logits, mu_c, logvar_c):
    """Equation 14 (VaDE's negative ELBO with L = 1), averaged over the batch.

    ||x - x_rec||^2
    + 1/2 sum_c gamma_c sum_j (log s2_cj + s2~_j / s2_cj + (mu~_j - mu_cj)^2 / s2_cj)
    - sum_c gamma_c log(pi_c / gamma_c) - 1/2 sum_j (1 + log s2~_j),   gamma_c = p(c | z) (eq. 15).
    """
    rec = ((x - x_rec) ** 2).flatten(1).sum(1)
    log_pi = torch.log_softmax(pi_logits, 0)
    log_joint = log_pi[None] + log_gaussians(z, mu_c, logvar_c)                     # log p(c) p(z|c), (N, K)
    log_gamma = log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)
    gamma = torch.exp(log_gamma)
    var_c = torch.exp(logvar_c)
    per_c = (logvar_c[None] + torch.exp(logvar)[:, None] / var_c[None]
             + (mu[:, None] - mu_c[None]) ** 2 / var_c[None]).sum(-1)               # (N, K)
    kl = (0.5 * (gamma * per_c).sum(1) - (gamma * (log_pi[None] - log_gamma)).sum(1)
          - 0.5 * (1 + logvar).sum(1))
    return (rec + kl).mean(), rec.mean(), kl.mean()


# ----------------------------------------------------------------------------------------- dynamic flow
def rank_pool_coefficients(T: int) -> np.ndarray:
    """Approximate rank pooling (Bilen et al. 2016): alpha_t = 2(T-t+1) - (T+1)(H_T - H_{t-1}), t = 1..T."""
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, T + 1))])       # H_0..H_T
    t = np.arange(1, T + 1)
    return 2.0 * (T - t + 1) - (T + 1) * (harmonic[T] - harmonic[t - 1])


def dynamic_flow_starts(num_flows: int, window: int) -> tuple[np.ndarray, int]:
    """Window start (flow index) for each frame: frame i pools flows i..i+T-1, clamped to the last full window."""
    num_frames = num_flows + 1
    T = min(window, num_flows)
    return np.minimum(np.arange(num_frames), num_flows - T), T


def rank_pool_flows(flows, frame_ids, window: int, a: float = 16.0, b: float = 128.0):
    """Rank-pooled (u, v), (len(frame_ids), 2, H, W) float32 torch: D_i = sum_k alpha_k (a f_{s_i+k} + b).

    flows: (N, H, W, 2) array or tensor in pixels; a f + b is rounded and clipped to 0..255 (the paper's
    discrete flow images) before pooling. s_i is frame i's window start (dynamic_flow_starts).
    """
    starts, T = dynamic_flow_starts(flows.shape[0], window)
    starts = starts[np.asarray(frame_ids)]
    lo, hi = int(starts.min()), int(starts.max()) + T          # the flows these windows need, mapped once
    segment = flows[lo:hi] if torch.is_tensor(flows) else torch.from_numpy(np.array(flows[lo:hi]))
    mapped = torch.clamp(torch.round(segment.float() * a + b), 0, 255)
    rel = torch.as_tensor(starts - lo, device=mapped.device)
    alpha = rank_pool_coefficients(T)
    pooled = mapped[rel] * float(alpha[0])
    for k in range(1, T):                   # T vectorised passes over all requested frames
        pooled.add_(mapped[rel + k], alpha=float(alpha[k]))
    return pooled.permute(0, 3, 1, 2)


def normalize_dynamic_flow(pooled, scale: float):
    """(N, 2, H, W) pooled (u, v) -> (N, 3, H, W) in [0, 1]: 0.5 + D / 2s for u, v and |D| / s as magnitude."""
    magnitude = torch.sqrt((pooled ** 2).sum(1, keepdim=True))
    return torch.cat([0.5 + pooled / (2 * scale), magnitude / scale], 1).clamp_(0, 1)


def estimate_flow_scale(train_flows: dict, window: int, a: float, b: float, frames_per_video: int = 8) -> float:
    """Global normalisation s: the 99.9th percentile of |rank-pooled u, v| on evenly spaced training windows."""
    values = []
    gen = torch.Generator().manual_seed(0)
    for flows in train_flows.values():
        if flows.shape[0] == 0:
            continue
        ids = np.unique(np.linspace(0, flows.shape[0], frames_per_video).astype(int))
        uv = rank_pool_flows(flows, ids, window, a, b).abs().flatten()
        values.append(uv[torch.randperm(uv.numel(), generator=gen)[:200000]])
    if not values:
        return 1.0
    return max(float(np.percentile(torch.cat(values).numpy(), 99.9)), 1.0)


# --------------------------------------------------------------------------------------------------- data
def moving_patch_positions(gray_frames, stride: int, threshold: float, min_pixels: int, chunk: int = 64):
    """(M, 3) int64 rows (frame i, y, x) of 28x28 training patches on a stride grid that contain at least
    `min_pixels` pixels with |I_{i+1} - I_i| > threshold (static patches are dropped, Sec. IV-C)."""
    T, H, W = gray_frames.shape[:3]
    ys = np.arange(0, H - PATCH + 1, stride)
    xs = np.arange(0, W - PATCH + 1, stride)
    rows = []
    for s in range(0, max(T - 1, 0), chunk):
        e = min(s + chunk, T - 1)
        block = np.asarray(gray_frames[s:e + 1], dtype=np.int16)
        moving = (np.abs(block[1:] - block[:-1]) > threshold).astype(np.int32)      # (n, H, W)
        integral = np.zeros((moving.shape[0], H + 1, W + 1), np.int32)
        integral[:, 1:, 1:] = moving.cumsum(1).cumsum(2)
        y0, x0 = ys[:, None], xs[None, :]
        count = (integral[:, y0 + PATCH, x0 + PATCH] - integral[:, y0, x0 + PATCH]
                 - integral[:, y0 + PATCH, x0] + integral[:, y0, x0])                  # (n, gy, gx)
        f, gy, gx = np.nonzero(count >= min_pixels)
        rows.append(np.stack([f + s, ys[gy], xs[gx]], 1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


def gather_patches(images, positions):
    """images (T, H, W) or (T, H, W, C) array; positions (M, 3) (frame, y, x) -> (M, C, 28, 28) copy."""
    d = np.arange(PATCH)
    f = positions[:, 0, None, None]
    y = positions[:, 1, None, None] + d[None, :, None]
    x = positions[:, 2, None, None] + d[None, None, :]
    out = images[f, y, x]
    return out[:, None] if out.ndim == 3 else out.transpose(0, 3, 1, 2)


def sample_positions(candidates: dict, max_patches: int, seed: int) -> dict:
    """Uniformly sample at most max_patches candidate rows over all videos; returns {video: (m, 3)} sorted."""
    names = [n for n in candidates if len(candidates[n])]
    sizes = np.array([len(candidates[n]) for n in names], dtype=np.int64)
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(total, size=min(max_patches, total), replace=False)) if total else np.zeros(0, int)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = {}
    for i, name in enumerate(names):
        sel = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])] - offsets[i]
        if len(sel):
            out[name] = candidates[name][sel]
    return out


def extract_rgb_patches(frames: dict, positions: dict) -> np.ndarray:
    """uint8 (M, C, 28, 28) appearance patches (C = 1 for gray footage, replicated to 3 at batch time)."""
    parts = [gather_patches(frames[name], pos) for name, pos in positions.items()]
    return np.concatenate(parts) if parts else np.zeros((0, 1, PATCH, PATCH), np.uint8)


def extract_flow_patches(flows: dict, positions: dict, window: int, scale: float, a: float, b: float,
                         chunk: int = 32) -> np.ndarray:
    """uint8 (M, 3, 28, 28) dynamic-flow patches, computing only the dynamic flows of the sampled frames."""
    parts = []
    for name, pos in tqdm(positions.items(), desc="dynamic flow patches", leave=False):
        frame_ids = np.unique(pos[:, 0])
        for s in range(0, len(frame_ids), chunk):
            ids = frame_ids[s:s + chunk]
            images = dynamic_flow_uint8(rank_pool_flows(flows[name], ids, window, a, b), scale)   # (n, 3, H, W)
            images = images.permute(0, 2, 3, 1).numpy()
            sel = pos[np.isin(pos[:, 0], ids)].copy()
            sel[:, 0] = np.searchsorted(ids, sel[:, 0])
            parts.append(gather_patches(images, sel))
    return np.concatenate(parts) if parts else np.zeros((0, 3, PATCH, PATCH), np.uint8)


def dynamic_flow_uint8(pooled, scale: float):
    """The dynamic flow image as uint8 (N, 3, H, W): the same quantisation at training and at test."""
    return torch.round(normalize_dynamic_flow(pooled, scale) * 255).to(torch.uint8)


def to_input(batch_uint8, device):
    """uint8 (N, C, 28, 28) -> float (N, 3, 28, 28) in [0, 1] on device; gray (C = 1) is replicated."""
    x = batch_uint8.to(device, non_blocking=True).float().div_(255)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def grid_patches(images, stride: int):
    """(N, C, H, W) -> (N * gh * gw, C, 28, 28) and (gh, gw); stride 28 is a pure view/reshape."""
    N, C = images.shape[:2]
    tiles = images.unfold(2, PATCH, stride).unfold(3, PATCH, stride)              # (N, C, gh, gw, P, P)
    gh, gw = tiles.shape[2:4]
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(N * gh * gw, C, PATCH, PATCH), (gh, gw)


def test_grid_shape(frame_size, stride: int):
    H, W = frame_size
    return (H - PATCH) // stride + 1, (W - PATCH) // stride + 1


# ----------------------------------------------------------------------------------------------- training
def run_epoch(model, optimizer, patches, args, device, phase: str, epoch: int, desc: str):
    """One pass over the sampled patches (uint8 tensor, on the GPU when training there); phase 'pretrain'
    (auto-encoder, squared error) or 'vade' (equation 14)."""
    model.train()
    gen = torch.Generator().manual_seed(args.seed * 1000 + epoch + (0 if phase == "pretrain" else 500))
    order = torch.randperm(len(patches), generator=gen).numpy()
    sums = np.zeros(3)
    count = 0
    start = time.time()
    bar = tqdm(range(0, len(order), args.batch_size), desc=desc, leave=False)
    for s in bar:
        idx = torch.from_numpy(np.sort(order[s:s + args.batch_size])).to(patches.device)
        x = to_input(patches[idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            x_rec, mu, logvar, z = model(x, sample=(phase == "vade"))
        x_rec, mu, logvar, z = x_rec.float(), mu.float(), logvar.float(), z.float()
        if phase == "pretrain":
            loss = ((x - x_rec) ** 2).flatten(1).sum(1).mean()
            rec, kl = loss, torch.zeros(())
        else:
            loss, rec, kl = vade_loss(x, x_rec, mu, logvar, z, *model.mixture_params())
        common.check_finite(loss, f"{desc} batch {s // args.batch_size}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += len(idx) * np.array([loss.item(), rec.item(), kl.item()])
        count += len(idx)
        if (s // args.batch_size) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.2f}")
    elapsed = time.time() - start
    loss, rec, kl = sums / max(count, 1)
    return {"loss": loss, "rec": rec, "kl": kl, "time": elapsed, "patches_per_s": count / max(elapsed, 1e-9)}


@torch.no_grad()
def init_mixture_from_latents(model, patches, components: int, max_fit: int, seed: int, device,
                              batch: int = 4096):
    """VaDE initialisation: fit a diagonal GMM to the pre-trained encoder means and copy (pi, mu, sigma^2)."""
    from sklearn.mixture import GaussianMixture
    model.eval()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(patches), size=min(max_fit, len(patches)), replace=False))
    latents = []
    for s in range(0, len(idx), batch):
        sel = torch.from_numpy(idx[s:s + batch]).to(patches.device)
        latents.append(model.encode(to_input(patches[sel], device))[0].float().cpu())
    latents = torch.cat(latents).numpy().astype(np.float64)
    gmm = GaussianMixture(components, covariance_type="diag", random_state=seed, max_iter=200).fit(latents)
    model.pi_logits.copy_(torch.from_numpy(np.log(np.maximum(gmm.weights_, 1e-12))).float())
    model.mu_c.copy_(torch.from_numpy(gmm.means_).float())
    model.logvar_c.copy_(torch.from_numpy(np.log(gmm.covariances_)).float())
    # F6 (log-variance) is unused by the deterministic pre-training; start the sampling layer at the scale of
    # the fitted clusters (mean component log-variance per dimension) instead of unit variance, which would
    # be orders of magnitude wider than the clusters of the pre-trained latents and swamp eq. 14's KL term.
    model.f6.weight.zero_()
    model.f6.bias.copy_(model.logvar_c.mean(0))
    return gmm


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def patch_energies(model, patches, device, batch: int, amp: bool):
    """Sample energy (eq. 17) of every patch from the encoder MEAN (deterministic test latent)."""
    model.eval()
    out = []
    for s in range(0, patches.shape[0], batch):
        x = to_input(patches[s:s + batch], device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            mu, _ = model.encode(x)
        out.append(sample_energy(mu.float(), *model.mixture_params()))
    return torch.cat(out)


def moving_grid(frames_t, stride: int, threshold: float, min_pixels: int):
    """(T, gh, gw) bool: the test patch has >= min_pixels pixels with |I_{t+1} - I_t| > threshold (the training
    criterion; the last frame uses the pair (T-2, T-1)). frames_t: (T, C, H, W) uint8 tensor."""
    gray = frames_t.float().mean(1, keepdim=True)
    if gray.shape[0] < 2:
        return torch.ones(gray.shape[0], *test_grid_shape(gray.shape[2:], stride), dtype=torch.bool,
                          device=gray.device)
    moving = ((gray[1:] - gray[:-1]).abs() > threshold).float()
    moving = torch.cat([moving, moving[-1:]])
    counts = F.avg_pool2d(moving, PATCH, stride) * (PATCH * PATCH)
    return counts[:, 0] > min_pixels - 0.5


@torch.inference_mode()
def score_video(models: dict, frames, flows, args, flow_scale: float, device):
    """Energy grid (T, gh, gw) float32 of one video: alpha E_app + beta E_motion (eq. 18) or a single stream.

    With --static-test-patches skip (default) only patches with moving pixels are encoded (the domain the
    networks were trained on); the others are NaN here and get the run's lowest energy in test()."""
    T = frames.shape[0]
    gh, gw = test_grid_shape(frames.shape[1:3], args.test_stride)
    chunk = max(1, args.test_batch_size // (gh * gw))
    frames_t = torch.from_numpy(np.array(frames)).to(device, non_blocking=True)   # copy: the cache is read-only
    frames_t = frames_t[:, None] if frames_t.ndim == 3 else frames_t.permute(0, 3, 1, 2)
    if args.static_test_patches == "skip":
        scored = moving_grid(frames_t, args.test_stride, args.motion_threshold, args.min_moving_pixels)
    else:
        scored = torch.ones(T, gh, gw, dtype=torch.bool, device=device)
    fused = torch.zeros(T, gh, gw, device=device)
    flows_t = None
    if "flow" in models and flows is not None and flows.shape[0] > 0:
        flows_t = torch.from_numpy(np.array(flows)).to(device, non_blocking=True)
    for s in range(0, T, chunk):
        e_chunk = min(s + chunk, T)
        keep = scored[s:e_chunk].reshape(-1)
        total = torch.zeros(int(keep.sum()), device=device)
        if "rgb" in models:
            weight = args.alpha if "flow" in models else 1.0
            tiles, _ = grid_patches(frames_t[s:e_chunk], args.test_stride)
            total += weight * patch_energies(models["rgb"], tiles[keep], device, args.test_batch_size, args.amp)
        if "flow" in models:
            weight = args.beta if "rgb" in models else 1.0
            if flows_t is None:            # a one-frame video has no flow: not scorable by the motion stream
                total += float("nan")
            else:
                ids = np.arange(s, e_chunk)
                images = dynamic_flow_uint8(rank_pool_flows(flows_t, ids, args.window, args.flow_a, args.flow_b),
                                            flow_scale)
                tiles, _ = grid_patches(images, args.test_stride)
                total += weight * patch_energies(models["flow"], tiles[keep], device, args.test_batch_size, args.amp)
        block = torch.full(((e_chunk - s) * gh * gw,), float("nan"), device=device)
        block[keep] = total
        fused[s:e_chunk] = block.view(-1, gh, gw)
    return fused.cpu().numpy()


# ------------------------------------------------------------------------------------------ train / test
PAPER = {"frame_size": (280, 420), "window": 20, "max_train_patches": 960_000, "batch_size": 100, "lr": 1e-4,
         "pretrain_lr": 1e-4}
SYNTHETIC = {"frame_size": (112, 168), "window": 8, "max_train_patches": 2_500, "pretrain_epochs": 1,
             "epochs": 2, "batch_size": 100, "lr": 1e-4, "pretrain_lr": 1e-3}


def fill_defaults(args):
    """Paper values for real datasets, the small documented CPU-demo values for --dataset synthetic."""
    base = SYNTHETIC if args.dataset == "synthetic" else {**PAPER, "pretrain_epochs": 10, "epochs": 10}
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.frame_size = tuple(int(v) for v in args.frame_size)
    if args.test_batch_size is None:
        args.test_batch_size = 65536 if args.device.type == "cuda" else 8192
    if min(args.frame_size) < PATCH:
        raise common.DataError(f"--frame-size {args.frame_size}: both sides must be at least {PATCH}")
    return args


def protocol_string(args) -> str:
    reduced = (args.frame_size != PAPER["frame_size"] or args.window != PAPER["window"]
               or args.max_train_patches < PAPER["max_train_patches"] or args.batch_size != PAPER["batch_size"]
               or args.lr != PAPER["lr"] or args.pretrain_lr != PAPER["pretrain_lr"] or args.components != 20 or args.pretrain_epochs < 10 or args.epochs < 10)
    return (f"{'REDUCED' if reduced else 'paper'} protocol: frames {args.frame_size[1]}x{args.frame_size[0]}, "
            f"dynamic-flow window t={args.window}, <= {args.max_train_patches} training patches/stream "
            f"(stride {args.train_stride}), {args.pretrain_epochs} AE pre-training + {args.epochs} VaDE epochs, "
            f"batch {args.batch_size}, lr {args.pretrain_lr:g} (AE) / {args.lr:g} (VaDE), K={args.components}, stream={args.stream}, "
            f"test stride {args.test_stride}, raw sample energy (normalize none)")


def training_positions(ds, frames: dict, flows_needed: bool, args) -> dict:
    """Moving-patch candidates -> {stream: {video: (m, 3) positions}} sampled up to --max-train-patches."""
    candidates = {}
    for video in tqdm(ds.train, desc="moving patches", leave=False):
        gray = frames[video.name] if frames[video.name].ndim == 3 else np.asarray(frames[video.name]).mean(-1)
        candidates[video.name] = moving_patch_positions(gray, args.train_stride, args.motion_threshold,
                                                        args.min_moving_pixels)
    positions = {"rgb": sample_positions(candidates, args.max_train_patches, args.seed)}
    if flows_needed:     # motion stream: only frames whose own forward window of t flows is complete
        full = {}
        for video in ds.train:
            last = video.num_frames - 1 - min(args.window, video.num_frames - 1)
            full[video.name] = candidates[video.name][candidates[video.name][:, 0] <= last]
        positions["flow"] = sample_positions(full, args.max_train_patches, args.seed + 1)
    print(f"training patches: {sum(len(c) for c in candidates.values())} moving of "
          f"{sum(v.num_frames for v in ds.train)} frames; sampled "
          + ", ".join(f"{s} {sum(len(p) for p in pos.values())}" for s, pos in positions.items()))
    return positions


def checkpoint_state(models, optimizer, progress, flow_scale, args):
    """Everything --resume needs: both streams' weights (incl. the mixture), the running optimizer, progress."""
    return {"models": {s: m.state_dict() for s, m in models.items()},
            "optimizer": optimizer or {},          # {"stream": name, "state": optimizer.state_dict()}
            "progress": {s: dict(p) for s, p in progress.items()},
            "epoch": sum(p["epoch"] + (args.pretrain_epochs if p["phase"] != "pretrain" else 0)
                         for p in progress.values()),
            "flow_scale": float(flow_scale), "args": common.args_to_dict(args)}


def train(args, ds, streams, gray: bool, device):
    """Train one GMFC-VAE per stream: AE pre-training, GMM initialisation, VaDE (eq. 14). Returns models, s."""
    ckpt_path = os.path.join(args.out, "model.pt")
    models = {s: GMFCVAE(3, LATENT_DIM, args.components).to(device) for s in streams}
    progress = {s: {"phase": "pretrain", "epoch": 0} for s in streams}
    flow_scale, saved_optimizer = None, None
    if args.resume and os.path.isfile(ckpt_path):
        state = common.load_checkpoint(ckpt_path)
        for s in streams:
            if s in state["models"]:
                models[s].load_state_dict(state["models"][s])
                progress[s] = dict(state["progress"][s])
        flow_scale = state.get("flow_scale")
        saved_optimizer = state.get("optimizer") or None
        print(f"resumed from {ckpt_path}: " + ", ".join(f"{s} {p['phase']} epoch {p['epoch']}"
                                                        for s, p in progress.items()))
    elif args.resume:
        print(f"--resume: no {ckpt_path} yet, training from scratch")
    finished = lambda p: p["phase"] == "vade" and p["epoch"] >= args.epochs
    if all(finished(p) for p in progress.values()):
        return models, flow_scale or 1.0

    frames = common.load_split_frames(ds, "train", args.frame_size, gray=gray, cache_dir=args.cache_dir)
    flows = (common.load_split_flows(ds, "train", args.frame_size, method=args.flow_method, cache_dir=args.cache_dir,
                                     workers=args.workers) if "flow" in streams else {})
    if "flow" in streams and flow_scale is None:
        flow_scale = estimate_flow_scale(flows, args.window, args.flow_a, args.flow_b)
        print(f"dynamic-flow normalisation scale s = {flow_scale:.1f} (99.9th percentile of |D|)")
    flow_scale = flow_scale or 1.0
    positions = training_positions(ds, frames, "flow" in streams, args)

    for stream in streams:
        model, prog = models[stream], progress[stream]
        if finished(prog):
            continue
        t0 = time.time()
        patches = (extract_rgb_patches(frames, positions["rgb"]) if stream == "rgb" else
                   extract_flow_patches(flows, positions["flow"], args.window, flow_scale, args.flow_a, args.flow_b))
        if len(patches) == 0:
            raise common.DataError(f"{ds.root}: no moving training patches for the {stream} stream "
                                   f"(lower --motion-threshold / --min-moving-pixels?)")
        print(f"[{stream}] {len(patches)} patches {tuple(patches.shape[1:])} uint8 in {time.time() - t0:.1f}s")
        patches = torch.from_numpy(patches).to(device)     # whole set on the GPU (960K patches ~ 2.3 GB uint8)

        # 1) pre-training as a plain (deterministic) auto-encoder on the network weights
        optimizer = torch.optim.Adam(model.non_mixture_parameters(), lr=args.pretrain_lr,
                                     weight_decay=args.weight_decay)
        if prog["phase"] == "pretrain" and saved_optimizer and saved_optimizer.get("stream") == stream:
            optimizer.load_state_dict(saved_optimizer["state"])
        while prog["phase"] == "pretrain" and prog["epoch"] < args.pretrain_epochs:
            stats = run_epoch(model, optimizer, patches, args, device, "pretrain", prog["epoch"],
                              f"[{stream}] pretrain {prog['epoch'] + 1}/{args.pretrain_epochs}")
            prog["epoch"] += 1
            print(f"[{stream}] pretrain epoch {prog['epoch']}/{args.pretrain_epochs}: mse-sum {stats['loss']:.3f} "
                  f"({stats['time']:.1f}s, {stats['patches_per_s']:.0f} patches/s)")
            common.save_checkpoint(ckpt_path, checkpoint_state(models, {"stream": stream, "state": optimizer.state_dict()},
                                                               progress, flow_scale, args))
        # 2) initialise pi, mu_c, sigma_c^2 from a diagonal GMM on the pre-trained latents
        if prog["phase"] == "pretrain":
            gmm = init_mixture_from_latents(model, patches, args.components, args.gmm_fit_patches, args.seed, device)
            print(f"[{stream}] GMM initialised on {min(args.gmm_fit_patches, len(patches))} latents "
                  f"(converged={gmm.converged_}, mean log-likelihood {gmm.lower_bound_:.2f})")
            prog.update(phase="vade", epoch=0)
            saved_optimizer = None
            common.save_checkpoint(ckpt_path, checkpoint_state(models, None, progress, flow_scale, args))
        # 3) VaDE on the loss of eq. 14; no weight decay on the mixture parameters
        optimizer = torch.optim.Adam([{"params": model.non_mixture_parameters(), "weight_decay": args.weight_decay},
                                      {"params": list(model.mixture_params()), "weight_decay": 0.0}], lr=args.lr)
        if saved_optimizer and saved_optimizer.get("stream") == stream and prog["phase"] == "vade":
            optimizer.load_state_dict(saved_optimizer["state"])
        while prog["epoch"] < args.epochs:
            stats = run_epoch(model, optimizer, patches, args, device, "vade", prog["epoch"],
                              f"[{stream}] VaDE {prog['epoch'] + 1}/{args.epochs}")
            prog["epoch"] += 1
            print(f"[{stream}] VaDE epoch {prog['epoch']}/{args.epochs}: loss {stats['loss']:.3f} "
                  f"(rec {stats['rec']:.3f}, kl {stats['kl']:.3f}; {stats['time']:.1f}s, "
                  f"{stats['patches_per_s']:.0f} patches/s)")
            common.save_checkpoint(ckpt_path, checkpoint_state(models, {"stream": stream, "state": optimizer.state_dict()},
                                                               progress, flow_scale, args))
        del patches
    return models, flow_scale


def load_models(args, streams, device):
    state = common.load_checkpoint(os.path.join(args.out, "model.pt"))
    models = {}
    for s in streams:
        if s not in state["models"]:
            raise common.DataError(f"{os.path.join(args.out, 'model.pt')}: no {s} stream (trained with "
                                   f"--stream {state['args'].get('stream')}; expected --stream to match)")
        weights = state["models"][s]
        models[s] = GMFCVAE(3, LATENT_DIM, weights["mu_c"].shape[0]).to(device)
        models[s].load_state_dict(weights)
        models[s].to(memory_format=torch.channels_last)      # ~2x faster convolutions at test on CPU
        if state["progress"][s]["phase"] != "vade" or state["progress"][s]["epoch"] < state["args"]["epochs"]:
            print(f"warning: the {s} stream's training is unfinished ({state['progress'][s]})")
    return models, float(state.get("flow_scale", 1.0))


def test(args, ds, models, flow_scale: float, gray: bool, device):
    """Score every test video, write scores.npz (+ panels) and return the measured test frames/s."""
    frames = common.load_split_frames(ds, "test", args.frame_size, gray=gray, cache_dir=args.cache_dir)
    flows = (common.load_split_flows(ds, "test", args.frame_size, method=args.flow_method, cache_dir=args.cache_dir,
                                     workers=args.workers) if "flow" in models else {})
    # throughput: from the cached frames / flows to scores.npz (flows are computed and cached above)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    grids = {video.name: score_video(models, frames[video.name], flows.get(video.name), args, flow_scale, device)
             for video in tqdm(ds.test, desc="test", leave=False)}
    # static (unscored) patches take the lowest energy of the run: "as normal as anything we scored"
    finite = [g[np.isfinite(g)] for g in grids.values()]
    floor = float(min((f.min() for f in finite if f.size), default=0.0))
    frame_scores, maps = {}, {}
    for name, grid in grids.items():
        grid = np.where(np.isnan(grid), floor, grid)
        frame_scores[name] = grid.reshape(len(grid), -1).max(1)
        # nearest-upsample x4 so eval's bilinear upsampling keeps the patch blocks
        maps[name] = np.repeat(np.repeat(grid, 4, axis=1), 4, axis=2).astype(np.float16)
    meta = {"method": "gmfc_vae", "dataset": ds.name, "protocol": {"normalize": args.normalize, "smooth": args.smooth},
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), frame_scores, maps, meta)
    elapsed = time.time() - t0
    num_frames = sum(len(s) for s in frame_scores.values())
    fps = num_frames / max(elapsed, 1e-9)
    print(f"test: {num_frames} frames in {elapsed:.1f}s = {fps:.1f} frames/s (cached frames/flows -> scores.npz, "
          f"{device})")
    return frame_scores, maps, fps


def main(argv=None):
    parser = common.build_parser("gmfc_vae", __doc__.strip().splitlines()[0])
    parser.add_argument("--stream", choices=tuple(STREAMS), default="both",
                        help="appearance (rgb), motion (dynamic flow) or both fused by eq. 18 (Table VI)")
    parser.add_argument("--components", type=int, default=20, help="K, Gaussian-mixture components (Table V)")
    parser.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="frames resized to H W (paper 280 420; synthetic 112 168)")
    parser.add_argument("--window", type=int, default=None, help="t, flows rank-pooled per dynamic flow (paper 20)")
    parser.add_argument("--flow-a", type=float, default=16.0, help="flow image mapping a f + b: a")
    parser.add_argument("--flow-b", type=float, default=128.0, help="flow image mapping a f + b: b")
    parser.add_argument("--flow-method", choices=("farneback", "dis"), default="farneback", help="optical flow")
    parser.add_argument("--train-stride", type=int, default=7, help="d1, training patch stride")
    parser.add_argument("--test-stride", type=int, default=PATCH, help="d2, test patch stride (28: 15x10 grid)")
    parser.add_argument("--max-train-patches", type=int, default=None,
                        help="random sample of moving training patches per stream (paper 960000)")
    parser.add_argument("--motion-threshold", type=float, default=15.0,
                        help="frame-difference level (0..255) above which a pixel is moving")
    parser.add_argument("--min-moving-pixels", type=int, default=1,
                        help="a training patch needs at least this many moving pixels (paper: any)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="auto-encoder pre-training epochs")
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="Adam learning rate of the auto-encoder pre-training (paper 1e-4; --lr is VaDE's)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="Adam weight decay (network weights)")
    parser.add_argument("--gmm-fit-patches", type=int, default=100_000,
                        help="pre-trained latents used to initialise the mixture")
    parser.add_argument("--alpha", type=float, default=0.5, help="eq. 18 weight of the appearance energy")
    parser.add_argument("--beta", type=float, default=0.5, help="eq. 18 weight of the motion energy")
    parser.add_argument("--static-test-patches", choices=("skip", "score"), default="skip",
                        help="skip: test patches without moving pixels (frame difference, as in training) get the "
                             "run's lowest energy; score: encode every patch")
    parser.add_argument("--test-batch-size", type=int, default=None, help="patches per forward pass at test")
    args = fill_defaults(common.parse_args(parser, argv))
    args.normalize = args.normalize or "none"        # the paper thresholds raw energies over the whole test set
    common.seed_everything(args.seed)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    streams = STREAMS[args.stream]
    gray = args.dataset in GRAY_DATASETS
    print(f"gmfc_vae on {ds.name}: {ds.summary()} | streams {streams} | device {device}")

    train_time = None
    if args.train:
        t0 = time.time()
        models, flow_scale = train(args, ds, streams, gray, device)
        train_time = time.time() - t0
        print(f"training time {train_time:.1f}s")
    if args.test:
        models, flow_scale = load_models(args, streams, device)
        frame_scores, maps, fps = test(args, ds, models, flow_scale, gray, device)
        extra = {"train_time_s": train_time, "test_fps": fps, "protocol": protocol_string(args),
                 "device": str(device),
                 "command": "python gmfc_vae.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)
        if args.num_panels > 0:
            shown = {v.name: maps[v.name] for v in ds.test if v.has_masks}
            shown = dict(list(shown.items())[:args.num_panels])
            n = vad_eval.write_overlays(frame_scores, shown, ds, os.path.join(args.out, "panels"), top_k=1,
                                        cache_dir=args.cache_dir)
            print(f"wrote {n} localisation panels to {os.path.join(args.out, 'panels')}")


if __name__ == "__main__":
    common.run_main(main)
