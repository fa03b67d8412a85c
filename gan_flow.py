"""GANs on frames and optical flow for abnormal event detection (Ravanbakhsh et al. 2017).

Citation
    M. Ravanbakhsh, M. Nabi, E. Sangineto, L. Marcenaro, C. Regazzoni, N. Sebe.
    "Abnormal event detection in videos using generative adversarial nets." ICIP 2017.
    Architecture details from P. Isola, J.-Y. Zhu, T. Zhou, A. A. Efros, "Image-to-image translation with
    conditional adversarial networks" (pix2pix), CVPR 2017, which the paper adopts for G and D.

What it does
    Two conditional GANs are trained on normal training data only: N_F->O translates a frame F_t into its
    optical-flow image O_t (flow from F_t to F_t+1, three channels: horizontal, vertical, magnitude) and
    N_O->F translates O_t back into the frame. Both are pix2pix networks: a U-Net generator with skip
    connections whose dropout is the noise z (kept on at test time) and a 70x70 PatchGAN discriminator that
    sees the concatenated (input, output) pair; loss = conditional GAN loss + 100 * L1. Since they only saw
    normal scenes, the generators cannot reproduce abnormal motion or appearance. At test time
        Delta_O = O - G_F->O(F)                       (per pixel, motion stream)
        Delta_S = h(F) - h(G_O->F(O))                 (h = AlexNet conv5, "semantic" appearance stream)
    Delta_S is upsampled to Delta_O's size, each is divided by its maximum over the whole test video
    (eq. 4-5: N_O, N_S) and fused: A = N_S + lambda * N_O with lambda = 2. A is the abnormality heatmap;
    the frame score is max(A) (a frame is abnormal when any pixel exceeds the threshold).
    Paper: UCSD Ped2 frame AUC 93.5% / EER 14%; Ped1 97.4% / 8%, pixel AUC 70.3% / EER 35%.
    Pixel level the paper counts a detection on an abnormal frame that covers under 40% of its ground-truth
    pixels as a false positive (a stricter variant of the UCSD 40% rule): metrics.json's pixel_auc/pixel_eer
    use that rule (eval pixel_rule "strict", recorded in scores.npz's meta); pixel_auc_ucsd/pixel_eer_ucsd
    give the usual UCSD rule for comparison with other methods.

Deviations (from the paper / pix2pix, each with its reason)
    1. Optical flow: OpenCV Farneback from common.load_flows (cached; `--flow-method`), not the flow method
       of the paper's reference [28]: the shared, cached flow of this repository; no other flow code here.
    2. Flow image encoding (the paper gives none): with s = the flow scale (`--flow-scale`; default: the
       99.9th percentile of the per-pixel flow magnitude over an evenly spaced sample of ~400 normal training
       flows, at the GAN's input size, stored in the checkpoint), O = (dx / s, dy / s, 2 * |flow| / s - 1), clipped to [-1, 1], i.e.
       the [-1, 1] range of pix2pix images (zero motion is (0, 0, -1)).
    3. Normalisation layers are InstanceNorm2d(affine=True) instead of BatchNorm2d. pix2pix trains with
       batch 1 and applies batch normalisation with the statistics of the test batch at test time ("instance
       normalisation" in their words); for batch 1 the two are the same function. Instance norm keeps this
       exact when many test frames are batched for throughput (and when `--batch-size` > 1, where it differs
       from pix2pix's batch statistics): a frame's output does not depend on the other frames of its batch.
    4. Dropout (the noise z, p = 0.5) sits in the first three decoder blocks as in the pix2pix paper
       (CD512-CD1024-CD1024) and its original Torch code (the later PyTorch port puts it one level lower). It
       is always on, also at test. Not a deviation; listed because the two public codes differ. At test a
       frame's noise is a fixed function of (--seed, video, frame, generator) (AlwaysDropout, noise_keys):
       its scores do not depend on --test-batch-size, on which frames share its batch or on the device.
    5. Channel reductions, which the paper leaves open: Delta_O and Delta_S are reduced to one value per
       pixel by the L2 norm over channels (3 flow channels; 256 conv5 channels), which also makes them
       non-negative so that "normalised by the maximum" maps them to [0, 1]. Delta_S is reduced on the
       15x15 grid and then upsampled (the paper upsamples Delta_S and reduces nothing).
    6. h = AlexNet conv5 *after* its ReLU (torchvision features[:12]; "before pooling" as in the paper). The
       paper says only "AlexNet [8]" pre-trained on ImageNet; the Caffe model common in 2017 runs relu5 in
       place, so its conv5 blob holds post-ReLU values, which is why we take them after the ReLU. The net
       is torchvision's variant (conv widths 64-192-384-256-256, no grouping, no LRN), the published PyTorch
       weights (SPEC section 2), not Krizhevsky's / Caffe's (96-256-384-384-256, grouped, with LRN): same
       15x15x256 conv5 grid, different features. The AlexNet input is the 256x256 frame (gray replicated to
       RGB, ImageNet mean/std; `--semantic-size`; F and p_F are resized bilinearly to it when the GANs run
       smaller). The 15x15 grid is upsampled bilinearly (align_corners=False) to Delta_O's size, which
       puts cell m at pixel ~17.07 m + 8 while its receptive field is centred at 16 m + 15: up to 8 pixels
       off near the borders, which matters for the pixel level only.
    7. Optimiser: the paper writes "stochastic gradient descent with momentum 0.5, batch size 1"; that is
       pix2pix's Adam with beta1 = 0.5, lr 2e-4, used here.
    8. The last frame of each video has no O_t (no F_t+1): its frame score is NaN (eval fills it from the
       previous frame and reports the count) and its map is a copy of the previous frame's map.
    9. Frames are gray for every dataset (UCSD is gray; colour datasets are converted).
   10. scores.npz stores A average-pooled to `--map-size` (64x64 by default, float16); the frame score is the
       max of the full-resolution A. The pixel-level metrics therefore threshold a smoothed A (4x4 blocks
       averaged, then upsampled bilinearly by eval.py), not the full-resolution heatmap of the paper.
   11. Training jitter is pix2pix's (resize to 286x286, a random 256x256 crop, a random horizontal mirror with
       probability 1/2; `--jitter on`, the default; `--jitter off` trains on the plain frames), with three
       differences: the resize starts from the cached frames/flow images at the GAN size (one more bilinear
       resampling) and is bilinear (pix2pix's PyTorch port: bicubic from the original image), done on the device; at other
       sizes S the resize goes to round(S * 286 / 256); a mirrored flow has its dx channel negated (pix2pix
       mirrors the flow image as a picture, which leaves a left-moving pedestrian's flow pointing right). The
       frame and its flow share one crop and mirror, and both cGANs see the same jittered pair in a step.
       As in pix2pix, the 286/256 zoom does not rescale the flow values (a zoomed object moves 11.7% more
       pixels per frame than its flow image says).
   12. `--dataset synthetic` defaults (CPU demo, < 3 min on 2 cores): 64x64 inputs with a correspondingly
       shallower U-Net (6 down / 6 up levels instead of 8; dropout still in the first three decoder
       blocks), ngf = ndf = 32, 2 epochs on every 2nd training frame, `--backbone-weights none`. The PatchGAN
       is unchanged (a 6x6 output grid for 64x64 input). `--image-size` must be a square power of two >= 16.
   13. ImageNet AlexNet weights need a download (or `--backbone-weights PATH`); with
       `--backbone-weights none` the appearance stream uses a randomly initialised AlexNet (printed loudly,
       recorded in the protocol string): not the paper's setting, and the paper's figures assume ImageNet.
   14. The strict pixel rule's formula is ours: the paper says an under-covering detection "is counted as a
       false positive" and gives no formula; eval.py adds such frames to the false positives and to the
       negatives, FPR = (alarms on normal frames + under-covered abnormal frames) / (normal frames +
       under-covered abnormal frames). The UCSD rule is reported beside it (pixel_auc_ucsd).

Runs, speed and reproducibility
    - Training is resumable and can be time-boxed: `--max-minutes M` stops at the next step boundary after M
      minutes, writes model.pt atomically (weights, both Adam states, epoch, step within the epoch and that
      epoch's order, the RNG states of torch (dropout), numpy and the sampler (order and jitter draws)),
      prints the command that continues and exits without testing; `--resume` continues from there, and a
      run cut into slices ends with the same weights as an uninterrupted one (bit for bit on the CPU). One
      step = one D and one G update of each cGAN on one batch; the printed steps/s counts these (timed from
      the end of each epoch's or slice's first step, which includes cuDNN's autotuning on CUDA). Losses are
      summed on the device and checked for NaN/inf every 50 steps and at each epoch end (common.LossMonitor),
      not synced every step. On CUDA the training split is held on the GPU (uint8 frames, float16 flows)
      when it fits in half of the free memory, and the jitter runs there. At batch 1 a step is ~1,100 small
      operator calls (counted on the CPU), so eager PyTorch would spend it launching kernels: on CUDA each
      cGAN's step (D then G, with fused, capturable Adam) is captured once as a CUDA graph and replayed
      (common.GraphedStep; `--no-cuda-graphs` runs it eagerly; a capture that fails warns and steps
      eagerly). The replayed kernels are the eager ones, and each replay advances the CUDA generator as an
      eager step would, so the dropout draws (the noise z) should be an eager run's too; a run resumed on
      CUDA is close to an uninterrupted one, not bit for bit (cuDNN may pick other algorithms after a
      restart).
      tests/device_checks.py compares the graphed and eager steps on the GPU (with dropout off: the same
      losses and weights; with it: close losses, and whether the draws agree) and measures both rates in
      one run; the speed-up has not been measured on a GPU yet.
    - Test-only runs (`--test`) build no discriminators or optimisers and take every training setting they
      report from the checkpoint (a differing command-line flag is ignored with a warning).
    - The test path streams the split's (frame, flow) pairs, videos laid end to end, through one fixed batch
      shape (`--test-batch-size`; batches run across video boundaries and only the split's last one is
      padded, with copies of its last pair, which changes no real frame's output, see 3), copies the next
      batch to the device while the current one runs (common.prefetch_to_device), runs AlexNet once on
      real and generated frames together, upsamples Delta_S once per video, fuses a whole video on the
      device once its last pair is scored and copies its scores and maps back in one transfer (one sync
      per video). A warm-up batch runs before the timer. The printed test frames/s covers cached frames and flows ->
      scores.npz and excludes model loading, flow extraction (printed separately) and the warm-up.
    - With `--streams both` (the paper) the same pass also yields the motion-only (N_O) and appearance-only
      (N_S) scores: they are evaluated too (metrics.json "streams", scores_motion.npz, scores_appearance.npz),
      the fusion analysis of the paper's section 5.1 from one run.
    - `--amp` (bf16 autocast on CUDA) stays opt-in: its effect on the metrics has not been measured. Without
      it CUDA runs the convolutions in cuDNN's TF32 (PyTorch's default), so CUDA and CPU scores differ by more
      than float32 rounding (the test-time noise is the same on both: see 4).
    - A baseline to beat, not only chance: at the README's reduced Ped2 command, a model stopped after one
      training step (`--max-minutes 0.001`, then `--test`) scores 91.2 frame AUC (motion stream alone
      88.9), above the model trained for the command's 2 epochs (82.2, motion alone 78.9) and, measured
      with an earlier version whose test noise depended on the batching (as are the figures below), for 10
      (79.6, motion alone 73.5). The motion error of a generator that has not learned already ranks
      Ped2's fast bikes and carts well, and not as a plain speed score: a zero generator (Delta_O = |O|,
      the flow image's own norm) gives 65.0. Three readings of the drop, each measured on the motion stream
      of that one-step model and of the 2-epoch model (frame AUC micro, one-step / trained; as then
      shipped 90.4 / 78.4): the flow target's clipping at s (Delta_O against the unclipped flow / s: 77.4
      / 79.1), the sign of dx that one frame cannot tell (the magnitude channel's error alone: 53.9 /
      79.8), and the test-time dropout (off: 90.0 / 77.6). None of them explains it: with each change the trained
      model stays at 77.6-79.8.

Usage
    python gan_flow.py --dataset synthetic                       # CPU demo: train + test, prints metrics
    python gan_flow.py --dataset ped2 --data-root ../shared/data --device cuda --max-minutes 20   # then --resume
    python gan_flow.py --dataset ped2 --data-root ../shared/data --test --streams motion   # one stream only
    python gan_flow.py --dataset ped2 --backbone-weights ~/alexnet-owt-7be5be79.pth --num-panels 8
    # the reduced CPU protocol of the Ped2 figure measured without a GPU (128x128, 7-level U-Net, half
    # width, 2 epochs over every 3rd training pair, random AlexNet): see the README results table
    python gan_flow.py --dataset ped2 --data-root ../shared/data --train --image-size 128 --ngf 32 --ndf 32 \\
        --epochs 2 --train-step 3
    python gan_flow.py --dataset ped2 --data-root ../shared/data --test --backbone-weights none
"""

import argparse
import json
import math
import os
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAMS = ("both", "motion", "appearance")
# The paper's (and pix2pix's) settings: a run is labelled "paper settings" only when it uses all of them.
PAPER_SETTINGS = {"image_size": (256, 256), "ngf": 64, "ndf": 64, "epochs": 10, "batch_size": 1, "lr": 2e-4,
                  "beta1": 0.5, "l1_weight": 100.0, "dropout": 0.5, "train_step": 1, "jitter": "on",
                  "lambda_motion": 2.0, "streams": "both", "backbone_weights": "imagenet", "semantic_size": 256}
# Training settings a test-only run takes from the checkpoint rather than from the command line.
TRAINING_KEYS = ("epochs", "batch_size", "lr", "beta1", "l1_weight", "dropout", "train_step", "jitter",
                 "image_size", "ngf", "ndf", "flow_method", "flow_scale")


# ----------------------------------------------------------------------------------------------- model
MASK32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of python ints or int64 tensors holding values in
    [0, 2^32): every product stays below 2^63, so int64 tensors on any device give python's exact result."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def noise_keys(seed, video, frames, stream):
    """int64 keys (one per frame index in `frames`) naming the test-time noise of (seed, video name, frame,
    generator): what a frame's dropout mask is drawn from, whatever batch or device scores it."""
    base = hash32(hash32(hash32(seed & MASK32) ^ zlib.crc32(video.encode())) ^ stream)
    return hash32(base ^ torch.as_tensor(frames, dtype=torch.int64))


class AlwaysDropout(nn.Module):
    """Dropout that stays on in eval mode: in pix2pix (and here) it is the generator's noise z. In training
    it draws from torch's generator. At test each sample comes with a key (noise_keys), and its mask is a
    hash of (key, layer, element): a frame's noise does not depend on its batch, its position in it or the
    device, so scores do not move with --test-batch-size and a CPU and a GPU run draw the same z."""

    def __init__(self, p=0.5, layer=0):
        super().__init__()
        self.p, self.layer = p, layer

    def forward(self, x, keys=None):
        if keys is None:
            return F.dropout(x, self.p, training=True)
        element = torch.arange(x[0].numel(), device=x.device, dtype=torch.int64)
        sample = hash32(keys.to(x.device)[:, None] ^ hash32(self.layer + 1))   # (N, 1)
        keep = hash32(sample ^ element) >= round(self.p * 2 ** 32)             # (N, C*H*W), P = 1 - p
        return x * keep.view_as(x).to(x.dtype) / (1 - self.p)


def norm_layer(channels):
    # = BatchNorm2d with batch 1 and test-batch statistics, pix2pix's setting (Deviation 3)
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class UNetGenerator(nn.Module):
    """pix2pix U-Net. For 256x256 inputs: 8 stride-2 4x4 convs down to 1x1 (C64-C128-C256-C512-C512-C512-
    C512-C512, LeakyReLU 0.2, no norm on the first and the innermost), 8 transposed convs up
    (CD512-CD1024-CD1024-C1024-C1024-C512-C256-C128 counting the concatenated skips, ReLU), tanh output.
    Smaller inputs use log2(size) levels (64x64 -> 6)."""

    def __init__(self, in_channels, out_channels, image_size=256, ngf=64, num_dropout=3, dropout=0.5):
        super().__init__()
        num_levels = int(round(math.log2(image_size)))
        if 2 ** num_levels != image_size or num_levels < 4:
            raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
        channels = [ngf * min(2 ** i, 8) for i in range(num_levels)]
        self.down = nn.ModuleList()
        for i in range(num_levels):
            if i == 0:
                self.down.append(nn.Conv2d(in_channels, channels[0], 4, 2, 1))
                continue
            block = [nn.LeakyReLU(0.2, inplace=False), nn.Conv2d(channels[i - 1], channels[i], 4, 2, 1)]
            if i < num_levels - 1:  # the innermost (1x1) encoder block has no norm
                block.append(norm_layer(channels[i]))
            self.down.append(nn.Sequential(*block))
        self.up = nn.ModuleList()
        for i in range(num_levels - 1, 0, -1):
            in_ch = channels[i] if i == num_levels - 1 else 2 * channels[i]  # innermost has no skip yet
            self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(in_ch, channels[i - 1], 4, 2, 1),
                                         norm_layer(channels[i - 1])))
        self.noise = nn.ModuleList(AlwaysDropout(dropout, layer=j) for j in range(num_dropout))
        self.final = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * channels[0], out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, x, noise_keys=None):
        """x (N, C, S, S) -> (N, out, S, S). noise_keys (N,) int64: the test-time noise of each sample
        (AlwaysDropout); None in training."""
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
        for j, block in enumerate(self.up):
            h = block(h)
            if j < len(self.noise):
                h = self.noise[j](h, noise_keys)
            h = torch.cat([h, skips[-2 - j]], dim=1)
        return self.final(h)


class PatchDiscriminator(nn.Module):
    """pix2pix 70x70 PatchGAN on the concatenated (input, output) pair: C64 (no norm) - C128 - C256 (stride
    2) - C512 (stride 1) - 1-channel conv (stride 1), 4x4 kernels, LeakyReLU 0.2. Outputs logits on a
    30x30 grid for 256x256 inputs, each with a 70x70 receptive field."""

    def __init__(self, in_channels, ndf=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1), norm_layer(ndf * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1), norm_layer(ndf * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 1, 1), norm_layer(ndf * 8), nn.LeakyReLU(0.2),
            nn.Conv2d(ndf * 8, 1, 4, 1, 1),
        )

    def forward(self, condition, image):
        return self.net(torch.cat([condition, image], dim=1))


def init_pix2pix_weights(module):
    """pix2pix initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Pix2Pix(nn.Module):
    """One conditional GAN N_X->Y: generator G and discriminator D(x, y) (D is None when only testing)."""

    def __init__(self, in_channels, out_channels, image_size=256, ngf=64, ndf=64, dropout=0.5,
                 discriminator=True):
        super().__init__()
        self.G = UNetGenerator(in_channels, out_channels, image_size, ngf, dropout=dropout)
        self.D = PatchDiscriminator(in_channels + out_channels, ndf) if discriminator else None
        init_pix2pix_weights(self)


class AlexNetConv5(nn.Module):
    """torchvision's `alexnet().features`, same parameter names and shapes (features.0/3/6/8/10), so its
    published ImageNet weights load. forward returns conv5 after ReLU, before the last max-pool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, gray):
        """gray: (N, 1, H, W) in [-1, 1] -> conv5 (N, 256, h, w) (15x15 for 256x256)."""
        rgb = ((gray + 1.0) * 0.5).expand(-1, 3, -1, -1)
        x = (rgb - self.mean) / self.std
        return self.features[:12](x)  # conv5 + relu5; features[12] is pool5 (Deviation 6)


# ----------------------------------------------------------------------------------------------- data
def frames_to_image(frames_u8):
    """(N, H, W) uint8 tensor -> (N, 1, H, W) float in [-1, 1] on the same device."""
    return frames_u8.float().div_(127.5).sub_(1.0).unsqueeze(1)


def flow_to_image(flow, scale):
    """Deviation 2. flow: (N, H, W, 2) tensor (pixels per frame) -> (N, 3, H, W) in [-1, 1]:
    (dx / s, dy / s, 2 |flow| / s - 1), clipped."""
    flow = flow.float() / scale
    dx, dy = flow[..., 0], flow[..., 1]
    magnitude = torch.sqrt(dx * dx + dy * dy)
    return torch.stack([dx, dy, 2.0 * magnitude - 1.0], dim=1).clamp_(-1.0, 1.0)


def estimate_flow_scale(train_flows, percentile=99.9, max_frames=400):
    """The flow scale s of Deviation 2: a high percentile of the per-pixel flow magnitude over (an evenly
    spaced subset of) the normal training flows."""
    total = sum(len(f) for f in train_flows.values())
    step = max(1, total // max_frames)
    magnitudes = []
    for flows in train_flows.values():
        sample = np.asarray(flows[::step], dtype=np.float32)
        magnitudes.append(np.sqrt((sample ** 2).sum(-1)).ravel())
    scale = float(np.percentile(np.concatenate(magnitudes), percentile))
    return max(scale, 1e-3)


def training_pairs(train_flows, step):
    """(video index, t) of every training pair (F_t, O_t), t = 0..T-2, keeping every `step`-th."""
    pairs = [(v, t) for v, flows in enumerate(train_flows.values()) for t in range(0, len(flows), step)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


class TrainingSplit:
    """The normal training pairs (F_t, O_t), O_t the flow from F_t to F_t+1: uint8 frames and float16 flows.
    On CUDA the whole split is uploaded once when it fits in half of the free GPU memory and batches are
    gathered there; otherwise each batch is gathered from the cached memmaps and copied (pinned,
    non-blocking). Both give the same tensors. `hold` forces either way (tests)."""

    def __init__(self, train_frames, train_flows, step, device, hold=None):
        self.device = device
        self.frames_list, self.flows_list = list(train_frames.values()), list(train_flows.values())
        self.pairs = training_pairs(train_flows, step)
        self.nbytes = sum(f.nbytes for f in self.frames_list) + sum(f.nbytes for f in self.flows_list)
        if hold is None:
            hold = common.fits_on_device(self.nbytes, device)
        self.on_device = bool(hold)
        if self.on_device:
            self.frames, frame_start = common.concat_to_device(self.frames_list, device)
            self.flows, flow_start = common.concat_to_device(self.flows_list, device)
            # row of frame t and of flow t (from t to t+1) of every pair in the concatenated split
            self.frame_rows = common.to_device(frame_start[self.pairs[:, 0]] + self.pairs[:, 1], device)
            self.flow_rows = common.to_device(flow_start[self.pairs[:, 0]] + self.pairs[:, 1], device)

    def order_indices(self, order):
        """An epoch's order (indices into self.pairs) where batch() gathers from: one copy per epoch to the
        device when the split is held there, so that no step waits on a host-to-device copy."""
        return common.to_device(order, self.device) if self.on_device else order

    def batch(self, indices):
        """indices (N,) into self.pairs (a slice of order_indices(order)) -> frames (N, H, W) uint8 and flows
        (N, H, W, 2) float16 on the device: frame t and the flow from t to t+1 of each pair (video, t)."""
        if self.on_device:
            return self.frames[self.frame_rows[indices]], self.flows[self.flow_rows[indices]]
        pairs = self.pairs[indices]
        frames = np.empty((len(pairs),) + self.frames_list[0].shape[1:], np.uint8)
        flows = np.empty((len(pairs),) + self.flows_list[0].shape[1:], np.float16)
        for v in np.unique(pairs[:, 0]):   # numpy fancy indexing per video (a batch touches few videos)
            rows = np.nonzero(pairs[:, 0] == v)[0]
            frames[rows] = self.frames_list[v][pairs[rows, 1]]
            flows[rows] = self.flows_list[v][pairs[rows, 1]]
        return common.to_device(frames, self.device), common.to_device(flows, self.device)


def jitter_load_size(size):
    """pix2pix resizes 256x256 crops' images to 286x286 first; the same ratio at other sizes (Deviation 11)."""
    return int(round(size * 286 / 256))


def draw_jitter(rng, num, size, load_size):
    """pix2pix's random crop offsets (y, x), uniform in [0, load - size], and mirror flags (p = 1/2), drawn on
    the host from the sampler's generator (saved with the checkpoint; no device sync)."""
    offsets = rng.integers(0, load_size - size + 1, size=(num, 2))
    flips = rng.random(num) < 0.5
    return offsets, flips


def apply_jitter(frame_img, flow_img, offsets, flips, load_size):
    """Deviation 11 on the device: resize the frame (N, 1, S, S) and flow image (N, 3, S, S) to load_size
    (bilinear), crop each pair at its offset back to S x S, mirror the flagged pairs; a mirrored flow's dx
    channel changes sign (dy and the magnitude do not)."""
    size = frame_img.shape[-1]
    frame_big = F.interpolate(frame_img, size=(load_size, load_size), mode="bilinear", align_corners=False)
    flow_big = F.interpolate(flow_img, size=(load_size, load_size), mode="bilinear", align_corners=False)
    frames, flows = [], []
    for i, ((y, x), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
        frame, flow = frame_big[i, :, y:y + size, x:x + size], flow_big[i, :, y:y + size, x:x + size]
        if flip:
            frame, flow = frame.flip(-1), flow.flip(-1)
            flow = torch.cat([-flow[:1], flow[1:]])  # mirrored motion: dx changes sign
        frames.append(frame)
        flows.append(flow)
    return torch.stack(frames), torch.stack(flows)


# ----------------------------------------------------------------------------------------------- training
def discriminator_loss(logits_real, logits_fake):
    """pix2pix D objective: maximise log D(x, y) + log(1 - D(x, G(x))), as BCE-with-logits, halved."""
    real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
    fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    return 0.5 * (real + fake)


def generator_loss(logits_fake, generated, target, l1_weight):
    """pix2pix G objective: non-saturating cGAN term -log D(x, G(x)) + l1_weight * ||y - G(x)||_1 (mean)."""
    adversarial = F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))
    l1 = (target - generated).abs().mean()
    return adversarial + l1_weight * l1, adversarial, l1


def pix2pix_step(net, opt_G, opt_D, x, y, l1_weight, amp):
    """One pix2pix update of D then G on the batch (x -> y). Returns (loss_D, loss_G, l1) as detached device
    tensors: no host sync here (common.LossMonitor checks them every N steps). (autocast's cache of cast
    weights is off: a CUDA-graph capture of this step must not keep cast copies; D's weights are cast twice.)"""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        fake = net.G(x)
        loss_D = discriminator_loss(net.D(x, y), net.D(x, fake.detach()))
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()
    # G step: the gradient flows through D into G, but D's own weights need none (as in pix2pix's
    # set_requires_grad(D, False)); opt_D clears them before its next step anyway, so this only saves work.
    net.D.requires_grad_(False)
    try:          # (D trainable again even when this half raises, e.g. in a CUDA-graph capture that fails)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss_G, _, l1 = generator_loss(net.D(x, fake), fake, y, l1_weight)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
    finally:
        net.D.requires_grad_(True)
    return loss_D.detach(), loss_G.detach(), l1.detach()


def make_optimizers(net, lr, beta1, capturable=False):
    # fused Adam: one kernel per step instead of one per tensor (batch 1 makes the update a large share);
    # capturable for the CUDA-graph training step
    return (torch.optim.Adam(net.G.parameters(), lr=lr, betas=(beta1, 0.999), fused=True, capturable=capturable),
            torch.optim.Adam(net.D.parameters(), lr=lr, betas=(beta1, 0.999), fused=True, capturable=capturable))


def build_networks(config, device, discriminators=True):
    size, ngf, ndf, p = config["image_size"], config["ngf"], config["ndf"], config["dropout"]
    return {"f2o": Pix2Pix(1, 3, size, ngf, ndf, p, discriminators).to(device),   # N_F->O: frame -> flow image
            "o2f": Pix2Pix(3, 1, size, ngf, ndf, p, discriminators).to(device)}   # N_O->F: flow image -> frame


def checkpoint_state(nets, opts, args, config, progress, sampler, train_time_s):
    """Everything a resumed run needs to continue exactly: weights, Adam states, the position in the
    schedule (completed epochs, steps done in the current epoch and its order) and every RNG state."""
    state = {"epoch": progress["epoch"], "step": progress["step"],
             "order": None if progress["order"] is None else torch.from_numpy(progress["order"]),
             "rng": common.get_rng_state({"sampler": sampler}),
             "args": common.args_to_dict(args), "config": config, "train_time_s": train_time_s}
    for name in ("f2o", "o2f"):
        state[name] = {"G": nets[name].G.state_dict(), "D": nets[name].D.state_dict(),
                       "opt_G": opts[name][0].state_dict(), "opt_D": opts[name][1].state_dict()}
    return state


def train(args, config, split, nets, opts, checkpoint, budget, argv):
    """pix2pix training of both cGANs on the normal pairs, one batch order per epoch shared by both.
    Returns (finished, train_time_s); finished is False when --max-minutes stopped the run (checkpoint
    written, continue command printed)."""
    device, amp = args.device, args.amp and args.device.type == "cuda"
    ckpt_path = os.path.join(args.out, "model.pt")
    size, scale = config["image_size"], config["flow_scale"]
    load_size = jitter_load_size(size)
    pairs = split.pairs
    steps_per_epoch = math.ceil(len(pairs) / args.batch_size)
    sampler = np.random.default_rng(args.seed)  # epoch orders and jitter draws
    progress = {"epoch": 0, "step": 0, "order": None}
    train_time_s = 0.0
    if checkpoint is not None:
        order = checkpoint.get("order")
        progress = {"epoch": checkpoint["epoch"], "step": checkpoint.get("step", 0),
                    "order": None if order is None else order.numpy()}
        train_time_s = checkpoint.get("train_time_s", 0.0)
        if "rng" in checkpoint:
            common.set_rng_state(checkpoint["rng"], {"sampler": sampler})
    graphs = args.cuda_graphs and device.type == "cuda"
    print(f"training on {len(pairs)} normal (frame, flow) pairs, {args.epochs} epochs of {steps_per_epoch} steps, "
          f"batch {args.batch_size}, jitter {args.jitter}, split held on "
          f"{'the device' if split.on_device else 'the host'}{', steps replayed as CUDA graphs' if graphs else ''}")
    # one pix2pix step of each cGAN on (source, target) batches; on CUDA each captured once and replayed
    steps = {name: (lambda x, y, name=name: pix2pix_step(nets[name], *opts[name], x, y, args.l1_weight, amp))
             for name in ("f2o", "o2f")}
    if graphs:
        steps = {name: common.GraphedStep(step, opts[name], args.batch_size) for name, step in steps.items()}
    monitor = common.LossMonitor(every=50)

    def save(where):
        monitor.check(where)  # never write a checkpoint after a non-finite loss
        common.save_checkpoint(ckpt_path, checkpoint_state(nets, opts, args, config, progress, sampler,
                                                           train_time_s))

    while progress["epoch"] < args.epochs:
        epoch = progress["epoch"]
        if progress["step"] == 0:
            progress["order"] = sampler.permutation(len(pairs))
        order = split.order_indices(progress["order"])
        for net in nets.values():
            net.train()
        t0, first_step, rate = time.time(), progress["step"], common.StepRate(device)
        stopped = False
        bar = tqdm(range(first_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step in bar:
            frames_u8, flows_f16 = split.batch(order[step * args.batch_size:(step + 1) * args.batch_size])
            frame_img, flow_img = frames_to_image(frames_u8), flow_to_image(flows_f16, scale)
            if args.jitter == "on":
                frame_img, flow_img = apply_jitter(frame_img, flow_img,
                                                   *draw_jitter(sampler, len(frame_img), size, load_size), load_size)
            f2o = steps["f2o"](frame_img, flow_img)
            o2f = steps["o2f"](flow_img, frame_img)
            where = f"epoch {epoch + 1} step {step + 1}"
            monitor.add(where, f2o_D=f2o[0], f2o_G=f2o[1], f2o_L1=f2o[2], o2f_D=o2f[0], o2f_G=o2f[1], o2f_L1=o2f[2])
            progress["step"] = step + 1
            rate.step_done()
            if budget.expired() and step + 1 < steps_per_epoch:
                stopped = True
                break
        common.synchronize(device)
        steps_per_s, elapsed = rate.rate(), time.time() - t0
        train_time_s += elapsed
        if stopped:
            save(f"epoch {epoch + 1} step {progress['step']}")
            print(f"training: {steps_per_s:.2f} steps/s (one step = a D and a G update of both cGANs, batch "
                  f"{args.batch_size})")
            common.report_time_stop(__file__, argv, ckpt_path, f"epoch {epoch + 1} step {progress['step']}"
                                    f"/{steps_per_epoch}", budget)
            return False, train_time_s
        means = monitor.means(f"end of epoch {epoch + 1}")
        progress = {"epoch": epoch + 1, "step": 0, "order": None}
        save(f"end of epoch {epoch + 1}")
        print(f"epoch {epoch + 1}/{args.epochs}  N_F->O: D {means['f2o_D']:.3f} G {means['f2o_G']:.3f} "
              f"L1 {means['f2o_L1']:.4f}  N_O->F: D {means['o2f_D']:.3f} G {means['o2f_G']:.3f} "
              f"L1 {means['o2f_L1']:.4f}  ({elapsed:.0f}s, {steps_per_s:.2f} steps/s; one step = a D and a G "
              f"update of both cGANs)")
        if budget.expired() and progress["epoch"] < args.epochs:
            common.report_time_stop(__file__, argv, ckpt_path, f"end of epoch {progress['epoch']}", budget)
            return False, train_time_s
    return True, train_time_s


# ----------------------------------------------------------------------------------------------- scoring
def difference_maps(frame_img, flow_img, G_f2o, G_o2f, alexnet, streams, semantic_size=None, noise=None):
    """Per-frame raw differences (before the per-video normalisation) and the generated images:
    Delta_O = ||O - G_F->O(F)||_2 over the 3 flow channels, (N, H, W);
    Delta_S = ||h(F) - h(G_O->F(O))||_2 over the 256 conv5 channels, (N, h, w). h sees F and p_F resized
    to semantic_size (the paper's 256x256 frames -> a 15x15 conv5 grid) when the GANs run smaller; AlexNet
    runs once on F and p_F stacked into one batch. noise: (keys of G_F->O, keys of G_O->F), each (N,) int64
    (noise_keys), or None for torch's generator. Returns (Delta_O, Delta_S, p_O, p_F), None for a stream
    that is not computed."""
    delta_O = delta_S = generated_flow = generated_frame = None
    keys_f2o, keys_o2f = noise or (None, None)
    if streams in ("both", "motion"):
        generated_flow = G_f2o(frame_img, keys_f2o)
        delta_O = (flow_img - generated_flow).float().norm(dim=1)
    if streams in ("both", "appearance"):
        generated_frame = G_o2f(flow_img, keys_o2f)
        real_and_generated = torch.cat([frame_img, generated_frame.to(frame_img.dtype)])
        if semantic_size and semantic_size != real_and_generated.shape[-1]:
            real_and_generated = F.interpolate(real_and_generated, size=(semantic_size, semantic_size),
                                               mode="bilinear", align_corners=False)
        h_real, h_generated = alexnet(real_and_generated).chunk(2)
        delta_S = (h_real.float() - h_generated.float()).norm(dim=1)    # the difference in fp32 under --amp too
    return delta_O, delta_S, generated_flow, generated_frame


def fuse_video(delta_O, delta_S, image_size, lambda_motion):
    """Equations 4-5 and the fusion, for one whole video on its device. delta_O (T, H, W) or None, delta_S
    (T, h, w) or None. Delta_S is upsampled bilinearly to H x W once (Delta'_S); m_O, m_S = maxima over all
    elements of the video; N_O = Delta_O / m_O, N_S = Delta'_S / m_S. Returns the maps of every stream that
    can be formed: {"motion": N_O, "appearance": N_S, "both": N_S + lambda N_O} (each (T, H, W))."""
    maps = {}
    if delta_O is not None:
        maps["motion"] = delta_O.float() / delta_O.max().float().clamp_min(1e-12)
    if delta_S is not None:
        upsampled = F.interpolate(delta_S.float()[:, None], size=(image_size, image_size), mode="bilinear",
                                  align_corners=False)[:, 0]
        maps["appearance"] = upsampled / upsampled.max().clamp_min(1e-12)
    if delta_O is not None and delta_S is not None:
        maps["both"] = maps["appearance"] + lambda_motion * maps["motion"]
    return maps


def panel_frames(scores, num_pairs, count):
    """The `count` best-scoring frames of a video (stable order; the unscored last frame last), as indices
    of frames that have a flow: the frames drawn in the panels."""
    ranked = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:count]
    return [int(min(t, num_pairs - 1)) for t in ranked]


def panels_per_video(names, num_panels):
    """Panels are dealt round-robin over the test videos: how many each video gets."""
    return {name: len(range(i, num_panels, len(names))) for i, name in enumerate(names)}


def score_videos(test_frames, test_flows, G_f2o, G_o2f, alexnet, scale, args, panels=None):
    """Score every test video. frames (T, S, S) uint8 and flows (T-1, S, S, 2) float16 per video ->
    {video: {stream: (scores (T,) float32, maps (T, m, m) float16), ..., "panels": {t: (p_F, p_O)}}}, with
    every stream fuse_video forms (the main one is args.streams), NaN for the last frame (Deviation 8), A
    average-pooled to --map-size, and for `panels[video]` best frames the generated frame and flow that
    were scored. All batches have one shape (they run across videos, the split's last one padded); the
    next batch is copied while the current one runs; a video is fused on the device and copied back in one
    transfer once its last pair has been scored."""
    device, amp = args.device, args.amp and args.device.type == "cuda"
    batch, map_size = args.test_batch_size, args.map_size
    panels = panels or {}
    num_pairs = {name: len(test_flows[name]) for name in test_frames}
    # the split's (frame, flow) pairs laid end to end, in batches that run across videos: padding every
    # video's last batch instead would waste 35% of the work on Ped2's 120-180-frame videos at 256 a batch
    plan = common.batch_segments([(name, 0, count) for name, count in num_pairs.items()], batch)

    def host(source):
        for segments in plan:
            rows = np.concatenate([np.asarray(source[name][s:e]) for name, s, e in segments])
            yield common.pad_batch(rows, batch)[0]

    def keys(stream):   # each frame's test-time noise (the padded rows': key 0), so batching cannot change it
        for segments in plan:
            rows = torch.cat([noise_keys(args.seed, name, range(s, e), stream) for name, s, e in segments])
            yield torch.cat([rows, rows.new_zeros(batch - len(rows))])

    def finish(name, deltas_O, deltas_S, generated):
        """The video's fusion on the device and one transfer of every stream's scores and maps."""
        num_frames = len(test_frames[name])
        delta_O = None if deltas_O[0] is None else torch.cat(deltas_O)
        delta_S = None if deltas_S[0] is None else torch.cat(deltas_S)
        fused = fuse_video(delta_O, delta_S, test_frames[name].shape[-1], args.lambda_motion)
        packed = torch.stack([torch.cat([A.flatten(1).amax(1)[:, None],
                                         F.adaptive_avg_pool2d(A[:, None], map_size).flatten(1)], dim=1)
                              for A in fused.values()]).cpu().numpy()
        result = {}
        for k, stream in enumerate(fused):
            scores = np.full(num_frames, np.nan, np.float32)
            scores[:num_pairs[name]] = packed[k, :, 0]
            maps = np.empty((num_frames, map_size, map_size), np.float16)
            maps[:num_pairs[name]] = packed[k, :, 1:].reshape(num_pairs[name], map_size, map_size)
            maps[num_pairs[name]:] = maps[num_pairs[name] - 1]  # the last frame has no flow: the previous map
            result[stream] = (scores, maps)
        result["panels"] = {}
        if generated:
            p_F = None if generated[0][0] is None else torch.cat([g[0] for g in generated])
            p_O = None if generated[0][1] is None else torch.cat([g[1] for g in generated])
            for t in panel_frames(result[args.streams][0], num_pairs[name], panels[name]):
                result["panels"][t] = (None if p_F is None else p_F[t, 0].float().cpu().numpy(),
                                       None if p_O is None else p_O[t].float().cpu().numpy())
        return result

    results = {}
    for name in test_frames:
        if num_pairs[name] == 0:  # a one-frame video: nothing to score
            empty = (np.full(len(test_frames[name]), np.nan, np.float32),
                     np.zeros((len(test_frames[name]), map_size, map_size), np.float16))
            results[name] = {stream: empty for stream in STREAMS} | {"panels": {}}
    pending = {}                  # video -> (Delta_O parts, Delta_S parts, generated parts) on the device
    batches = zip(plan, common.prefetch_to_device(host(test_frames), device),
                  common.prefetch_to_device(host(test_flows), device),
                  common.prefetch_to_device(keys(0), device), common.prefetch_to_device(keys(1), device))
    for segments, frames_u8, flows_f16, *noise in tqdm(batches, total=len(plan), desc="test batches", leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            d_O, d_S, p_O, p_F = difference_maps(frames_to_image(frames_u8), flow_to_image(flows_f16, scale),
                                                 G_f2o, G_o2f, alexnet, args.streams, args.semantic_size, noise)
        at = 0
        for name, s, e in segments:
            rows = slice(at, at + e - s)
            at += e - s
            parts = pending.setdefault(name, ([], [], []))
            parts[0].append(None if d_O is None else d_O[rows])
            parts[1].append(None if d_S is None else d_S[rows])
            if panels.get(name):
                parts[2].append((None if p_F is None else p_F[rows], None if p_O is None else p_O[rows]))
            if e == num_pairs[name]:
                results[name] = finish(name, *pending.pop(name))
    return {name: results[name] for name in test_frames}


def score_video(frames, flows, G_f2o, G_o2f, alexnet, scale, args):
    """One video: (frame scores (T,) float32, maps (T, m, m) float16) of the stream args.streams."""
    return score_videos({"video": frames}, {"video": flows}, G_f2o, G_o2f, alexnet, scale, args)["video"][args.streams]


def warm_up(test_frames, test_flows, G_f2o, G_o2f, alexnet, scale, args):
    """One batch of the test shape through the test path before the timer (cuDNN autotuning, allocator)."""
    name = next(name for name in test_frames if len(test_flows[name]))
    frames = common.to_device(common.pad_batch(np.asarray(test_frames[name][:args.test_batch_size]),
                                               args.test_batch_size)[0], args.device)
    flows = common.to_device(common.pad_batch(np.asarray(test_flows[name][:args.test_batch_size]),
                                              args.test_batch_size)[0], args.device)
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.amp and args.device.type == "cuda"):
        no_keys = torch.zeros(args.test_batch_size, dtype=torch.int64, device=args.device)
        difference_maps(frames_to_image(frames), flow_to_image(flows, scale), G_f2o, G_o2f, alexnet,
                        args.streams, args.semantic_size, (no_keys, no_keys))
    common.synchronize(args.device)


# ----------------------------------------------------------------------------------------------- localization
def save_panels(out_dir, ds, test_frames, results, args):
    """Fig. 3: real frame | generated frame G_O->F(O) | generated flow G_F->O(F) | abnormality heatmap A, for
    the --num-panels frames dealt round-robin over the test videos, best-scoring frame first. The generated
    images are the ones that were scored (kept by score_videos), not a new draw of the dropout noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_dir = os.path.join(out_dir, "panels")
    os.makedirs(panel_dir, exist_ok=True)
    written = 0
    for name in test_frames:
        scores, maps = results[name][args.streams]
        for t, (gen_frame, gen_flow) in results[name]["panels"].items():
            real = test_frames[name][t]
            size = real.shape[0]
            fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
            axes[0].imshow(real, cmap="gray", vmin=0, vmax=255)
            axes[0].set_title("real frame")
            if gen_frame is not None:
                axes[1].imshow((gen_frame + 1) / 2, cmap="gray", vmin=0, vmax=1)
            axes[1].set_title("generated frame")
            if gen_flow is not None:
                axes[2].imshow(np.clip((gen_flow.transpose(1, 2, 0) + 1) / 2, 0, 1))
            axes[2].set_title("generated OF (dx, dy, |f|)")
            axes[3].imshow(real, cmap="gray", vmin=0, vmax=255)
            axes[3].imshow(maps[t].astype(np.float32), cmap="jet", alpha=0.5,
                           extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                           vmin=0, vmax=1 + (args.lambda_motion if args.streams == "both" else 0))
            video = ds.video(name)
            if video.has_masks:
                import cv2
                mask = cv2.resize(video.read_masks()[t].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
                if mask.any():
                    axes[3].contour(mask, levels=[0.5], colors="white", linewidths=1)
            axes[3].set_title(f"abnormality heatmap (score {scores[t]:.2f})")
            for ax in axes:
                ax.axis("off")
            fig.suptitle(f"{name} frame {t + 1}")
            fig.tight_layout()
            fig.savefig(os.path.join(panel_dir, f"{name}_{t + 1:04d}.png"), dpi=80)
            plt.close(fig)
            written += 1
    return written


# ----------------------------------------------------------------------------------------------- main
def protocol_label(args, backbone):
    """'paper settings' only when every setting is the paper's (the flow method and encoding, Deviations 1-2,
    are always ours); otherwise the settings that differ, named."""
    ours = {"backbone_weights": "imagenet" if backbone == "alexnet-imagenet" else backbone}
    differ = [f"{key} {ours.get(key, getattr(args, key))}" for key, paper in PAPER_SETTINGS.items()
              if ours.get(key, getattr(args, key)) != paper]
    if args.normalize not in (None, "none") or args.smooth != "none":
        differ.append(f"normalize {args.normalize}, smooth {args.smooth}")
    return "paper settings" if not differ else "not the paper's settings: " + ", ".join(differ)


def timed_flows(ds, split, size, config, args):
    """common.load_split_flows, timed: flow extraction frames/s (cached videos are read, not recomputed)."""
    t0 = time.time()
    flows = common.load_split_flows(ds, split, size, method=config["flow_method"], cache_dir=args.cache_dir,
                                    workers=args.workers or 0)
    seconds = time.time() - t0
    num = sum(len(f) for f in flows.values())
    print(f"flows ({split}): {num} flows in {seconds:.1f}s = {num / max(seconds, 1e-9):.1f} frames/s "
          f"({config['flow_method']} at {size[0]}x{size[1]}, {args.workers or os.cpu_count()} processes; "
          f"includes cache reads of videos already computed)")
    return flows


def main(argv=None):
    parser = common.build_parser("gan_flow", __doc__.splitlines()[0])
    parser.add_argument("--ngf", type=int, default=None, help="generator base width (pix2pix 64; synthetic 32)")
    parser.add_argument("--ndf", type=int, default=None, help="discriminator base width (pix2pix 64; synthetic 32)")
    parser.add_argument("--l1-weight", type=float, default=100.0, help="weight of the L1 term (pix2pix 100)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, replay each cGAN's training step as one captured CUDA graph (default on; "
                             "--no-cuda-graphs runs it eagerly)")
    parser.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (paper: 'momentum 0.5')")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout = noise z, kept at test time")
    parser.add_argument("--jitter", choices=("on", "off"), default=None,
                        help="pix2pix training jitter: resize to 286/256 of the size, random crop, mirror (on)")
    parser.add_argument("--lambda-motion", type=float, default=2.0, help="A = N_S + lambda N_O (paper 2)")
    parser.add_argument("--streams", choices=STREAMS, default="both",
                        help="motion = N_F->O only, appearance = N_O->F only, both = fused (paper; also "
                             "reports the two single streams)")
    parser.add_argument("--backbone-weights", default=None,
                        help="imagenet (torchvision alexnet-owt-7be5be79.pth via torch.hub), none (random), or "
                             "a PATH (default imagenet; none for --dataset synthetic)")
    parser.add_argument("--semantic-size", type=int, default=256,
                        help="side of the frames AlexNet sees (paper: the 256x256 frames -> 15x15 conv5)")
    parser.add_argument("--flow-method", default="farneback", help="optical flow passed to common.load_flows")
    parser.add_argument("--flow-scale", type=float, default=0.0,
                        help="flow scale s in pixels (0: 99.9th percentile of training magnitudes)")
    parser.add_argument("--train-step", type=int, default=None,
                        help="use every k-th training pair (paper 1; synthetic 2)")
    parser.add_argument("--test-batch-size", type=int, default=None, help="frames per test batch (CPU 32, CUDA 256)")
    parser.add_argument("--map-size", type=int, default=64, help="side of the A maps stored in scores.npz")
    argv_given = argv
    args = common.parse_args(parser, argv)
    ckpt_path = os.path.join(args.out, "model.pt")

    # a test-only run reports the model's training settings; a resumed run continues the checkpoint's
    checkpoint = None
    if not args.train:
        checkpoint = common.load_checkpoint(ckpt_path, method=args.method)
        common.restore_training_args(args, parser, checkpoint["args"], TRAINING_KEYS)
        if "jitter" not in checkpoint["args"]:
            args.jitter = "off"  # trained before the jitter existed
    elif args.resume:
        checkpoint = common.resume_checkpoint(ckpt_path, True, method=args.method)
    synthetic = args.dataset == "synthetic"
    fill = {"image_size": (64, 64) if synthetic else (256, 256), "ngf": 32 if synthetic else 64,
            "ndf": 32 if synthetic else 64, "epochs": 2 if synthetic else 10, "batch_size": 1, "lr": 2e-4,
            "train_step": 2 if synthetic else 1, "jitter": "on", "backbone_weights": "none" if synthetic else "imagenet",
            "test_batch_size": 256 if args.device.type == "cuda" else 32}
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.image_size, int):  # checkpoints written before --image-size took H W
        args.image_size = (args.image_size, args.image_size)
    side = args.image_size[0]
    if args.image_size[0] != args.image_size[1] or side < 16 or side & (side - 1):
        raise common.DataError(f"--image-size {args.image_size[0]} {args.image_size[1]}: gan_flow's U-Net needs a "
                               "square power-of-two size >= 16 (e.g. 256, the paper's, or 128)")
    for flag in ("batch_size", "test_batch_size", "epochs", "train_step", "map_size", "semantic_size"):
        if getattr(args, flag) < (0 if flag == "epochs" else 1):
            raise common.DataError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive number")
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    os.makedirs(args.out, exist_ok=True)
    budget = common.TimeBudget(args.max_minutes)

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(json.dumps(ds.summary()))

    if checkpoint is not None:
        config = checkpoint["config"]
    else:
        config = {"image_size": side, "ngf": args.ngf, "ndf": args.ndf, "dropout": args.dropout,
                  "flow_method": args.flow_method, "flow_scale": args.flow_scale or None}
    size = (config["image_size"], config["image_size"])
    nets = build_networks(config, args.device, discriminators=args.train)
    graphs = args.cuda_graphs and args.device.type == "cuda"      # train(): common.GraphedStep
    opts = ({name: make_optimizers(net, args.lr, args.beta1, capturable=graphs) for name, net in nets.items()}
            if args.train else None)
    if checkpoint is not None:
        for name in ("f2o", "o2f"):
            nets[name].G.load_state_dict(checkpoint[name]["G"])
            if args.train:
                nets[name].D.load_state_dict(checkpoint[name]["D"])
                common.load_optimizer_state(opts[name][0], checkpoint[name]["opt_G"])
                common.load_optimizer_state(opts[name][1], checkpoint[name]["opt_D"])
        print(f"loaded {ckpt_path} (epoch {checkpoint['epoch']}, step {checkpoint.get('step', 0)}, config {config})")
    epochs_done = checkpoint["epoch"] if checkpoint is not None else 0
    steps_done = checkpoint.get("step", 0) if checkpoint is not None else 0
    train_time_s = checkpoint.get("train_time_s", 0.0) if checkpoint is not None else 0.0

    if args.train:
        train_frames = common.load_split_frames(ds, "train", size, cache_dir=args.cache_dir)
        train_flows = timed_flows(ds, "train", size, config, args)
        if not config["flow_scale"]:
            config["flow_scale"] = estimate_flow_scale(train_flows)
        print(f"flow scale s = {config['flow_scale']:.3f} px/frame at {size[0]}x{size[1]}")
        split = TrainingSplit(train_frames, train_flows, args.train_step, args.device)
        finished, train_time_s = train(args, config, split, nets, opts, checkpoint, budget, argv_given)
        del split
        if not finished:
            return
        epochs_done, steps_done = args.epochs, 0
        print(f"training time {train_time_s:.0f}s")
        opts = None
        for net in nets.values():
            net.D = None  # not needed at test time

    if not args.test:
        return
    alexnet = AlexNetConv5().to(args.device).eval().requires_grad_(False)
    backbone = common.load_alexnet_features(alexnet, args.backbone_weights) if args.streams != "motion" else "unused"
    for net in nets.values():
        net.eval()  # dropout stays on (AlwaysDropout); instance norm has no running statistics
    G_f2o, G_o2f = nets["f2o"].G, nets["o2f"].G
    test_flows = timed_flows(ds, "test", size, config, args)
    test_frames = common.load_split_frames(ds, "test", size, cache_dir=args.cache_dir)
    names = list(test_frames)
    panels = panels_per_video(names, args.num_panels) if args.num_panels > 0 else None
    scale = config["flow_scale"]
    with torch.inference_mode():
        warm_up(test_frames, test_flows, G_f2o, G_o2f, alexnet, scale, args)
        t0 = time.time()
        results = score_videos(test_frames, test_flows, G_f2o, G_o2f, alexnet, scale, args, panels)

    trained = (f"{epochs_done} epochs" + (f" + {steps_done} steps" if steps_done else "") +
               ("" if epochs_done >= args.epochs else f" of {args.epochs} (unfinished)"))
    label = protocol_label(args, backbone)
    cuda = args.device.type == "cuda"
    precision = "bf16 autocast" if args.amp and cuda else "fp32 (TF32 convolutions)" if cuda else "fp32"
    protocol = (f"gan_flow {args.streams}, {size[0]}x{size[1]}, ngf {config['ngf']}, ndf {config['ndf']}, "
                f"trained {trained}, train step {args.train_step}, batch {args.batch_size}, "
                f"jitter {args.jitter}, {backbone}, AlexNet input {args.semantic_size}, "
                f"flow {config['flow_method']}, lambda {args.lambda_motion}, pixel rule strict (paper), "
                f"{precision}; {label}")
    normalize = args.normalize or "none"

    def meta_for(stream):
        return {"method": "gan_flow" if stream == args.streams else f"gan_flow_{stream}", "dataset": args.dataset,
                "protocol": {"normalize": normalize, "smooth": args.smooth},
                "run_protocol": protocol.replace(f"gan_flow {args.streams}", f"gan_flow {stream}"),
                "pixel_rule": "strict", "args": common.args_to_dict(args)}

    scores = {name: results[name][args.streams][0] for name in names}
    maps = {name: results[name][args.streams][1] for name in names}
    common.write_scores(os.path.join(args.out, "scores.npz"), scores, maps, meta_for(args.streams))
    test_time = time.time() - t0
    num_frames = sum(len(f) for f in test_frames.values())
    test_fps = num_frames / test_time
    print(f"test: {num_frames} frames in {test_time:.1f}s = {test_fps:.1f} frames/s (cached frames + flows -> "
          f"scores.npz, batch {args.test_batch_size}, {args.device}; excludes model load, flow extraction and "
          f"warm-up)")
    if panels:
        n = save_panels(args.out, ds, test_frames, results, args)
        print(f"wrote {n} panels to {os.path.join(args.out, 'panels')}")

    extra = {"train_time_s": round(train_time_s, 1), "test_fps": round(test_fps, 1), "run_protocol": protocol,
             "peak_memory_gib": common.peak_memory()}
    ucsd = vad_eval.evaluate(scores, maps, ds, normalize=normalize, smooth=args.smooth, pixel_rule="ucsd")
    extra.update(pixel_auc_ucsd=ucsd["pixel_auc"], pixel_eer_ucsd=ucsd["pixel_eer"])
    if args.streams == "both":  # the paper's fusion analysis (section 5.1) from the same pass
        extra["streams"] = {}
        for stream in ("motion", "appearance"):
            stream_scores = {name: results[name][stream][0] for name in names}
            stream_maps = {name: results[name][stream][1] for name in names}
            common.write_scores(os.path.join(args.out, f"scores_{stream}.npz"), stream_scores, stream_maps,
                                meta_for(stream))
            r = vad_eval.evaluate(stream_scores, stream_maps, ds, normalize=normalize, smooth=args.smooth,
                                  pixel_rule="strict")
            extra["streams"][stream] = {key: r[key] for key in ("frame_auc_micro", "frame_auc_macro", "frame_eer",
                                                                "pixel_auc", "pixel_eer", "events")}
            print(f"  {stream} only: frame AUC {r['frame_auc_micro']:.3f} micro, EER {r['frame_eer']:.3f}, pixel AUC "
                  f"{r['pixel_auc'] if r['pixel_auc'] is None else round(r['pixel_auc'], 3)} (strict rule)")
    vad_eval.evaluate_run(args.out, ds, normalize=normalize, smooth=args.smooth, pixel_rule="strict", extra=extra)


if __name__ == "__main__":
    common.run_main(main, report_memory=True)
