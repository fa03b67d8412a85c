"""Adversarial 3D convolutional auto-encoder (denoising, max-unpooling) for video anomaly detection.

Citation: C. Sun, Y. Jia, H. Song and Y. Wu, "Adversarial 3D Convolutional Auto-Encoder for Abnormal Event
Detection in Videos", IEEE Transactions on Multimedia 23:3292-3305, 2021 (doi 10.1109/TMM.2020.3023303).

What it does
------------
A 3D convolutional auto-encoder R = G(F(.)) learns the normal spatio-temporal patterns of 16-frame gray clips
(224x224, minus the training mean image) from normal training videos only. The encoder F has five 3x3x3 3D
convolutions (stride 1, each followed by BatchNorm + tanh) with four 3D max-pools in between (the first 1x2x2,
the others 2x2x2) that record where each maximum came from; the decoder G mirrors it with 3D
de-convolutions and 3D max-unpooling that puts every value back at the recorded location; the last layer is
linear. Training is denoising (eq. 7: the input is corrupted with Gaussian noise, sigma = 0.005, the target is
the clean clip) and adversarial (eq. 8-12, Algorithm 1): a discriminator D (three 3D convolutions, three
3D max-pools, two fully connected layers, no BatchNorm) tells input clips from reconstructions, and the
auto-encoder minimises L_R = L_rec + lambda L_adv. Both nets use RMSprop, lr 2e-4. At test time there is no
noise; the reconstruction error of frame t is e_t = mean over its pixels of the squared error (eq. 13) and the
anomaly score is s_t = (e_t - min_t e_t) / max_t e_t per video (eq. 14). Events are the persistent local maxima
of s_t, merged within 50 frames (Table X; done by eval.py). `--layers 6` is the shallower network of Table VII,
`--no-gan` / `--no-noise` the ablations of Tables V and VI, `--flow` the RGB + optical-flow variant of Table IX.

Implementation choices the paper leaves open (not deviations, but stated so they can be checked)
------------------------------------------------------------------------------------------------
- Channel widths (not in the text): encoder convs 32, 64, 128, 128, 128 (`--channels`), decoder mirrored
  (128, 128, 64, 32 -> 1). This is C3D's 64/128/256 halved, chosen so that one 224x224 frame costs ~4.7
  GFLOP and the test-time target (4,700 frames/s on an H200) is reachable. `--layers 6` keeps the first three
  widths (32, 64, 128) and the first two pools.
- Layout of the 10-layer net: conv1 pool1(1x2x2) conv2 pool2 conv3 pool3 conv4 pool4 conv5 | deconv5 unpool4
  deconv4 unpool3 deconv3 unpool2 deconv2 unpool1 deconv1(linear). The 6-layer net drops conv4, conv5 and
  their pools / deconvolutions ("the last two layers of the encoder and the corresponding decoder layers").
  De-convolutions are ConvTranspose3d(3x3x3, stride 1, padding 1): padding 1 is exactly "cropping out the
  boundary of the output to keep the same size" of Hasan et al.
- Initialisation (not in the paper): Xavier-uniform (tanh gain), zero biases, and the last (linear)
  de-convolution starts at zero, i.e. the first reconstruction is the mean image. PyTorch's default init
  sizes a transposed convolution by its output channels and starts the 1-channel output layer at std ~2
  against inputs of std ~0.05, which RMSprop at lr 2e-4 takes thousands of steps to undo.
- Discriminator: conv 3x3x3 (1->32), max-pool 2x4x4, conv (32->64), max-pool 2x4x4, conv (64->64), max-pool
  2x4x4, FC (-> 256), FC (-> 1); LeakyReLU(0.2) (the paper names no activation for D); it returns a logit and
  D = sigmoid(logit). The 2x4x4 pools keep the first FC small at 224x224 (64 x 2 x 4 x 4 = 2048 inputs;
  ceil-mode pools, so any input size works).
- Losses: eq. 7 as written, L_rec = squared Euclidean norm of (R(S + eta) - S) over the whole clip, averaged
  over the batch. Eq. 8/10/12 as printed contain sign typos (log D on both terms would train D to say "real"
  to everything); we implement the GAN of Goodfellow et al. [16] that Theorem 3 and the reported loss level
  of 2 ln 2 refer to: L_D = -log D(S) - log(1 - D(R(S + eta))), and for the auto-encoder the adversarial term
  -log D(R(S + eta)), whose gradient is exactly eq. 11's lambda / D(R) dD/dtheta. Algorithm 1 updates theta
  and phi from the same forward pass (simultaneous updates), which is what `train_step` does.
- lambda is not given: default 1 (`--lambda-adv`). With L_rec summed over the clip's pixels this keeps the
  reconstruction term dominant and the adversarial term a regulariser.
- Training clips (Hasan et al. [12] augmentation): from every training video, 16-frame clips taking every
  k-th frame for skip strides k = 1, 2, 3 (`--skip-strides`), starting at every `--train-step`-th frame
  (default 1, i.e. every clip). Epochs (20) and batch size (16) are not in the paper.
- Test clips and aggregation: 16-frame clips with start step `--test-stride` (default 16: the paper's "one
  forward pass", each frame reconstructed once; the last clip of a video is aligned to its end, so the few
  frames in two clips get the mean of both). With a smaller stride every frame lies in several clips and its
  per-pixel squared error is the mean over those clips. e_t is the mean of that per-pixel error over the
  frame. Every frame is scored (no NaN); a video shorter than 16 frames is padded by repeating its last frame.
- scores.npz holds s_t of eq. 14 (already normalised per video by this script), so eval.py is called with
  normalize="none"; the raw e_t are written next to it in raw_errors.npz. Maps: the per-pixel squared error
  averaged over `--map-pool` x `--map-pool` blocks (default 4: 56x56 maps at 224x224 input) to keep
  scores.npz small; divided by max_t e_t of the video so that map and score share a scale.
- `--flow`: a second, independent auto-encoder + discriminator on optical flow (common.load_flows, Farneback),
  encoded as in Ravanbakhsh et al. [11]: three channels dx, dy, magnitude; frame t uses the flow t -> t+1
  (the last frame reuses the previous flow); minus the training mean flow image and divided by the training
  std of each channel. Both streams are trained on the same clips. "Combine" (the paper gives no formula):
  s_t = (s_t^rgb + s_t^flow) / 2, each normalised by eq. 14 first, since raw errors of the two streams have
  unrelated scales; maps likewise (each divided by its stream's max_t e_t, averaged).

Deviations from the paper
-------------------------
- Section III-B says "all 3D convolution kernels are 3x3x3 ... except that the kernel of the first
  convolutional layer is 1x2x2", repeated by the next sentence about pooling. A 1x2x2 stride-1 convolution
  would change the frame size by one pixel and break the symmetric unpooling; we read it as a duplication
  typo and use 3x3x3 everywhere (as C3D, which the sentence cites, and as the task's issue says).
- `--dataset synthetic` defaults (CPU demo, < 3 minutes on 2 cores): 64x96 input (the 120x180 frames'
  aspect), 2 epochs, batch 4, training clip start step 16 (96 clips per epoch), maps pooled by 2 (32x48).
  Real datasets keep the paper's 224x224.
- Reduced CPU runs on real data (see README) are labelled "reduced" in metrics.json's protocol string.

Usage
-----
    python adv3dae.py --dataset synthetic                          # CPU demo: train + test + metrics
    python adv3dae.py --dataset ped2 --data-root ../shared/data    # paper protocol (GPU)
    python adv3dae.py --dataset ped2 --data-root ../shared/data --test          # test a trained model.pt
    python adv3dae.py --dataset ped2 --layers 6                    # Table VII shallow net
    python adv3dae.py --dataset ped2 --no-gan                      # Table V ablation
    python adv3dae.py --dataset ped2 --no-noise                    # Table VI ablation
    python adv3dae.py --dataset ped2 --flow                        # Table IX RGB + optical flow
    python adv3dae.py --dataset ped2 --amp --test-batch-size 128        # fast bf16 test on CUDA
"""

import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

METHOD = "adv3dae"
CLIP_LEN = 16                          # frames per clip (section IV-C)
PAPER_SIZE = (224, 224)                # gray frames resized to 224x224 (section IV-C)
DEFAULT_CHANNELS = (32, 64, 128, 128, 128)   # not in the paper: see the docstring
ARCHITECTURE_KEYS = ("size", "layers", "channels", "no_gan", "flow")   # test-only runs take these from model.pt


# ----------------------------------------------------------------------------------------------- model

class GaussianNoise(nn.Module):
    """eta ~ N(0, sigma^2 I) added to the input in training mode only (the denoising criterion, eq. 7);
    identity in eval mode ("we do not add Gaussian noise when testing")."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, x):
        if self.training and self.sigma > 0:
            return x + self.sigma * torch.randn_like(x)
        return x

    def extra_repr(self):
        return f"sigma={self.sigma}"


def conv_bn_tanh(c_in: int, c_out: int) -> nn.Sequential:
    """3x3x3 3D convolution, stride 1, 'same' padding, then BatchNorm and tanh (section IV-C)."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=1, padding=1), nn.BatchNorm3d(c_out), nn.Tanh())


def deconv_bn_tanh(c_in: int, c_out: int) -> nn.Sequential:
    """3x3x3 3D de-convolution, stride 1; padding=1 crops the one-voxel border the full transposed
    convolution adds (Hasan et al.'s cropping), so the output keeps the input's size."""
    return nn.Sequential(nn.ConvTranspose3d(c_in, c_out, 3, stride=1, padding=1), nn.BatchNorm3d(c_out),
                         nn.Tanh())


class Adv3DAE(nn.Module):
    """The 3D convolutional auto-encoder R_theta = G_theta2(F_theta1(.)) of Fig. 2.

    layers=10: 5 convs + 4 max-pools (1x2x2, then 2x2x2) in the encoder, 5 de-convs + 4 max-unpools in the
    decoder. layers=6: 3 convs + 2 pools / 3 de-convs + 2 unpools. Input/output (B, C, 16, H, W), H and W
    divisible by 2^(number of pools)."""

    def __init__(self, in_channels: int = 1, channels=DEFAULT_CHANNELS, layers: int = 10,
                 noise_sigma: float = 0.005):
        super().__init__()
        if layers not in (6, 10):
            raise ValueError(f"layers must be 10 or 6, got {layers}")
        num_convs = layers // 2
        channels = tuple(int(c) for c in channels)[:num_convs]
        if len(channels) != num_convs:
            raise ValueError(f"{layers} layers need {num_convs} channel widths, got {channels}")
        self.in_channels, self.channels, self.layers = in_channels, channels, layers
        self.noise = GaussianNoise(noise_sigma)
        widths = (in_channels,) + channels
        self.encoder_convs = nn.ModuleList(conv_bn_tanh(widths[i], widths[i + 1]) for i in range(num_convs))
        # num_convs - 1 pools between the convs; the first only pools space (keeps early temporal detail, C3D)
        self.pools = nn.ModuleList(
            nn.MaxPool3d(k, stride=k, return_indices=True)
            for k in [(1, 2, 2)] + [(2, 2, 2)] * (num_convs - 2))
        self.unpools = nn.ModuleList(nn.MaxUnpool3d(p.kernel_size, stride=p.stride) for p in self.pools)
        # decoder_deconvs[i] mirrors encoder_convs[i]: widths[i+1] -> widths[i]; the outermost is linear
        self.decoder_deconvs = nn.ModuleList(
            deconv_bn_tanh(widths[i + 1], widths[i]) if i > 0
            else nn.ConvTranspose3d(widths[1], widths[0], 3, stride=1, padding=1)
            for i in range(num_convs))

        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform weights (tanh gain) and zero biases for the (de)convolutions; the last, linear
        de-convolution starts at zero, so the first reconstruction is the mean image (input 0). PyTorch's default
        init takes a transposed convolution's fan-in from its OUTPUT channels, so the last layer (C_out = 1)
        would start with outputs of std ~2 against mean-subtracted inputs of std ~0.05, and RMSprop at lr 2e-4
        (steps of ~lr per weight) needs thousands of iterations to undo that."""
        gain = nn.init.calculate_gain("tanh")
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.xavier_uniform_(m.weight, gain=gain)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.decoder_deconvs[0].weight)

    def encode(self, x):
        """F_theta1: returns the code and, per pool, (indices, size before pooling) for the unpooling."""
        switches = []
        for i, conv in enumerate(self.encoder_convs):
            x = conv(x)
            if i < len(self.pools):
                size = x.shape
                x, indices = self.pools[i](x)
                switches.append((indices, size))
        return x, switches

    def decode(self, code, switches):
        """G_theta2: de-convolve, unpool at the recorded locations, ..., last de-convolution linear."""
        x = code
        for i in reversed(range(len(self.decoder_deconvs))):
            x = self.decoder_deconvs[i](x)
            if i > 0:
                indices, size = switches[i - 1]
                x = self.unpools[i - 1](x, indices, output_size=size)
        return x

    def forward(self, x):
        """R_theta(S + eta) in training mode, R_theta(S) in eval mode."""
        code, switches = self.encode(self.noise(x))
        return self.decode(code, switches)


class Discriminator3D(nn.Module):
    """D_phi of Fig. 2: three 3D convs + three 3D max-pools + two FC layers, no BatchNorm. forward returns the
    logit of "this clip is a real input clip"; D = sigmoid(logit)."""

    POOL = (2, 4, 4)

    def __init__(self, in_channels: int = 1, clip_len: int = CLIP_LEN, size=PAPER_SIZE,
                 channels=(32, 64, 64), hidden: int = 256):
        super().__init__()
        widths = (in_channels,) + tuple(channels)
        blocks = []
        for i in range(3):
            blocks += [nn.Conv3d(widths[i], widths[i + 1], 3, stride=1, padding=1), nn.LeakyReLU(0.2),
                       nn.MaxPool3d(self.POOL, stride=self.POOL, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        t, h, w = clip_len, size[0], size[1]
        for _ in range(3):
            t, h, w = -(-t // self.POOL[0]), -(-h // self.POOL[1]), -(-w // self.POOL[2])   # ceil_mode
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * t * h * w, hidden), nn.LeakyReLU(0.2),
                                nn.Linear(hidden, 1))

    def forward(self, x):
        return self.fc(self.features(x))

    def probability(self, x):
        return torch.sigmoid(self.forward(x))


# ----------------------------------------------------------------------------------------------- losses

def reconstruction_loss(recon, clean):
    """Eq. 7: E_S ||R(S + eta) - S||^2, the squared norm over each clip, averaged over the batch."""
    return (recon.float() - clean.float()).pow(2).flatten(1).sum(1).mean()


def discriminator_loss(real_logits, fake_logits):
    """L_D = -[log D(S) + log(1 - D(R(S + eta)))] (Goodfellow et al.'s value function, eq. 8/10 up to the
    printed sign typo); minimising it is the gradient ascent of eq. 12."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def adversarial_loss(fake_logits):
    """Auto-encoder's adversarial term -log D(R(S + eta)); its gradient is eq. 11's second term."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# ----------------------------------------------------------------------------------------------- scoring maths

def paper_score(errors: np.ndarray) -> np.ndarray:
    """Eq. 14: s_t = (e_t - min_t e_t) / max_t e_t over one video (NOT (e - min) / (max - min)).
    NaN entries stay NaN; an all-zero video scores 0."""
    e = np.asarray(errors, dtype=np.float64)
    finite = np.isfinite(e)
    if not finite.any():
        return e.astype(np.float32)
    lo, hi = e[finite].min(), e[finite].max()
    s = (e - lo) / hi if hi > 0 else np.where(finite, 0.0, np.nan)
    return s.astype(np.float32)


# ----------------------------------------------------------------------------------------------- data

def training_clip_specs(num_frames: list, clip_len: int = CLIP_LEN, skips=(1, 2, 3), step: int = 1) -> np.ndarray:
    """Hasan et al.'s temporal augmentation: for each video v and skip stride k, the clips
    [s, s + k, ..., s + k (clip_len - 1)] for s = 0, step, 2 step, ... that fit in the video.
    Returns (N, 3) int64 rows (video, start, skip)."""
    rows = []
    for v, t in enumerate(num_frames):
        for k in skips:
            last_start = t - 1 - k * (clip_len - 1)
            if last_start < 0:
                continue
            starts = np.arange(0, last_start + 1, step, dtype=np.int64)
            rows.append(np.stack([np.full_like(starts, v), starts, np.full_like(starts, k)], 1))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(rows)


def clip_frame_indices(specs: np.ndarray, clip_len: int = CLIP_LEN) -> np.ndarray:
    """(N, 3) (video, start, skip) rows -> (N, clip_len) frame indices start + skip * arange(clip_len)."""
    return specs[:, 1:2] + specs[:, 2:3] * np.arange(clip_len, dtype=np.int64)[None]


def test_clip_starts(num_frames: int, clip_len: int, stride: int) -> np.ndarray:
    """Start frames of the test clips of one video: common.clip_starts (the last clip ends at the video's
    end); a video shorter than a clip gets one clip at 0 (padded later by repeating its last frame)."""
    if num_frames < clip_len:
        return np.zeros(1, dtype=np.int64)
    return np.asarray(common.clip_starts(num_frames, clip_len, stride), dtype=np.int64)


def gather_clips(videos: list, specs: np.ndarray, clip_len: int = CLIP_LEN) -> np.ndarray:
    """Stack the clips `specs` (video, start, skip) of `videos` (list of (T, ...) arrays, e.g. memmaps) into one
    (B, clip_len, ...) array. Indices past the end are clamped to the last available entry (videos shorter than
    a clip; flow has one entry fewer than frames, so the last frame reuses the previous flow)."""
    idx = clip_frame_indices(specs, clip_len)
    out = None
    for b, (v, row) in enumerate(zip(specs[:, 0], idx)):
        src = videos[v]
        rows = np.minimum(row, len(src) - 1)
        if out is None:
            out = np.empty((len(specs), clip_len) + src.shape[1:], dtype=src.dtype)
        out[b] = src[rows]
    return out


class FrameStream:
    """Gray frames -> network input (B, 1, L, H, W): x / 255 minus the training mean image (section IV-C)."""
    name = "rgb"
    in_channels = 1

    def __init__(self, mean_image: torch.Tensor):
        self.mean_image = mean_image            # (H, W) float32 in [0, 1]

    @staticmethod
    def fit_stats(train_frames: list) -> dict:
        total = sum(len(f) for f in train_frames)
        acc = None
        for f in train_frames:
            s = np.asarray(f, dtype=np.float64).sum(0)
            acc = s if acc is None else acc + s
        return {"mean_image": torch.from_numpy((acc / total / 255.0).astype(np.float32))}

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: uint8 (B, L, H, W) on the compute device."""
        x = batch.float().div_(255.0).sub_(self.mean_image.to(batch.device))
        return x.unsqueeze(1)


class FlowStream:
    """Optical flow -> (B, 3, L, H, W): channels dx, dy, magnitude (Ravanbakhsh et al.'s flow image), minus the
    training mean flow image, divided by the training std of each channel. Frame t uses flow t -> t+1."""
    name = "flow"
    in_channels = 3

    def __init__(self, mean_image: torch.Tensor, channel_std: torch.Tensor):
        self.mean_image, self.channel_std = mean_image, channel_std   # (H, W, 3), (3,)

    @staticmethod
    def fit_stats(train_flows: list) -> dict:
        n, acc, acc2 = 0, None, np.zeros(3)
        for f in train_flows:
            f = np.asarray(f, dtype=np.float32)
            f3 = np.concatenate([f, np.sqrt((f ** 2).sum(-1, keepdims=True))], -1)
            s = f3.astype(np.float64).sum(0)
            acc = s if acc is None else acc + s
            acc2 += (f3.astype(np.float64) ** 2).sum((0, 1, 2))
            n += len(f)
        mean_image = acc / n                                     # (H, W, 3)
        pixels = n * mean_image.shape[0] * mean_image.shape[1]
        var = acc2 / pixels - mean_image.mean((0, 1)) ** 2       # per-channel variance over all pixels
        return {"flow_mean_image": torch.from_numpy(mean_image.astype(np.float32)),
                "flow_channel_std": torch.from_numpy(np.sqrt(np.maximum(var, 1e-12)).astype(np.float32))}

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: float16 (B, L, H, W, 2) on the compute device."""
        f = batch.float()
        f = torch.cat([f, f.pow(2).sum(-1, keepdim=True).sqrt()], -1)
        f = (f - self.mean_image.to(f.device)) / self.channel_std.to(f.device)
        return f.permute(0, 4, 1, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------------- training

def build_models(args, in_channels: int, size, device):
    ae = Adv3DAE(in_channels, args.channels, args.layers, 0.0 if args.no_noise else args.noise_sigma).to(device)
    disc = None if args.no_gan else Discriminator3D(in_channels, CLIP_LEN, size).to(device)
    opt_ae = torch.optim.RMSprop(ae.parameters(), lr=args.lr)
    opt_d = None if disc is None else torch.optim.RMSprop(disc.parameters(), lr=args.lr)
    return {"ae": ae, "disc": disc, "opt_ae": opt_ae, "opt_d": opt_d}


def train_step(ae, disc, opt_ae, opt_d, x, lambda_adv: float, amp: bool = False, where: str = "") -> dict:
    """One iteration of Algorithm 1 on the clean clips x: R = R_theta(x + eta) (noise inside ae in train
    mode); theta descends L_R = L_rec + lambda L_adv, phi descends L_D (= ascends eq. 12), both from the same
    forward pass (simultaneous update)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        recon = ae(x)
        loss_rec = reconstruction_loss(recon, x)
        if disc is not None:
            loss_adv = adversarial_loss(disc(recon))
            loss_d = discriminator_loss(disc(x), disc(recon.detach()))
            loss_r = loss_rec + lambda_adv * loss_adv
        else:
            loss_adv = loss_d = None
            loss_r = loss_rec
    common.check_finite(loss_r, f"{where} (auto-encoder loss)")
    if loss_d is not None:
        common.check_finite(loss_d, f"{where} (discriminator loss)")
    opt_ae.zero_grad(set_to_none=True)
    loss_r.backward(inputs=list(ae.parameters()))
    if disc is not None:
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward(inputs=list(disc.parameters()))
    opt_ae.step()
    if disc is not None:
        opt_d.step()
    out = {"rec": loss_rec.item()}
    if disc is not None:
        out.update(adv=loss_adv.item(), d=loss_d.item())
    return out


def to_device(array: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def train(args, ds, streams: dict, sources: dict, models: dict, start_epoch: int, stats: dict,
          previous_time: float = 0.0) -> float:
    """Train every stream (rgb, and flow with --flow) on the same strided clips. Returns the total training
    wall time in seconds (including `previous_time` of a resumed run)."""
    num_frames = [len(sources["rgb"][v]) for v in range(len(ds.train))]
    specs = training_clip_specs(num_frames, CLIP_LEN, args.skip_strides, args.train_step)
    if len(specs) == 0:
        raise common.DataError(f"{ds.root}: no training video has {CLIP_LEN} frames for a clip")
    print(f"training clips: {len(specs)} (skip strides {tuple(args.skip_strides)}, start step {args.train_step}),"
          f" {len(ds.train)} videos, input {args.size[0]}x{args.size[1]}, streams {list(streams)}")
    rng = np.random.default_rng(args.seed + start_epoch)
    amp = args.amp and args.device.type == "cuda"
    for m in models.values():
        m["ae"].train()
        if m["disc"] is not None:
            m["disc"].train()
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        order = rng.permutation(len(specs))
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        sums = {name: {} for name in streams}
        t0 = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step, b in enumerate(bar):
            batch_specs = specs[b]
            for name, stream in streams.items():
                raw = gather_clips(sources[name], batch_specs, CLIP_LEN)
                x = stream.to_input(to_device(raw, args.device))
                m = models[name]
                losses = train_step(m["ae"], m["disc"], m["opt_ae"], m["opt_d"], x, args.lambda_adv, amp,
                                    where=f"epoch {epoch + 1} step {step} stream {name}")
                for k, v in losses.items():
                    sums[name][k] = sums[name].get(k, 0.0) + v
            bar.set_postfix({f"{n}_{k}": f"{v / (step + 1):.4g}" for n, d in sums.items() for k, v in d.items()})
        summary = "  ".join(f"{n}: " + " ".join(f"L_{k}={v / len(batches):.5g}" for k, v in d.items())
                            for n, d in sums.items())
        print(f"epoch {epoch + 1}/{args.epochs}  {summary}  ({time.time() - t0:.1f}s, {len(specs)} clips)")
        save_model(args, models, epoch, stats, previous_time + time.time() - t_start)
    return previous_time + time.time() - t_start


def save_model(args, models: dict, epoch: int, stats: dict, train_time_s: float) -> None:
    state = {"epoch": epoch, "args": common.args_to_dict(args), "stats": stats, "train_time_s": float(train_time_s),
             "streams": {}}
    for name, m in models.items():
        state["streams"][name] = {
            "ae": m["ae"].state_dict(), "opt_ae": m["opt_ae"].state_dict(),
            "disc": None if m["disc"] is None else m["disc"].state_dict(),
            "opt_d": None if m["opt_d"] is None else m["opt_d"].state_dict()}
    common.save_checkpoint(os.path.join(args.out, "model.pt"), state)


def load_model(models: dict, state: dict, with_optim: bool) -> None:
    for name, m in models.items():
        if name not in state["streams"]:
            raise common.DataError(f"checkpoint has no '{name}' stream (trained without --flow?)")
        s = state["streams"][name]
        m["ae"].load_state_dict(s["ae"])
        if m["disc"] is not None and s["disc"] is not None:
            m["disc"].load_state_dict(s["disc"])
        if with_optim:
            m["opt_ae"].load_state_dict(s["opt_ae"])
            if m["opt_d"] is not None and s["opt_d"] is not None:
                m["opt_d"].load_state_dict(s["opt_d"])


# ----------------------------------------------------------------------------------------------- scoring

@torch.inference_mode()
def score_videos(ae: Adv3DAE, stream, sources: list, num_frames: list, args, desc: str = "test"):
    """Reconstruct every test clip (batches of `--test-batch-size` clips that may span videos) and return, per
    video, e (T,) = mean per-pixel squared error of each frame averaged over the clips containing it
    (eq. 13), and the per-pixel squared error map pooled by `--map-pool` (T, H/p, W/p), same averaging."""
    device = args.device
    ae.eval()
    amp = args.amp and device.type == "cuda"
    clips = [(v, int(s)) for v, t in enumerate(num_frames) for s in test_clip_starts(t, CLIP_LEN, args.test_stride)]
    err_sum, map_sum, count = {}, {}, {}
    p = args.map_pool
    for i in tqdm(range(0, len(clips), args.test_batch_size), desc=desc, leave=False):
        chunk = clips[i:i + args.test_batch_size]
        specs = np.array([(v, s, 1) for v, s in chunk], dtype=np.int64)
        raw = gather_clips(sources, specs, CLIP_LEN)
        x = stream.to_input(to_device(raw, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon = ae(x)
        sq = (recon.float() - x).pow(2).mean(1)                       # (B, L, H, W), mean over channels
        frame_err = sq.mean((2, 3))                                    # (B, L): e_t within each clip
        b, l, h, w = sq.shape
        pooled = F.avg_pool2d(sq.reshape(b * l, 1, h, w), p).reshape(b, l, h // p, w // p) if p > 1 else sq
        idx = torch.from_numpy(clip_frame_indices(specs, CLIP_LEN)).to(device)
        for v in sorted(set(specs[:, 0].tolist())):
            rows = torch.from_numpy(np.nonzero(specs[:, 0] == v)[0]).to(device)
            t = num_frames[v]
            if v not in err_sum:
                err_sum[v] = torch.zeros(t, device=device)
                map_sum[v] = torch.zeros((t,) + pooled.shape[2:], device=device)
                count[v] = torch.zeros(t, device=device)
            fi = idx[rows].clamp_(max=t - 1).flatten()                 # short videos: padding frames -> last
            err_sum[v].index_add_(0, fi, frame_err[rows].flatten())
            map_sum[v].index_add_(0, fi, pooled[rows].flatten(0, 1))
            count[v].index_add_(0, fi, torch.ones_like(fi, dtype=torch.float32))
    errors, maps = [], []
    for v in range(len(num_frames)):
        c = count[v].clamp(min=1)
        errors.append((err_sum[v] / c).cpu().numpy().astype(np.float32))
        maps.append((map_sum[v] / c[:, None, None]).cpu().numpy().astype(np.float32))
    return errors, maps


def combine_streams(errors: dict, maps: dict, num_videos: int):
    """Per video: s_t of eq. 14 per stream, averaged over streams; maps divided by their stream's max_t e_t
    and averaged (one stream: s_t and map / max e)."""
    scores, out_maps = [], []
    for v in range(num_videos):
        s = np.mean([paper_score(errors[n][v]) for n in errors], axis=0).astype(np.float32)
        m = np.mean([maps[n][v] / max(float(errors[n][v].max()), 1e-12) for n in maps], axis=0)
        scores.append(s)
        out_maps.append(m.astype(np.float16))
    return scores, out_maps


# ----------------------------------------------------------------------------------------------- main

def parse_csv_ints(text: str) -> tuple:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


def main(argv=None):
    parser = common.build_parser(METHOD, __doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_csv_ints, default=None,
                        help="input H,W (default 224,224 as in the paper; 64,64 for synthetic)")
    parser.add_argument("--layers", type=int, choices=(10, 6), default=10,
                        help="10 (Fig. 2) or 6 (Table VII: conv4, conv5 and their decoder layers removed)")
    parser.add_argument("--channels", type=parse_csv_ints, default=DEFAULT_CHANNELS,
                        help="encoder conv widths, comma separated (not in the paper; default 32,64,128,128,128)")
    parser.add_argument("--noise-sigma", type=float, default=0.005, help="training input noise std (paper 0.005)")
    parser.add_argument("--no-noise", action="store_true", help="Table VI ablation: no input noise")
    parser.add_argument("--no-gan", action="store_true", help="Table V ablation: no discriminator / L_adv")
    parser.add_argument("--lambda-adv", type=float, default=1.0, help="lambda of eq. 9 (not in the paper)")
    parser.add_argument("--flow", action="store_true", help="Table IX: add an optical-flow auto-encoder")
    parser.add_argument("--flow-method", default="farneback", help="common.load_flows method")
    parser.add_argument("--skip-strides", type=parse_csv_ints, default=(1, 2, 3),
                        help="Hasan et al.'s temporal skip strides for training clips")
    parser.add_argument("--train-step", type=int, default=None,
                        help="start step between training clips (default 1; 16 for synthetic)")
    parser.add_argument("--test-stride", type=int, default=CLIP_LEN,
                        help="start step between test clips; < 16 averages overlapping clips")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="clips per test batch (default 64 on CUDA, 8 on CPU)")
    parser.add_argument("--map-pool", type=int, default=None,
                        help="average-pool factor of the error maps (default 4; 2 for synthetic)")
    parser.add_argument("--protocol-note", default="",
                        help="free text appended to metrics.json's protocol (e.g. 'reduced: ...')")
    args = common.parse_args(parser, argv)

    synthetic = args.dataset == "synthetic"
    args.size = tuple(args.size) if args.size else ((64, 96) if synthetic else PAPER_SIZE)
    args.epochs = args.epochs if args.epochs is not None else (2 if synthetic else 20)
    args.batch_size = args.batch_size if args.batch_size is not None else (4 if synthetic else 16)
    args.lr = args.lr if args.lr is not None else 2e-4
    args.train_step = args.train_step if args.train_step is not None else (16 if synthetic else 1)
    args.map_pool = args.map_pool if args.map_pool is not None else (2 if synthetic else 4)
    args.test_batch_size = args.test_batch_size or (64 if args.device.type == "cuda" else 8)
    args.channels = tuple(args.channels)
    args.skip_strides = tuple(args.skip_strides)
    num_pools = args.layers // 2 - 1
    if args.size[0] % (2 ** num_pools) or args.size[1] % (2 ** num_pools) or args.size[0] % args.map_pool \
            or args.size[1] % args.map_pool:
        raise common.DataError(f"--size {args.size}: H and W must be divisible by {2 ** num_pools} (pools) and by"
                               f" --map-pool {args.map_pool}")
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(f"{METHOD}: {ds.summary()}")
    stream_names = ["rgb"] + (["flow"] if args.flow else [])
    ckpt_path = os.path.join(args.out, "model.pt")

    # ------------------------------------------------------------------ train
    stats, train_time, state = None, None, None
    if not args.train:      # test only: the architecture comes from the checkpoint, not from the command line
        state = common.load_checkpoint(ckpt_path)
        for key in ARCHITECTURE_KEYS:
            saved = state["args"].get(key)
            saved = tuple(saved) if isinstance(saved, list) else saved
            if saved is not None and saved != getattr(args, key):
                print(f"note: --{key.replace('_', '-')} {saved} from {ckpt_path} (command line: {getattr(args, key)})")
                setattr(args, key, saved)
        stream_names = ["rgb"] + (["flow"] if args.flow else [])
    models = {n: build_models(args, 1 if n == "rgb" else 3, args.size, args.device) for n in stream_names}
    if args.train:
        train_frames = list(common.load_split_frames(ds, "train", args.size, gray=True,
                                                     cache_dir=args.cache_dir).values())
        sources = {"rgb": train_frames}
        start_epoch, previous_time = 0, 0.0
        if args.resume and os.path.exists(ckpt_path):
            state = common.load_checkpoint(ckpt_path)
            load_model(models, state, with_optim=True)
            stats, start_epoch = state["stats"], state["epoch"] + 1
            previous_time = float(state.get("train_time_s", 0.0))
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")
        if stats is None:
            stats = FrameStream.fit_stats(train_frames)
        if args.flow:
            sources["flow"] = list(common.load_split_flows(ds, "train", args.size, args.flow_method,
                                                           cache_dir=args.cache_dir, workers=args.workers).values())
            if "flow_mean_image" not in stats:
                stats.update(FlowStream.fit_stats(sources["flow"]))
        streams = make_streams(stream_names, stats)
        if start_epoch >= args.epochs:
            print(f"checkpoint already at epoch {start_epoch}/{args.epochs}: nothing to train")
            train_time = previous_time
        else:
            train_time = train(args, ds, streams, sources, models, start_epoch, stats, previous_time)
            print(f"training done in {train_time:.1f}s -> {ckpt_path}")
    else:
        load_model(models, state, with_optim=False)
        stats = state["stats"]
        train_time = state.get("train_time_s")

    # ------------------------------------------------------------------ test
    if not args.test:
        return None
    streams = make_streams(stream_names, stats)
    test_sources = {"rgb": list(common.load_split_frames(ds, "test", args.size, gray=True,
                                                         cache_dir=args.cache_dir).values())}
    if args.flow:
        test_sources["flow"] = list(common.load_split_flows(ds, "test", args.size, args.flow_method,
                                                            cache_dir=args.cache_dir, workers=args.workers).values())
    num_frames = [v.num_frames for v in ds.test]
    for name in stream_names:                     # warm-up (cuDNN autotuning, lazy init): not timed
        score_videos(models[name]["ae"], streams[name], test_sources[name][:1], [min(num_frames[0], CLIP_LEN)],
                     args, desc="warm-up")
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    errors, maps = {}, {}
    for name in stream_names:
        errors[name], maps[name] = score_videos(models[name]["ae"], streams[name], test_sources[name], num_frames,
                                                args, desc=f"test {name}")
    scores, out_maps = combine_streams(errors, maps, len(ds.test))
    names = [v.name for v in ds.test]
    # the paper's protocol: eq. 14 is already applied here, so eval adds nothing (--normalize/--smooth override)
    normalize, smooth = args.normalize or "none", args.smooth or "none"
    meta = {"method": METHOD, "dataset": ds.name, "protocol": {"normalize": normalize, "smooth": smooth},
            "scores": "s_t of eq. 14, (e_t - min e) / max e per video (already normalised by adv3dae.py)"
                      + ("; mean of the rgb and flow streams' s_t" if args.flow else ""),
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), dict(zip(names, scores)), dict(zip(names, out_maps)),
                        meta)
    test_time = time.time() - t0
    total_frames = sum(num_frames)
    fps = total_frames / max(test_time, 1e-9)
    print(f"test: {total_frames} frames in {test_time:.2f}s = {fps:.1f} frames/s (cached frames -> scores.npz,"
          f" {args.device}, test stride {args.test_stride}, batch {args.test_batch_size} clips)")
    np.savez(os.path.join(args.out, "raw_errors.npz"),
             **{f"{n}/{name}": errors[n][i] for n in errors for i, name in enumerate(names)})

    protocol = (f"adv3dae {args.layers} layers, {args.size[0]}x{args.size[1]}, {args.epochs} epochs, batch"
                f" {args.batch_size}, train step {args.train_step}, skips {args.skip_strides},"
                f" {'no GAN' if args.no_gan else f'lambda {args.lambda_adv}'},"
                f" noise {0.0 if args.no_noise else args.noise_sigma}, streams {'+'.join(stream_names)};"
                f" scores eq. 14 per video in scores.npz, eval normalize={normalize} smooth={smooth}, events window 50")
    if args.protocol_note:
        protocol += "; " + args.protocol_note
    extra = {"train_time_s": train_time, "test_fps": fps, "protocol": protocol, "device": str(args.device)}
    return vad_eval.evaluate_run(args.out, ds, normalize=normalize, smooth=smooth, extra=extra)


def make_streams(names, stats: dict) -> dict:
    streams = {"rgb": FrameStream(stats["mean_image"])}
    if "flow" in names:
        streams["flow"] = FlowStream(stats["flow_mean_image"], stats["flow_channel_std"])
    return streams


if __name__ == "__main__":
    common.run_main(main)
