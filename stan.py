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
    are trained alternately with
        L_G = -log D(S^_t) + lambda ||G(...) - X_t||^2          (lambda = 1, eq. 1-3)
        L_D = -log(1 - D(S^_t)) - log D(S_t)                    (eq. 4)
    At test time, per frame (eq. 5, 6)
        l_s(t) = ||G(...) - X_t||^2 - lambda_s log D(S_t),
        lambda_s = (max_t of the first term / max_t of the second term) / 10,
        s(t) = (l_s(t) - min_t l_s) / (max_t l_s - min_t l_s) per video.
    `--detector g|d|gd` chooses the pixel term alone, the discriminator term alone, or both (Table 2's
    three rows; all three are evaluated and recorded in metrics.json whichever is chosen). Localization
    (section 3.4): the pixel-loss map (G - X)^2 is the anomaly map in scores.npz, and guided
    backpropagation of D's output to the input sequence is drawn, with the real frame, the generated
    frame and the pixel-loss map, in PNG panels like Fig. 3 for `--num-panels` frames. Event-level
    counts (Table 3: detected events / false alarms) are eval.py's, under "events" in metrics.json; the
    un-normalised scores' result is under "unnormalized".

Deviations (from the paper, with reasons)
    - Epoch counts and Adam betas are not given in the paper. Defaults: 10 pre-training epochs
      (`--pretrain-epochs`) and 20 adversarial epochs (`--epochs`) on real datasets; torch's Adam
      betas (0.9, 0.999).
    - The paper does not say what the combined ConvLSTM receives besides the pairwise-concatenated states.
      We run it for one step with ([h_fwd, h_bwd], [c_fwd, c_bwd]) as its initial state and the
      concatenated hidden state [h_fwd, h_bwd] as its input; its output hidden state is the latent
      feature of the inter-frame.
    - ConvLSTM cells are the standard ones (sigmoid gates, tanh cell/output non-linearities) without the
      peephole terms of Shi et al. 2015; "ELU everywhere else" is applied to all convolutions outside the
      ConvLSTMs (encoder, decoder except the last tanh layer, discriminator except the last sigmoid layer).
      Zero initial states.
    - ||.||^2 is the squared L2 norm summed over the pixels of the frame, as written (inputs in [-1, 1]);
      -log D(.) over the 7x7 probability map is the mean over the map (the local adversarial loss of
      Shrivastava et al., averaged instead of summed). Losses are averaged over the batch instead of
      summed (only a constant factor for Adam). The sigmoid is folded into the losses (log-sigmoid /
      softplus on D's logits), which is the same function, computed stably.
    - lambda_s: the paper's rule, taking the maxima of the two terms over all scored frames of the test
      split (one value per dataset; it uses no labels). `--lambda-s VALUE` fixes it instead.
    - The anomaly map stored in scores.npz is the pixel-loss map average-pooled by `--map-pool` (default
      4, i.e. 56x56 for 224 input) to keep scores.npz small; eval.py upsamples it. The first and last 5
      frames of each video have no full window: their frame scores are NaN (eval.py fills them from the
      nearest scored frame) and their maps copy the nearest scored frame's map.
    - Panels: the `--num-panels` frames with the highest abnormality loss (at most one per video, chosen
      without labels). The discriminator map is |guided-backprop gradient| of D's summed output activation
      taken before the sigmoid (a confident D saturates the sigmoid, which would zero every gradient)
      with respect to the middle frame of the input sequence. Through ELU, guided backprop passes only
      positive gradients, multiplied by ELU's own derivative.
    - Synthetic data (`--dataset synthetic`, a CPU demo, not a paper setting): 64x64 input (so the
      encoder's latent is 8x8 and D's map 2x2 instead of 28x28 and 7x7), 3 pre-training + 1 adversarial
      epochs of 40 steps each, batch 3. The architecture is unchanged.
    - Real UCSD Ped2 on a 2-core CPU can only run a reduced protocol (smaller input, fewer steps); such
      runs say so in the "protocol" string of metrics.json.

Usage
    python stan.py --dataset synthetic                       # CPU demo, trains + tests in < 3 minutes
    python stan.py --dataset ped2 --data-root ../shared/data --train --test
    python stan.py --dataset ped2 --test --detector d        # Table 2, discriminator-only row
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
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)

    def zero_state(self, x):
        shape = (x.shape[0], self.hidden_channels, x.shape[2], x.shape[3])
        return x.new_zeros(shape), x.new_zeros(shape)

    def forward(self, x, state):
        h, c = state
        input_gate, forget_gate, output_gate, candidate = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * torch.tanh(candidate)
        h = torch.sigmoid(output_gate) * torch.tanh(c)
        return h, c


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

    def decode(self, latent):
        x = latent
        for deconv in self.decoder[:-1]:
            x = F.elu(deconv(x))
        return torch.tanh(self.decoder[-1](x)).squeeze(1)

    def forward(self, window):
        """window: (B, 11, H, W) in [-1, 1]; the middle frame is never read. Returns X^_t (B, H, W)."""
        batch, _, height, width = window.shape
        context = window[:, FORWARD_POSITIONS + BACKWARD_POSITIONS]          # (B, 10, H, W)
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
        """sequence: (B, 11, H, W) in [-1, 1] -> logits (B, H/32, W/32); D(S) = sigmoid(logits)."""
        x = sequence.unsqueeze(1)
        for conv in self.convs:
            x = _GuidedELU.apply(conv(x)) if guided else F.elu(conv(x))
        return self.output(x)[:, 0, 0]


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
    """-log D(S) per sample, averaged over D's probability map. -> (B,)"""
    return F.softplus(-logits).flatten(1).mean(1)


def neg_log_one_minus_d(logits):
    """-log(1 - D(S)) per sample, averaged over D's probability map. -> (B,)"""
    return F.softplus(logits).flatten(1).mean(1)


def generator_loss(fake_logits, generated, target, lambda_pixel):
    """L_G (eq. 3): realism loss -log D(S^) + lambda * pixel loss, averaged over the batch."""
    return (neg_log_d(fake_logits) + lambda_pixel * pixel_loss(generated, target)).mean()


def discriminator_loss(real_logits, fake_logits):
    """L_D (eq. 4): -log(1 - D(S^)) - log D(S), averaged over the batch."""
    return (neg_log_one_minus_d(fake_logits) + neg_log_d(real_logits)).mean()


def lambda_s_rule(pixel_terms, disc_terms, divisor=10.0):
    """lambda_s = (max of ||G - X||^2 / max of -log D(S)) / divisor (section 3.2), NaNs ignored.
    Accepts arrays or lists of per-video arrays."""
    pixel_max = max(float(np.nanmax(p)) for p in _as_list(pixel_terms))
    disc_max = max(float(np.nanmax(d)) for d in _as_list(disc_terms))
    return pixel_max / max(disc_max, 1e-12) / divisor


def _as_list(values):
    return list(values) if isinstance(values, (list, tuple)) else [np.asarray(values)]


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


def minmax_per_video(scores):
    """Eq. 6: s(t) = (l_s(t) - min l_s) / (max l_s - min l_s), NaNs left as NaN (eval.py does the same
    with normalize="video_minmax"; used here only to pick panel frames)."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = np.nanmin(scores), np.nanmax(scores)
    return (scores - low) / max(high - low, 1e-12)


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


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def autocast(args):
    """bf16 autocast only on CUDA with --amp (a no-op context otherwise)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(args.amp) and args.device.type == "cuda")


def train(args, ds, generator, discriminator):
    frames_by_video = common.load_split_frames(ds, "train", (args.image_size, args.image_size),
                                               cache_dir=args.cache_dir)
    train_frames, train_windows = stack_training_frames(frames_by_video)
    # The whole (uint8) training set lives on the device: batches are gathered by indexing, no loader.
    frames_device = torch.from_numpy(train_frames).to(args.device)
    windows_device = torch.from_numpy(train_windows).to(args.device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr)
    total_epochs = args.pretrain_epochs + args.epochs
    start_epoch, previous_time_s, started_all = 0, 0.0, time.time()
    checkpoint_path = os.path.join(args.out, "model.pt")
    if args.resume:
        state = common.load_checkpoint(checkpoint_path)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start_epoch = int(state["epoch"])
        previous_time_s = float(state.get("train_time_s") or 0.0)
        print(f"resumed from {checkpoint_path} after epoch {start_epoch}/{total_epochs}")
    steps_per_epoch = len(train_windows) // args.batch_size
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    print(f"training on {len(train_windows)} windows of {SEQUENCE_LENGTH} frames at {args.image_size}x"
          f"{args.image_size}: {args.pretrain_epochs} pixel-loss epochs + {args.epochs} adversarial epochs, "
          f"{steps_per_epoch} steps of batch {args.batch_size} each")
    generator.train()
    discriminator.train()
    for epoch in range(start_epoch, total_epochs):
        adversarial = epoch >= args.pretrain_epochs
        phase = "adversarial" if adversarial else "pretrain"
        # A fresh permutation per epoch, reproducible from (seed, epoch) so --resume sees the same order.
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train_windows))
        sums = {"pixel": 0.0, "realism": 0.0, "d": 0.0}
        started = time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{total_epochs} {phase}", leave=False)
        for step in bar:
            batch_ids = torch.from_numpy(order[step * args.batch_size:(step + 1) * args.batch_size]).to(args.device)
            window = to_unit_range(frames_device[windows_device[batch_ids]])        # (B, 11, H, W)
            target = window[:, MIDDLE]
            if not adversarial:
                with autocast(args):
                    generated = generator(window)
                    pixel = pixel_loss(generated.float(), target).mean()
                common.check_finite(pixel, f"epoch {epoch + 1} step {step} (pixel loss)")
                opt_g.zero_grad(set_to_none=True)
                pixel.backward()
                opt_g.step()
                sums["pixel"] += pixel.item()
                bar.set_postfix(pixel=f"{pixel.item():.2f}")
                continue
            # Discriminator step on (real, fake) with the generator frozen (fake detached).
            with autocast(args):
                generated = generator(window)
                fake = replace_middle(window, generated.float())
                d_loss = discriminator_loss(discriminator(window).float(), discriminator(fake.detach()).float())
            common.check_finite(d_loss, f"epoch {epoch + 1} step {step} (L_D)")
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # Generator step: fool the (just updated) discriminator while staying close in pixels.
            with autocast(args):
                fake_logits = discriminator(fake).float()
                realism = neg_log_d(fake_logits).mean()
                pixel = pixel_loss(generated.float(), target).mean()
                g_loss = realism + args.lambda_pixel * pixel
            common.check_finite(g_loss, f"epoch {epoch + 1} step {step} (L_G)")
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            sums["pixel"] += pixel.item()
            sums["realism"] += realism.item()
            sums["d"] += d_loss.item()
            bar.set_postfix(pixel=f"{pixel.item():.2f}", realism=f"{realism.item():.3f}", d=f"{d_loss.item():.3f}")
        bar.close()
        means = {k: v / max(steps_per_epoch, 1) for k, v in sums.items()}
        summary = f"epoch {epoch + 1}/{total_epochs} [{phase}] pixel {means['pixel']:.3f}"
        if adversarial:
            summary += f" realism {means['realism']:.4f} L_D {means['d']:.4f}"
        print(f"{summary} ({time.time() - started:.1f}s)")
        common.save_checkpoint(checkpoint_path, {
            "generator": generator.state_dict(),
            "discriminator": discriminator.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "epoch": epoch + 1,
            "args": common.args_to_dict(args),
            "train_time_s": previous_time_s + time.time() - started_all,
        })
    return previous_time_s + time.time() - started_all


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def score_video(generator, discriminator, frames, batch_size=64, map_pool=4, amp=False):
    """Score one video. frames: (T, H, W) uint8 tensor on the model's device.
    Returns per-frame pixel terms ||G - X_t||^2 and discriminator terms -log D(S_t) (float64 (T,), NaN
    where no full window exists) and the pixel-loss maps (T, H/map_pool, W/map_pool) float32 (frames
    without a window copy the nearest scored frame's map)."""
    num_frames = frames.shape[0]
    pixel_terms = np.full(num_frames, np.nan)
    disc_terms = np.full(num_frames, np.nan)
    height, width = frames.shape[1] // map_pool, frames.shape[2] // map_pool
    maps = torch.zeros((num_frames, height, width), device=frames.device)
    if num_frames < SEQUENCE_LENGTH:
        return pixel_terms, disc_terms, maps.cpu().numpy()
    windows = torch.from_numpy(common.window_indices(num_frames, NEIGHBOURS, NEIGHBOURS)).to(frames.device)
    with torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=amp and frames.device.type == "cuda"):
        # The encoder sees one frame at a time, so each frame is encoded once and shared by the windows.
        features = torch.cat([generator.encode(to_unit_range(frames[i:i + 4 * batch_size]))
                              for i in range(0, num_frames, 4 * batch_size)])
        pixel_out, disc_out = [], []
        for start in range(0, len(windows), batch_size):
            rows = windows[start:start + batch_size]
            generated = generator.decode(generator.temporal(features[rows[:, FORWARD_POSITIONS]],
                                                            features[rows[:, BACKWARD_POSITIONS]])).float()
            sequence = to_unit_range(frames[rows])
            error = (generated - sequence[:, MIDDLE]).pow(2)
            pixel_out.append(error.flatten(1).sum(1))
            disc_out.append(neg_log_d(discriminator(sequence).float()))
            maps[rows[:, MIDDLE]] = F.avg_pool2d(error.unsqueeze(1), map_pool)[:, 0]
    scored = slice(NEIGHBOURS, num_frames - NEIGHBOURS)
    pixel_terms[scored] = torch.cat(pixel_out).double().cpu().numpy()
    disc_terms[scored] = torch.cat(disc_out).double().cpu().numpy()
    maps[:NEIGHBOURS] = maps[NEIGHBOURS]
    maps[num_frames - NEIGHBOURS:] = maps[num_frames - NEIGHBOURS - 1]
    return pixel_terms, disc_terms, maps.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Localization (section 3.4, Fig. 3)
# --------------------------------------------------------------------------------------------------

def guided_backprop_map(discriminator, sequence):
    """|d sum(output activation) / d X_t| with guided backpropagation through D's ELUs, where the output
    activation is D's last layer before the sigmoid (the sigmoid saturates for confident sequences and
    would zero every gradient). sequence: (11, H, W) in [-1, 1] -> (H, W)."""
    inputs = sequence.detach().unsqueeze(0).clone().requires_grad_(True)
    with torch.enable_grad():
        logits = discriminator(inputs, guided=True)
        (gradient,) = torch.autograd.grad(logits.sum(), inputs)
    return gradient[0, MIDDLE].abs()


def write_panels(out_dir, generator, discriminator, test_frames, frame_scores, num_panels, device):
    """Fig. 3-like PNGs (real, generated, generator map, discriminator map) for the highest-scoring
    frames, at most one per video (chosen from the scores, never from labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = []
    for name, scores in frame_scores.items():
        if np.isfinite(scores).any():
            normalised = minmax_per_video(scores)
            candidates.append((float(np.nanmax(normalised)), name, int(np.nanargmax(scores))))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    panel_dir = os.path.join(out_dir, "panels")
    os.makedirs(panel_dir, exist_ok=True)
    written = []
    for _, name, t in candidates[:num_panels]:
        frames = torch.from_numpy(np.array(test_frames[name][t - NEIGHBOURS:t + NEIGHBOURS + 1])).to(device)
        sequence = to_unit_range(frames)
        with torch.inference_mode():
            generated = generator(sequence.unsqueeze(0))[0]
        pixel_map = (generated - sequence[MIDDLE]).pow(2)
        disc_map = guided_backprop_map(discriminator, sequence)
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


def test(args, ds, generator, discriminator, train_time_s):
    generator.eval()
    discriminator.eval()
    size = (args.image_size, args.image_size)
    # Decoding/resizing is cached by common; the throughput below is measured from cached frames.
    test_frames = common.load_split_frames(ds, "test", size, cache_dir=args.cache_dir)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.time()
    pixel_terms, disc_terms, maps = {}, {}, {}
    for name, frames in tqdm(test_frames.items(), desc="test videos", leave=False):
        frames_device = torch.from_numpy(np.array(frames))
        if args.device.type == "cuda":
            frames_device = frames_device.pin_memory().to(args.device, non_blocking=True)
        pixel_terms[name], disc_terms[name], video_maps = score_video(
            generator, discriminator, frames_device, args.test_batch_size, args.map_pool, args.amp)
        maps[name] = video_maps.astype(np.float16)
    names = list(pixel_terms)
    lambda_s = args.lambda_s if args.lambda_s is not None else lambda_s_rule(
        [pixel_terms[n] for n in names], [disc_terms[n] for n in names], args.lambda_s_divisor)
    scores_by_detector = {det: {n: detector_scores(pixel_terms[n], disc_terms[n], det, lambda_s).astype(np.float32)
                                for n in names} for det in ("g", "d", "gd")}
    frame_scores = scores_by_detector[args.detector]
    meta = {"method": "stan", "dataset": ds.name, "detector": args.detector, "lambda_s": lambda_s,
            "protocol": {"normalize": args.normalize, "smooth": args.smooth}, "args": common.args_to_dict(args)}
    scores_path = os.path.join(args.out, "scores.npz")
    common.write_scores(scores_path, frame_scores, maps, meta)
    elapsed = time.time() - started
    num_frames = sum(len(s) for s in frame_scores.values())
    test_fps = num_frames / max(elapsed, 1e-9)
    print(f"test: {num_frames} frames in {elapsed:.1f}s = {test_fps:.1f} frames/s (cached frames -> scores.npz, "
          f"{args.device}); lambda_s = {lambda_s:.4g}; wrote {scores_path}")

    if args.num_panels:
        panels = write_panels(args.out, generator, discriminator, test_frames, frame_scores, args.num_panels,
                              args.device)
        print(f"wrote {len(panels)} localization panels to {os.path.join(args.out, 'panels')}")

    # Table 2's three rows and the un-normalised result are recorded next to the paper protocol's result.
    # (maps do not depend on the detector, so the pixel-level numbers are only computed once, below)
    per_detector = {det: vad_eval.evaluate(s, None, ds, normalize=args.normalize, smooth=args.smooth)
                    for det, s in scores_by_detector.items()}
    unnormalised = vad_eval.evaluate(frame_scores, maps, ds, normalize="none", smooth=args.smooth)
    extra = {"train_time_s": train_time_s, "test_fps": test_fps, "protocol": args.protocol,
             "detector": args.detector, "lambda_s": lambda_s, "image_size": args.image_size,
             "detectors": per_detector, "unnormalized": unnormalised, "command": args.command}
    return vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

# Paper values for real datasets; a small CPU demo for the synthetic one (see the docstring).
PAPER_DEFAULTS = {"image_size": 224, "pretrain_epochs": 10, "epochs": 20, "batch_size": 3, "lr": 2e-4,
                  "steps_per_epoch": 0}
SYNTHETIC_DEFAULTS = {"image_size": 64, "pretrain_epochs": 3, "epochs": 1, "batch_size": 3, "lr": 2e-4,
                      "steps_per_epoch": 40}


def build_parser():
    parser = common.build_parser("stan", __doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size, a multiple of 8 (paper 224; synthetic default 64)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="generator-only epochs on the pixel loss before adversarial training (default 10)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="cap on optimisation steps per epoch (0 = one pass over all windows)")
    parser.add_argument("--lambda-pixel", type=float, default=1.0, help="lambda in L_G, eq. 3 (paper 1)")
    parser.add_argument("--lambda-s", type=float, default=None,
                        help="lambda_s in eq. 5; default: the paper's rule (max ratio of the two terms / 10)")
    parser.add_argument("--lambda-s-divisor", type=float, default=10.0, help="divisor in the lambda_s rule (paper 10)")
    parser.add_argument("--detector", choices=("g", "d", "gd"), default="gd",
                        help="Table 2 row: generator pixel loss, discriminator, or both (eq. 5)")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="windows per test batch (default 256 on CUDA, 32 on CPU)")
    parser.add_argument("--map-pool", type=int, default=4, help="average-pool factor of the stored pixel-loss maps")
    return parser


def resolve_defaults(args):
    defaults = SYNTHETIC_DEFAULTS if args.dataset == "synthetic" else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size % 8:
        raise common.DataError(f"--image-size {args.image_size}: expected a multiple of 8")
    if args.normalize is None:
        args.normalize = "video_minmax"       # the paper's protocol (eq. 6)
    if args.test_batch_size is None:
        args.test_batch_size = 256 if args.device.type == "cuda" else 32
    reduced = args.image_size != 224 or args.steps_per_epoch or args.pretrain_epochs != 10 or args.epochs != 20
    args.protocol = (f"STAN {'REDUCED' if reduced else 'paper'} protocol: {args.image_size}x{args.image_size} "
                     f"gray, {args.pretrain_epochs} pixel + {args.epochs} adversarial epochs"
                     f"{f' x {args.steps_per_epoch} steps' if args.steps_per_epoch else ''}, batch {args.batch_size},"
                     f" Adam lr {args.lr}, detector {args.detector}, per-video min-max (eq. 6)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = common.parse_args(build_parser(), argv)
    args.command = "python stan.py " + " ".join(argv)
    common.seed_everything(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    checkpoint_path = os.path.join(args.out, "model.pt")
    if args.test and not args.train:
        # Test-only: input size and training settings (for the protocol string) come from the checkpoint.
        trained_with = common.load_checkpoint(checkpoint_path)["args"]
        for key in ("image_size", "pretrain_epochs", "epochs", "steps_per_epoch", "batch_size", "lr"):
            if getattr(args, key) is None:
                setattr(args, key, trained_with.get(key))
    args = resolve_defaults(args)
    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    print(json.dumps(ds.summary()))
    os.makedirs(args.out, exist_ok=True)
    generator = Generator().to(args.device)
    discriminator = Discriminator().to(args.device)
    train_time_s = None
    if args.train:
        train_time_s = train(args, ds, generator, discriminator)
        print(f"training took {train_time_s:.1f}s (all runs of this model.pt)")
    if args.test:
        state = common.load_checkpoint(checkpoint_path, map_location=args.device)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        if train_time_s is None:
            train_time_s = state.get("train_time_s")
        test(args, ds, generator, discriminator, train_time_s)


if __name__ == "__main__":
    common.run_main(main)
