"""STAN: spatio-temporal adversarial networks for abnormal event detection (Lee et al., ICASSP 2018).

Citation
    Sangmin Lee, Hak Gu Kim, Yong Man Ro. "STAN: Spatio-temporal adversarial networks for abnormal
    event detection." IEEE International Conference on Acoustics, Speech and Signal Processing
    (ICASSP), 2018. arXiv:1804.08381.

What the method does
    A generator G synthesises the middle frame X_t of an 11-frame window from its 10 neighbours:
    a per-frame spatial encoder (4 convolutions, 224x224 -> 28x28x128), a forward ConvLSTM (64) run over
    frames t-5 .. t-1, a backward ConvLSTM (64) run over t+5 .. t+1, their final hidden and cell states
    concatenated pairwise (128) into a combined ConvLSTM (128), and a spatial decoder (4 transposed
    convolutions, tanh). A 3D-convolutional discriminator D sees the whole 11-frame sequence and outputs a
    7x7 map of "real" probabilities (sigmoid). The fake sequence is the real one with X_t replaced by
    G's output. Training on normal videos only: G is first pre-trained on the pixel loss, then G and D
    are trained alternately (one D step, then one G step, on every batch) with
        L_G = -log D(S^_t) + lambda ||G(...) - X_t||^2          (lambda = 1, eq. 1-3)
        L_D = -log(1 - D(S^_t)) - log D(S_t)                    (eq. 4)
    At test time, per frame (eq. 5, 6)
        l_s(t) = ||G(...) - X_t||^2 - lambda_s log D(S_t),
        lambda_s = (max of the first term / max of the second term) / 10,
        s(t) = (l_s(t) - min_t l_s) / (max_t l_s - min_t l_s) per video.
    All three detectors of Table 2 (g: the pixel term alone, d: the discriminator term alone, gd: eq. 5)
    are evaluated on every test run and recorded under "detectors" in metrics.json; `--detector` picks
    the one written to scores.npz and reported at the top level. Event-level counts (Table 3: detected
    events / false alarms) are eval.py's, under "events". Localization (section 3.4): the pixel-loss map
    (G - X)^2 is the anomaly map in scores.npz, and guided backpropagation of D's output to the input
    sequence is drawn, with the real frame, the generated frame and the pixel-loss map, in PNG panels like
    Fig. 3 for the `--num-panels` frames with the highest abnormality loss.

Training schedule: what the paper gives and what is ours
    The paper gives Adam, lr 2e-4, batch 3, lambda = 1, and the order "first only the generator on the
    pixel loss, then G and D alternately". It gives no epoch or iteration counts for either phase, no
    stopping rule and no Adam betas. Our choices: 10 pixel-loss epochs (`--pretrain-epochs`) then 20
    alternating epochs (`--epochs`), one epoch = one pass over every training window in a fresh random
    order (Ped2: 2,390 windows, 796 steps of batch 3), torch's Adam betas (0.9, 0.999). What the schedule
    implies: D starts from scratch against an already pre-trained G, and a fake sequence differs from
    the real one in one frame of eleven, the generated one, which is smoother than a real frame. D can
    learn that cue fast, so L_D may fall towards 0 early in the alternating phase while the realism loss
    climbs; because the pixel term (a sum over all pixels) is much larger than the realism term, G then
    keeps improving on the pixel loss and the discriminator term of eq. 5 carries little information
    beyond "this frame is blurry". The longer the pre-training, the sharper G's frames when D starts and
    the later that happens. Every epoch's mean pixel loss, realism loss, L_D and D's mean probability on
    real and on fake sequences are printed and kept in `train_log.json` and metrics.json
    ("train_history"), so a collapse is visible. The run's "run_protocol" string (metrics.json) calls these settings
    "paper settings with our epoch counts" and names every other setting that is not the paper's.

Deviations (from the paper, with reasons)
    - The paper does not say what the combined ConvLSTM receives besides the pairwise-concatenated states.
      We run it for one step with ([h_fwd, h_bwd], [c_fwd, c_bwd]) as its initial state and the
      concatenated hidden state [h_fwd, h_bwd] as its input; its output hidden state is the latent
      feature of the inter-frame.
    - ConvLSTM cells are the standard ones (sigmoid gates, tanh cell/output non-linearities) without the
      peephole terms of Shi et al. 2015; "ELU everywhere else" is applied to all convolutions outside the
      ConvLSTMs (encoder, decoder except the last tanh layer, discriminator except the last sigmoid layer).
      Zero initial states.
    - ||.||^2 is the squared L2 norm summed over the pixels of the frame (inputs in [-1, 1]). This is our
      reading: the paper's text cannot tell a subscript 2 from a square; the squared norm is the usual
      pixel loss of frame prediction. The plain norm would weigh the pixel term differently against the
      realism term in training and, through eq. 6's per-video min-max, move the micro AUC of g and gd
      (measured at test only, on the G of the 96x96 probes below: g 75.2% squared, 76.3% plain norm).
    - Choices the paper leaves open: PyTorch's default weight initialisation; "same" spatial padding (k//2)
      and output_padding 1 on the stride-2 de-convolutions, so the decoder doubles the size exactly; every
      frame resized (INTER_AREA) to the 224x224 square of Table 1, which stretches non-square frames (Ped2
      is 360x240); an epoch is len(windows) // batch steps (the last incomplete batch is dropped); on CUDA
      convolutions and matrix products run in TF32 (cuDNN's default for convolutions; TF32 matrix
      products are turned on as well, the ConvLSTM gates being convolutions, so this changes little).
      -log D(.) on the 7x7 probability map is summed over the map, the local adversarial loss of
      Shrivastava et al. 2017 that the paper cites (the sum of the per-patch cross-entropies); the same
      sum is eq. 5's discriminator term at test time (the lambda_s rule divides by its maximum, so the
      gd and d detectors do not depend on sum versus mean). Losses are averaged over the batch instead of
      summed (only a constant factor for Adam). The sigmoid is folded into the losses (log-sigmoid /
      softplus on D's logits), which is the same function, computed stably.
    - lambda_s: the paper's rule, with both maxima taken over every window of the training split, scored
      by the final model at the end of training and stored in model.pt (the paper does not name the
      split; nothing may be fitted on test data). `--lambda-s-split test` takes them over the test split
      instead (uses no labels, but is recorded as such in the protocol); `--lambda-s VALUE` fixes it.
      Each maximum is one window out of ~2,400, so one outlier sets it. Measured at 96x96 with a D that
      wins (G frozen, D trained alone until D(fake) ~ 1e-4): on the training windows -log D(S) peaks
      at 2.08 (99th percentile 0.12), on the normal test frames at 0.38, while the pixel term's maxima are
      alike (45.4 / 47.0); lambda_s is then 2.19 from the training windows against 21.7 by the same rule
      on the test split, lambda_s * d holds 0-4% of g's spread within each test video, and gd equals g to
      0.1 point. With D at chance both splits give the same frame AUC.
    - The anomaly map stored in scores.npz is the pixel-loss map average-pooled by `--map-pool` (default
      4, i.e. 56x56 for 224 input) to keep scores.npz small; eval.py upsamples it. The first and last 5
      frames of each video have no full window: their frame scores are NaN (eval.py fills them from the
      nearest scored frame) and their maps copy the nearest scored frame's map.
    - Panels: the `--num-panels` frames with the highest raw abnormality loss of the chosen detector
      (at most one per video, chosen without labels). The discriminator map is |guided-backprop gradient|
      of D's summed output activation taken before the sigmoid (a confident D saturates the sigmoid,
      which would zero every gradient) with respect to the middle frame of the input sequence: the
      paper's "gradients of activation at the output of the discriminator", i.e. of D's evidence for
      "real". Through ELU, guided backprop passes only positive gradients, multiplied by ELU's own
      derivative (which scales units with negative input by exp(x) where the ReLU rule would zero them),
      so the sign it starts from matters: the map of the abnormality term -log D(S) would be
      another map, not the negated one.
    - Synthetic data (`--dataset synthetic`, a CPU demo, not a paper setting): 64x64 input (so the
      encoder's latent is 8x8 and D's map 2x2 instead of 28x28 and 7x7), 3 pre-training + 1 adversarial
      epochs of 40 steps each, batch 3. The architecture is unchanged.
    - Real UCSD Ped2 on a 2-core CPU can only run a reduced protocol (smaller input, fewer steps); such
      runs name every setting that is not the paper's in the "run_protocol" string of metrics.json. At
      96x96 with 4 pixel-loss epochs of 600 steps, then alternating epochs of 600 steps: after 1 of them
      frame AUC 75.8% (g 75.9%, d 54.9%), EER 30.3%; after 4, 80.6% (g 80.5%, d 61.7%), EER 27.9%
      (80.5%, g 80.5%, d 61.0%, EER 28.1% on another host, most likely through its CPU kernels' rounding).
      D did not collapse (the synthetic data's failure: L_D near 0 within an epoch). On Ped2 it stayed at
      chance instead: L_D = 2 log 2 per map cell in every epoch, mean D(real) / D(fake) 0.507 / 0.494
      after the first and 0.500 / 0.499 (0.500 / 0.500 on the other host) after the fourth, while the
      pixel loss kept falling (22.9 -> 16.7).
      Yet -log D(S_t) of the real test sequences ranks frames above chance (d 61.7%), so D's term holds
      some information. The paper's d row (86.2% on Ped2) implies a D far from chance at 224x224 and
      the paper's (unstated) number of alternating epochs.
      Two probes from one G pre-trained by the same command with `--epochs 0` (4 x 600 pixel-loss steps:
      g 75.2%; a fresh D's d 55.4%), each 1,200 steps at the paper's Adam 2e-4 and batch 3, with a D
      initialisation and batch order other than the run's (probe code, not a flag of this script):
      (1) G frozen, D trained alone: D separates real from fake at once (94% of map cells right over
      the first 100 steps, 99.5% over the next 100, D(fake) ~1e-4 from step 900), so the one generated
      frame in eleven is an easy cue; its d detector then scores 65.8%. (2) Alternating, as the paper:
      D stayed at chance for ~250 steps, then G's pixel loss jumped from 25 to 74, D won (at step
      1,200 L_D 0.13, D(real) / D(fake) 0.994 / 0.006) and the pixel loss stayed near 38, the collapse
      of the synthetic data: d 68.7%, g 74.3%. So whether D wins or stays at chance differs between
      runs of the same schedule, and at 96x96 neither a winning D nor one at chance comes near the
      paper's d row (61.7-68.7% against 86.2%).
      What holds D at chance is G's realism term, not a broken D step (a third probe: a G after 800
      pixel-loss steps, one D initialisation and one batch order, 300 steps of `adversarial_step` each):
      alternating as the paper does, each D step widens the mean real-fake logit gap on its batch to
      about +0.5 and the G step after it brings it back to about +0.25, so L_D stays at 1.25-1.33 per
      map cell (2 log 2 = 1.39) and D(real) / D(fake) near 0.53 / 0.47; with the realism term's weight
      in G's loss set to 0 and nothing else changed, D separates within 50 steps (D(real) / D(fake)
      0.947 / 0.055, then 1.000 / 0.000 from step 100). One G step on the realism term alone moves every
      G tensor and lifts D(fake) (0.42 -> 0.57 against a D trained for 20 steps), so its gradient
      reaches G; against a fresh D it is small next to the pixel term's (norm 0.11 against 168), but Adam
      scales each coordinate by its own gradient history, so a small gradient that keeps its sign moves G
      as far per step as a large one: the norm ratio does not bound what the realism term does.

Test path (the scores are those of the per-window computation above, to float rounding; on CUDA, to
TF32 rounding, about 1e-3 relative, since the rewrites sum convolutions in another order)
    Three exact rewrites avoid recomputing what neighbouring windows share; tests check each against the
    straightforward per-window computation:
    - D has temporal stride 1 and no temporal padding, so D run once over L consecutive frames gives the
      outputs of all L - 10 windows in them (one pass per chunk instead of one per window);
    - the x-part of each ConvLSTM gate convolution (conv over [x, h] = conv_x(x) + conv_h(h)) depends on
      one frame only and is computed once per frame, the h-part per window (zero at the first step);
    - the combined cell's input equals its hidden state, so its convolution over [h, h] is one
      convolution with the two weight halves summed.
    The split's videos, laid end to end, are scored in chunks of `--test-batch-size` windows (that many
    + 10 frames); windows that straddle two videos are computed and dropped (10 per boundary), and only
    the split's last chunk is padded, by repeating the last frame, so every batch has one shape. (Padding
    each video's last chunk instead would waste 38% of the work on Ped2's 120-180-frame videos at 256
    windows a chunk.) Chunks are copied to the device through reused pinned buffers one chunk ahead
    (common.prefetch_to_device); results stay on the device until one copy back for the split. A warm-up
    chunk runs before the timer (cuDNN autotuning is not timed).
    The printed frames/s covers cached frames -> scores.npz (reading the frame cache, scoring, lambda_s,
    writing scores.npz), not model loading, warm-up or evaluation. bf16 autocast (`--amp`) stays opt-in
    on CUDA: its effect on the metrics is not measured. channels_last is not used (not measured either).

Time-boxed training
    `--max-minutes M` stops at the next step boundary after M minutes, saves model.pt (weights, both Adam
    states, epoch and step within it, RNG states, the epoch's loss sums) atomically, prints the command
    that continues (the same one with `--resume`) and exits without testing. The batch order of an epoch
    is a permutation drawn from (seed, epoch), so a resumed run sees the same batches: slices end with
    the same weights as one uninterrupted run (bit for bit on the CPU).

Usage
    python stan.py --dataset synthetic                       # CPU demo, trains + tests in < 3 minutes
    python stan.py --dataset ped2 --data-root ../shared/data --train --test
    python stan.py --dataset ped2 --train --max-minutes 10   # a training slice; repeat with --resume
    python stan.py --dataset ped2 --test --detector d        # report the discriminator-only row on top
    python stan.py --dataset ped2 --test --num-panels 8      # Fig. 3-like localization panels
    python eval.py runs/stan/ped2                            # metrics table from scores.npz
    OMP_NUM_THREADS=1 python stan.py ...                     # often faster on a CPU shared with other jobs
"""
import json
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

# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

NEIGHBOURS = 5                               # frames on each side of the generated inter-frame
SEQUENCE_LENGTH = 2 * NEIGHBOURS + 1         # 11 frames seen by the discriminator
MIDDLE = NEIGHBOURS                          # position of X_t inside a window
# Positions inside an 11-frame window, in the order each ConvLSTM consumes them: the forward one reads
# t-5, ..., t-1 and the backward one t+5, ..., t+1, so both end next to the missing frame.
FORWARD_POSITIONS = list(range(0, NEIGHBOURS))                                # [0, 1, 2, 3, 4]
BACKWARD_POSITIONS = list(range(SEQUENCE_LENGTH - 1, NEIGHBOURS, -1))         # [10, 9, 8, 7, 6]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step (Shi et al. 2015, no peepholes): all four gates from one 3x3 convolution of [x, h]."""

    def __init__(self, in_channels, hidden_channels, kernel_size=3):
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)

    def zero_state(self, x):
        shape = (x.shape[0], self.hidden_channels, x.shape[2], x.shape[3])
        return x.new_zeros(shape), x.new_zeros(shape)

    def update(self, gates, c):
        """The LSTM update from the gate pre-activations (input, forget, output, candidate) and the old cell."""
        input_gate, forget_gate, output_gate, candidate = gates.chunk(4, 1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * torch.tanh(candidate)
        h = torch.sigmoid(output_gate) * torch.tanh(c)
        return h, c

    def forward(self, x, state):
        h, c = state
        return self.update(self.gates(torch.cat([x, h], 1)), c)

    # Exact rewrites of forward() used by the test path. The gate convolution is linear in its input, so
    # conv([x, h], W) + b = conv(x, W_x) + b + conv(h, W_h) with W split along its input channels.
    def input_part(self, x):
        """conv(x, W_x) + b: the part of the gates that depends on the input frame only."""
        weight = self.gates.weight[:, :self.in_channels].contiguous()
        return F.conv2d(x, weight, self.gates.bias, padding=self.gates.padding)

    def recurrent_part(self, h):
        """conv(h, W_h): the part of the gates that depends on the hidden state."""
        weight = self.gates.weight[:, self.in_channels:].contiguous()
        return F.conv2d(h, weight, None, padding=self.gates.padding)

    def forward_same_input(self, h, c):
        """forward(h, (h, c)): with the input equal to the hidden state, conv([h, h], [W_x, W_h]) is one
        convolution of h with W_x + W_h."""
        weight = self.gates.weight[:, :self.in_channels] + self.gates.weight[:, self.in_channels:]
        return self.update(F.conv2d(h, weight, self.gates.bias, padding=self.gates.padding), c)


class Generator(nn.Module):
    """Table 1, left: spatial encoder -> bidirectional ConvLSTM -> combined ConvLSTM -> spatial decoder."""

    def __init__(self):
        super().__init__()
        # (in, out, kernel, stride): 224 -> 112x16 -> 56x32 -> 28x64 -> 28x128
        self.encoder = nn.ModuleList([
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.Conv2d(16, 32, 5, stride=2, padding=2),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Conv2d(64, 128, 3, stride=1, padding=1),
        ])
        self.forward_cell = ConvLSTMCell(128, 64)
        self.backward_cell = ConvLSTMCell(128, 64)
        self.combined_cell = ConvLSTMCell(128, 128)
        # 28x128 -> 28x64 -> 56x32 -> 112x16 -> 224x1 (output_padding makes stride-2 layers double exactly)
        self.decoder = nn.ModuleList([
            nn.ConvTranspose2d(128, 64, 3, stride=1, padding=1),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1),
            nn.ConvTranspose2d(32, 16, 5, stride=2, padding=2, output_padding=1),
            nn.ConvTranspose2d(16, 1, 5, stride=2, padding=2, output_padding=1),
        ])

    def encode(self, frames):
        """(N, H, W) frames in [-1, 1] -> (N, 128, H/8, W/8) spatial features (each frame on its own)."""
        x = frames.unsqueeze(1)
        for conv in self.encoder:
            x = F.elu(conv(x))
        return x

    def temporal(self, forward_features, backward_features):
        """forward_features: (B, 5, C, h, w) of t-5..t-1 in that order; backward_features: (B, 5, C, h, w)
        of t+5..t+1 in that order. Returns the combined ConvLSTM's latent of the inter-frame (B, 128, h, w)."""
        forward_state = self.forward_cell.zero_state(forward_features[:, 0])
        for step in range(forward_features.shape[1]):
            forward_state = self.forward_cell(forward_features[:, step], forward_state)
        backward_state = self.backward_cell.zero_state(backward_features[:, 0])
        for step in range(backward_features.shape[1]):
            backward_state = self.backward_cell(backward_features[:, step], backward_state)
        hidden = torch.cat([forward_state[0], backward_state[0]], 1)
        cell = torch.cat([forward_state[1], backward_state[1]], 1)
        latent, _ = self.combined_cell(hidden, (hidden, cell))
        return latent

    def temporal_consecutive(self, features):
        """Exact rewrite of temporal() for every window of a run of consecutive frames.
        features: (L, C, h, w) of L consecutive frames -> (L - 10, 128, h, w), row i = the window of
        frames i .. i+10. Each frame's x-part is computed once and shared by the windows that read it:
        window i's forward step s reads frame i + s, its backward step s frame i + 10 - s, so each step
        is a contiguous slice of the per-frame x-parts. The first step starts from zero state, whose
        h-part is zero."""
        num_windows = features.shape[0] - 2 * NEIGHBOURS
        states = []
        for cell, frame_at_step in ((self.forward_cell, lambda s: s),
                                    (self.backward_cell, lambda s: SEQUENCE_LENGTH - 1 - s)):
            x_parts = cell.input_part(features)                         # once per frame
            first = x_parts[frame_at_step(0):frame_at_step(0) + num_windows]
            h, c = cell.update(first, torch.zeros_like(first[:, :cell.hidden_channels]))
            for step in range(1, NEIGHBOURS):
                start = frame_at_step(step)
                h, c = cell.update(x_parts[start:start + num_windows] + cell.recurrent_part(h), c)
            states.append((h, c))
        hidden = torch.cat([states[0][0], states[1][0]], 1)
        cell_state = torch.cat([states[0][1], states[1][1]], 1)
        latent, _ = self.combined_cell.forward_same_input(hidden, cell_state)
        return latent

    def decode(self, latent):
        x = latent
        for deconv in self.decoder[:-1]:
            x = F.elu(deconv(x))
        return torch.tanh(self.decoder[-1](x)).squeeze(1)

    def forward(self, window):
        """window: (B, 11, H, W) in [-1, 1]; the middle frame is never read. Returns X^_t (B, H, W)."""
        batch, _, height, width = window.shape
        # FORWARD_POSITIONS then BACKWARD_POSITIONS, as slices: indexing a CUDA tensor with a Python list
        # copies the index to the GPU and waits for it, once per training step
        context = torch.cat([window[:, :MIDDLE], window[:, MIDDLE + 1:].flip(1)], 1)   # (B, 10, H, W)
        features = self.encode(context.reshape(-1, height, width))
        features = features.reshape(batch, 2 * NEIGHBOURS, *features.shape[1:])
        return self.decode(self.temporal(features[:, :NEIGHBOURS], features[:, NEIGHBOURS:]))


class _GuidedELU(torch.autograd.Function):
    """ELU whose backward pass lets only positive gradients through (guided backpropagation)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.elu(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        elu_derivative = torch.where(x > 0, torch.ones_like(x), torch.exp(x))
        return grad_output.clamp(min=0) * elu_derivative


class Discriminator(nn.Module):
    """Table 1, right: 3D convolutions over the 11-frame sequence down to a 7x7 map (logits; sigmoid = D)."""

    def __init__(self):
        super().__init__()
        # (in, out, kernel (l, h, w)); stride (1, 2, 2); no temporal padding: 11 -> 7 -> 5 -> 3 -> 1 -> 1
        specs = [(1, 32, (5, 5, 5)), (32, 64, (3, 5, 5)), (64, 128, (3, 3, 3)), (128, 256, (3, 3, 3)),
                 (256, 512, (1, 3, 3))]
        self.convs = nn.ModuleList([
            nn.Conv3d(cin, cout, k, stride=(1, 2, 2), padding=(0, k[1] // 2, k[2] // 2)) for cin, cout, k in specs
        ])
        self.output = nn.Conv3d(512, 1, (1, 3, 3), stride=1, padding=(0, 1, 1))

    def forward(self, sequence, guided=False):
        """sequence: (B, L, H, W) in [-1, 1], L >= 11 -> logits (B, L - 10, H/32, W/32); D(S) = sigmoid.
        An 11-frame window gives one map; with temporal stride 1 and no temporal padding, L consecutive
        frames give the maps of all L - 10 windows in them (entry i = the window of frames i .. i+10)."""
        x = sequence.unsqueeze(1)
        for conv in self.convs:
            x = _GuidedELU.apply(conv(x)) if guided else F.elu(conv(x))
        return self.output(x)[:, 0]


def replace_middle(window, generated):
    """The fake sequence S^_t: the real window with X_t replaced by the generated frame."""
    return torch.cat([window[:, :MIDDLE], generated.unsqueeze(1), window[:, MIDDLE + 1:]], 1)


# --------------------------------------------------------------------------------------------------
# Losses and scores (eq. 1-6)
# --------------------------------------------------------------------------------------------------

def pixel_loss(generated, target):
    """||X^_t - X_t||^2 per sample: squared L2 norm summed over pixels (eq. 2). -> (B,)"""
    return (generated - target).pow(2).flatten(1).sum(1)


def neg_log_d(logits):
    """-log D(S) per sample, summed over D's probability map (local adversarial loss). -> (B,)"""
    return F.softplus(-logits).flatten(1).sum(1)


def neg_log_one_minus_d(logits):
    """-log(1 - D(S)) per sample, summed over D's probability map. -> (B,)"""
    return F.softplus(logits).flatten(1).sum(1)


def generator_loss(fake_logits, generated, target, lambda_pixel):
    """L_G (eq. 3) averaged over the batch: realism loss -log D(S^) + lambda * pixel loss.
    Returns (L_G, realism term, pixel term), each a batch mean."""
    realism = neg_log_d(fake_logits).mean()
    pixel = pixel_loss(generated, target).mean()
    return realism + lambda_pixel * pixel, realism, pixel


def discriminator_loss(real_logits, fake_logits):
    """L_D (eq. 4): -log(1 - D(S^)) - log D(S), averaged over the batch."""
    return (neg_log_one_minus_d(fake_logits) + neg_log_d(real_logits)).mean()


def lambda_s_rule(pixel_max, disc_max, divisor=10.0):
    """lambda_s = (max of ||G - X||^2 / max of -log D(S)) / divisor (section 3.2)."""
    return float(pixel_max) / max(float(disc_max), 1e-12) / divisor


def term_maxima(pixel_terms, disc_terms):
    """The two maxima of the lambda_s rule over per-video arrays of terms (NaN frames ignored)."""
    return {"pixel": max(float(np.nanmax(p)) for p in pixel_terms if np.isfinite(p).any()),
            "disc": max(float(np.nanmax(d)) for d in disc_terms if np.isfinite(d).any())}


def abnormality_loss(pixel_term, disc_term, lambda_s):
    """l_s(t) = ||G - X_t||^2 - lambda_s log D(S_t) (eq. 5); disc_term already holds -log D(S_t)."""
    return np.asarray(pixel_term, dtype=np.float64) + lambda_s * np.asarray(disc_term, dtype=np.float64)


def detector_scores(pixel_term, disc_term, detector, lambda_s):
    """Raw per-frame scores of Table 2's three detectors (higher = more abnormal)."""
    if detector == "g":
        return np.asarray(pixel_term, dtype=np.float64)
    if detector == "d":
        return np.asarray(disc_term, dtype=np.float64)
    return abnormality_loss(pixel_term, disc_term, lambda_s)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def to_unit_range(frames_uint8):
    """uint8 tensor -> float in [-1, 1] (the paper's input range; tanh output range)."""
    return frames_uint8.float().div_(127.5).sub_(1.0)


def stack_training_frames(frames_by_video):
    """All training frames in one uint8 array plus the global frame indices of every 11-frame window."""
    arrays, windows, offset = [], [], 0
    for frames in frames_by_video.values():
        if frames.shape[0] >= SEQUENCE_LENGTH:
            windows.append(common.window_indices(frames.shape[0], NEIGHBOURS, NEIGHBOURS) + offset)
        arrays.append(np.asarray(frames))
        offset += frames.shape[0]
    if not windows:
        raise common.DataError(f"no training video has the {SEQUENCE_LENGTH} frames one window needs")
    return np.concatenate(arrays), np.concatenate(windows)


class TrainingWindows:
    """Batches of 11-frame training windows gathered by index. The whole uint8 training split is held on
    the device when it takes at most a quarter of the free device memory (no loader, no per-step copy of
    frames); otherwise it stays in host memory and each batch is gathered there and copied (pinned,
    non_blocking on CUDA)."""

    def __init__(self, frames, windows, device):
        self.device = torch.device(device)
        self.num_windows = len(windows)
        on_device = self.device.type != "cuda" or common.fits_on_device(frames.nbytes, self.device, 0.25)
        self.store = self.device if on_device else torch.device("cpu")
        self.frames = common.to_device(frames, self.store)
        self.windows = common.to_device(windows, self.store)

    def epoch_order(self, seed, epoch):
        """A fresh permutation per epoch, a pure function of (seed, epoch): --resume needs no sampler state."""
        return common.to_device(np.random.default_rng([seed, epoch]).permutation(self.num_windows), self.store)

    def batch(self, order, step, batch_size):
        """(B, 11, H, W) windows in [-1, 1] on the training device."""
        frames = self.frames[self.windows[order[step * batch_size:(step + 1) * batch_size]]]
        if self.store != self.device:                   # held in host memory: copy the batch over
            frames = common.to_device(frames, self.device)
        return to_unit_range(frames)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def autocast(device, amp):
    """bf16 autocast only on CUDA with --amp (a no-op context otherwise)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(amp) and torch.device(device).type == "cuda")


def pretrain_step(generator, opt_g, window, amp=False):
    """One generator step on the pixel loss alone (the pre-training phase). Returns the losses (tensors)."""
    with autocast(window.device, amp):
        generated = generator(window)
    pixel = pixel_loss(generated.float(), window[:, MIDDLE]).mean()
    opt_g.zero_grad(set_to_none=True)
    pixel.backward()
    opt_g.step()
    return {"pixel": pixel.detach()}


def adversarial_step(generator, discriminator, opt_g, opt_d, window, lambda_pixel, amp=False):
    """One alternating step on a batch: D minimises L_D (eq. 4) on the real and the fake sequence, then G
    minimises L_G (eq. 3) against the updated D. G is run once; the fake enters D's step detached (no
    gradient into G) and G's step undetached (the realism gradient flows through D into G). Returns the
    losses and D's mean probabilities on real and fake sequences (tensors, no host sync)."""
    target = window[:, MIDDLE]
    with autocast(window.device, amp):
        generated = generator(window).float()
    fake = replace_middle(window, generated)
    # D step: real and fake sequences in one call (D has no batch statistics, so this equals two calls).
    with autocast(window.device, amp):
        logits = discriminator(torch.cat([window, fake.detach()])).float()
    real_logits, fake_logits = logits.chunk(2)
    d_loss = discriminator_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # G step. D's weights need no gradient here (opt_d clears it anyway): skipping it saves work.
    discriminator.requires_grad_(False)
    with autocast(window.device, amp):
        fake_logits_for_g = discriminator(fake).float()
    g_loss, realism, pixel = generator_loss(fake_logits_for_g, generated, target, lambda_pixel)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    discriminator.requires_grad_(True)
    return {"pixel": pixel.detach(), "realism": realism.detach(), "d": d_loss.detach(),
            "d_real": torch.sigmoid(real_logits.detach()).mean(), "d_fake": torch.sigmoid(fake_logits.detach()).mean()}


TRAINING_KEYS = ("image_size", "pretrain_epochs", "epochs", "steps_per_epoch", "batch_size", "lr", "lambda_pixel")


def train(args, ds, generator, discriminator, argv):
    """Pixel-loss pre-training then alternating G/D epochs, resumable at any step. Returns the total
    training time in seconds, or None when the --max-minutes budget stopped this slice."""
    frames_by_video = common.load_split_frames(ds, "train", args.image_size, cache_dir=args.cache_dir)
    train_frames, train_windows = stack_training_frames(frames_by_video)
    data = TrainingWindows(train_frames, train_windows, args.device)
    # fused Adam on CUDA: one kernel per step instead of several per tensor (the CPU keeps the default)
    fused = args.device.type == "cuda"
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr, fused=fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr, fused=fused)
    total_epochs = args.pretrain_epochs + args.epochs
    steps_per_epoch = len(train_windows) // args.batch_size
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    checkpoint_path = os.path.join(args.out, "model.pt")
    monitor = common.LossMonitor(every=50)
    epoch, step, history, previous_time_s, maxima = 0, 0, [], 0.0, None
    state = common.resume_checkpoint(checkpoint_path, args.resume, method=args.method)
    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        common.load_optimizer_state(opt_g, state["opt_g"])
        common.load_optimizer_state(opt_d, state["opt_d"])
        epoch, step = int(state["epoch"]), int(state.get("step", 0))
        history = list(state.get("history", []))
        previous_time_s = float(state.get("train_time_s") or 0.0)
        maxima = state.get("lambda_s_maxima")
        monitor.sums = dict(state.get("loss_sums", {}))
        monitor.count = int(state.get("loss_count", 0))
        if "rng" in state:
            common.set_rng_state(state["rng"])
        for key in TRAINING_KEYS:
            saved = state["args"].get(key)
            saved = tuple(saved) if isinstance(saved, list) else saved
            if saved is not None and saved != getattr(args, key):
                print(f"warning: --resume with {key} = {getattr(args, key)}, the checkpoint was trained with "
                      f"{saved}: the result will differ from one uninterrupted run", file=sys.stderr)
        print(f"resumed from {checkpoint_path} at epoch {epoch + 1}/{total_epochs} step {step}" if epoch < total_epochs
              else f"resumed from {checkpoint_path}: all {total_epochs} epochs already done")
    if epoch < total_epochs:
        maxima = None                  # more training to do (e.g. --epochs raised): the maxima are redone at the end
    budget = common.TimeBudget(args.max_minutes)
    height, width = args.image_size

    def save():
        common.save_checkpoint(checkpoint_path, {
            "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "epoch": epoch, "step": step, "rng": common.get_rng_state(),
            "loss_sums": monitor.check(f"epoch {epoch + 1} step {step}"), "loss_count": monitor.count,
            "history": history, "args": common.args_to_dict(args), "lambda_s_maxima": maxima,
            "train_time_s": previous_time_s + budget.elapsed()})

    def report_stop():
        common.report_time_stop(__file__, argv, checkpoint_path, f"epoch {epoch + 1}/{total_epochs} step {step}/"
                                f"{steps_per_epoch}", budget)

    print(f"training on {len(train_windows)} windows of {SEQUENCE_LENGTH} frames at {height}x{width}: "
          f"{args.pretrain_epochs} pixel-loss epochs + {args.epochs} adversarial epochs, {steps_per_epoch} steps "
          f"of batch {args.batch_size} each (training frames held on {data.store})")
    generator.train()
    discriminator.train()
    while epoch < total_epochs:
        adversarial = epoch >= args.pretrain_epochs
        phase = "adversarial" if adversarial else "pretrain"
        order = data.epoch_order(args.seed, epoch)
        started, rate = time.time(), common.StepRate(args.device)
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch + 1}/{total_epochs} {phase}", leave=False)
        while step < steps_per_epoch:
            window = data.batch(order, step, args.batch_size)
            if adversarial:
                losses = adversarial_step(generator, discriminator, opt_g, opt_d, window, args.lambda_pixel, args.amp)
            else:
                losses = pretrain_step(generator, opt_g, window, args.amp)
            step += 1
            monitor.add(f"epoch {epoch + 1} step {step}", **losses)
            bar.update(1)
            rate.step_done()
            if step < steps_per_epoch and budget.expired():
                bar.close()
                print(f"training: {rate.rate():.2f} {phase} steps/s (batch {args.batch_size})")
                save()
                report_stop()
                return None
        bar.close()
        steps_per_s = rate.rate()
        means = monitor.means(f"epoch {epoch + 1}")          # one host sync per epoch (and every 50 steps)
        history.append({"epoch": epoch + 1, "phase": phase, **means, "seconds": time.time() - started})
        summary = f"epoch {epoch + 1}/{total_epochs} [{phase}] pixel {means['pixel']:.3f}"
        if adversarial:
            summary += (f" realism {means['realism']:.4f} L_D {means['d']:.4f} D(real) {means['d_real']:.3f} "
                        f"D(fake) {means['d_fake']:.3f}")
        print(f"{summary} ({time.time() - started:.1f}s, {steps_per_s:.2f} steps/s)")
        epoch, step = epoch + 1, 0
        save()
        common.write_json(os.path.join(args.out, "train_log.json"), history)
        if epoch < total_epochs and budget.expired():
            report_stop()                                    # the checkpoint of this epoch is on disk
            return None
    if maxima is None:
        # lambda_s (eq. 5) from the training windows, scored by the final model; the test reads it from model.pt.
        generator.eval()
        discriminator.eval()
        pixel_terms, disc_terms, _ = score_videos(generator, discriminator, frames_by_video, args.test_batch_size,
                                                  args.map_pool, args.device, args.amp)
        maxima = {**term_maxima(pixel_terms.values(), disc_terms.values()), "split": "train"}
        print(f"lambda_s maxima over the {len(train_windows)} training windows: pixel term {maxima['pixel']:.4g}, "
              f"discriminator term {maxima['disc']:.4g}")
        save()
    return previous_time_s + budget.elapsed()


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

def score_chunk(generator, discriminator, frames, map_pool=4, amp=False):
    """Score every window of a run of L >= 11 consecutive frames, (L, H, W) uint8 on the device, with the
    exact rewrites: each frame is encoded once, its ConvLSTM x-parts computed once, and D runs once over
    the L frames. Returns, for the L - 10 windows centred at frames 5 .. L-6: pixel terms (n,), D terms
    -log D(S_t) (n,) and pooled pixel-loss maps (n, H/map_pool, W/map_pool), all float32 on the device."""
    sequence = to_unit_range(frames)
    with autocast(frames.device, amp):
        generated = generator.decode(generator.temporal_consecutive(generator.encode(sequence))).float()
        logits = discriminator(sequence.unsqueeze(0))[0].float()
    error = (generated - sequence[NEIGHBOURS:sequence.shape[0] - NEIGHBOURS]).pow(2)
    return error.flatten(1).sum(1), neg_log_d(logits), F.avg_pool2d(error.unsqueeze(1), map_pool)[:, 0]


def chunk_plan(frames_by_video, batch_size):
    """The split's videos laid end to end as one frame sequence: returns (offsets, chunks), offsets[name] =
    the video's first frame in that sequence and chunks = (first window, real windows) of every fixed-size
    chunk of batch_size windows = batch_size + 10 frames. Chunks run across video boundaries, so short
    videos (Ped2's 120-180 frames against 256 windows a chunk on CUDA) do not each pay for a padded chunk;
    a window that straddles two videos is computed and dropped, which costs 10 windows per boundary. Only
    the split's last chunk is padded (see host_chunks)."""
    offsets, total = {}, 0
    for name, frames in frames_by_video.items():
        offsets[name], total = total, total + frames.shape[0]
    num_windows = total - 2 * NEIGHBOURS
    chunks = [(start, min(batch_size, num_windows - start)) for start in range(0, max(num_windows, 0), batch_size)]
    return offsets, chunks


def host_chunks(frames_by_video, offsets, chunks, batch_size):
    """The uint8 frames of each planned chunk (read from the cache, across video boundaries), padded to
    batch_size + 10 frames by repeating the last one."""
    names = list(frames_by_video)
    for start, real in chunks:
        stop, parts = start + real + 2 * NEIGHBOURS, []
        for name in names:
            first, frames = offsets[name], frames_by_video[name]
            lo, hi = max(start, first), min(stop, first + frames.shape[0])
            if lo < hi:
                parts.append(np.asarray(frames[lo - first:hi - first]))
        yield common.pad_batch(np.concatenate(parts), batch_size + 2 * NEIGHBOURS)[0]


@torch.inference_mode()
def score_videos(generator, discriminator, frames_by_video, batch_size, map_pool, device, amp=False):
    """Score whole videos: {name: (T, H, W) uint8 array}. Returns three dicts by video: pixel terms
    ||G - X_t||^2 and discriminator terms -log D(S_t) (float64 (T,), NaN where no full window exists) and
    the pooled pixel-loss maps (T, H/map_pool, W/map_pool) float32 (frames without a window copy the
    nearest scored frame's map; a video shorter than a window keeps zero maps). Fixed-shape chunks are
    prefetched to the device; the results stay there until one copy back for the whole split."""
    offsets, chunks = chunk_plan(frames_by_video, batch_size)
    results = []                                     # device results of every chunk, real windows only
    for (start, real), chunk in zip(chunks, common.prefetch_to_device(
            host_chunks(frames_by_video, offsets, chunks, batch_size), device)):
        pixel, disc, chunk_maps = score_chunk(generator, discriminator, chunk, map_pool, amp)
        results.append((pixel[:real], disc[:real], chunk_maps[:real]))
    pixel_terms, disc_terms, maps = {}, {}, {}
    for name, frames in frames_by_video.items():
        pixel_terms[name] = np.full(frames.shape[0], np.nan)
        disc_terms[name] = np.full(frames.shape[0], np.nan)
        maps[name] = np.zeros((frames.shape[0], frames.shape[1] // map_pool, frames.shape[2] // map_pool), np.float32)
    if not results:
        return pixel_terms, disc_terms, maps
    # One copy back (one host sync) for the split: the three results travel in one flat tensor.
    pixel = torch.cat([p for p, _, _ in results])
    all_maps = torch.cat([m for _, _, m in results])
    flat = torch.cat([pixel, torch.cat([d for _, d, _ in results]), all_maps.flatten()]).cpu().numpy()
    n = pixel.shape[0]
    pixel_all, disc_all, maps_all = flat[:n], flat[n:2 * n], flat[2 * n:].reshape(all_maps.shape)
    for name, frames in frames_by_video.items():
        num_frames, first = frames.shape[0], offsets[name]
        if num_frames <= 2 * NEIGHBOURS:
            continue
        windows = slice(first, first + num_frames - 2 * NEIGHBOURS)     # window i is centred at frame i + 5
        scored = slice(NEIGHBOURS, num_frames - NEIGHBOURS)
        pixel_terms[name][scored] = pixel_all[windows]
        disc_terms[name][scored] = disc_all[windows]
        maps[name][scored] = maps_all[windows]
        maps[name][:NEIGHBOURS] = maps[name][NEIGHBOURS]
        maps[name][num_frames - NEIGHBOURS:] = maps[name][num_frames - NEIGHBOURS - 1]
    return pixel_terms, disc_terms, maps


def score_video(generator, discriminator, frames, lambda_s, detector="gd", batch_size=64, map_pool=4, amp=False):
    """One video, for use as a library: frames (T, H, W) uint8 at the model's input size -> (raw per-frame
    scores (T,) float64 of the detector, NaN for the first and last five frames; pooled pixel-loss maps).
    lambda_s comes from lambda_s_rule() on the training split's term_maxima()."""
    device = next(generator.parameters()).device
    pixel, disc, maps = score_videos(generator, discriminator, {"video": frames}, batch_size, map_pool, device, amp)
    return detector_scores(pixel["video"], disc["video"], detector, lambda_s), maps["video"]


def warm_up(generator, discriminator, batch_size, image_size, map_pool, device, amp=False):
    """One chunk of the test shape through the test path, so cuDNN autotuning happens before the timer."""
    frames = torch.zeros((batch_size + 2 * NEIGHBOURS, *image_size), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        score_chunk(generator, discriminator, frames, map_pool, amp)
    common.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Localization (section 3.4, Fig. 3)
# --------------------------------------------------------------------------------------------------

def guided_backprop(discriminator, sequence):
    """d sum(output activation) / d X_t with guided backpropagation through D's ELUs, where the output
    activation is D's last layer before the sigmoid (the sigmoid saturates for confident sequences and
    would zero every gradient). sequence: (11, H, W) in [-1, 1] -> signed gradient (H, W); Fig. 3(d)
    draws its magnitude."""
    inputs = sequence.detach().unsqueeze(0).clone().requires_grad_(True)
    with torch.enable_grad():
        logits = discriminator(inputs, guided=True)
        (gradient,) = torch.autograd.grad(logits.sum(), inputs)
    return gradient[0, MIDDLE]


def panel_frames(frame_scores, num_panels):
    """The frames to draw: per video its highest raw abnormality loss, the videos with the highest such
    loss first (ties by name). Raw, not min-max normalised: eq. 6 maps every video's maximum to 1."""
    candidates = [(float(np.nanmax(scores)), name, int(np.nanargmax(scores)))
                  for name, scores in frame_scores.items() if np.isfinite(scores).any()]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [(name, t) for _, name, t in candidates[:num_panels]]


def write_panels(out_dir, generator, discriminator, test_frames, frame_scores, num_panels, device):
    """Fig. 3-like PNGs (real, generated, generator map, discriminator map) for the panel_frames()."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_dir = os.path.join(out_dir, "panels")
    os.makedirs(panel_dir, exist_ok=True)
    written = []
    for name, t in panel_frames(frame_scores, num_panels):
        frames = common.to_device(np.array(test_frames[name][t - NEIGHBOURS:t + NEIGHBOURS + 1]), device)
        sequence = to_unit_range(frames)
        with torch.inference_mode():
            generated = generator(sequence.unsqueeze(0))[0]
        pixel_map = (generated - sequence[MIDDLE]).pow(2)
        disc_map = guided_backprop(discriminator, sequence).abs()
        images = [sequence[MIDDLE], generated, pixel_map, disc_map]
        titles = ["(a) real frame", "(b) generated frame", "(c) generator: pixel loss",
                  "(d) discriminator: guided backprop"]
        fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
        for ax, image, title, cmap in zip(axes, images, titles, ["gray", "gray", "jet", "jet"]):
            image = image.float().cpu().numpy()
            ax.imshow(image, cmap=cmap, vmin=-1 if cmap == "gray" else None, vmax=1 if cmap == "gray" else None)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{name} frame {t + 1} (score {frame_scores[name][t]:.3g})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(panel_dir, f"{name}_{t + 1:04d}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def test(args, ds, generator, discriminator, state):
    """Score the test split, write scores.npz (+ panels) and metrics.json with Table 2's three rows."""
    generator.eval()
    discriminator.eval()
    # Decoding/resizing is cached by common; the timed region starts from the cached frames.
    test_frames = common.load_split_frames(ds, "test", args.image_size, cache_dir=args.cache_dir)
    warm_up(generator, discriminator, args.test_batch_size, args.image_size, args.map_pool, args.device, args.amp)
    started = time.time()
    pixel_terms, disc_terms, maps = score_videos(generator, discriminator, test_frames, args.test_batch_size,
                                                 args.map_pool, args.device, args.amp)
    names = list(pixel_terms)
    if args.lambda_s is not None:
        maxima, lambda_s = None, args.lambda_s
    elif args.lambda_s_split == "test":
        maxima = {**term_maxima(pixel_terms.values(), disc_terms.values()), "split": "test"}
        lambda_s = lambda_s_rule(maxima["pixel"], maxima["disc"], args.lambda_s_divisor)
    else:
        maxima = state.get("lambda_s_maxima")
        if not maxima:
            raise common.DataError(f"{os.path.join(args.out, 'model.pt')}: no training-split maxima for lambda_s "
                                   f"(written at the end of training; expected a finished --train run), or pass "
                                   f"--lambda-s VALUE or --lambda-s-split test")
        lambda_s = lambda_s_rule(maxima["pixel"], maxima["disc"], args.lambda_s_divisor)
    scores_by_detector = {det: {n: detector_scores(pixel_terms[n], disc_terms[n], det, lambda_s).astype(np.float32)
                                for n in names} for det in ("g", "d", "gd")}
    frame_scores = scores_by_detector[args.detector]
    maps16 = {n: m.astype(np.float16) for n, m in maps.items()}
    meta = {"method": "stan", "dataset": ds.name, "detector": args.detector, "lambda_s": lambda_s,
            "lambda_s_maxima": maxima, "protocol": {"normalize": args.normalize, "smooth": args.smooth},
            "run_protocol": args.protocol, "args": common.args_to_dict(args)}
    scores_path = os.path.join(args.out, "scores.npz")
    common.write_scores(scores_path, frame_scores, maps16, meta)
    elapsed = time.time() - started
    num_frames = sum(len(s) for s in frame_scores.values())
    test_fps = num_frames / max(elapsed, 1e-9)
    print(f"test: {num_frames} frames in {elapsed:.2f}s = {test_fps:.1f} frames/s ({args.device}, cached frames -> "
          f"scores.npz, batch {args.test_batch_size} windows; excludes model load and warm-up); lambda_s = "
          f"{lambda_s:.4g} ({'fixed' if maxima is None else maxima['split'] + '-split maxima'}); wrote {scores_path}")

    if args.num_panels:
        panels = write_panels(args.out, generator, discriminator, test_frames, frame_scores, args.num_panels,
                              args.device)
        print(f"wrote {len(panels)} localization panels to {os.path.join(args.out, 'panels')}")

    # Table 2's three rows and the un-normalised result are recorded next to the chosen detector's result.
    # (maps do not depend on the detector, so the pixel-level numbers are only computed once, below)
    per_detector = {det: vad_eval.evaluate(s, None, ds, normalize=args.normalize, smooth=args.smooth)
                    for det, s in scores_by_detector.items()}
    unnormalised = vad_eval.evaluate(frame_scores, maps16, ds, normalize="none", smooth=args.smooth)
    extra = {"train_time_s": state.get("train_time_s"), "test_fps": test_fps, "run_protocol": args.protocol,
             "peak_memory_gib": common.peak_memory(),
             "detector": args.detector, "lambda_s": lambda_s, "lambda_s_maxima": maxima,
             "image_size": list(args.image_size), "detectors": per_detector, "unnormalized": unnormalised,
             "train_history": state.get("history", []), "command": args.command}
    return vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

# The paper's settings (epoch counts are ours: the paper gives none) for real datasets; a small CPU demo
# for the synthetic one (see the docstring).
PAPER_DEFAULTS = {"image_size": (224, 224), "pretrain_epochs": 10, "epochs": 20, "batch_size": 3, "lr": 2e-4,
                  "steps_per_epoch": 0}
SYNTHETIC_DEFAULTS = {"image_size": (64, 64), "pretrain_epochs": 3, "epochs": 1, "batch_size": 3, "lr": 2e-4,
                      "steps_per_epoch": 40}
PAPER_VALUES = {"image_size": (224, 224), "batch_size": 3, "lr": 2e-4, "lambda_pixel": 1.0, "lambda_s_divisor": 10.0}


def build_parser():
    parser = common.build_parser("stan", __doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="generator-only epochs on the pixel loss before adversarial training (default 10)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="cap on optimisation steps per epoch (0 = one pass over all windows)")
    parser.add_argument("--lambda-pixel", type=float, default=1.0, help="lambda in L_G, eq. 3 (paper 1)")
    parser.add_argument("--lambda-s", type=float, default=None,
                        help="lambda_s in eq. 5; default: the paper's rule (max ratio of the two terms / 10)")
    parser.add_argument("--lambda-s-split", choices=("train", "test"), default="train",
                        help="split whose maxima the lambda_s rule uses (train: stored in model.pt by training)")
    parser.add_argument("--lambda-s-divisor", type=float, default=10.0, help="divisor in the lambda_s rule (paper 10)")
    parser.add_argument("--detector", choices=("g", "d", "gd"), default="gd",
                        help="Table 2 row written to scores.npz: generator pixel loss, discriminator, or both (eq. 5)")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="windows per test chunk (default 256 on CUDA, 32 on CPU)")
    parser.add_argument("--map-pool", type=int, default=4, help="average-pool factor of the stored pixel-loss maps")
    return parser


def protocol_label(args):
    """The run's settings in words: 'paper settings' only when every setting the paper gives is its value;
    our own choices (epoch counts) and every departure from the paper are named."""
    height, width = args.image_size
    not_paper = [f"{name.replace('_', ' ')} {getattr(args, name)} (paper {value})"
                 for name, value in PAPER_VALUES.items() if getattr(args, name) != value]
    if args.steps_per_epoch:
        not_paper.append(f"epochs capped at {args.steps_per_epoch} steps")
    if args.lambda_s is not None:
        not_paper.append(f"lambda_s fixed at {args.lambda_s} (paper: max-ratio rule)")
    elif args.lambda_s_split == "test":
        not_paper.append("lambda_s maxima from the TEST split (no labels used)")
    if args.normalize != "video_minmax":
        not_paper.append(f"normalize {args.normalize} (paper: per-video min-max, eq. 6)")
    if args.smooth != "none":
        not_paper.append(f"smooth {args.smooth} (paper: none)")
    if args.amp and args.device.type == "cuda":
        not_paper.append("bf16 autocast")
    label = "STAN REDUCED/MODIFIED settings" if not_paper else "STAN paper settings with our epoch counts"
    text = (f"{label}: {height}x{width} gray, batch {args.batch_size}, Adam lr {args.lr}, lambda {args.lambda_pixel}, "
            f"{args.pretrain_epochs} pixel-loss pre-training epochs then {args.epochs} alternating G/D epochs "
            f"(epoch counts are ours: the paper gives none), lambda_s = max ratio / {args.lambda_s_divisor:g} "
            f"({'fixed' if args.lambda_s is not None else args.lambda_s_split + ' split'}), detector {args.detector}, "
            f"normalize {args.normalize}")
    return text + ("; not the paper's: " + "; ".join(not_paper) if not_paper else "")


def resolve_defaults(args):
    defaults = SYNTHETIC_DEFAULTS if args.dataset == "synthetic" else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.image_size, int):            # checkpoints written before sizes were (H, W)
        args.image_size = (args.image_size, args.image_size)
    args.image_size = tuple(int(v) for v in args.image_size)
    if any(v % 8 for v in args.image_size):
        raise common.DataError(f"--image-size {' '.join(map(str, args.image_size))}: expected multiples of 8 "
                               f"(the encoder divides the frame by 8 and the decoder doubles it back)")
    if args.normalize is None:
        args.normalize = "video_minmax"       # the paper's protocol (eq. 6)
    if args.test_batch_size is None:
        args.test_batch_size = 256 if args.device.type == "cuda" else 32
    if args.test_batch_size < 1 or args.batch_size < 1:
        raise common.DataError("--batch-size and --test-batch-size: expected positive numbers")
    args.protocol = protocol_label(args)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = common.parse_args(parser, argv)
    args.command = "python stan.py " + " ".join(argv)
    checkpoint_path = os.path.join(args.out, "model.pt")
    if args.test and not args.train:
        # Test-only: the input size and every training setting the protocol string reports come from the
        # checkpoint (a differing command-line value is ignored with a warning).
        saved = common.load_checkpoint(checkpoint_path, method=args.method)["args"]
        common.restore_training_args(args, parser, saved, TRAINING_KEYS)
    args = resolve_defaults(args)
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(json.dumps(ds.summary()))
    os.makedirs(args.out, exist_ok=True)
    generator = Generator().to(args.device)
    discriminator = Discriminator().to(args.device)
    if args.train:
        train_time_s = train(args, ds, generator, discriminator, argv)
        if train_time_s is None:
            return                           # a --max-minutes slice: the continue command has been printed
        print(f"training took {train_time_s:.1f}s (all runs of this model.pt)")
    if args.test:
        state = common.load_checkpoint(checkpoint_path, map_location=args.device)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        test(args, ds, generator, discriminator, state)


if __name__ == "__main__":
    common.run_main(main, report_memory=True)
