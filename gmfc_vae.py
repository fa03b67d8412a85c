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
"dynamic flow" images (motion stream). A dynamic flow summarises a window of optical-flow fields: each flow is
mapped to [0, 255] by 16 f + 128, the horizontal and vertical channels are each rank-pooled over the window,
and the magnitude of the pooled (u, v) is the third channel. Each network is a fully convolutional VAE (C1..C4
encoder, F5/F6 1x1 mean / log-variance of a 64-d latent, a sampling layer, D8..D11 deconvolution decoder)
whose prior is a K = 20 component Gaussian mixture learned jointly (VaDE): the network is first pre-trained as
a plain auto-encoder, the mixture (pi, mu, sigma^2) is initialised by fitting a diagonal GMM to the pre-trained
latents, then everything is trained on the VaDE loss (equation 14) on moving patches of normal training video.
At test every frame is cut into a grid of non-overlapping 28x28 patches (15x10 = 150 at 420x280), each patch's
latent gets the sample energy E = -log sum_c pi_c N(z | mu_c, sigma_c^2) (equation 17) in each stream, the
streams are fused by E = 0.5 E_appearance + 0.5 E_motion (equation 18), the frame score is the maximum over
the grid and the grid itself is the anomaly map (localisation). One test run reports the fused result and each
stream alone (Table VI's ablation) in metrics.json["streams"]. The paper reports that ablation on Ped1 only
(frame AUC: spatial stream 90.6, temporal 87.7, fused 94.9); it gives no single-stream figure for Ped2.

Choices the paper leaves open (documented, not deviations)
-------------------------------------------------------
- Rank pooling: approximate rank pooling (Bilen et al. 2016, eq. "alpha_k = 2(T - k + 1) - (T + 1)(H_T -
  H_{k-1})", H_k the k-th harmonic number), which already includes the time-varying means of eq. (4); no
  RankSVM is solved.
- Dynamic-flow window (Sec. III-A: "we compute the dynamic flow F_i from the sequence f_i .. f_{i+t}", giving
  the dynamic flows F_1 .. F_{n-t} of n flows): the dynamic flow of frame i pools the t + 1 flows f_i..f_{i+t}
  (flow f_i goes from frame i to i+1, so frames i..i+t+1 are covered; t = 20: 21 flows). This forward window
  describes what happens AFTER frame i. That F_i scores frame i is our reading (the paper does not say
  which frame a dynamic flow belongs to); on Ped2 it matters: 151 of the 362 normal test frames have an
  abnormal frame inside their forward window (101 with the centred one), most of them in the run-up to
  an anomaly that starts mid-video. `--flow-window centred` pools f_{i-t/2}..f_{i+t/2} instead (t + 1
  flows around frame i), our option, not the paper's. Frames whose window would leave the video (the last
  t + 1 frames with the forward window, since n flows give n - t full windows for n + 1 frames; t/2 at each
  end with the centred one) reuse the nearest full window (the start is clamped into [0, n_flows - t - 1]) so that every frame and its map are scored; videos with at most
  t + 1 flows pool all their flows. Training patches of the motion stream come only from frames with their
  own full window.
- The 16 f + 128 mapping is rounded and clipped to the integers 0..255 ("discrete range"). Because the
  coefficients sum to 0 the offset 128 cancels except where clipping occurred.
- "All patches are linearly normalized into [0, 1]": frames by /255; dynamic flow (u, v) by 0.5 + D / (2 s),
  magnitude by M / s, clipped to [0, 1], with ONE global scale s = 99.9th percentile of |D| over a sample of
  training dynamic flows (stored in the checkpoint). A per-image min-max (as in Bilen's dynamic images) would
  erase the motion magnitude an anomaly detector needs. Dynamic-flow images are quantised to uint8 at training
  and at test alike.
- Moving patches (Sec. IV-C, "we eliminate the massive number of patches that do not contain any moving pixels
  based on a frame difference"): a training patch is kept when at least `--min-moving-pixels` (default 1, the
  paper's "any moving pixel") of its pixels change by more than `--motion-threshold` (default 15 of 255,
  ours) between frame i and frame i+1, on the gray frames at the working size. A position gives the
  appearance stream the patch of frame i and the motion stream the patch of frame i's dynamic flow. The
  paper samples one set of 960K; each stream here draws its own sample of up to `--max-train-patches`
  (seeds seed and seed + 1): the appearance stream from every moving position, the motion stream from those
  whose frame has its own full flow window, so the appearance stream is not limited to the frames that
  the motion stream can use.
- Output non-linearity of D11: sigmoid (targets are in [0, 1]); F5/F6 are linear; ReLU after every other
  conv/deconv, C4 included ("each convolutional layer is followed by a ReLU").
- Reconstruction term of eq. 14: sum over pixels of the squared error, L = 1 Monte-Carlo sample (VaDE's
  default). Eq. 8 lets the decoder output a variance sigma_x^2 as well (eq. 12: N(x | mu_x, sigma_x^2 I)),
  but Table I's D11 outputs the 3x28x28 mean only, so sigma_x^2 is fixed (at 1/2, which makes the negative
  log-likelihood the plain sum of squares; gray frames repeated on three channels count each pixel three
  times); gamma_c = q(c|x) = p(c|z) of eq. 15 at the sampled z (as VaDE does, gradients pass through it).
- Mixture weights stay on the simplex through a softmax parametrisation (pi = softmax(pi_logits));
  variances through log-variances.
- Weight decay 5e-4 (L2, torch Adam) applies to the network weights only, not to the mixture parameters
  (decaying mu_c / log sigma_c^2 towards 0 would bias the prior). Note the paper used Keras, where Adam's
  `decay=5e-4` means a learning-rate decay; we follow the wording "weight decay".
- Epochs: the paper gives none. Defaults (ours): 10 pre-training epochs (`--pretrain-epochs`) and 10 VaDE
  epochs (`--epochs`) over the sampled patches. Flow: OpenCV Farneback (the paper's [24] is not available).
- Test latent: the encoder mean (F5), not a sample, so scores are deterministic; F6 is not evaluated at test.
- Mixture initialisation (the paper defers to VaDE, which fits a GMM to all pre-trained latents): a diagonal
  GMM (sklearn GaussianMixture, k-means initialisation, one init, reg_covar 1e-6, at most 200 EM
  iterations) on the encoder means of a random `--gmm-fit-patches` (100,000) of the training patches, to
  bound the fit's time and memory; reg_covar is the floor of the component variances.
- F6 (log-variance) is not used by the deterministic auto-encoder pre-training; when the mixture is initialised
  its weights are zeroed and its bias set to the mean log-variance of the fitted components, so the sampling
  layer starts at the scale of the latent clusters instead of unit variance (which would be orders of magnitude
  wider than the clusters and swamp eq. 14's KL term in the first VaDE steps).
- Two learning-rate flags: `--pretrain-lr` (auto-encoder) and `--lr` (VaDE); both 1e-4 as in the paper.
- Pre-training: the paper's "stacked Auto-Encoder which has the same network architecture as the Encoder and
  Decoder" is trained end to end on the squared error (encoder, F5 as the code, decoder); the paper describes
  no greedy layer-wise stage, so there is none.
- Ped1/Ped2 are gray: the appearance stream replicates the gray frame into 3 channels (Table I's 3-channel
  input). Colour datasets use RGB frames.
- Maps: the energy grid (15x10 per frame at 420x280) is written nearest-upsampled by 4 (40x60) so the
  evaluator's bilinear upsampling keeps the patch blocks instead of smearing them across patches. The stored
  value is the monotone transform m = sign(d) log(1 + |d|), d = E - E_ref, E_ref the 99th percentile of the
  stream's energies on 10,000 training patches (fused: alpha E_ref,app + beta E_ref,mot; stored in model.pt).
  Why: scores.npz holds maps as float16, and raw energies overflow it (an anomalous latent far from every
  tight cluster reaches E > 65504 -> inf) while its spacing at large |E| (0.5 at 1000, 32 at 60000) ties
  frames in the pixel ROC. Centred at a training reference and log-compressed, every energy is finite (|m| <
  89 for any float32 E) and the resolution is finest around the energies of normal frames' hottest cells.
  The pixel protocol only compares map values within a run, so a monotone transform changes it only through
  eval's bilinear upsampling at the borders of the 4x4 blocks.
- Frames must be multiples of 28 on both sides (`--image-size`) so that the test grid tiles the whole frame
  (the map is stretched over the frame by the evaluator); 28 must be a multiple of `--test-stride`. With a
  stride s below 28 the patches overlap and the map of patch centres is stretched over the frame, which moves
  the border cells by about (28 - s) / 2 pixels (10 px at stride 7 on 280 rows).
- A video with a single frame has no flow: its motion-stream and fused scores are NaN ("cannot score"), kept as
  such in scores.npz; its map cells take the run's lowest map value (maps must be finite).
- Precision: fp32 by default, on CUDA too (cuDNN's TF32 is turned off: its 10-bit mantissa, like bf16's 7
  bits, is coarse against a tight cluster's sigma). `--amp` (CUDA only, opt-in) runs C1..C4 (and, in
  training, the decoder) in bf16 autocast, for the GMM initialisation's and E_ref's latents too, but
  F5/F6, the latent and the energies in fp32 (a bf16 mean has ~3 significant digits, a large fraction of a
  tight cluster's sigma; F5 still sees C4's bf16-rounded output); its effect on the metrics has not been
  measured. channels_last at test.

Deviations
----------
- Table I lists pad 0 for C1/C2 (and D10/D11) but also their outputs 14x14 / 7x7; a 3x3/2 convolution without
  padding would give 13x13 / 6x6. We use pad 1 (output_padding 1 in D10/D11) to keep Table I's feature sizes,
  which is what Keras' padding="same" does. The text of Sec. IV-C gives other widths (32/64/128/256); we follow
  Table I (64/128/256/64).
- Static test patches: the paper scores all 150 patches of a test frame, which is our default on real data
  (`--static-test-patches score`). `--static-test-patches skip` (our option; the default on the synthetic
  data) encodes only test patches with moving pixels (the training rule above) and gives the others the run's
  lowest energy: the networks never see static background in training, and on the synthetic data scoring it
  put two background cells at the top of every frame (appearance frame AUC ~0.6 vs ~0.9 skipping them). Its
  threshold is recorded in the protocol string.
- Synthetic dataset defaults (for a < 3 min CPU demo; the paper's values stay the defaults for real datasets):
  frames 112x168 (a 6x4 test grid; synthetic frames are 120x180), dynamic-flow window t = 8 (the videos are 80
  frames long and a fast mover crosses the frame in ~20, so t = 20 smeared it over most of the window), at
  most 2,500 training patches per stream, 1 pre-training epoch at lr 1e-3 (too few steps at 1e-4) + 2 VaDE
  epochs at the paper's 1e-4 (1e-3 wrecked the pre-trained latent space in the first VaDE epoch: frame AUC
  0.94 -> 0.50), static test patches skipped. Patch size, network (Table I), K = 20 and the scoring are
  unchanged.
- Real UCSD Ped2 on the 2-core CPU used a reduced protocol (labelled "REDUCED" in metrics.json's "run_protocol"):
  40,000 of the 960K training patches per stream, 2 AE epochs at lr 1e-3 + 2 VaDE epochs at 1e-4 (418 s of
  training). Frame AUC 77.2% micro / 80.4% macro, EER 30.4%, pixel AUC 30.2% / EER 66.0%; motion stream
  alone 81.3%, appearance stream alone 60.3% (52.6% macro; one static corner cell, row 10 column 1, holds
  its frame maximum in 99.7% of test frames, see below) (paper: 92.2 / 12.6, pixel 78.2 / 19.2, Table
  III; its Table V gives Ped2 frame AUC 91.7% at K = 20, our default, and 92.2% at K = 30 and 40). An
  earlier version of this script gave 77.6 / 80.0 with the appearance stream alone at 42.9%, the figure
  the experiments below start from.

Why the appearance stream fails on Ped2 at that budget (measured on every 3rd test frame; "patch AUC" ranks
the test cells more than 25% covered by the anomaly mask against the cells outside every mask)
-------------------------------------------------------------------------------------------------------------
- The frame maximum is taken by static background. Training sees only patches with moving pixels, and the
  bottom corners of Ped2's frame hardly ever move (0-3% of test frames): one cell there (row 10 of 10, column
  13 of 15) is the highest-energy cell of 95% of all test frames, normal or not, so the frame score barely
  depends on the frame. Skipping static test cells (`--static-test-patches skip`) removes it but leaves the
  frame AUC at about 50%.
- Among moving cells the sample energy separates anomalous from normal patches weakly: patch AUC 61-69% in
  every variant we tried, while the reconstruction error of the same model reaches 75-80% (88-93% over all
  cells). The energy was also weak right after the AE pre-training and GMM initialisation (68%); the VaDE
  epochs lowered it to 61-63%.
- Hypotheses tested and rejected, each a run of the reduced protocol: no weight decay (Keras' `decay` read as
  learning-rate decay): no change; eq. 14's reconstruction term weighted by 10 or by 100 (a smaller
  sigma_x^2, eq. 12): KL grows from 11 to 32-77 nats, energy patch AUC among moving cells stays at 68-69%;
  scoring with uniform pi, with the best single component, or averaging the energy over posterior samples
  instead of the mean latent: within 1 point; refitting a GMM on the final latents: +4 to +6 points, still below 70%;
  reading "linearly normalized into [0, 1]" as a min-max of each patch instead of /255 (appearance stream
  alone, reduced protocol, a patched copy of `to_input`): frame AUC 55.3% (macro 56.6%), 49.0% with static
  test cells skipped, against 42.9% for /255: near chance either way.
- A diagonal mixture on correlated latents (tested on the appearance stream of a fresh reduced run, 42.8%
  frame AUC, by refitting on the encoder means of its 40,000 training patches and rescoring the test grid):
  the latent is strongly correlated (mean |correlation| between dimensions 0.41) and nearly degenerate
  (covariance eigenvalues from 19.8 down to a median of 2e-4), so an axis-aligned mixture fits it badly.
  A full-covariance GMM (K = 20) gives 50.1%, a diagonal one after PCA whitening 50.0% (55.0% with static
  test cells skipped), a single full Gaussian 49.9%, diagonal GMMs on the top 4 / 8 / 16 whitened
  components 53.8 / 49.6 / 52.5%: the axes explain why the energy falls below chance, not why it stays
  near it.
- Training patches with more motion: with `--min-moving-pixels 80` (374,284 candidate positions instead of
  1,071,309 with the literal "any moving pixel"; same reduced protocol, appearance stream alone) the frame AUC is 46.4%
  (macro 37.6%) against 42.8%: not the cause either.
- Why the refit helps (reasoning, not a measurement): Adam moves each parameter by about lr per step, so in
  the reduced run's 800 VaDE steps the mixture (mu_c, log sigma_c^2) can move by at most ~0.08 at lr 1e-4
  and stays close to its initial fit while the encoder's latents move; our default schedule on the paper's
  960K patches (96,000 VaDE steps per stream; the paper gives no epoch count) removes that limit. It does
  not explain the weak energy right after initialisation.
- The energy measures contrast. Right after the reduced protocol's AE pre-training (2 epochs, lr 1e-3) and the
  GMM initialisation, on the moving cells of every 3rd test frame, the energy ranks anomalous against normal
  patches no better than the patch's pixel standard deviation alone (patch AUC 67.4% against 67.8%; Spearman
  correlation between the two 0.83), and a frame score from the standard deviation of the moving cells (64.2%)
  beats the energy's (56.5%), while the same AE's reconstruction error reaches 73.1%. With the paper's lr 1e-4
  for the pre-training: energy patch AUC 68.8%, Spearman 0.80, energy frame AUC 53.7%, reconstruction error
  63.4%. The energy left after regressing out contrast (a quadratic in log(1 + std) fitted on training cells)
  has patch AUC 59.2%; standardising each grid position's energy by its mean and deviation over training frames
  lifts the frame AUC to 62.8% (moving cells): real but modest. At this budget the mixture prior mostly scores
  how textured a patch is, not what it shows. The formulas are not the cause: the tests check eq. 17 against
  scipy and eq. 14 against numpy.
- More budget of the same kind does not lift it: the appearance stream alone (`--streams rgb`) on 200,000
  patches with 4 + 4 epochs (10x the reduced run's patch-epochs, 1,378 s) scores frame AUC 49.4% (macro
  40.4%), and 49.4% (macro 56.8%) with static test cells skipped; the reduced run's was 42.9%.
- The ReLU after C4, C4's width and the mixture's shape (patched copies, the reduced protocol, appearance
  stream alone): Table I feeds F5/F6 from C4's 64 channels and the text puts a ReLU after every
  convolution; 12 of those 64 units never fire on the 28-pixel grid of every 10th training frame. Without
  that ReLU the frame AUC is 67.1% with seed 0 (42.8% with it) and 66.2% with seed 1 (46.5%), but only
  through static background (the bottom-left corner cell holds the maximum of 85% of the maps): with static
  test cells skipped it scores 46.8% against the ReLU model's 49.9%. The text's wider C4 (256 channels with
  ReLU, F5/F6 mapping 256 -> 64) gives 41.0%; one variance per component at scoring (the mean of log
  sigma_c^2 over the 64 dimensions, on the seed-0 ReLU model) 42.1%. With or without the ReLU the encoder
  mean spans about 11 directions (covariance eigenvalues above 1e-3 of the largest).
- How to read the frame AUCs above: with every test cell scored, a bottom-corner cell that is never a
  training patch (cell row 10, column 13 has a moving pixel in 0 of 2,534 training frame pairs at the
  threshold of 15) holds the frame maximum of 96-99% of test frames, so the appearance frame AUC measures
  that one static cell. Two models with the same patch AUC among moving cells (61.7%; the second differed
  only in F6's starting bias, the minimum instead of the mean of the component log-variances) scored 42.8%
  and 57.5%, with a different corner cell winning; their appearance pixel AUC is 0.0% (the always-hot
  corner alarms on every normal frame first). Frame AUC differences of ~15 points between the variants
  above are within that noise; the patch AUCs and the figures with static test cells skipped are the
  evidence. The same runs show what VaDE does to the mixture: 6 of the 20 components end with no
  patches, 2 hold 63%, and the energy follows the assigned component's log-determinant (correlation 0.79).
- The motion threshold decides whether the border cells are ever trained on: at 5 instead of 15 (35% of
  positions kept) the corner cells count as moving in 569-1,880 of the 2,534 training frame pairs, the
  patch AUC over moving cells goes from 61.7% to 66.9%, and corner cells still win 72% of the frame maxima
  (frame AUC 46.5% micro / 52.4% macro). Not the cause either; the default stays 15.
- Training on every position (`--motion-threshold -1`: static background included, so no test cell is
  unseen; the reduced protocol, appearance stream alone) does not remove the corner either: a bottom-row
  cell (row 10, column 2) still holds the frame maximum of 95% of test frames, frame AUC 45.7% micro /
  54.4% macro, pixel AUC 0.0%. The corner's high energy does not come from its never being trained on.
- What a density of the raw patches gives, with no network (the same 40,000 moving training patches at
  420x280 /255; every 3rd test frame, all 150 cells scored, patch AUC among moving cells in brackets): the
  negative log-likelihood of a K = 20 GMM on the patches' 64 PCA components 63.4% (69.6%) with diagonal
  and 63.6% (75.4%) with full covariances, the L2 distance to the nearest training patch 60.1% (77.2%),
  the pixel standard deviation 54.0% (67.2%), and the same PCA's reconstruction error 78.6% (77.8%). So a
  28x28 appearance density reaches about 64% frame AUC on Ped2 at this budget while reconstruction error
  carries more of the signal, and the learned latent's mixture (42.9%) falls below even the linear one,
  whose frame AUC hardly changes when only moving cells are scored (63.3%).
- The same GMMs refitted on the encoder means of the README's reduced model (same patches and cells; its
  own eq. 17 energy there: 59.6% with all cells, 45.9% moving cells only, patch AUC 60.5%) score 44.4 /
  54.7% (diagonal; all cells / moving cells) and 56.9 / 54.9% (full), 7-19 points below the same mixtures
  on the PCA components, and the auto-encoder's own reconstruction error 64.3 / 64.2% against PCA's
  78.6%: at this budget the learned 64-d latent keeps less of what separates Ped2's anomalies than a
  linear projection of the pixels does, whatever mixture is put on it.
- Not testable on a CPU: the paper's 960K patches with our default epochs (24x the reduced run's patches, 5x
  its epochs; 12x the larger run's patch-epochs).

Training in slices
------------------
`--max-minutes M` stops at the next training step once M minutes have passed, writes model.pt atomically
(weights, mixture, optimiser, phase / epoch / step, RNG states) and prints the command that continues
(`--resume`); a run cut into slices ends with the same weights as an uninterrupted one, bit for bit on the
CPU; on CUDA only close to them (cuDNN may pick other algorithms after a restart). The patch order of an
epoch is a permutation drawn from a generator seeded by (seed, phase, epoch), so it is recomputed, not
stored. A test-only run (`--test`) takes every training setting (size, window, flow mapping, epochs, ...)
from model.pt and warns about a command-line flag that disagrees.

Training speed
--------------
The default schedule is up to 384,000 steps of 100 patches (both streams, 20 epochs each; ~378,000 on Ped2,
whose motion stream has 931,866 moving patches with a full flow window), and one step is ~280 operator calls
(counted on the CPU), so on a GPU eager PyTorch would spend most of each step launching kernels. On CUDA
each step is therefore captured once as a CUDA graph and replayed (`common.GraphedStep`; `--no-cuda-graphs`
runs it eagerly), with fused, capturable Adam; the training patches stay on the GPU as uint8 where they fit.
The replayed kernels are the eager ones, and each replay advances the CUDA generator as an eager step would,
so the sampling layer's draws should be an eager run's too. A check on the GPU (tests/device_checks.py)
compares the two steps (the same losses and weights without noise, close ones with it, and whether the draws
agree) and measures both rates in one run; the speed-up on a GPU has not been measured yet. A capture that
fails warns and steps eagerly. Each epoch prints its synchronised steps/s.

Test throughput
---------------
Per video, frames and flows are copied to the device (pinned, the next video's copy in flight), dynamic flows
are rank-pooled and patches cut there, fixed-shape batches (the last one padded) go through the encoders, and
one copy per video brings the grids back. The printed frames/s covers cached frames and flows to scores.npz
(dynamic flow, patches, both streams, fusion, maps, writing), excluding model load and a warm-up batch.

Usage
-----
    python gmfc_vae.py --dataset synthetic                          # train + test, < 3 min on 2 CPU cores
    python gmfc_vae.py --dataset ped2 --data-root ../shared/data    # the paper's protocol (use a GPU)
    python gmfc_vae.py --dataset ped2 --data-root ../shared/data --train --max-minutes 9   # one slice; repeat
        with --resume until it says training is done, then --test
    python gmfc_vae.py --dataset ped2 --data-root ../shared/data --test          # score with runs/.../model.pt
    python gmfc_vae.py --dataset ped2 --components 10               # Table V variant
    python gmfc_vae.py --dataset ped2 --max-train-patches 40000 --pretrain-epochs 2 --epochs 2 \
        --pretrain-lr 1e-3                                          # the reduced CPU protocol
"""

import argparse
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
REFERENCE_PATCHES = 10_000                      # training patches whose energies give the map reference E_ref


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

    def trunk(self, x):
        """C1..C4 with their ReLUs: (N, 64, 1, 1). Runs in the caller's autocast precision."""
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = F.relu(self.c3(h))
        return F.relu(self.c4(h))

    def encode(self, x):
        """(mean, log-variance) of q(z|x), (N, 64) each; F5/F6 always in fp32 (also under --amp)."""
        h = self.trunk(x)
        with torch.autocast(x.device.type, enabled=False):
            h = h.float()
            return self.f5(h).flatten(1), self.f6(h).flatten(1)

    def encode_mean(self, x):
        """The test latent: F5 only (fp32), F6 is not evaluated."""
        h = self.trunk(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.f5(h.float()).flatten(1)

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


def dynamic_flow_windows(num_flows: int, window: int, align: str = "forward"):
    """Frame i's window of L = min(t + 1, num_flows) flows: (starts (num_flows + 1,), L, complete mask).

    forward (paper, Sec. III-A): flows i..i+t; centred: flows i - t//2 .. i - t//2 + t. Starts are clamped into
    [0, num_flows - L]; `complete` marks the frames whose own window fits (and has all t + 1 flows)."""
    length = min(window + 1, num_flows)
    wanted = np.arange(num_flows + 1) - (window // 2 if align == "centred" else 0)
    starts = np.clip(wanted, 0, max(num_flows - length, 0))
    complete = (wanted == starts) & (length == window + 1)
    return starts, length, complete


def rank_pool_flows(flows, frame_ids, window: int, align: str = "forward", a: float = 16.0, b: float = 128.0):
    """Rank-pooled (u, v), (len(frame_ids), 2, H, W) float32 tensor: D_i = sum_k alpha_k (a f_{s_i+k} + b).

    flows: (N, H, W, 2) array or tensor (any device) in pixels; a f + b is rounded and clipped to 0..255 (the
    paper's discrete flow images) before pooling. s_i is frame i's window start (dynamic_flow_windows)."""
    starts, T, _ = dynamic_flow_windows(flows.shape[0], window, align)
    starts = starts[np.asarray(frame_ids)]
    lo, hi = int(starts.min()), int(starts.max()) + T          # the flows these windows need, mapped once
    segment = flows[lo:hi] if torch.is_tensor(flows) else torch.from_numpy(np.array(flows[lo:hi]))
    mapped = torch.clamp(torch.round(segment.float() * a + b), 0, 255)
    rel = common.to_device(starts - lo, mapped.device)          # pinned, non-blocking on CUDA: no sync
    alpha = rank_pool_coefficients(T)
    pooled = mapped[rel] * float(alpha[0])
    for k in range(1, T):                   # T vectorised passes over all requested frames
        pooled.add_(mapped[rel + k], alpha=float(alpha[k]))
    return pooled.permute(0, 3, 1, 2)


def normalize_dynamic_flow(pooled, scale: float):
    """(N, 2, H, W) pooled (u, v) -> (N, 3, H, W) in [0, 1]: 0.5 + D / 2s for u, v and |D| / s as magnitude."""
    magnitude = torch.sqrt((pooled ** 2).sum(1, keepdim=True))
    return torch.cat([0.5 + pooled / (2 * scale), magnitude / scale], 1).clamp_(0, 1)


def dynamic_flow_uint8(pooled, scale: float):
    """The dynamic flow image as uint8 (N, 3, H, W): the same quantisation at training and at test."""
    return torch.round(normalize_dynamic_flow(pooled, scale) * 255).to(torch.uint8)


def estimate_flow_scale(train_flows: dict, args, frames_per_video: int = 8) -> float:
    """Global normalisation s: the 99.9th percentile of |rank-pooled u, v| on evenly spaced training windows."""
    values = []
    gen = torch.Generator().manual_seed(0)
    for flows in train_flows.values():
        if flows.shape[0] == 0:
            continue
        ids = np.unique(np.linspace(0, flows.shape[0], frames_per_video).astype(int))
        uv = rank_pool_flows(flows, ids, args.window, args.flow_window, args.flow_a, args.flow_b).abs().flatten()
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
    """images (T, C, H, W) tensor; positions (M, 3) (frame, y, x) int tensor on its device -> (M, C, 28, 28)."""
    d = torch.arange(PATCH, device=images.device)
    f = positions[:, 0, None, None]
    y = positions[:, 1, None, None] + d[None, :, None]
    x = positions[:, 2, None, None] + d[None, None, :]
    return images.permute(0, 2, 3, 1)[f, y, x].permute(0, 3, 1, 2)


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


def frames_to_tensor(frames, device):
    """(T, H, W) or (T, H, W, C) uint8 array -> (T, C, H, W) uint8 tensor on device."""
    t = common.to_device(frames, device)
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)


def patches_fit(device, num_bytes: int) -> bool:
    """Keep a training set on the device when it takes under half of the free memory (always on CPU)."""
    return device.type != "cuda" or common.fits_on_device(num_bytes, device)


def extract_patches(stream: str, frames: dict, flows: dict, positions: dict, flow_scale: float, args, device,
                    chunk: int = 32):
    """uint8 (M, C, 28, 28) training patches, cut on the device (C = 1 for gray appearance, replicated to 3 at
    batch time; C = 3 for dynamic flow, pooled only for the sampled frames). Kept on the device when they fit."""
    channels = 3 if stream == "flow" or frames[next(iter(frames))].ndim == 4 else 1
    total = sum(len(p) for p in positions.values())
    keep_on = device if patches_fit(device, total * channels * PATCH * PATCH) else torch.device("cpu")
    parts = []
    for name, pos in tqdm(positions.items(), desc=f"{stream} patches", leave=False):
        pos_t = torch.from_numpy(pos).to(device)
        if stream == "rgb":
            parts.append(gather_patches(frames_to_tensor(frames[name], device), pos_t).to(keep_on))
            continue
        flows_t = common.to_device(flows[name], device)
        frame_ids = np.unique(pos[:, 0])
        for s in range(0, len(frame_ids), chunk):
            ids = frame_ids[s:s + chunk]
            images = dynamic_flow_uint8(rank_pool_flows(flows_t, ids, args.window, args.flow_window,
                                                        args.flow_a, args.flow_b), flow_scale)   # (n, 3, H, W)
            sel = pos_t[(pos_t[:, 0] >= int(ids[0])) & (pos_t[:, 0] <= int(ids[-1]))].clone()
            sel[:, 0] = torch.searchsorted(torch.as_tensor(ids, device=device), sel[:, 0].contiguous())
            parts.append(gather_patches(images, sel).to(keep_on))
    return torch.cat(parts) if parts else torch.zeros((0, channels, PATCH, PATCH), dtype=torch.uint8)


def on_device(batch, device):
    """A batch of a training set kept on the device as it is; one kept on the host through pinned memory."""
    return batch if batch.device.type == device.type else common.to_device(batch, device)


def to_input(batch_uint8):
    """uint8 (N, C, 28, 28) on the compute device -> float (N, 3, 28, 28) in [0, 1]; gray (C = 1) replicated."""
    x = batch_uint8.float().div_(255)
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
def epoch_order(num_patches: int, seed: int, phase: str, epoch: int):
    """The patch permutation of one epoch: a function of (seed, phase, epoch), so a resumed run recomputes it."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch + (0 if phase == "pretrain" else 500))
    return torch.randperm(num_patches, generator=gen)


def train_step(model, optimizer, x, phase: str, autocast: bool):
    """One step on the float batch x: forward, the auto-encoder's squared error (phase 'pretrain') or eq. 14
    ('vade'), backward, Adam. Returns the (loss, rec, kl) tensors without waiting for the device."""
    # (autocast's cache of cast weights off: each weight is used once per step, and a CUDA graph must not
    # keep cast copies from its capture)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        x_rec, mu, logvar, z = model(x, sample=(phase == "vade"))
    x_rec = x_rec.float()
    if phase == "pretrain":
        loss = ((x - x_rec) ** 2).flatten(1).sum(1).mean()
        rec, kl = loss, torch.zeros_like(loss)
    else:
        loss, rec, kl = vade_loss(x, x_rec, mu, logvar, z, *model.mixture_params())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, rec, kl


def run_epoch(model, optimizer, patches, args, device, phase: str, prog: dict, budget, desc: str,
              step_fn=None):
    """Continue one pass over the sampled patches from step prog['step']; phase 'pretrain' (auto-encoder,
    squared error) or 'vade' (equation 14). Stops before a step once the time budget has run out. step_fn:
    batch -> (loss, rec, kl) tensors, e.g. train_step as a common.GraphedStep (default: train_step).
    Returns (finished, loss means of the steps run now, plus their "steps_per_s")."""
    model.train()
    order = epoch_order(len(patches), args.seed, phase, prog["epoch"]).to(patches.device)
    steps = math.ceil(len(patches) / args.batch_size)
    monitor = common.LossMonitor(every=50)
    autocast = args.amp and device.type == "cuda"
    rate, finished = common.StepRate(device), True
    if step_fn is None:
        step_fn = lambda x: train_step(model, optimizer, x, phase, autocast)
    for step in tqdm(range(prog["step"], steps), desc=desc, leave=False):
        if budget.expired():
            finished = False
            break
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        loss, rec, kl = step_fn(to_input(on_device(patches[idx], device)))
        monitor.add(f"{desc} step {step}", loss=loss, rec=rec, kl=kl)
        prog["step"] = step + 1
        rate.step_done()
    stats = monitor.means(f"{desc} " + ("end" if finished else f"step {prog['step']}"))
    stats["steps_per_s"] = rate.rate()
    return finished, stats


@torch.no_grad()
def encode_latents(model, patches, idx, device, amp: bool = False, batch: int = 4096):
    """Encoder means (fp32, on CPU) of patches[idx] (idx a sorted numpy index array); with amp (CUDA), the
    trunk in bf16 as in training and at test."""
    model.eval()
    out = []
    for s in range(0, len(idx), batch):
        sel = torch.from_numpy(idx[s:s + batch]).to(patches.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model.encode_mean(to_input(on_device(patches[sel], device))).cpu())
    return torch.cat(out) if out else torch.zeros(0, LATENT_DIM)


@torch.no_grad()
def init_mixture_from_latents(model, patches, components: int, max_fit: int, seed: int, device, amp=False):
    """VaDE initialisation: fit a diagonal GMM to the pre-trained encoder means and copy (pi, mu, sigma^2)."""
    from sklearn.mixture import GaussianMixture
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(patches), size=min(max_fit, len(patches)), replace=False))
    latents = encode_latents(model, patches, idx, device, amp).numpy().astype(np.float64)
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


@torch.no_grad()
def energy_reference(model, patches, seed: int, device, amp: bool = False) -> float:
    """E_ref of the stored maps: the 99th percentile of the energies of up to 10,000 training patches."""
    rng = np.random.default_rng(seed + 7)
    idx = np.sort(rng.choice(len(patches), size=min(REFERENCE_PATCHES, len(patches)), replace=False))
    latents = encode_latents(model, patches, idx, device, amp)
    energies = sample_energy(latents, *[p.detach().cpu() for p in model.mixture_params()])
    return float(np.percentile(energies.numpy(), 99))


def training_positions(ds, frames: dict, flows: dict, streams, args) -> dict:
    """Moving-patch candidates -> {stream: {video: (m, 3) positions}} sampled up to --max-train-patches."""
    candidates = {}
    for video in tqdm(ds.train, desc="moving patches", leave=False):
        gray = frames[video.name] if frames[video.name].ndim == 3 else np.asarray(frames[video.name]).mean(-1)
        candidates[video.name] = moving_patch_positions(gray, args.train_stride, args.motion_threshold,
                                                        args.min_moving_pixels)
    positions = {"rgb": sample_positions(candidates, args.max_train_patches, args.seed)}
    if "flow" in streams:     # motion stream: only frames whose own window of t + 1 flows is complete
        full = {}
        for video in ds.train:
            complete = dynamic_flow_windows(flows[video.name].shape[0], args.window, args.flow_window)[2]
            full[video.name] = candidates[video.name][complete[candidates[video.name][:, 0]]]
        positions["flow"] = sample_positions(full, args.max_train_patches, args.seed + 1)
    print(f"training patches: {sum(len(c) for c in candidates.values())} moving of "
          f"{sum(v.num_frames for v in ds.train)} frames; sampled "
          + ", ".join(f"{s} {sum(len(p) for p in positions[s].values())}" for s in streams))
    return positions


# settings a resumed run must share with its checkpoint (they define the training data and its order)
RESUME_KEYS = ("image_size", "window", "flow_window", "flow_a", "flow_b", "flow_method", "train_stride",
               "max_train_patches", "motion_threshold", "min_moving_pixels", "components", "batch_size", "seed",
               "gmm_fit_patches")


def checkpoint_state(models, optimizer, progress, run):
    """Everything --resume needs: every stream's weights (incl. the mixture), the running optimizer, phase /
    epoch / step per stream, RNG states, the flow scale, the map references and the training time so far."""
    return {"models": {s: m.state_dict() for s, m in models.items()},
            "optimizer": optimizer or {},     # {"stream", "phase", "state"} of the optimizer in use
            "progress": {s: dict(p) for s, p in progress.items()},
            "flow_scale": run["flow_scale"], "energy_reference": dict(run["energy_reference"]),
            "train_time_s": run["train_time_s"] + time.monotonic() - run["started"],
            "rng": common.get_rng_state(), "args": common.args_to_dict(run["args"])}


def train(args, ds, streams, gray: bool, device, budget, argv):
    """Train one GMFC-VAE per stream: AE pre-training, GMM initialisation, VaDE (eq. 14).
    Returns True when training is complete, False when the time budget stopped it (checkpoint written)."""
    ckpt_path = os.path.join(args.out, "model.pt")
    models = {s: GMFCVAE(3, LATENT_DIM, args.components).to(device) for s in streams}
    progress = {s: {"phase": "pretrain", "epoch": 0, "step": 0} for s in streams}
    run = {"flow_scale": None, "energy_reference": {}, "train_time_s": 0.0, "started": time.monotonic(),
           "args": args}
    saved_optimizer = None
    state = common.resume_checkpoint(ckpt_path, args.resume, method=args.method)
    if state is not None:
        saved_args = state["args"]
        mine_all = common.args_to_dict(args)
        for key in RESUME_KEYS:
            mine, theirs = mine_all[key], saved_args.get(key)
            if key in saved_args and mine != theirs:
                raise common.DataError(f"{ckpt_path}: trained with --{key.replace('_', '-')} {theirs}, this run "
                                       f"asks for {mine}; --resume needs the same setting (or a new --out)")
        for s, weights in state["models"].items():
            if s not in models:       # a stream this run does not train: kept in the checkpoint as it is
                models[s] = GMFCVAE(3, LATENT_DIM, weights["mu_c"].shape[0]).to(device)
                progress[s] = dict(state["progress"][s])
            models[s].load_state_dict(weights)
            progress[s] = {"step": 0, **state["progress"][s]}
        run.update(flow_scale=state.get("flow_scale"), energy_reference=dict(state.get("energy_reference", {})),
                   train_time_s=float(state.get("train_time_s", 0.0)))
        saved_optimizer = state.get("optimizer") or None
        if "rng" in state:
            common.set_rng_state(state["rng"])
        print(f"resumed from {ckpt_path}: " + ", ".join(f"{s} {p['phase']} epoch {p['epoch']} step {p['step']}"
                                                        for s, p in progress.items()))
    finished = lambda p: p["phase"] == "vade" and p["epoch"] >= args.epochs
    save = lambda opt: common.save_checkpoint(ckpt_path, checkpoint_state(models, opt, progress, run))
    if all(finished(progress[s]) for s in streams):
        print("training already complete")
        return True

    frames = common.load_split_frames(ds, "train", args.image_size, gray=gray, cache_dir=args.cache_dir)
    flows = (common.load_split_flows(ds, "train", args.image_size, method=args.flow_method, cache_dir=args.cache_dir,
                                     workers=args.workers) if "flow" in streams else {})
    if "flow" in streams and run["flow_scale"] is None:     # also when an appearance-only run made model.pt
        run["flow_scale"] = estimate_flow_scale(flows, args)
        print(f"dynamic-flow normalisation scale s = {run['flow_scale']:.1f} (99.9th percentile of |D|)")
    positions = training_positions(ds, frames, flows, streams, args)
    # fused Adam on CUDA: the default schedule is up to 384,000 small steps (9,600 an epoch, 20 epochs, 2 streams),
    # so per-tensor optimizer kernels would be a large share of each step (the CPU keeps the default)
    fused = device.type == "cuda"
    amp = args.amp and device.type == "cuda"     # the precision of training, also for the latents fitted on
    graphs = args.cuda_graphs and device.type == "cuda"     # common.GraphedStep: capturable optimizers

    for stream in streams:
        model, prog = models[stream], progress[stream]
        if finished(prog):
            continue
        t0 = time.time()
        patches = extract_patches(stream, frames, flows, positions[stream], run["flow_scale"], args, device)
        if len(patches) == 0:
            raise common.DataError(f"{ds.root}: no moving training patches for the {stream} stream "
                                   f"(lower --motion-threshold / --min-moving-pixels?)")
        print(f"[{stream}] {len(patches)} patches {tuple(patches.shape[1:])} uint8 on {patches.device} "
              f"in {time.time() - t0:.1f}s")
        restore = lambda opt, phase: (common.load_optimizer_state(opt, saved_optimizer["state"])
                                      if saved_optimizer and saved_optimizer.get("stream") == stream
                                      and saved_optimizer.get("phase") == phase else None)

        def run_phase(phase, optimizer, epochs, summary, on_last_epoch=None):
            """This stream's epochs of one phase from where prog stands, a checkpoint after each; False when
            the time budget stopped it (the position within the epoch is saved)."""
            label = "pretrain" if phase == "pretrain" else "VaDE"
            step_fn = (common.GraphedStep(lambda x: train_step(model, optimizer, x, phase, amp), [optimizer],
                                          args.batch_size) if graphs else None)
            while prog["epoch"] < epochs:
                done, stats = run_epoch(model, optimizer, patches, args, device, phase, prog, budget,
                                        f"[{stream}] {label} {prog['epoch'] + 1}/{epochs}", step_fn)
                opt_state = {"stream": stream, "phase": phase, "state": optimizer.state_dict()}
                rate = f"{stats['steps_per_s']:.1f} steps/s (batch {args.batch_size})"
                if not done:
                    save(opt_state)
                    if math.isfinite(stats["steps_per_s"]):       # (NaN when stopped before any step)
                        print(f"[{stream}] {label} epoch {prog['epoch'] + 1}/{epochs}: training {rate}")
                    return False
                prog.update(epoch=prog["epoch"] + 1, step=0)
                print(f"[{stream}] {label} epoch {prog['epoch']}/{epochs}: {summary(stats)}, {rate}")
                if prog["epoch"] == epochs and on_last_epoch is not None:
                    on_last_epoch()
                save(opt_state)
            return True

        # 1) pre-training as a plain (deterministic) auto-encoder on the network weights
        if prog["phase"] == "pretrain":
            optimizer = torch.optim.Adam(model.non_mixture_parameters(), lr=args.pretrain_lr,
                                         weight_decay=args.weight_decay, fused=fused, capturable=graphs)
            restore(optimizer, "pretrain")
            if not run_phase("pretrain", optimizer, args.pretrain_epochs,
                             lambda stats: f"mse-sum {stats.get('loss', float('nan')):.3f}"):
                return False
            # 2) initialise pi, mu_c, sigma_c^2 from a diagonal GMM on the pre-trained latents
            gmm = init_mixture_from_latents(model, patches, args.components, args.gmm_fit_patches, args.seed, device,
                                            amp)
            print(f"[{stream}] GMM initialised on {min(args.gmm_fit_patches, len(patches))} latents "
                  f"(converged={gmm.converged_}, mean log-likelihood {gmm.lower_bound_:.2f})")
            prog.update(phase="vade", epoch=0, step=0)
            save(None)
        # 3) VaDE on the loss of eq. 14; no weight decay on the mixture parameters
        optimizer = torch.optim.Adam([{"params": model.non_mixture_parameters(), "weight_decay": args.weight_decay},
                                      {"params": list(model.mixture_params()), "weight_decay": 0.0}], lr=args.lr,
                                     fused=fused, capturable=graphs)
        restore(optimizer, "vade")

        def store_energy_reference():    # E_ref of the maps, from the final model, in the last checkpoint
            run["energy_reference"][stream] = energy_reference(model, patches, args.seed, device, amp)

        if not run_phase("vade", optimizer, args.epochs,
                         lambda stats: f"loss {stats.get('loss', float('nan')):.3f} (rec "
                                       f"{stats.get('rec', float('nan')):.3f}, kl {stats.get('kl', float('nan')):.3f})",
                         store_energy_reference):
            return False
        saved_optimizer = None
        del patches
    return True


# ------------------------------------------------------------------------------------------------ scoring
def patch_energies(model, tiles, amp: bool):
    """Sample energy (eq. 17, fp32) of a batch of uint8 patches from the encoder MEAN (deterministic latent)."""
    x = to_input(tiles).contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp and x.device.type == "cuda"):
        mu = model.encode_mean(x)
    return sample_energy(mu, *model.mixture_params())


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
def score_video(models: dict, frames_t, flows_t, args, flow_scale: float, frames_per_batch: int,
                fixed_shape: bool):
    """Energy grids of one video on the device, no host sync: {"rgb", "flow", "fused"} -> (T, gh, gw) float32.

    frames_t: (T, C, H, W) uint8 tensor; flows_t: (T - 1, H, W, 2) tensor or None. Frames go through the
    encoders `frames_per_batch` at a time; with fixed_shape the last batch is padded (repeating the last frame)
    so that every forward pass has one shape. fused = alpha E_rgb + beta E_flow (eq. 18; a single stream is
    its own fused score). Cells skipped by --static-test-patches skip are -inf; a video without flows has
    NaN motion (and fused) energies."""
    T = frames_t.shape[0]
    gh, gw = test_grid_shape(frames_t.shape[2:], args.test_stride)
    grids = {s: torch.empty(T, gh, gw, device=frames_t.device) for s in models}
    for s in range(0, T, frames_per_batch):
        ids = np.arange(s, min(s + frames_per_batch, T))
        n = len(ids)
        if fixed_shape:
            ids = common.pad_batch(ids, frames_per_batch)[0]
        if "rgb" in models:
            tiles, _ = grid_patches(frames_t[common.to_device(ids, frames_t.device)], args.test_stride)
            grids["rgb"][s:s + n] = patch_energies(models["rgb"], tiles, args.amp).view(-1, gh, gw)[:n]
        if "flow" in models:
            if flows_t is None or flows_t.shape[0] == 0:       # a one-frame video has no flow: cannot score
                grids["flow"][s:s + n] = float("nan")
                continue
            images = dynamic_flow_uint8(rank_pool_flows(flows_t, ids, args.window, args.flow_window,
                                                        args.flow_a, args.flow_b), flow_scale)
            tiles, _ = grid_patches(images, args.test_stride)
            grids["flow"][s:s + n] = patch_energies(models["flow"], tiles, args.amp).view(-1, gh, gw)[:n]
    if len(models) == 2:
        grids["fused"] = args.alpha * grids["rgb"] + args.beta * grids["flow"]
    else:
        grids["fused"] = grids[next(iter(models))]
    if args.static_test_patches == "skip":
        static = ~moving_grid(frames_t, args.test_stride, args.motion_threshold, args.min_moving_pixels)
        for g in grids.values():
            g.masked_fill_(static & ~torch.isnan(g), float("-inf"))
    return grids


def map_values(energies: np.ndarray, reference: float) -> np.ndarray:
    """The stored map (float32): sign(d) log(1 + |d|), d = E - E_ref, nearest-upsampled by 4. Monotone in E;
    finite in float16 for every finite float32 energy (|value| < 89)."""
    d = energies.astype(np.float64) - reference
    values = (np.sign(d) * np.log1p(np.abs(d))).astype(np.float32)
    return np.repeat(np.repeat(values, 4, axis=1), 4, axis=2)


def finish_scores(grids: dict, reference: float):
    """Per-video energy grids of one stream -> (frame scores, maps). Skipped cells (-inf) take the run's lowest
    energy; NaN frames (cannot score) stay NaN in the frame scores, and their map cells take the lowest value."""
    finite = [g[np.isfinite(g)] for g in grids.values()]
    floor = float(min((f.min() for f in finite if f.size), default=0.0))
    frame_scores, maps = {}, {}
    for name, grid in grids.items():
        grid = np.where(np.isneginf(grid), floor, grid)
        frame_scores[name] = grid.reshape(len(grid), -1).max(1)           # NaN stays NaN
        maps[name] = map_values(np.where(np.isnan(grid), floor, grid), reference)
    return frame_scores, maps


def frames_per_batch_for(args, grid_cells: int, longest_video: int) -> int:
    return max(1, min(args.test_batch_size // grid_cells, longest_video))


def test(args, ds, models, checkpoint, gray: bool, device):
    """Score every test video, write scores.npz (fused) and scores_<stream>.npz, return (results, fps)."""
    frames = common.load_split_frames(ds, "test", args.image_size, gray=gray, cache_dir=args.cache_dir)
    flows = (common.load_split_flows(ds, "test", args.image_size, method=args.flow_method, cache_dir=args.cache_dir,
                                     workers=args.workers) if "flow" in models else {})
    flow_scale = checkpoint.get("flow_scale") or 1.0
    refs = {s: float(checkpoint.get("energy_reference", {}).get(s, 0.0)) for s in models}
    refs["fused"] = (args.alpha * refs["rgb"] + args.beta * refs["flow"]) if len(models) == 2 else refs[streams_of(models)[0]]
    names = [v.name for v in ds.test]
    cells = math.prod(test_grid_shape(args.image_size, args.test_stride))
    fpb = frames_per_batch_for(args, cells, max(v.num_frames for v in ds.test))
    fixed_shape = device.type == "cuda"
    for m in models.values():
        m.eval()

    # warm-up outside the timed region: one fixed-shape batch through every stream (cuDNN autotuning)
    first = names[0]
    flows0 = common.to_device(flows[first], device) if "flow" in models else None
    score_video(models, frames_to_tensor(frames[first][:fpb], device),
                None if flows0 is None else flows0[:max(fpb - 1, 1)], args, flow_scale, fpb, fixed_shape)
    common.synchronize(device)

    # timed: cached frames (+ flows) -> device -> dynamic flow, patches, energies -> host -> scores.npz
    t0 = time.time()
    frame_iter = common.prefetch_to_device((frames[n] for n in names), device)
    flow_iter = common.prefetch_to_device((flows[n] for n in names), device) if "flow" in models else None
    kinds = [*streams_of(models), "fused"] if len(models) == 2 else ["fused"]
    grids = {k: {} for k in kinds}
    for name in tqdm(names, desc="test", leave=False):
        frames_t = next(frame_iter)
        frames_t = frames_t[:, None] if frames_t.ndim == 3 else frames_t.permute(0, 3, 1, 2)
        flows_t = next(flow_iter) if flow_iter is not None else None
        video = score_video(models, frames_t, flows_t, args, flow_scale, fpb, fixed_shape)
        host = torch.stack([video[k] for k in kinds]).cpu().numpy()          # the one sync per video
        for k, g in zip(kinds, host):
            grids[k][name] = g
    results = {k: finish_scores(grids[k], refs[k]) for k in kinds}
    meta = {"method": "gmfc_vae", "dataset": ds.name, "protocol": {"normalize": args.normalize, "smooth": args.smooth},
            "args": common.args_to_dict(args)}
    common.write_scores(os.path.join(args.out, "scores.npz"), *results["fused"], {**meta, "streams": args.streams})
    elapsed = time.time() - t0
    for k in kinds[:-1]:       # each stream alone (Table VI), outside the timed region
        common.write_scores(os.path.join(args.out, f"scores_{k}.npz"), *results[k], {**meta, "streams": k})
    num_frames = sum(v.num_frames for v in ds.test)
    fps = num_frames / max(elapsed, 1e-9)
    print(f"test: {num_frames} frames in {elapsed:.1f}s = {fps:.1f} frames/s (cached frames"
          f"{' + flows' if 'flow' in models else ''} -> dynamic flow, patches, {'+'.join(streams_of(models))} "
          f"energies, maps -> scores.npz; excludes model load and warm-up; {device})")
    return results, fps


def streams_of(models):
    return [s for s in ("rgb", "flow") if s in models]


def load_models(args, streams, device):
    path = os.path.join(args.out, "model.pt")
    state = common.load_checkpoint(path)
    models = {}
    for s in streams:
        if s not in state["models"]:
            raise common.DataError(f"{path}: no {s} stream (trained with --streams {state['args'].get('streams')}; "
                                   f"expected --streams to match)")
        weights = state["models"][s]
        models[s] = GMFCVAE(3, LATENT_DIM, weights["mu_c"].shape[0]).to(device)
        models[s].load_state_dict(weights)
        models[s].to(memory_format=torch.channels_last)      # ~2x faster convolutions at test on CPU
        prog = state["progress"][s]
        if prog["phase"] != "vade" or prog["epoch"] < state["args"]["epochs"]:
            print(f"warning: the {s} stream's training is unfinished ({prog})")
    if "flow" in models and state.get("flow_scale") is None:
        raise common.DataError(f"{path}: the flow stream has no dynamic-flow scale (incomplete checkpoint)")
    return models, state


# ------------------------------------------------------------------------------------------ train / test
PAPER = {"image_size": (280, 420), "window": 20, "max_train_patches": 960_000, "batch_size": 100, "lr": 1e-4,
         "pretrain_lr": 1e-4, "pretrain_epochs": 10, "epochs": 10, "static_test_patches": "score"}
SYNTHETIC = {"image_size": (112, 168), "window": 8, "max_train_patches": 2_500, "pretrain_epochs": 1,
             "epochs": 2, "batch_size": 100, "lr": 1e-4, "pretrain_lr": 1e-3, "static_test_patches": "skip"}
# training settings a test-only run takes from model.pt (it reports them, and they define the test input)
TRAINING_KEYS = ("streams", "components", "image_size", "window", "flow_window", "flow_a", "flow_b", "flow_method",
                 "train_stride", "max_train_patches", "motion_threshold", "min_moving_pixels", "pretrain_epochs",
                 "epochs", "batch_size", "lr", "pretrain_lr", "weight_decay", "gmm_fit_patches", "seed")


def fill_defaults(args):
    """Paper values for real datasets, the small documented CPU-demo values for --dataset synthetic."""
    base = SYNTHETIC if args.dataset == "synthetic" else PAPER
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.streams = args.streams or "both"
    args.image_size = tuple(int(v) for v in args.image_size)
    if args.test_batch_size is None:
        args.test_batch_size = 65536 if args.device.type == "cuda" else 8192
    H, W = args.image_size
    if H % PATCH or W % PATCH or min(H, W) < PATCH:
        raise common.DataError(f"--image-size {H} {W}: both sides must be multiples of {PATCH} (the patch), so "
                               f"that the test grid covers the whole frame; e.g. 280 420 (the paper's)")
    if args.test_stride < 1 or PATCH % args.test_stride:
        raise common.DataError(f"--test-stride {args.test_stride}: expected a divisor of {PATCH} (paper: 28)")
    if args.window < 1:
        raise common.DataError(f"--window {args.window}: expected t >= 1 (paper: 20)")
    return args


def protocol_string(args) -> str:
    """'paper protocol' only when every setting the paper gives is the paper's; our own choices are listed."""
    H, W = args.image_size
    checks = [(args.image_size == PAPER["image_size"], f"frames {W}x{H} (paper 420x280)"),
              (args.window == 20, f"t={args.window} (paper 20)"),
              (args.flow_window == "forward", f"{args.flow_window} dynamic-flow window (paper: flows i..i+t)"),
              ((args.flow_a, args.flow_b) == (16.0, 128.0), f"flow mapping {args.flow_a:g} f + {args.flow_b:g}"),
              (args.max_train_patches >= PAPER["max_train_patches"],
               f"{args.max_train_patches} training patches/stream (paper 960K)"),
              (args.train_stride == 7, f"training stride {args.train_stride} (paper 7)"),
              (args.test_stride == PATCH, f"test stride {args.test_stride} (paper 28)"),
              (args.batch_size == 100, f"batch {args.batch_size} (paper 100)"),
              ((args.pretrain_lr, args.lr) == (1e-4, 1e-4), f"lr {args.pretrain_lr:g} (AE) / {args.lr:g} (VaDE) "
                                                            f"(paper 1e-4)"),
              (args.weight_decay == 5e-4, f"weight decay {args.weight_decay:g} (paper 5e-4)"),
              (args.components == 20, f"K={args.components} (paper 20)"),
              (args.streams == "both" and (args.alpha, args.beta) == (0.5, 0.5),
               f"streams {args.streams}, alpha {args.alpha:g} / beta {args.beta:g} (paper both, 0.5 / 0.5)"),
              (args.static_test_patches == "score",
               f"static test patches skipped (< {args.min_moving_pixels} pixels with frame difference > "
               f"{args.motion_threshold:g}; paper scores all)")]
    differs = [text for ok, text in checks if not ok]
    head = "paper protocol" if not differs else "REDUCED protocol (not the paper's: " + "; ".join(differs) + ")"
    ours = (f"our choices where the paper gives none: {args.pretrain_epochs} AE pre-training + {args.epochs} VaDE "
            f"epochs, {args.flow_method} flow, moving pixel = frame difference > {args.motion_threshold:g}, "
            f">= {args.min_moving_pixels} per training patch, GMM init on {args.gmm_fit_patches} latents"
            + (", bf16 autocast (F5/F6 and energies fp32)" if args.amp and args.device.type == "cuda" else ""))
    return f"{head}; {ours}; raw sample energy (normalize none)"


def build_parser():
    parser = common.build_parser("gmfc_vae", __doc__.strip().splitlines()[0])
    parser.add_argument("--streams", choices=tuple(STREAMS), default=None,
                        help="appearance (rgb), motion (dynamic flow) or both fused by eq. 18 (default both; a "
                             "two-stream run also reports each stream alone)")
    parser.add_argument("--components", type=int, default=20, help="K, Gaussian-mixture components (Table V)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, replay each training step as one captured CUDA graph (default on; "
                             "--no-cuda-graphs runs it eagerly)")
    parser.add_argument("--window", type=int, default=None,
                        help="t: a dynamic flow pools t + 1 flows (paper 20; synthetic 8)")
    parser.add_argument("--flow-window", choices=("forward", "centred"), default="forward",
                        help="forward: frame i pools flows i..i+t (paper); centred: flows i-t/2..i+t/2 (ours)")
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
    parser.add_argument("--static-test-patches", choices=("score", "skip"), default=None,
                        help="score: encode all test patches (paper; default on real data); skip: patches without "
                             "moving pixels (training rule) get the run's lowest energy (default on synthetic)")
    parser.add_argument("--test-batch-size", type=int, default=None,
                        help="patches per forward pass at test (default 65536 on CUDA, 8192 on CPU)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = common.parse_args(parser, argv)
    budget = common.TimeBudget(args.max_minutes)
    args.normalize = args.normalize or "none"        # the paper thresholds raw energies over the whole test set
    ckpt_path = os.path.join(args.out, "model.pt")
    if args.test and not args.train:                 # test-only: the settings the model was trained with
        saved = dict(common.load_checkpoint(ckpt_path, method=args.method)["args"])
        if "image_size" not in saved and "frame_size" in saved:
            saved["image_size"] = saved["frame_size"]
        common.restore_training_args(args, parser, saved, TRAINING_KEYS)
    args = fill_defaults(args)
    common.seed_everything(args.seed)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # IEEE fp32 convolutions (cuDNN's default would be TF32, a 10-bit mantissa): the energies of tight
        # latent clusters need the precision, and this small network is cheap in fp32
        torch.backends.cudnn.allow_tf32 = False

    ds = common.load_dataset(args.dataset, args.data_root, scene=args.scene, labels_file=args.labels_file,
                             cache_dir=args.cache_dir, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    streams = STREAMS[args.streams]
    gray = args.dataset in GRAY_DATASETS
    print(f"gmfc_vae on {ds.name}: {ds.summary()} | streams {streams} | device {device}")

    if args.train:
        t0 = time.time()
        if not train(args, ds, streams, gray, device, budget, argv):
            state = common.load_checkpoint(ckpt_path)
            where = ", ".join(f"{s} {p['phase']} epoch {p['epoch']} step {p['step']}"
                              for s, p in state["progress"].items() if s in streams)
            common.report_time_stop(script=__file__, argv=argv, checkpoint=ckpt_path, progress=where, budget=budget)
            return
        print(f"training time {time.time() - t0:.1f}s")
    if args.test:
        models, checkpoint = load_models(args, streams, device)
        results, fps = test(args, ds, models, checkpoint, gray, device)
        extra = {"train_time_s": checkpoint.get("train_time_s"), "test_fps": fps,
                 "peak_memory_gib": common.peak_memory(),
                 "test_fps_covers": "cached frames and flows -> scores.npz, excluding model load and warm-up",
                 "run_protocol": protocol_string(args), "device": str(device),
                 "command": "python gmfc_vae.py " + " ".join(argv)}
        if len(models) == 2:       # Table VI: each stream alone, from the same test run
            keys = ("frame_auc_micro", "frame_auc_macro", "frame_eer", "pixel_auc", "pixel_eer", "events", "nan_filled")
            extra["streams"] = {}
            for s in streams_of(models):
                r = vad_eval.evaluate(*results[s], ds, normalize=args.normalize, smooth=args.smooth)
                extra["streams"][s] = {k: r[k] for k in keys}
                print(f"  {s} stream alone: frame AUC {r['frame_auc_micro']}, pixel AUC {r['pixel_auc']}")
        vad_eval.evaluate_run(args.out, ds, normalize=args.normalize, smooth=args.smooth, extra=extra)
        if args.num_panels > 0:
            frame_scores, maps = results["fused"]
            shown = {v.name: maps[v.name] for v in ds.test if v.has_masks}
            shown = dict(list(shown.items())[:args.num_panels])
            n = vad_eval.write_overlays(frame_scores, shown, ds, os.path.join(args.out, "panels"), top_k=1,
                                        cache_dir=args.cache_dir)
            print(f"wrote {n} localisation panels to {os.path.join(args.out, 'panels')}")


if __name__ == "__main__":
    common.run_main(main, report_memory=True)
