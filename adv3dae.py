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
of s_t, merged within 50 frames (Table X; done by eval.py, whose docstring gives the rule). `--layers 6` is the shallower network of Table VII,
`--no-gan` / `--no-noise` the ablations of Tables V and VI, `--flow` the RGB + optical-flow variant of Table IX.

Implementation choices the paper leaves open (not deviations, but stated so they can be checked)
------------------------------------------------------------------------------------------------
- Input scale: gray frames are divided by 255 (to [0, 1]) before the training mean image is subtracted;
  the paper says only "we normalize the images", and [0, 1] is Hasan et al.'s scale. The noise sigma
  (0.005) and the size of the reconstruction errors are relative to this scale.
- Channel widths (not in the text): encoder convs 32, 64, 128, 128, 128 (`--channels`), decoder mirrored
  (128, 128, 64, 32 -> 1): C3D's 64/128/256 halved for conv1-conv3 and a quarter of its 512 for conv4 and
  conv5, chosen so that one 224x224 frame costs ~4.7 GFLOP and the test-time target (4,700 frames/s on an
  H200) is reachable. `--layers 6` keeps the first three widths (32, 64, 128) and the first two pools, so
  its code (128 x 8 x 56 x 56 for a 16 x 224 x 224 clip) has 4x as many values as the input, against 1/16
  for the 10-layer net's: it has no bottleneck. Keeping pool3 as well (128 x 4 x 28 x 28, half the input)
  would be the other reading of "the last two layers of the encoder ... are removed"; we drop it with conv4
  so that the variant is the 10-layer net truncated, and its FLOPs are unchanged either way.
- Layout of the 10-layer net: conv1 pool1(1x2x2) conv2 pool2 conv3 pool3 conv4 pool4 conv5 | deconv5 unpool4
  deconv4 unpool3 deconv3 unpool2 deconv2 unpool1 deconv1(linear). The 6-layer net drops conv4, conv5 and
  their pools / deconvolutions ("the last two layers of the encoder and the corresponding decoder layers").
  De-convolutions are ConvTranspose3d(3x3x3, stride 1, padding 1): padding 1 is exactly "cropping out the
  boundary of the output to keep the same size" of Hasan et al.
- Speed of the 6-layer net (Table VII: 729.4 vs 467.5 frames/s, 1.56x). `conv_macs` counts the multiply-adds
  per 16x224x224 clip: 37.8 G for our 10-layer net and 34.7 G for the 6-layer one, a ratio of only 1.09,
  because the 2x2x2 pools leave conv4 / conv5 (and their de-convolutions) 1/256 and 1/2048 of conv1's voxels.
  C3D's widths (64, 128, 256, 512, 512) give 1.20; no width sequence that at most doubles per stage gets
  near 1.56 (it needs conv4 = conv5 ~ 576 channels after conv3 = 128), and the paper gives no widths, so we
  keep ours rather than invent wider deep layers to match a speed figure. The paper's ratio is close to
  the ratio of layer counts (10 / 6 = 1.67), which is what a launch-bound measurement (small batches,
  per-layer overhead) gives. A GPU run should report both: frames/s of `--layers 6` vs 10 at 224x224 at the
  default test batch (compute-bound; expect ~1.1x) and at `--test-batch-size 1` (launch-bound). On the
  2-core CPU (Ped2's test split at 224x224, cached frames to scores.npz) the 6-layer net ran at 16.5
  against 13.0 frames/s at the CPU's default test batch of 8 clips (1.27x) and 15.9 against 13.0 at batch
  1 (1.22x): more than the multiply-adds say, less than the paper's 1.56x.
- Initialisation (not in the paper): Xavier-uniform (tanh gain), zero biases, and the last (linear)
  de-convolution starts at zero, i.e. the first reconstruction is the mean image. PyTorch's default init
  sizes a transposed convolution by its output channels and starts the 1-channel output layer at std ~2
  against inputs of std ~0.05, which RMSprop at lr 2e-4 takes thousands of steps to undo. The
  discriminator keeps PyTorch's default init (its layers are plain convolutions and linear layers).
- What a short budget scores: since the first reconstruction is the mean image, a model that has hardly
  trained scores like mean-image background subtraction (e_t grows with how much of the frame differs from
  the empty scene), which already ranks Ped2's frames well (its bikes and carts are larger than walkers).
  After one training step at the README's reduced command the frame AUC is 84.4 (micro) after eq. 14 and
  64.3 on the raw e_t: eq. 14, offline because it uses each video's own minimum and maximum, is worth 20
  points to that trivial score. At the same reduced settings 1, 3, 6 and 12 epochs gave 78.9, 76.1, 73.1
  and 75.6 after eq. 14 (76.7 on the raw e_t after 12), while L_rec fell from 118 to 38 (on an earlier
  host; the 1-epoch run gives 78.5 on the README's current one, most likely through its CPU kernels'
  rounding). A trained model has to clear this baseline, not only chance. Two test-time effects on that
  host's 1-epoch model (78.9) are small: the first and last frame of each 16-frame clip reconstruct
  worse (normal test frames: 1.15 and 1.13 times their video's median e_t, against 0.91-1.06 inside the
  clip), a saw-tooth that `--test-stride 8` averages out (80.2); recomputing BatchNorm's running
  statistics over all training clips gives 80.1.
- Discriminator: conv 3x3x3 (1->32), max-pool 2x4x4, conv (32->64), max-pool 2x4x4, conv (64->64), max-pool
  2x4x4, FC (-> 256), FC (-> 1); LeakyReLU(0.2) (the paper names no activation for D); it returns a logit and
  D = sigmoid(logit). The 2x4x4 pools keep the first FC small at 224x224 (64 x 2 x 4 x 4 = 2048 inputs;
  ceil-mode pools, so any input size works).
- Losses: eq. 7 as written, L_rec = squared Euclidean norm of (R(S + eta) - S) over the whole clip, averaged
  over the batch. Eq. 8/10/12 as printed contain sign typos (log D on both terms would train D to say "real"
  to everything); we implement the GAN of Goodfellow et al. [16] that Theorem 3 and the reported loss level
  of 2 ln 2 refer to: L_D = -log D(S) - log(1 - D(R(S + eta))), and for the auto-encoder the adversarial term
  -log D(R(S + eta)). Its gradient, -lambda / D(R) dD/dtheta, is eq. 11's second term with the opposite sign:
  descending eq. 11 as printed would make the reconstructions look less real to D, so we follow the stated
  intent (the generator "aims at reconstructing realistic videos to confuse the discriminator"). Algorithm 1
  updates theta and phi from the same forward pass (simultaneous updates), which is what `train_step` does;
  D sees the real and the reconstructed clips in one call (D has no BatchNorm, so this is exact).
- lambda is not given: default 1 (`--lambda-adv`). With L_rec summed over the clip's pixels this keeps the
  reconstruction term dominant and the adversarial term a regulariser. How much it steers the auto-encoder
  is printed with every epoch: the gradient norms of L_rec and of lambda L_adv on the epoch's last batch.
  In the reduced CPU run on Ped2 (README) the adversarial share was 0.68% at the end of training (13.1
  against 1,920; 0.26% in the same run on an earlier host), with D winning (L_D 0.35): at lambda = 1 the
  adversarial term barely moves the auto-encoder after one epoch. Continued at the same settings (on the
  earlier host), the share was 5-59% at the end of every
  later epoch up to 12, with D still winning (L_D mostly 0.01-0.03 from epoch 5), so the term does steer
  a longer run; the paper's GAN-versus-no-GAN gap (Table V, Ped2: 91.0 against 90.3) is worth checking
  against that share at the paper's budget. The share shrinks with the input size, because L_rec sums over
  every pixel of the clip while L_adv is one number per clip: at initialisation, on two training clips, it
  is 0.0049% at 64x96 and 0.0007% at 224x224. The paper's own training-side check is Fig. 3: its L_adv
  "fluctuate[s] at 2 ln 2" (D confused), which a run at lambda = 1 with D winning does not show; the
  training log's L_D against 2 ln 2 = 1.386 is the thing to read before crediting or blaming lambda.
- Training clips (Hasan et al. [12] augmentation): from every training video, `--clip-len` (16) frame clips
  taking every k-th frame for skip strides k = 1, 2, 3 (`--skip-strides`), starting at every `--train-step`-th
  frame (default 1, i.e. every clip). Epochs (20) and batch size (16) are not in the paper.
- Test clips and aggregation: clips with start step `--test-stride` (default the clip length: the paper's "one
  forward pass", each frame reconstructed once; the last clip of a video is aligned to its end, so the few
  frames in two clips get the mean of both). With a smaller stride every frame lies in several clips and its
  per-pixel squared error is the mean over those clips. e_t is the mean of that per-pixel error over the
  frame. Every frame is scored (no NaN); a video shorter than a clip is padded by repeating its last frame.
- scores.npz holds s_t of eq. 14 (already normalised per video by this script), so eval.py is called with
  normalize="none"; the raw e_t are written next to it in raw_errors.npz. Maps: the per-pixel squared error
  averaged over `--map-pool` x `--map-pool` blocks (default 4: 56x56 maps at 224x224 input) to keep
  scores.npz small; divided by max_t e_t of the video, so that maps of different videos share a scale (a
  map's frame mean is e_t / max_t e_t = s_t + min_t e_t / max_t e_t: the score up to a per-video offset).
  The paper reports no pixel-level results, so the pixel metrics have no figure to compare with.
- `--flow`: a second, independent auto-encoder + discriminator on optical flow (common.load_flows, Farneback),
  encoded as in Ravanbakhsh et al. [11]: three channels dx, dy, magnitude; frame t uses the flow t -> t+1
  (the last frame reuses the previous flow); minus the training mean flow image and divided by the training
  std of each channel. Both streams are trained on the same clips. "Combine" (the paper gives no formula):
  s_t = (s_t^rgb + s_t^flow) / 2, each normalised by eq. 14 first, since raw errors of the two streams have
  unrelated scales; maps likewise (each divided by its stream's max_t e_t, averaged).
- Events (Table X): the paper sets "the appropriate threshold of the anomaly scores" and groups overlapping
  local-maximum regions [12] without giving the threshold or the region width. eval.py's rule is ours: peaks
  of s_t whose persistence is at least 10% of the video's own score range, greedy merging within 50 frames,
  a detection counted when its peak frame lies in a ground-truth event (Hasan et al. span each peak with a
  window and count a region that overlaps an event, so a peak just outside an event that is a false alarm
  here can be a detection in Table X). Being relative to each video, it
  gives every non-constant fully normal video at least one false alarm; compare Table X's counts with that
  in mind.
- `--flow` noise: the same sigma (0.005) is added to the flow stream, whose input is divided by the training
  std of each channel (std up to 1); against the gray stream's input std of ~0.05 that is a ~20x weaker
  corruption. The paper states
  sigma for the gray input only.
- `--flow` with skip strides 2 and 3: the flow of each clip frame is still its own t -> t+1 flow, not the flow
  between consecutive clip frames, so the flow stream does not see the faster apparent motion the skipped
  gray clips show (the paper gives no rule; test clips use stride 1, so training and test agree).
- metrics.json's "run_protocol" string says "paper settings" only when every setting the paper gives is at its
  value (size, clip length, noise, lr, skip strides, test stride); otherwise it starts with "changed from the
  paper:" and names each change; it always lists our choices for what the paper does not give (epochs,
  batch, lambda, widths, clip start step). Test-only runs (`--test` on an existing model.pt) take every
  training setting from the checkpoint and warn when the command line disagrees.

Running on a GPU
----------------
- Training: the whole training split is held on the GPU as uint8 (flow as float16) when it fits in half the
  free memory, and clips are gathered there; the epoch's shuffled order is copied once per epoch, losses are
  summed on the device and checked for NaN/inf every 50 steps and at the end of each epoch (one host sync
  each), not every step.
- `--max-minutes M`: after M minutes training stops at the next step boundary, writes model.pt (weights,
  optimisers, the position within the epoch and the epoch's shuffled order, the RNG states of torch, numpy,
  Python and the shuffling generator), prints the command that continues (`--resume`) and exits without
  testing. Slices resumed this way end with the same weights as one uninterrupted run (bit for bit on CPU).
- Test: all clips of the split stream through batches of one shape (`--test-batch-size`; the last batch is
  padded by repeating its last clip, and the padded rows are dropped), copied to the GPU from reused pinned
  buffers one batch ahead (common.prefetch_to_device); per-frame errors and maps are accumulated and
  averaged on the GPU and copied back once for the whole split. The input statistics (mean image, flow
  std) are moved to the GPU once: a host tensor in the per-batch transform would be a blocking copy. A
  warm-up batch of the same shape runs before the timer, so cuDNN autotuning is not timed. The printed frames/s covers cached frames -> scores.npz (input transfer,
  reconstruction, error maps, eq. 14, writing scores.npz), not model load, warm-up or evaluation.
- Memory: autograd keeps 0.9 GiB per training clip at 224x224 (the 10-layer net with D, counted with
  saved-tensor hooks; 0.64 GiB with `--no-gan`), most of it at full resolution (conv1 and D's first layer,
  whose LeakyReLU runs in place: 1.1 GiB per clip otherwise), so the default batch of 16 holds ~14 GiB of
  activations: an H100 or H200 has room; a 24 GB card has not been tried. On the CPU the peak resident set
  of a training slice on Ped2 was 2.0, 3.4, 6.0 and 22.2 GiB at batches 1, 2, 4 and 16 (1.35 GiB more per
  clip), and 13.9 GiB at batch 16 with `--no-gan`. Before the LeakyReLU ran in place it took 1.5 GiB more
  per clip, and batch 16 needed more than the 24 GiB machine had: the system killed it in its first step.
  `--batch-size 8` halves the activations (the paper gives no batch size). The script prints its peak
  memory when it exits.
- bf16 autocast (`--amp`) stays opt-in: the score is the squared difference of a reconstruction and its input,
  both of order 0.05 after mean subtraction, and bf16's ~0.4% relative precision is of the order of the
  normal-vs-abnormal error gap; it has not been measured to change no metric by more than 0.1 point.
  Without `--amp`, CUDA runs the convolutions in cuDNN's TF32 (PyTorch's default; a 10-bit mantissa, 8x
  finer than bf16's 7 bits), so GPU scores differ from CPU ones by more than fp32 rounding (not measured).
  CUDA's max-unpooling takes bfloat16 only from PyTorch 2.5 on; with an older PyTorch, `--amp` unpools in
  float32.
- `--channels-last` (channels_last_3d) is opt-in as well: it has not been measured on a GPU yet (with one
  input channel and max-pooling indices it may not pay); scores are the same either way (tested on CPU).

Deviations from the paper
-------------------------
- Section III-B says "all 3D convolution kernels are 3x3x3 ... except that the kernel of the first
  convolutional layer is 1x2x2", repeated by the next sentence about pooling. A 1x2x2 stride-1 convolution
  would change the frame size by one pixel and break the symmetric unpooling; we read it as a duplication
  typo and use 3x3x3 everywhere (as C3D, which the sentence cites).
- `--dataset synthetic` defaults (CPU demo, < 3 minutes on 2 cores): 64x96 input (the 120x180 frames'
  aspect), 2 epochs, batch 4, training clip start step 16 (96 clips per epoch), maps pooled by 2 (32x48).
  Real datasets keep the paper's 224x224.

Usage
-----
    python adv3dae.py --dataset synthetic                          # CPU demo: train + test + metrics
    python adv3dae.py --dataset ped2 --data-root ../shared/data    # paper settings (GPU)
    python adv3dae.py --dataset ped2 --data-root ../shared/data --train --max-minutes 8   # one training slice
    python adv3dae.py --dataset ped2 --data-root ../shared/data --train --max-minutes 8 --resume   # the next
    python adv3dae.py --dataset ped2 --data-root ../shared/data --test          # test a trained model.pt
    python adv3dae.py --dataset ped2 --image-size 64 96            # reduced input size (named in metrics.json)
    python adv3dae.py --dataset ped2 --layers 6                    # Table VII shallow net
    python adv3dae.py --dataset ped2 --no-gan                      # Table V ablation
    python adv3dae.py --dataset ped2 --no-noise                    # Table VI ablation
    python adv3dae.py --dataset ped2 --flow                        # Table IX RGB + optical flow
    python adv3dae.py --dataset ped2 --test --amp                  # bf16 test on CUDA (opt-in, see above)
"""

import json
import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import eval as vad_eval

METHOD = "adv3dae"
CLIP_LEN = 16                          # frames per clip (section IV-C; --clip-len)
PAPER_SIZE = (224, 224)                # gray frames resized to 224x224 (section IV-C)
DEFAULT_CHANNELS = (32, 64, 128, 128, 128)   # not in the paper: see the docstring
# Settings a test-only run takes from model.pt (it reports them and builds the net from them).
TRAINING_KEYS = ("image_size", "clip_len", "layers", "channels", "no_gan", "no_noise", "noise_sigma", "lambda_adv",
                 "flow", "flow_method", "epochs", "batch_size", "lr", "train_step", "skip_strides", "protocol_note")
# Settings that fix the shapes of the weights: a --resume must not change them.
ARCHITECTURE_KEYS = ("image_size", "clip_len", "layers", "channels", "no_gan", "flow")
# CUDA's max-unpooling kernels take bfloat16 from PyTorch 2.5 on (the CPU's always did); before that, --amp
# runs the unpooling in float32 and the next de-convolution casts back to bfloat16.
UNPOOL_TAKES_BF16 = tuple(map(int, re.match(r"(\d+)\.(\d+)", torch.__version__).groups())) >= (2, 5)
LOSS_CHECK_EVERY = 50                  # steps between the NaN/inf checks of the summed losses (one host sync)


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
                if x.dtype == torch.bfloat16 and not UNPOOL_TAKES_BF16:
                    x = x.float()                   # --amp on CUDA with PyTorch < 2.5 (see UNPOOL_TAKES_BF16)
                x = self.unpools[i - 1](x, indices, output_size=size)
        return x

    def forward(self, x):
        """R_theta(S + eta) in training mode, R_theta(S) in eval mode."""
        code, switches = self.encode(self.noise(x))
        return self.decode(code, switches)


def conv_macs(in_channels: int, channels, layers: int, clip_len: int, size) -> list:
    """Multiply-adds of every (de)convolution of Adv3DAE for one (clip_len, H, W) clip, in forward order
    [(name, macs)]. A 3x3x3 layer costs 27 C_in C_out per output voxel; de-convolution i runs at the size of
    conv i's output. Pools, BN, tanh and unpooling are not counted (memory-bound, small FLOPs)."""
    num_convs = layers // 2
    widths = (in_channels,) + tuple(int(c) for c in channels)[:num_convs]
    t, h, w = clip_len, size[0], size[1]
    voxels = []
    for i in range(num_convs):
        voxels.append(t * h * w)
        if i == 0:
            h, w = h // 2, w // 2              # pool1 is 1x2x2
        else:
            t, h, w = t // 2, h // 2, w // 2
    encoder = [(f"conv{i + 1}", 27 * widths[i] * widths[i + 1] * voxels[i]) for i in range(num_convs)]
    decoder = [(f"deconv{i + 1}", 27 * widths[i + 1] * widths[i] * voxels[i]) for i in reversed(range(num_convs))]
    return encoder + decoder


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
            # in place: nothing needs the convolution's output again (its backward needs its input), and
            # at full resolution that output is 0.2 GiB per training clip (real and reconstructed)
            blocks += [nn.Conv3d(widths[i], widths[i + 1], 3, stride=1, padding=1), nn.LeakyReLU(0.2, inplace=True),
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


class DeviceSplit:
    """A whole split held on the compute device: the videos concatenated into one tensor (uint8 frames or
    float16 flows) plus each video's offset and length, so a batch of clips is one indexing op there."""

    def __init__(self, videos: list, device):
        self.frames, offsets = common.concat_to_device(videos, device)
        self.offsets = common.to_device(offsets, device)
        self.lengths = common.to_device(np.array([len(v) for v in videos], np.int64), device)

    def gather(self, specs: torch.Tensor, clip_len: int) -> torch.Tensor:
        """specs: (B, 3) int64 (video, start, skip) on the device -> (B, clip_len, ...), clamped like gather_clips."""
        v, start, skip = specs[:, 0], specs[:, 1:2], specs[:, 2:3]
        idx = start + skip * torch.arange(clip_len, device=specs.device)[None]
        idx = torch.minimum(idx, (self.lengths[v] - 1)[:, None]) + self.offsets[v][:, None]
        return self.frames[idx]

    @staticmethod
    def fits(videos: list, device, fraction: float = 0.5) -> bool:
        """True on CUDA when the split takes at most `fraction` of the free device memory."""
        return common.fits_on_device(sum(np.asarray(v[:1]).nbytes * len(v) for v in videos), device, fraction)


class FrameStream:
    """Gray frames -> network input (B, 1, L, H, W): x / 255 minus the training mean image (section IV-C)."""
    name = "rgb"
    in_channels = 1
    CHUNK = 256                                 # frames summed at a time by fit_stats

    def __init__(self, mean_image: torch.Tensor):
        self.mean_image = mean_image            # (H, W) float32 in [0, 1], on the compute device

    @staticmethod
    def fit_stats(train_frames: list) -> dict:
        """The training mean image. Sums uint8 frames exactly in int64, CHUNK frames at a time (a whole
        Avenue video in float64 would be ~0.5 GB)."""
        total, acc = 0, None
        for f in train_frames:
            for i in range(0, len(f), FrameStream.CHUNK):
                s = np.asarray(f[i:i + FrameStream.CHUNK]).sum(0, dtype=np.int64)
                acc = s if acc is None else acc + s
            total += len(f)
        return {"mean_image": torch.from_numpy((acc / total / 255.0).astype(np.float32))}

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: uint8 (B, L, H, W) on the compute device."""
        x = batch.float().div_(255.0).sub_(self.mean_image)
        return x.unsqueeze(1)


class FlowStream:
    """Optical flow -> (B, 3, L, H, W): channels dx, dy, magnitude (Ravanbakhsh et al.'s flow image), minus the
    training mean flow image, divided by the training std of each channel. Frame t uses flow t -> t+1."""
    name = "flow"
    in_channels = 3
    CHUNK = 64                                  # flows accumulated at a time by fit_stats

    def __init__(self, mean_image: torch.Tensor, channel_std: torch.Tensor):
        self.mean_image, self.channel_std = mean_image, channel_std   # (H, W, 3), (3,), on the compute device

    @staticmethod
    def fit_stats(train_flows: list) -> dict:
        n, acc, acc2 = 0, None, np.zeros(3)
        for flows in train_flows:
            for i in range(0, len(flows), FlowStream.CHUNK):
                f = np.asarray(flows[i:i + FlowStream.CHUNK], dtype=np.float64)
                f3 = np.concatenate([f, np.sqrt((f ** 2).sum(-1, keepdims=True))], -1)
                s = f3.sum(0)
                acc = s if acc is None else acc + s
                acc2 += (f3 ** 2).sum((0, 1, 2))
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
        f = (f - self.mean_image) / self.channel_std
        return f.permute(0, 4, 1, 2, 3).contiguous()


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


# ----------------------------------------------------------------------------------------------- training

def build_models(args, in_channels: int, device):
    ae = Adv3DAE(in_channels, args.channels, args.layers, 0.0 if args.no_noise else args.noise_sigma).to(device)
    disc = None if args.no_gan else Discriminator3D(in_channels, args.clip_len, args.image_size).to(device)
    if args.channels_last:
        ae = ae.to(memory_format=torch.channels_last_3d)
        disc = None if disc is None else disc.to(memory_format=torch.channels_last_3d)
    opt_ae = torch.optim.RMSprop(ae.parameters(), lr=args.lr)
    opt_d = None if disc is None else torch.optim.RMSprop(disc.parameters(), lr=args.lr)
    return {"ae": ae, "disc": disc, "opt_ae": opt_ae, "opt_d": opt_d}


def train_step(ae, disc, opt_ae, opt_d, x, lambda_adv: float, amp: bool = False) -> dict:
    """One iteration of Algorithm 1 on the clean clips x: R = R_theta(x + eta) (noise inside ae in train
    mode); theta descends L_R = L_rec + lambda L_adv, phi descends L_D (= ascends eq. 12), both from the same
    forward pass (simultaneous update). D runs once on [x, R] stacked: D has no BatchNorm, so each clip's
    logit is what a separate call gives, and phi's gradient of L_D is the same with or without detaching R
    (only theta's would differ, and L_D is not back-propagated into theta). Returns the losses as detached
    device tensors (no host sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        recon = ae(x)
        loss_rec = reconstruction_loss(recon, x)
        if disc is not None:
            logits = disc(torch.cat([x, recon]))
            real_logits, fake_logits = logits[:len(x)], logits[len(x):]
            loss_adv = adversarial_loss(fake_logits)
            loss_d = discriminator_loss(real_logits, fake_logits)
            loss_r = loss_rec + lambda_adv * loss_adv
        else:
            loss_r = loss_rec
    opt_ae.zero_grad(set_to_none=True)
    loss_r.backward(inputs=list(ae.parameters()), retain_graph=disc is not None)
    if disc is not None:
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward(inputs=list(disc.parameters()))
    opt_ae.step()
    if disc is not None:
        opt_d.step()
    out = {"rec": loss_rec.detach()}
    if disc is not None:
        out.update(adv=loss_adv.detach(), d=loss_d.detach())
    return out


def gradient_norms(ae, disc, x, lambda_adv: float) -> tuple:
    """(||grad_theta L_rec||, ||grad_theta lambda L_adv||) on the batch x: how strongly the adversarial term
    steers the auto-encoder next to the reconstruction term (the question behind Table V's --no-gan row).
    Changes nothing: no update, and BatchNorm's running statistics and the random state are restored."""
    params = [p for p in ae.parameters() if p.requires_grad]
    buffers = [b.clone() for b in ae.buffers()]
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
        recon = ae(x)
        rec_grads = torch.autograd.grad(reconstruction_loss(recon, x), params, retain_graph=True)
        adv_grads = torch.autograd.grad(lambda_adv * adversarial_loss(disc(recon)), params)
    for b, saved in zip(ae.buffers(), buffers):
        b.copy_(saved)
    norm = lambda grads: float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))
    return norm(rec_grads), norm(adv_grads)


def train(args, ds, streams: dict, sources: dict, models: dict, stats: dict, state: dict | None,
          budget: common.TimeBudget, argv) -> tuple:
    """Train every stream (rgb, and flow with --flow) on the same strided clips, from the beginning or from
    the position saved in `state`. Returns (total training seconds, finished): finished is False when the
    --max-minutes budget ran out (the checkpoint then holds the position within the epoch)."""
    num_frames = [len(sources["rgb"][v]) for v in range(len(ds.train))]
    specs = training_clip_specs(num_frames, args.clip_len, args.skip_strides, args.train_step)
    if len(specs) == 0:
        raise common.DataError(f"{ds.root}: no training video has {args.clip_len} frames for a clip")
    device = args.device
    on_device = {n: DeviceSplit(sources[n], device) for n in streams if DeviceSplit.fits(sources[n], device)}
    print(f"training clips: {len(specs)} (skip strides {tuple(args.skip_strides)}, start step {args.train_step}),"
          f" {len(ds.train)} videos, input {args.clip_len}x{args.image_size[0]}x{args.image_size[1]},"
          f" streams {list(streams)}; held on the device: {list(on_device) or 'none (gathered from the frame cache)'}")
    specs_dev = torch.from_numpy(specs).to(device)
    shuffle = np.random.default_rng(args.seed)            # the clip order of every epoch
    start_epoch, start_step, order, previous_time = 0, 0, None, 0.0
    if state is not None:
        common.set_rng_state(state["rng"], {"shuffle": shuffle})
        start_epoch, start_step = state["progress"]["epoch"], state["progress"]["step"]
        order = None if state["order"] is None else state["order"].numpy()
        previous_time = float(state["train_time_s"])
    amp = args.amp and device.type == "cuda"
    for m in models.values():
        m["ae"].train()
        if m["disc"] is not None:
            m["disc"].train()
    monitor = common.LossMonitor(every=LOSS_CHECK_EVERY)
    ckpt_path = os.path.join(args.out, "model.pt")
    t_start = time.time()
    elapsed = lambda: previous_time + time.time() - t_start
    num_batches = -(-len(specs) // args.batch_size)
    last_batch = {}                                        # stream -> the epoch's last input batch
    for epoch in range(start_epoch, args.epochs):
        if order is None:                                  # a resumed epoch keeps the order it was cut in
            order = shuffle.permutation(len(specs))
        order_dev = torch.from_numpy(order).to(device)     # one copy per epoch
        first = start_step if epoch == start_epoch else 0
        t0, rate = time.time(), common.StepRate(device)
        for step in tqdm(range(first, num_batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
            where = f"epoch {epoch + 1} step {step + 1}"
            for name, stream in streams.items():
                if name in on_device:
                    raw = on_device[name].gather(specs_dev[order_dev[rows]], args.clip_len)
                else:
                    raw = common.to_device(gather_clips(sources[name], specs[order[rows]], args.clip_len), device)
                x = to_memory_format(stream.to_input(raw), args.channels_last)
                m = models[name]
                losses = train_step(m["ae"], m["disc"], m["opt_ae"], m["opt_d"], x, args.lambda_adv, amp)
                monitor.add(f"{where} stream {name}", **{f"{name}_{k}": v for k, v in losses.items()})
                last_batch[name] = x
            rate.step_done()
            if budget.expired() and step + 1 < num_batches:
                print(f"training: {rate.rate():.2f} steps/s (batch {args.batch_size} clips of {args.clip_len} "
                      f"frames{', ' + str(len(streams)) + ' streams' if len(streams) > 1 else ''})")
                monitor.check(where)                       # never save non-finite weights
                save_model(args, models, stats, {"epoch": epoch, "step": step + 1}, order, shuffle, elapsed())
                common.report_time_stop(__file__, argv, ckpt_path, f"epoch {epoch + 1} step {step + 1}/{num_batches}",
                                        budget)
                return elapsed(), False
        steps_per_s = rate.rate()
        means = monitor.means(f"end of epoch {epoch + 1}")
        summary = "  ".join(f"L_{k}={v:.5g}" for k, v in means.items())
        for name, x in last_batch.items():      # one extra forward/backward per epoch and stream
            if models[name]["disc"] is not None:
                rec, adv = gradient_norms(models[name]["ae"], models[name]["disc"], x, args.lambda_adv)
                summary += f"  {name} |grad L_rec| {rec:.3g} |grad lambda L_adv| {adv:.3g} (ratio {adv / max(rec, 1e-30):.2g})"
        last_batch.clear()
        print(f"epoch {epoch + 1}/{args.epochs}  {summary}  ({time.time() - t0:.1f}s, steps {first + 1}-{num_batches}"
              f" of {num_batches}, {steps_per_s:.2f} steps/s, {len(specs)} clips)")
        order = None
        save_model(args, models, stats, {"epoch": epoch + 1, "step": 0}, None, shuffle, elapsed())
        if budget.expired() and epoch + 1 < args.epochs:
            common.report_time_stop(__file__, argv, ckpt_path, f"end of epoch {epoch + 1}/{args.epochs}", budget)
            return elapsed(), False
    return elapsed(), True


def save_model(args, models: dict, stats: dict, progress: dict, order, shuffle, train_time_s: float) -> None:
    """model.pt (atomic): weights, optimisers, where training stands (`progress`: the next epoch and step;
    `order`: the clip order of the epoch in progress), the RNG states and the settings."""
    state = {"progress": progress, "order": None if order is None else torch.from_numpy(np.asarray(order)),
             "rng": common.get_rng_state({"shuffle": shuffle}), "args": common.args_to_dict(args), "stats": stats,
             "train_time_s": float(train_time_s), "streams": {}}
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
    """Reconstruct every test clip and return, per video, e (T,) = mean per-pixel squared error of each frame
    averaged over the clips containing it (eq. 13), and the per-pixel squared error map pooled by `--map-pool`
    (T, H/p, W/p), same averaging. The clips of all videos stream through batches of exactly
    `--test-batch-size` clips (the last one padded by repeating its last clip; padded rows are dropped before
    accumulation); sums are kept on the device and copied back once."""
    device, clip_len, batch, p = args.device, args.clip_len, args.test_batch_size, args.map_pool
    ae.eval()
    amp = args.amp and device.type == "cuda"
    clips = np.array([(v, s, 1) for v, t in enumerate(num_frames) for s in test_clip_starts(t, clip_len, args.test_stride)],
                     dtype=np.int64).reshape(-1, 3)
    lengths = np.asarray(num_frames, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # global frame index of every clip position (short videos: padding positions -> their last frame)
    frame_index = np.minimum(clip_frame_indices(clips, clip_len), lengths[clips[:, 0], None] - 1) \
        + offsets[clips[:, 0], None]
    count = common.to_device(np.bincount(frame_index.ravel(), minlength=int(lengths.sum())).astype(np.float32), device)
    frame_index_dev = common.to_device(frame_index, device)
    h, w = args.image_size
    err_sum = torch.zeros(int(lengths.sum()), device=device)
    map_sum = torch.zeros((int(lengths.sum()), h // p, w // p), device=device)

    def host_batches():
        for i in range(0, len(clips), batch):
            yield common.pad_batch(gather_clips(sources, clips[i:i + batch], clip_len), batch)[0]

    starts = range(0, len(clips), batch)
    for i, raw in tqdm(zip(starts, common.prefetch_to_device(host_batches(), device)), total=len(starts),
                       desc=desc, leave=False):
        n = min(batch, len(clips) - i)                                  # real (unpadded) clips in this batch
        x = to_memory_format(stream.to_input(raw), args.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            recon = ae(x)
        sq = (recon.float() - x).pow(2).mean(1)[:n]                     # (n, L, H, W), mean over channels
        frame_err = sq.mean((2, 3))                                     # (n, L): e_t within each clip
        pooled = F.avg_pool2d(sq.reshape(n * clip_len, 1, h, w), p).reshape(n, clip_len, h // p, w // p) \
            if p > 1 else sq
        idx = frame_index_dev[i:i + n].flatten()
        err_sum.index_add_(0, idx, frame_err.flatten())
        map_sum.index_add_(0, idx, pooled.flatten(0, 1))
    # averages over the clips holding each frame, on the device; then the one host sync
    err_all = (err_sum / count).cpu().numpy()
    map_all = (map_sum / count[:, None, None]).cpu().numpy()
    errors = [err_all[o:o + t].astype(np.float32) for o, t in zip(offsets, lengths)]
    maps = [map_all[o:o + t].astype(np.float32) for o, t in zip(offsets, lengths)]
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

def build_arg_parser():
    parser = common.build_parser(METHOD, __doc__.splitlines()[0])
    parser.add_argument("--clip-len", type=int, default=CLIP_LEN,
                        help="frames per clip (paper 16); a multiple of 8 for 10 layers, of 2 for 6")
    parser.add_argument("--layers", type=int, choices=(10, 6), default=10,
                        help="10 (Fig. 2) or 6 (Table VII: conv4, conv5 and their decoder layers removed)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                        help="encoder conv widths (not in the paper; default 32 64 128 128 128)")
    parser.add_argument("--noise-sigma", type=float, default=0.005, help="training input noise std (paper 0.005)")
    parser.add_argument("--no-noise", action="store_true", help="Table VI ablation: no input noise")
    parser.add_argument("--no-gan", action="store_true", help="Table V ablation: no discriminator / L_adv")
    parser.add_argument("--lambda-adv", type=float, default=1.0, help="lambda of eq. 9 (not in the paper)")
    parser.add_argument("--flow", action="store_true", help="Table IX: add an optical-flow auto-encoder")
    parser.add_argument("--flow-method", default="farneback", help="common.load_flows method")
    parser.add_argument("--skip-strides", type=int, nargs="+", default=None, metavar="K",
                        help="Hasan et al.'s temporal skip strides for training clips (default 1 2 3)")
    parser.add_argument("--train-step", type=int, default=None,
                        help="start step between training clips (default 1; 16 for synthetic)")
    parser.add_argument("--test-stride", type=int, default=None,
                        help="start step between test clips (default the clip length); smaller averages overlapping clips")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="clips per test batch, every batch this shape (default 64 on CUDA, 8 on CPU)")
    parser.add_argument("--map-pool", type=int, default=None,
                        help="average-pool factor of the error maps (default 4; 2 for synthetic)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last_3d memory format for the nets and inputs (opt-in, see the docstring)")
    parser.add_argument("--protocol-note", default="",
                        help="free text appended to metrics.json's protocol (e.g. why a setting is reduced)")
    return parser


def fill_defaults(args) -> None:
    """Script defaults (the paper's on real data, the CPU demo's on synthetic) for what is still unset, then
    the shape checks (after a test-only run has taken the architecture from the checkpoint)."""
    synthetic = args.dataset == "synthetic"
    args.image_size = tuple(args.image_size) if args.image_size else ((64, 96) if synthetic else PAPER_SIZE)
    args.channels = tuple(args.channels) if args.channels else DEFAULT_CHANNELS
    args.skip_strides = tuple(args.skip_strides) if args.skip_strides else (1, 2, 3)
    args.epochs = args.epochs if args.epochs is not None else (2 if synthetic else 20)
    args.batch_size = args.batch_size if args.batch_size is not None else (4 if synthetic else 16)
    args.lr = args.lr if args.lr is not None else 2e-4
    args.train_step = args.train_step if args.train_step is not None else (16 if synthetic else 1)
    args.test_stride = args.test_stride if args.test_stride is not None else args.clip_len
    args.map_pool = args.map_pool if args.map_pool is not None else (2 if synthetic else 4)
    args.test_batch_size = args.test_batch_size or (64 if args.device.type == "cuda" else 8)
    num_convs = args.layers // 2
    spatial, temporal = 2 ** (num_convs - 1), 2 ** (num_convs - 2)      # pool1 is 1x2x2, the others 2x2x2
    h, w = args.image_size
    if h % spatial or w % spatial or h % args.map_pool or w % args.map_pool:
        raise common.DataError(f"--image-size {h} {w}: H and W must be divisible by {spatial} ({args.layers} layers:"
                               f" {num_convs - 1} pools) and by --map-pool {args.map_pool}")
    if args.clip_len < temporal or args.clip_len % temporal:
        raise common.DataError(f"--clip-len {args.clip_len}: must be a multiple of {temporal} ({args.layers} layers:"
                               f" {num_convs - 2} temporal 2x pools)")
    if len(args.channels) < num_convs or min(args.channels) < 1:
        raise common.DataError(f"--channels {' '.join(map(str, args.channels))}: {args.layers} layers need"
                               f" {num_convs} positive widths")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--train-step", args.train_step),
                        ("--test-stride", args.test_stride), ("--test-batch-size", args.test_batch_size),
                        ("--map-pool", args.map_pool), ("--skip-strides", min(args.skip_strides))):
        if value < 1:
            raise common.DataError(f"{flag} {value}: expected a positive integer")
    if args.test_stride > args.clip_len:
        raise common.DataError(f"--test-stride {args.test_stride}: at most --clip-len {args.clip_len}, or frames "
                               f"between clips would have no reconstruction")


def protocol_label(args, stream_names: list, normalize: str, smooth: str) -> str:
    """metrics.json's protocol: "paper settings" only when every setting the paper gives is the paper's value,
    else the list of changes; then our choices for what the paper leaves open, and the variant."""
    changes = []
    if tuple(args.image_size) != PAPER_SIZE:
        changes.append(f"input {args.image_size[0]}x{args.image_size[1]} (paper 224x224)")
    if args.clip_len != CLIP_LEN:
        changes.append(f"{args.clip_len}-frame clips (paper 16)")
    if not args.no_noise and args.noise_sigma != 0.005:
        changes.append(f"noise sigma {args.noise_sigma} (paper 0.005)")
    if args.lr != 2e-4:
        changes.append(f"lr {args.lr} (paper 2e-4)")
    if tuple(args.skip_strides) != (1, 2, 3):
        changes.append(f"skip strides {tuple(args.skip_strides)} (Hasan et al.: 1, 2, 3)")
    if args.test_stride != args.clip_len:
        changes.append(f"test stride {args.test_stride}, overlapping clips averaged (paper: one pass)")
    if args.amp and args.device.type == "cuda":
        changes.append("bf16 autocast")
    head = ("paper settings" if not changes else "changed from the paper: " + ", ".join(changes))
    variant = [f"{args.layers} layers" + (" (Table VII)" if args.layers == 6 else ""),
               "no GAN (Table V ablation)" if args.no_gan else "GAN",
               "no noise (Table VI ablation)" if args.no_noise else f"noise {args.noise_sigma}",
               "streams " + "+".join(stream_names) + (" (Table IX)" if "flow" in stream_names else "")]
    ours = (f"our choices (not in the paper): {args.epochs} epochs, batch {args.batch_size},"
            f" {'' if args.no_gan else f'lambda {args.lambda_adv}, '}widths {tuple(args.channels)[:args.layers // 2]},"
            f" training clip start step {args.train_step}")
    label = (f"adv3dae {head}; {', '.join(variant)}; {ours}; scores eq. 14 per video in scores.npz,"
             f" eval normalize={normalize} smooth={smooth}, events window 50")
    if args.protocol_note:
        label += "; " + args.protocol_note
    return label


def main(argv=None):
    parser = build_arg_parser()
    args = common.parse_args(parser, argv)
    budget = common.TimeBudget(args.max_minutes)
    ckpt_path = os.path.join(args.out, "model.pt")
    state = None
    if not args.train:     # test only: every training setting (and the architecture) comes from the checkpoint
        state = common.load_checkpoint(ckpt_path, method=args.method)
        saved = dict(state["args"])
        if "image_size" not in saved and "size" in saved:              # checkpoints from before --image-size
            saved["image_size"] = saved["size"]
        common.restore_training_args(args, parser, saved, TRAINING_KEYS)
    elif args.resume:
        state = common.resume_checkpoint(ckpt_path, True, method=args.method)
        if state is not None and "progress" not in state:
            raise common.DataError(f"{ckpt_path}: written by an older adv3dae.py without the training position;"
                                   f" it can be tested (--test) but not resumed")
    fill_defaults(args)
    if args.train and state is not None:
        for key in ARCHITECTURE_KEYS:
            saved = state["args"].get(key)
            saved = tuple(saved) if isinstance(saved, list) else saved
            if saved != getattr(args, key):
                raise common.DataError(f"{ckpt_path}: trained with --{key.replace('_', '-')} {saved}, the command line"
                                       f" gives {getattr(args, key)}; --resume needs the same settings")
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(f"{METHOD}: {json.dumps(ds.summary())}")
    stream_names = ["rgb"] + (["flow"] if args.flow else [])
    models = {n: build_models(args, 1 if n == "rgb" else 3, args.device) for n in stream_names}

    # ------------------------------------------------------------------ train
    if args.train:
        train_frames = list(common.load_split_frames(ds, "train", args.image_size, gray=True,
                                                     cache_dir=args.cache_dir).values())
        sources = {"rgb": train_frames}
        if state is not None:
            load_model(models, state, with_optim=True)
            stats = state["stats"]
            print(f"resumed from {ckpt_path} at epoch {state['progress']['epoch'] + 1} step"
                  f" {state['progress']['step'] + 1}")
        else:
            stats = FrameStream.fit_stats(train_frames)
        if args.flow:
            sources["flow"] = list(common.load_split_flows(ds, "train", args.image_size, args.flow_method,
                                                           cache_dir=args.cache_dir, workers=args.workers).values())
            if "flow_mean_image" not in stats:
                stats.update(FlowStream.fit_stats(sources["flow"]))
        streams = make_streams(stream_names, stats, args.device)
        if state is not None and state["progress"]["epoch"] >= args.epochs:
            print(f"checkpoint already at epoch {state['progress']['epoch']}/{args.epochs}: nothing to train")
            train_time = float(state["train_time_s"])
        else:
            train_time, finished = train(args, ds, streams, sources, models, stats, state, budget, argv)
            if not finished:
                return None                                 # a time-boxed slice: no test
            print(f"training done in {train_time:.1f}s -> {ckpt_path}")
    else:
        load_model(models, state, with_optim=False)
        stats = state["stats"]
        train_time = state.get("train_time_s")

    # ------------------------------------------------------------------ test
    if not args.test:
        return None
    streams = make_streams(stream_names, stats, args.device)
    test_sources = {"rgb": list(common.load_split_frames(ds, "test", args.image_size, gray=True,
                                                         cache_dir=args.cache_dir).values())}
    if args.flow:
        test_sources["flow"] = list(common.load_split_flows(ds, "test", args.image_size, args.flow_method,
                                                            cache_dir=args.cache_dir, workers=args.workers).values())
    num_frames = [v.num_frames for v in ds.test]
    for name in stream_names:        # warm-up, one batch of the timed shape (cuDNN autotuning, lazy init): not timed
        score_videos(models[name]["ae"], streams[name], test_sources[name][:1], [min(num_frames[0], args.clip_len)],
                     args, desc="warm-up")
    common.synchronize(args.device)
    t0 = time.time()
    errors, maps = {}, {}
    for name in stream_names:
        errors[name], maps[name] = score_videos(models[name]["ae"], streams[name], test_sources[name], num_frames,
                                                args, desc=f"test {name}")
    scores, out_maps = combine_streams(errors, maps, len(ds.test))
    names = [v.name for v in ds.test]
    # the paper's protocol: eq. 14 is already applied here, so eval adds nothing (--normalize/--smooth override)
    normalize, smooth = args.normalize or "none", args.smooth or "none"
    protocol = protocol_label(args, stream_names, normalize, smooth)
    meta = {"method": METHOD, "dataset": ds.name, "protocol": {"normalize": normalize, "smooth": smooth},
            "scores": "s_t of eq. 14, (e_t - min e) / max e per video (already normalised by adv3dae.py)"
                      + ("; mean of the rgb and flow streams' s_t" if args.flow else ""),
            "run_protocol": protocol, "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), dict(zip(names, scores)), dict(zip(names, out_maps)),
                        meta)
    test_time = time.time() - t0
    total_frames = sum(num_frames)
    fps = total_frames / max(test_time, 1e-9)
    print(f"test: {total_frames} frames in {test_time:.2f}s = {fps:.1f} frames/s (cached frames -> scores.npz:"
          f" transfer, reconstruction, errors, eq. 14, writing; not model load or warm-up; {args.device},"
          f" {'+'.join(stream_names)}, test stride {args.test_stride}, batches of {args.test_batch_size} clips)")
    np.savez(os.path.join(args.out, "raw_errors.npz"),
             **{f"{n}/{name}": errors[n][i] for n in errors for i, name in enumerate(names)})
    extra = {"train_time_s": train_time, "test_fps": fps, "run_protocol": protocol, "device": str(args.device),
             "peak_memory_gib": common.peak_memory()}
    return vad_eval.evaluate_run(args.out, ds, normalize=normalize, smooth=smooth, extra=extra)


def make_streams(names, stats: dict, device) -> dict:
    """The input transforms, their statistics moved to `device` once: a host tensor in a per-batch expression
    would be a blocking copy, i.e. a GPU sync, on every step and every test batch."""
    streams = {"rgb": FrameStream(stats["mean_image"].to(device))}
    if "flow" in names:
        streams["flow"] = FlowStream(stats["flow_mean_image"].to(device), stats["flow_channel_std"].to(device))
    return streams


if __name__ == "__main__":
    common.run_main(main, report_memory=True)
