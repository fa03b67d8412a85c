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

Deviations (from the paper / pix2pix, each with its reason)
    1. Optical flow: OpenCV Farneback from common.load_flows (cached; `--flow-method`), not the flow method
       of the paper's reference [28]: the shared, cached flow of this repository; no other flow code here.
    2. Flow image encoding (the paper gives none): with s = the flow scale (`--flow-scale`; default: the
       99.9th percentile of the per-pixel flow magnitude over the normal training flows, at the GAN's input
       size, stored in the checkpoint), O = (dx / s, dy / s, 2 * |flow| / s - 1), clipped to [-1, 1], i.e.
       the [-1, 1] range of pix2pix images (zero motion is (0, 0, -1)).
    3. Normalisation layers are InstanceNorm2d(affine=True) instead of BatchNorm2d. pix2pix trains with
       batch 1 and applies batch normalisation with the statistics of the test batch at test time ("instance
       normalisation" in their words); for batch 1 the two are the same function. Instance norm keeps this
       exact when many test frames are batched for throughput (and when `--batch-size` > 1, where it differs
       from pix2pix's batch statistics).
    4. Dropout (the noise z, p = 0.5) sits in the first three decoder blocks as in the pix2pix paper
       (CD512-CD1024-CD1024); the public pix2pix code puts it one level lower. It is always on, also at test.
    5. Channel reductions, which the paper leaves open: Delta_O and Delta_S are reduced to one value per
       pixel by the L2 norm over channels (3 flow channels; 256 conv5 channels), which also makes them
       non-negative so that "normalised by the maximum" maps them to [0, 1].
    6. h = AlexNet conv5 *after* its ReLU (torchvision features[:12]; "before pooling" as in the paper): in
       the Caffe AlexNet the paper used, relu5 runs in place, so the conv5 blob holds post-ReLU values. The
       AlexNet input is the 256x256 frame (gray replicated to RGB, ImageNet mean/std; `--semantic-size`;
       F and p_F are resized bilinearly to it when the GANs run smaller), giving a 15x15 conv5 grid that is
       upsampled bilinearly to Delta_O's size.
    7. Optimiser: the paper writes "stochastic gradient descent with momentum 0.5, batch size 1"; that is
       pix2pix's Adam with beta1 = 0.5, lr 2e-4, used here.
    8. The last frame of each video has no O_t (no F_t+1): its frame score is NaN (eval fills it from the
       previous frame and reports the count) and its map is a copy of the previous frame's map.
    9. Frames are gray for every dataset (UCSD is gray; colour datasets are converted).
   10. scores.npz stores A average-pooled to `--map-size` (64x64 by default, float16); the frame score is the
       max of the full-resolution A.
   11. `--dataset synthetic` defaults (CPU demo, < 3 min on 2 cores): 64x64 inputs with a correspondingly
       shallower U-Net (6 down / 6 up levels instead of 8; dropout still in the first three decoder
       blocks), ngf = ndf = 32, 2 epochs on every 2nd training frame, `--backbone-weights none`. The PatchGAN
       is unchanged (a 6x6 output grid for 64x64 input).
   12. ImageNet AlexNet weights need a download (or `--backbone-weights PATH`); with
       `--backbone-weights none` the appearance stream uses a randomly initialised AlexNet (printed loudly,
       recorded in the protocol string): not the paper's setting.

Usage
    python gan_flow.py --dataset synthetic                       # CPU demo: train + test, prints metrics
    python gan_flow.py --dataset ped2 --data-root ../shared/data --device cuda --amp
    python gan_flow.py --dataset ped2 --data-root ../shared/data --test --streams motion   # fusion analysis
    python gan_flow.py --dataset ped2 --backbone-weights ~/alexnet-owt-7be5be79.pth --num-panels 8
    # the reduced CPU protocol of the Ped2 figure measured without a GPU (128x128, 7-level U-Net, half
    # width, 2 epochs over every 3rd training pair, random AlexNet): see the README results table
    python gan_flow.py --dataset ped2 --data-root ../shared/data --train --image-size 128 --ngf 32 --ndf 32 \
        --epochs 2 --train-stride 3
    python gan_flow.py --dataset ped2 --data-root ../shared/data --test --backbone-weights none
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- model
class AlwaysDropout(nn.Module):
    """Dropout that stays on in eval mode: in pix2pix (and here) it is the generator's noise z."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, training=True)


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
        for j, i in enumerate(range(num_levels - 1, 0, -1)):
            in_ch = channels[i] if i == num_levels - 1 else 2 * channels[i]  # innermost has no skip yet
            block = [nn.ReLU(), nn.ConvTranspose2d(in_ch, channels[i - 1], 4, 2, 1), norm_layer(channels[i - 1])]
            if j < num_dropout:
                block.append(AlwaysDropout(dropout))
            self.up.append(nn.Sequential(*block))
        self.final = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * channels[0], out_channels, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
        for j, block in enumerate(self.up):
            h = torch.cat([block(h), skips[-2 - j]], dim=1)
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
    """One conditional GAN N_X->Y: generator G and discriminator D(x, y)."""

    def __init__(self, in_channels, out_channels, image_size=256, ngf=64, ndf=64, dropout=0.5):
        super().__init__()
        self.G = UNetGenerator(in_channels, out_channels, image_size, ngf, dropout=dropout)
        self.D = PatchDiscriminator(in_channels + out_channels, ndf)
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
def frames_to_tensor(frames_u8, device):
    """(N, H, W) uint8 -> (N, 1, H, W) float in [-1, 1] on device."""
    t = torch.from_numpy(np.array(frames_u8))  # a writable copy of the (read-only memmap) batch
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device).float().div_(127.5).sub_(1.0).unsqueeze(1)


def flow_to_image(flow, scale):
    """Deviation 2. flow: (N, H, W, 2) tensor (pixels per frame) -> (N, 3, H, W) in [-1, 1]:
    (dx / s, dy / s, 2 |flow| / s - 1), clipped."""
    flow = flow.float() / scale
    dx, dy = flow[..., 0], flow[..., 1]
    magnitude = torch.sqrt(dx * dx + dy * dy)
    return torch.stack([dx, dy, 2.0 * magnitude - 1.0], dim=1).clamp_(-1.0, 1.0)


def flows_to_tensor(flows_f16, scale, device):
    t = torch.from_numpy(np.array(flows_f16))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return flow_to_image(t.to(device), scale)


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


def training_pairs(train_flows, stride):
    """(video index, t) of every training pair (F_t, O_t), t = 0..T-2, keeping every `stride`-th."""
    pairs = [(v, t) for v, flows in enumerate(train_flows.values()) for t in range(0, len(flows), stride)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def gather_batch(pairs, frames_list, flows_list):
    """Numpy fancy indexing per video (a batch touches at most batch-size videos)."""
    frames = np.empty((len(pairs),) + frames_list[0].shape[1:], np.uint8)
    flows = np.empty((len(pairs),) + flows_list[0].shape[1:], np.float16)
    for v in np.unique(pairs[:, 0]):
        rows = np.nonzero(pairs[:, 0] == v)[0]
        frames[rows] = frames_list[v][pairs[rows, 1]]
        flows[rows] = flows_list[v][pairs[rows, 1]]
    return frames, flows


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


def pix2pix_step(net, opt_G, opt_D, x, y, l1_weight, where, amp):
    """One pix2pix update of D then G on the batch (x -> y). Returns (loss_D, loss_G, l1) floats."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = net.G(x)
        loss_D = discriminator_loss(net.D(x, y), net.D(x, fake.detach()))
    common.check_finite(loss_D, f"{where} D")
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss_G, _, l1 = generator_loss(net.D(x, fake), fake, y, l1_weight)
    common.check_finite(loss_G, f"{where} G")
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    return loss_D.item(), loss_G.item(), l1.item()


def make_optimizers(net, lr, beta1):
    # fused Adam: one kernel per step instead of one per tensor (batch 1 makes the update a large share)
    return (torch.optim.Adam(net.G.parameters(), lr=lr, betas=(beta1, 0.999), fused=True),
            torch.optim.Adam(net.D.parameters(), lr=lr, betas=(beta1, 0.999), fused=True))


def checkpoint_state(nets, opts, epoch, args, config, train_time_s):
    state = {"epoch": epoch, "args": common.args_to_dict(args), "config": config, "train_time_s": train_time_s}
    for name in ("f2o", "o2f"):
        state[name] = {"G": nets[name].G.state_dict(), "D": nets[name].D.state_dict(),
                       "opt_G": opts[name][0].state_dict(), "opt_D": opts[name][1].state_dict()}
    return state


def build_networks(config, device):
    size, ngf, ndf, p = config["image_size"], config["ngf"], config["ndf"], config["dropout"]
    return {"f2o": Pix2Pix(1, 3, size, ngf, ndf, p).to(device),   # N_F->O: frame -> flow image
            "o2f": Pix2Pix(3, 1, size, ngf, ndf, p).to(device)}   # N_O->F: flow image -> frame


def train(args, config, train_frames, train_flows, nets, opts, start_epoch, train_time_s):
    device, amp = args.device, args.amp and args.device.type == "cuda"
    frames_list, flows_list = list(train_frames.values()), list(train_flows.values())
    pairs = training_pairs(train_flows, args.train_stride)
    print(f"training on {len(pairs)} normal (frame, flow) pairs, {args.epochs} epochs, batch {args.batch_size}")
    rng = np.random.default_rng(args.seed + start_epoch)
    scale = config["flow_scale"]
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        order = rng.permutation(len(pairs))
        totals = np.zeros(6)
        batches = range(0, len(order), args.batch_size)
        for net in nets.values():
            net.train()
        for i, start in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)):
            frames, flows = gather_batch(pairs[order[start:start + args.batch_size]], frames_list, flows_list)
            frame_img = frames_to_tensor(frames, device)
            flow_img = flows_to_tensor(flows, scale, device)
            totals[:3] += pix2pix_step(nets["f2o"], *opts["f2o"], frame_img, flow_img, args.l1_weight,
                                       f"epoch {epoch + 1} step {i} N_F->O", amp)
            totals[3:] += pix2pix_step(nets["o2f"], *opts["o2f"], flow_img, frame_img, args.l1_weight,
                                       f"epoch {epoch + 1} step {i} N_O->F", amp)
        means = totals / max(1, len(batches))
        train_time_s += time.time() - t0
        common.save_checkpoint(os.path.join(args.out, "model.pt"),
                               checkpoint_state(nets, opts, epoch + 1, args, config, train_time_s))
        print(f"epoch {epoch + 1}/{args.epochs}  N_F->O: D {means[0]:.3f} G {means[1]:.3f} L1 {means[2]:.4f}  "
              f"N_O->F: D {means[3]:.3f} G {means[4]:.3f} L1 {means[5]:.4f}  ({time.time() - t0:.0f}s)")
    return train_time_s


# ----------------------------------------------------------------------------------------------- scoring
def difference_maps(frame_img, flow_img, G_f2o, G_o2f, alexnet, streams, semantic_size=None):
    """Per-frame raw differences (before the per-video normalisation):
    Delta_O = ||O - G_F->O(F)||_2 over the 3 flow channels, (N, H, W);
    Delta_S = ||h(F) - h(G_O->F(O))||_2 over the 256 conv5 channels, (N, h, w). h sees F and p_F resized
    to semantic_size (the paper's 256x256 frames -> a 15x15 conv5 grid) when the GANs run smaller."""
    delta_O = delta_S = None
    if streams in ("both", "motion"):
        delta_O = (flow_img - G_f2o(frame_img)).float().norm(dim=1)
    if streams in ("both", "appearance"):
        real, generated = frame_img, G_o2f(flow_img)
        if semantic_size and semantic_size != real.shape[-1]:
            real, generated = (F.interpolate(x, size=(semantic_size, semantic_size), mode="bilinear",
                                             align_corners=False) for x in (real, generated))
        delta_S = (alexnet(real) - alexnet(generated)).float().norm(dim=1)
    return delta_O, delta_S


def fuse_video(delta_O, delta_S, image_size, lambda_motion, streams, chunk=64):
    """Equations 4-5 and the fusion, for one whole video. delta_O (T, H, W) or None, delta_S (T, h, w) or
    None. Delta_S is upsampled bilinearly to H x W (Delta'_S); m_O, m_S = maxima over all elements of the
    video; A = Delta'_S / m_S + lambda * Delta_O / m_O. Yields A chunk by chunk (to bound memory)."""
    def upsample(d):
        return F.interpolate(d[:, None], size=(image_size, image_size), mode="bilinear",
                             align_corners=False)[:, 0]

    num = len(delta_O) if delta_O is not None else len(delta_S)
    m_O = float(delta_O.max()) if delta_O is not None else 1.0
    m_S = max(float(upsample(delta_S[s:s + chunk]).max()) for s in range(0, num, chunk)) if delta_S is not None else 1.0
    m_O, m_S = max(m_O, 1e-12), max(m_S, 1e-12)
    for s in range(0, num, chunk):
        A = 0.0
        if streams in ("both", "appearance"):
            A = A + upsample(delta_S[s:s + chunk].float()) / m_S
        if streams in ("both", "motion"):
            A = A + (lambda_motion if streams == "both" else 1.0) * delta_O[s:s + chunk].float() / m_O
        yield A


def score_video(frames, flows, G_f2o, G_o2f, alexnet, scale, args):
    """frames (T, S, S) uint8, flows (T-1, S, S, 2) float16 -> frame scores (T,) float32 (NaN for the last
    frame, Deviation 8) and maps (T, map, map) float16: A average-pooled to --map-size."""
    device, amp = args.device, args.amp and args.device.type == "cuda"
    size = frames.shape[-1]
    num_pairs = len(flows)
    if num_pairs == 0:  # a one-frame video: nothing to score
        return np.full(len(frames), np.nan, np.float32), np.zeros((len(frames), args.map_size, args.map_size), np.float16)
    deltas_O, deltas_S = [], []
    for s in range(0, num_pairs, args.test_batch_size):
        e = min(num_pairs, s + args.test_batch_size)
        frame_img = frames_to_tensor(frames[s:e], device)
        flow_img = flows_to_tensor(flows[s:e], scale, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            d_O, d_S = difference_maps(frame_img, flow_img, G_f2o, G_o2f, alexnet, args.streams,
                                       args.semantic_size)
        if d_O is not None:
            deltas_O.append(d_O.half() if device.type == "cuda" else d_O)
        if d_S is not None:
            deltas_S.append(d_S)
    delta_O = torch.cat(deltas_O) if deltas_O else None
    delta_S = torch.cat(deltas_S) if deltas_S else None
    scores = np.full(len(frames), np.nan, np.float32)
    maps = np.zeros((len(frames), args.map_size, args.map_size), np.float16)
    s = 0
    for A in fuse_video(delta_O, delta_S, size, args.lambda_motion, args.streams):
        scores[s:s + len(A)] = A.flatten(1).amax(1).cpu().numpy()
        maps[s:s + len(A)] = F.adaptive_avg_pool2d(A[:, None], args.map_size)[:, 0].cpu().numpy()
        s += len(A)
    maps[num_pairs:] = maps[num_pairs - 1]  # the last frame has no flow: copy the previous map
    return scores, maps


# ----------------------------------------------------------------------------------------------- localization
def save_panels(out_dir, ds, test_frames, test_flows, scores, maps, nets, scale, args):
    """Fig. 3: real frame | generated frame G_O->F(O) | generated flow G_F->O(F) | abnormality heatmap A,
    for the --num-panels frames chosen round-robin over test videos, best-scoring frame first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(test_frames)
    chosen = []
    for i in range(args.num_panels):
        name = names[i % len(names)]
        ranked = np.argsort(-np.nan_to_num(scores[name], nan=-np.inf), kind="stable")
        k = i // len(names)
        if k < len(ranked):
            chosen.append((name, int(min(ranked[k], len(test_flows[name]) - 1))))
    panel_dir = os.path.join(out_dir, "panels")
    os.makedirs(panel_dir, exist_ok=True)
    for name, t in chosen:
        frame_img = frames_to_tensor(test_frames[name][t:t + 1], args.device)
        flow_img = flows_to_tensor(test_flows[name][t:t + 1], scale, args.device)
        with torch.inference_mode():
            gen_frame = nets["o2f"].G(flow_img)[0, 0].float().cpu().numpy()
            gen_flow = nets["f2o"].G(frame_img)[0].float().cpu().numpy()
        real = test_frames[name][t]
        heat = maps[name][t].astype(np.float32)
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
        axes[0].imshow(real, cmap="gray", vmin=0, vmax=255)
        axes[0].set_title("real frame")
        axes[1].imshow((gen_frame + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("generated frame")
        axes[2].imshow(np.clip((gen_flow.transpose(1, 2, 0) + 1) / 2, 0, 1))
        axes[2].set_title("generated OF (dx, dy, |f|)")
        axes[3].imshow(real, cmap="gray", vmin=0, vmax=255)
        size = real.shape[0]
        axes[3].imshow(heat, cmap="jet", alpha=0.5, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                       vmin=0, vmax=1 + (args.lambda_motion if args.streams == "both" else 0))
        video = ds.video(name)
        if video.has_masks:
            import cv2
            mask = cv2.resize(video.read_masks()[t].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
            if mask.any():
                axes[3].contour(mask, levels=[0.5], colors="white", linewidths=1)
        axes[3].set_title(f"abnormality heatmap (score {scores[name][t]:.2f})")
        for ax in axes:
            ax.axis("off")
        fig.suptitle(f"{name} frame {t + 1}")
        fig.tight_layout()
        fig.savefig(os.path.join(panel_dir, f"{name}_{t + 1:04d}.png"), dpi=80)
        plt.close(fig)
    return len(chosen)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = common.build_parser("gan_flow", __doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=None,
                        help="frame/flow size for the GANs (paper 256; synthetic default 64)")
    parser.add_argument("--ngf", type=int, default=None, help="generator base width (pix2pix 64; synthetic 32)")
    parser.add_argument("--ndf", type=int, default=None, help="discriminator base width (pix2pix 64; synthetic 32)")
    parser.add_argument("--l1-weight", type=float, default=100.0, help="weight of the L1 term (pix2pix 100)")
    parser.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (paper: 'momentum 0.5')")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout = noise z, kept at test time")
    parser.add_argument("--lambda-motion", type=float, default=2.0, help="A = N_S + lambda N_O (paper 2)")
    parser.add_argument("--streams", choices=("both", "motion", "appearance"), default="both",
                        help="motion = N_F->O only, appearance = N_O->F only, both = fused (paper)")
    parser.add_argument("--backbone-weights", default=None,
                        help="imagenet (torchvision alexnet-owt-7be5be79.pth via torch.hub), none (random), or "
                             "a PATH (default imagenet; none for --dataset synthetic)")
    parser.add_argument("--semantic-size", type=int, default=256,
                        help="side of the frames AlexNet sees (paper: the 256x256 frames -> 15x15 conv5)")
    parser.add_argument("--flow-method", default="farneback", help="optical flow passed to common.load_flows")
    parser.add_argument("--flow-scale", type=float, default=0.0,
                        help="flow scale s in pixels (0: 99.9th percentile of training magnitudes)")
    parser.add_argument("--train-stride", type=int, default=None,
                        help="use every k-th training pair (paper 1; synthetic 2)")
    parser.add_argument("--test-batch-size", type=int, default=None, help="frames per test batch (CPU 32, CUDA 256)")
    parser.add_argument("--map-size", type=int, default=64, help="side of the A maps stored in scores.npz")
    args = common.parse_args(parser, argv)

    synthetic = args.dataset == "synthetic"
    fill = {"image_size": 64 if synthetic else 256, "ngf": 32 if synthetic else 64, "ndf": 32 if synthetic else 64,
            "epochs": 2 if synthetic else 10, "batch_size": 1, "lr": 2e-4, "train_stride": 2 if synthetic else 1,
            "backbone_weights": "none" if synthetic else "imagenet",
            "test_batch_size": 256 if args.device.type == "cuda" else 32}
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "model.pt")

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(ds.summary())

    # configuration: from the checkpoint when resuming or testing only, else from the flags
    checkpoint = None
    if args.resume or not args.train:
        checkpoint = common.load_checkpoint(ckpt_path)
        config = checkpoint["config"]
    else:
        config = {"image_size": args.image_size, "ngf": args.ngf, "ndf": args.ndf, "dropout": args.dropout,
                  "flow_method": args.flow_method, "flow_scale": args.flow_scale or None}
    size = (config["image_size"], config["image_size"])

    nets = build_networks(config, args.device)
    opts = {name: make_optimizers(net, args.lr, args.beta1) for name, net in nets.items()}
    start_epoch, train_time_s = 0, 0.0
    if checkpoint is not None:
        for name in ("f2o", "o2f"):
            nets[name].G.load_state_dict(checkpoint[name]["G"])
            nets[name].D.load_state_dict(checkpoint[name]["D"])
            opts[name][0].load_state_dict(checkpoint[name]["opt_G"])
            opts[name][1].load_state_dict(checkpoint[name]["opt_D"])
        start_epoch, train_time_s = checkpoint["epoch"], checkpoint.get("train_time_s", 0.0)
        print(f"loaded {ckpt_path} (epoch {start_epoch}, config {config})")

    if args.train:
        train_frames = common.load_split_frames(ds, "train", size, cache_dir=args.cache_dir)
        train_flows = common.load_split_flows(ds, "train", size, method=config["flow_method"],
                                              cache_dir=args.cache_dir, workers=args.workers or 0)
        if not config["flow_scale"]:
            config["flow_scale"] = estimate_flow_scale(train_flows)
        print(f"flow scale s = {config['flow_scale']:.3f} px/frame at {size[0]}x{size[1]}")
        train_time_s = train(args, config, train_frames, train_flows, nets, opts, start_epoch, train_time_s)
        print(f"training time {train_time_s:.0f}s")

    if not args.test:
        return
    alexnet = AlexNetConv5().to(args.device).eval().requires_grad_(False)
    backbone = common.load_alexnet_features(alexnet, args.backbone_weights) if args.streams != "motion" else "unused"
    for net in nets.values():
        net.eval()  # dropout stays on (AlwaysDropout); instance norm has no running statistics
    test_flows = common.load_split_flows(ds, "test", size, method=config["flow_method"],
                                         cache_dir=args.cache_dir, workers=args.workers or 0)
    test_frames = common.load_split_frames(ds, "test", size, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)  # the dropout noise z at test time
    scores, maps = {}, {}
    t0 = time.time()
    with torch.inference_mode():
        for name in tqdm(test_frames, desc="test videos", leave=False):
            scores[name], maps[name] = score_video(test_frames[name], test_flows[name], nets["f2o"].G,
                                                   nets["o2f"].G, alexnet, config["flow_scale"], args)
    trained = checkpoint["args"] if (checkpoint is not None and not args.train) else common.args_to_dict(args)
    protocol = (f"gan_flow {args.streams}, {size[0]}x{size[1]}, ngf {config['ngf']}, ndf {config['ndf']}, "
                f"epochs {start_epoch if not args.train else args.epochs}, train stride {trained['train_stride']}, "
                f"batch {trained['batch_size']}, {backbone}, AlexNet input {args.semantic_size}, "
                f"flow {config['flow_method']}, lambda {args.lambda_motion}")
    meta = {"method": "gan_flow", "dataset": args.dataset,
            "protocol": {"normalize": args.normalize or "none", "smooth": args.smooth, "description": protocol},
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), scores, maps, meta)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    test_time = time.time() - t0
    num_frames = sum(len(f) for f in test_frames.values())
    test_fps = num_frames / test_time
    print(f"test: {num_frames} frames in {test_time:.1f}s = {test_fps:.1f} frames/s "
          f"(cached frames + flows -> scores.npz)")
    if args.num_panels > 0:
        n = save_panels(args.out, ds, test_frames, test_flows, scores, maps, nets, config["flow_scale"], args)
        print(f"wrote {n} panels to {os.path.join(args.out, 'panels')}")
    vad_eval.evaluate_run(args.out, ds, normalize=args.normalize or "none", smooth=args.smooth,
                          extra={"train_time_s": round(train_time_s, 1), "test_fps": round(test_fps, 1),
                                 "protocol": protocol})


if __name__ == "__main__":
    common.run_main(main)
