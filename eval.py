"""Evaluation for the video anomaly detection scripts: metrics, protocols, comparison table and plots.

Every method writes `scores.npz` (SPEC section 2) and is judged here the same way:

    frame/<video>  float (T,)      frame scores, higher = more abnormal, NaN where the method cannot score
    map/<video>    float (T,h,w)   optional anomaly maps at any resolution (upsampled bilinearly to the masks)
    meta           JSON string     {"method", "dataset", "protocol": {"normalize", "smooth"}, "args"}, and
                                   optionally "pixel_rule" (the method's default pixel-level rule, see below)

Every setting below is recorded in the result (`result["protocol"]`) and shown in the comparison table's
protocol column, so runs evaluated under different protocols are never mixed silently.

Post-processing, in this order per video (nothing is fitted on the test labels; but see the two caveats):
  1. Frames that cannot be scored (NaN), `unscored`:
       fill (default)  NaN scores take the value of the nearest scored frame (count: `nan_filled`);
       drop            NaN frames are removed from the video before anything else, as MNAD / ano_pred evaluate
                       (they score frames from the 5th on): the frame-level ROC, the events, the pixel-level
                       ROC and the plots use the scored frames only (count: `nan_dropped`).
     A video without any finite score, or with an infinite score, is an error.
  2. smooth: none | gaussian:SIGMA (scipy.ndimage.gaussian_filter1d) | median:K (scipy.ndimage.median_filter,
     odd K); both with mode="nearest" so the ends of a video are not pulled towards zero.
  3. normalize: none | video_minmax, (s - min) / (max - min) per video (a constant video becomes all 0).
  Smoothing comes before normalising so that a normalised curve spans exactly [0, 1].
  Caveats, both offline: `video_minmax` rescales each test video by the minimum and maximum of its own scores
  over the whole video (it needs the complete test video, which a live detector does not have, and it can
  move the micro AUC by many points: it removes the differences of scale between videos); smoothing is a
  centred filter, so each frame's score also uses future frames (up to round(4 SIGMA) frames ahead for
  gaussian, (K - 1) / 2 for median).

Metrics (all AUC / EER are fractions in [0, 1]):
- Frame level: ROC AUC over all test frames concatenated (micro, the headline; sklearn roc_auc_score) and the
  mean of per-video AUCs (macro) over the videos that contain both classes; one-class videos are listed in
  `single_class_videos`. EER (Mahadevan et al. 2010): the point of the ROC where the false positive rate
  equals the miss rate 1 - TPR; the ROC (sklearn roc_curve) is walked from the highest threshold until
  FPR >= 1 - TPR and the crossing is interpolated linearly on that ROC segment.
- Pixel level (Mahadevan et al. 2010, Li et al. 2014: the UCSD protocol and its 40% rule). Frames taking part:
  positives = frames labelled abnormal whose mask has at least one pixel (n_P, the TPR denominator);
  negatives = frames labelled normal with an empty mask (n_N). Frames where label and mask disagree are
  excluded and counted in `pixel_frames["excluded"]` (none on UCSD Ped2). Only videos with masks take part;
  None without maps or masks. Maps are used as written: the frame-score post-processing does not touch them.
  At threshold t a frame raises an alarm when any pixel of its map (bilinearly upsampled to the mask size,
  cv2.INTER_LINEAR) is > t; an abnormal frame is covered when at least 40% of its n ground-truth pixels are
  > t, i.e. count(map[mask] > t) >= k with k = ceil(0.4 n) (covered implies alarm). Counts at t:
      TP(t) = positives covered                          (true positives)
      U(t)  = positives with an alarm but not covered    (under-covered: under 40% of the mask > t)
      F(t)  = negatives with an alarm
  pixel_rule "ucsd" (default; the usual rule, Mahadevan et al. 2010, Li et al. 2014):
      TPR = TP / n_P,   FPR = F / n_N              (an under-covered detection is only a miss)
  pixel_rule "strict" (Ravanbakhsh et al. 2017: a detection covering under 40% of the abnormal pixels "is
  counted as a false positive"):
      TPR = TP / n_P,   FPR = (F + U) / (n_N + U)
  i.e. an under-covered detection is a false positive as well as a miss, wherever its alarm pixels lie (at
  high thresholds, where few mask pixels exceed t, that is most detections on abnormal frames); being a false
  positive it is also counted among the frames that can be false positives (FPR = FP / (FP + TN) with those
  frames among the negatives). So FPR stays in [0, 1], the curve runs from (0, 0) to (1, 1) (at the lowest
  threshold every positive is covered, U = 0), and with U = 0 at every t it is the ucsd ROC. The strict FPR
  is >= the ucsd FPR at every threshold, so the strict AUC is <= the ucsd AUC. It is not monotone in t (a
  frame leaves U when its coverage reaches 40%), so the curve can run right at high thresholds and come back
  left: such an excursion costs AUC, while the EER (first crossing) may lie after it; read both.
  Both ROCs are computed exactly from three numbers per frame, with no loop over thresholds:
      m = max of the map (every frame);   c = the k-th largest map value on the mask (positives).
  count(map[mask] > t) >= k  <=>  t < c, and c <= m (mask pixels are map pixels), so a positive is TP exactly
  when t < c and in U exactly when c <= t < m, and a negative has an alarm exactly when t < m. The curve's
  vertices are the distinct values v of all c and m, visited from the highest down: at t just below v the
  counts are TP = #(c >= v), TP + U = #(m_pos >= v), F = #(m_neg >= v), preceded by (0, 0) for t above
  every value. AUC = trapezoid area along these points in that order (what a trapz over a threshold sweep
  gives; ties give the diagonal step a sweep gives); EER = the first crossing of FPR = 1 - TPR, walking from
  the highest threshold. RD, the rate of detection at the EER that some tables give, is 1 - EER.
- Event level (Hasan et al. 2016; Sun et al. 2021 who use Persistence1D): per video, the local maxima of the
  post-processed score curve with topological persistence >= `event_persistence` x (max - min of that curve)
  are kept (1-D persistence of peaks: a peak dies when its rising region merges into one with a higher peak;
  the global maximum has persistence max - min). The papers leave the threshold to the user; 10%
  (EVENT_MIN_PERSISTENCE, our choice) is the default, `--event-persistence` / `event_persistence` sets it.
  Because it is relative to each video's own range, every non-constant video yields at least one detection
  (its global maximum), so a fully normal test video always scores at least one false alarm, and a constant
  one none. Merging (Hasan et al. 2016 treat extrema within 50 frames as one abnormal event; EVENT_WINDOW,
  `--event-window`): kept peaks are visited from the highest down and a peak less than `event_window` frames
  from an already accepted one is merged into it (non-maximum suppression), so accepted detections are
  >= event_window frames apart. Greedy suppression rather than chaining neighbours: a chain would let a noisy
  curve merge a whole video into one detection. Counted, per video and summed:
      total        ground-truth events = maximal runs of label 1
      detected     ground-truth events that contain at least one accepted detection (frame a <= p < b)
      false_alarms accepted detections outside every ground-truth event
      precision    detected / (detected + false_alarms), summed over the videos (STAN's Table 3: Ped2 12 / 0
                   -> 100%, Ped1 37 / 3 -> 92.5%); None when there is neither

Besides the metrics the result records `pixel_frames` ({"abnormal", "normal", "excluded"} or None), the event
parameters `events["window"]`, `events["min_persistence"]`, and `protocol` (normalize, smooth, unscored,
pixel_rule, event_window, event_persistence).

Library (used by the method scripts):
    frame_scores, maps, meta = read_scores("runs/stan/ped2/scores.npz")   # maps are read one video at a time
    result = evaluate(frame_scores, maps, ds, normalize="video_minmax", smooth="none", pixel_rule="ucsd")
    result = evaluate_run("runs/stan/ped2", ds, normalize="video_minmax", extra={"test_fps": 41.0})

CLI (comparison table; dataset, data root, protocol and pixel rule default to each file's meta):
    python eval.py runs/*/ped2
    python eval.py runs/stan/ped2 other/scores.npz --dataset ped2 --data-root ../shared/data --json
    python eval.py runs/gan_flow/ped1 --pixel-rule strict --unscored drop
    python eval.py runs/gmfc_vae/ped2 --overlays overlays/ --plots plots/
"""

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Mapping

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

import common

NORMALIZE_CHOICES = ("none", "video_minmax")
UNSCORED_CHOICES = ("fill", "drop")     # frames without a score: nearest scored frame's value / left out
PIXEL_RULES = ("ucsd", "strict")        # see the module doc
PIXEL_COVERAGE = 0.4                    # the UCSD protocol's 40% rule
EVENT_WINDOW = 50                       # frames: peaks closer than this are one event (Hasan et al. 2016)
EVENT_MIN_PERSISTENCE = 0.1             # kept peaks: persistence >= 10% of the video's score range (our choice)
PIXEL_CHUNK = 64                        # frames converted float16 -> float32 at a time (bounds the memory used)


# ----------------------------------------------------------------------------------------------- scores.npz

class ScoreMaps(Mapping):
    """The map/<video> arrays of a scores.npz, read one video at a time and only when asked for: an
    uncompressed member (np.savez, as common.write_scores writes) is returned as a read-only np.memmap, so
    even full-resolution maps never sit in memory whole; a compressed one (np.savez_compressed) is
    decompressed when its video is asked for. Holds no open file between calls."""

    def __init__(self, path: str, members: dict):
        self.path = path
        self._members = members     # video -> (zip member name, shape, dtype, fortran_order, data offset|None)

    def shape(self, name: str) -> tuple:
        return self._members[name][1]

    def __getitem__(self, name: str) -> np.ndarray:
        member, shape, dtype, fortran, offset = self._members[name]
        try:
            if offset is not None:
                return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                 order="F" if fortran else "C")
            with zipfile.ZipFile(self.path) as zf, zf.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise common.DataError(f"{self.path}: map/{name} cannot be read ({type(e).__name__})") from None

    def __iter__(self):
        return iter(self._members)

    def __len__(self):
        return len(self._members)


def _npy_member_header(path: str, zf: zipfile.ZipFile, member: str):
    """(shape, dtype, fortran_order, offset of the array data in the file or None if compressed) of one .npy
    member, reading only its header."""
    info = zf.getinfo(member)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        header_len = f.tell()
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        with open(path, "rb") as fh:          # the local header's name/extra lengths can differ from the
            fh.seek(info.header_offset)       # central directory's, so read them here
            local = fh.read(30)
        if local[:4] == b"PK\x03\x04":
            offset = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                      + int.from_bytes(local[28:30], "little") + header_len)
    return tuple(shape), dtype, fortran, offset


def read_scores(path: str) -> tuple[dict, Mapping, dict]:
    """Read and validate a scores.npz: returns (frame_scores, maps, meta); DataError (one line) if malformed.

    Frame scores and meta are loaded; maps are validated from their headers only and come back as a
    ScoreMaps mapping that reads one video's map when it is asked for."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise common.DataError(f"{path}: not a readable .npz scores file ({type(e).__name__})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load also opens plain .npy files
        raise common.DataError(f"{path}: not a .npz scores file (a single array)")
    frame_scores, map_members, meta = {}, {}, None
    with npz:
        for key in npz.files:
            try:
                if key.startswith("map/"):
                    shape, dtype, fortran, offset = _npy_member_header(path, npz.zip, key + ".npy")
                    if len(shape) != 3 or dtype.kind not in "fiu" or 0 in shape:
                        raise common.DataError(f"{path}: {key} must be a (T, h, w) float array, got {dtype} {shape}")
                    map_members[key[len("map/"):]] = (key + ".npy", shape, dtype, fortran, offset)
                    continue
                if not (key == "meta" or key.startswith("frame/")):
                    continue        # other keys are ignored so that methods may store extras
                arr = npz[key]
            except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
                raise common.DataError(f"{path}: key {key!r} cannot be read ({type(e).__name__})") from None
            if key == "meta":
                try:
                    meta = json.loads(str(arr.item()) if arr.ndim == 0 else "")
                except (ValueError, TypeError):
                    meta = None
                if not isinstance(meta, dict):
                    raise common.DataError(f"{path}: key 'meta' must be a JSON object string")
            else:
                if arr.ndim != 1 or arr.dtype.kind not in "fiu":
                    raise common.DataError(f"{path}: {key} must be a 1-D float array, got {arr.dtype} {arr.shape}")
                frame_scores[key[len("frame/"):]] = arr.astype(np.float64)
    if meta is None:
        raise common.DataError(f"{path}: no 'meta' key (JSON string with method, dataset, protocol, args)")
    if not frame_scores:
        raise common.DataError(f"{path}: no frame/<video> scores")
    for name, (_, shape, _, _, _) in map_members.items():
        if name not in frame_scores:
            raise common.DataError(f"{path}: map/{name} has no matching frame/{name}")
        if shape[0] != len(frame_scores[name]):
            raise common.DataError(f"{path}: map/{name} has {shape[0]} frames but frame/{name} has "
                                   f"{len(frame_scores[name])}")
    return frame_scores, ScoreMaps(path, map_members), meta


# ------------------------------------------------------------------------------------------ post-processing

def parse_smooth(spec: str) -> tuple[str, float]:
    """'none' | 'gaussian:SIGMA' (SIGMA > 0) | 'median:K' (odd K >= 1) -> (kind, value); ValueError otherwise."""
    if spec == "none":
        return "none", 0.0
    kind, _, value = str(spec).partition(":")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind == "gaussian" and np.isfinite(v) and v > 0:
        return kind, v
    if kind == "median" and v.is_integer() and v >= 1 and int(v) % 2 == 1:
        return kind, int(v)
    raise ValueError(f"smooth must be none, gaussian:SIGMA (SIGMA > 0) or median:K (odd K), got {spec!r}")


def _check_choice(what: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_normalize(spec: str) -> str:
    return _check_choice("normalize", spec, NORMALIZE_CHOICES)


def check_event_settings(window, persistence) -> tuple[int, float]:
    """event_window: integer >= 1 frames; event_persistence: fraction in [0, 1]; ValueError otherwise."""
    try:
        w, p = float(window), float(persistence)
    except (TypeError, ValueError):
        w = p = float("nan")
    if isinstance(window, bool) or not w.is_integer() or w < 1:
        raise ValueError(f"event window must be a whole number of frames >= 1, got {window!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"event persistence must be a fraction in [0, 1] of a video's score range, "
                         f"got {persistence!r}")
    return int(w), p


def check_scored(scores: np.ndarray, name: str = "?") -> np.ndarray:
    """The NaN (unscored) frames of one video as a boolean array; DataError on inf or when nothing is scored."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isinf(s).any():
        raise common.DataError(f"video {name}: infinite frame score at frame {int(np.flatnonzero(np.isinf(s))[0])}")
    missing = np.isnan(s)
    if missing.all():
        raise common.DataError(f"video {name}: no finite frame score at all")
    return missing


def fill_nan(scores: np.ndarray, name: str = "?") -> tuple[np.ndarray, int]:
    """NaN frames take the value of the nearest scored frame (ties: either neighbour); returns (filled, count)."""
    s = np.asarray(scores, dtype=np.float64)
    missing = check_scored(s, name)
    if not missing.any():
        return s, 0
    # index of the nearest non-missing frame for every frame, via the 1-D Euclidean distance transform
    _, nearest = ndimage.distance_transform_edt(missing, return_indices=True)
    return s[nearest[0]], int(missing.sum())


def postprocess(scores: np.ndarray, normalize: str = "none", smooth: str = "none") -> np.ndarray:
    """Smooth then normalise one video's (already NaN-free) frame scores."""
    s = np.asarray(scores, dtype=np.float64)
    kind, value = parse_smooth(smooth)
    if kind == "gaussian":
        s = ndimage.gaussian_filter1d(s, sigma=value, mode="nearest")
    elif kind == "median":
        s = ndimage.median_filter(s, size=value, mode="nearest")
    if check_normalize(normalize) == "video_minmax":
        span = s.max() - s.min()
        s = (s - s.min()) / span if span > 0 else np.zeros_like(s)
    return s


# ------------------------------------------------------------------------------------------------- metrics

def eer_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: the first point of the ROC polyline, walked from the highest threshold, where FPR
    equals the miss rate 1 - TPR.

    d = FPR - (1 - TPR) goes from -1 at (0, 0) to +1 at (1, 1) (and never decreases along an ordinary ROC);
    take the first point with d >= 0 and interpolate linearly between it and the previous point."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    d = fpr - (1.0 - tpr)
    i = int(np.argmax(d >= 0))
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    a = -d[i - 1] / (d[i] - d[i - 1])
    return float(fpr[i - 1] + a * (fpr[i] - fpr[i - 1]))


def roc_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """(AUC, EER) of scores against 0/1 labels; (None, None) when only one class is present."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None, None
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(roc_auc_score(labels, scores)), eer_from_roc(fpr, tpr)


def coverage_threshold(values: np.ndarray, coverage: float = PIXEL_COVERAGE) -> float:
    """The largest t (supremum) at which at least `coverage` of `values` are > t: the k-th largest value,
    k = ceil(coverage * n); for t < it the rule holds, at t >= it it fails."""
    n = values.size
    k = max(1, math.ceil(coverage * n - 1e-9))  # the epsilon keeps an exact 0.4 * n from rounding up a pixel
    return float(np.partition(values, n - k)[n - k])


def pixel_frame_stats(maps: Mapping, ds, kept: dict | None = None) -> dict:
    """Per-frame statistics for the pixel-level ROC over the test videos with masks (see the module doc):
    {"pos_c": c of every positive, "pos_m": m of every positive, "neg_m": m of every negative,
    "excluded": frames whose label and mask disagree}. One video's map is read at a time (maps[video.name])
    and converted PIXEL_CHUNK frames at a time. kept: video -> boolean array of the frames taking part
    (the scored frames under unscored="drop"); None = every frame."""
    pos_c, pos_m, neg_m, excluded = [], [], [], 0
    for video in ds.test:
        if not video.has_masks:
            continue
        masks = video.read_masks()
        if masks is None:
            continue
        masks = np.asarray(masks, dtype=bool)
        vmap = maps[video.name]
        H, W = masks.shape[1:]
        labels = np.asarray(video.labels).astype(bool)
        use = np.ones(len(labels), bool) if kept is None else np.asarray(kept[video.name], bool)
        for start in range(0, len(vmap), PIXEL_CHUNK):
            stop = min(start + PIXEL_CHUNK, len(vmap))
            if not use[start:stop].any():
                continue
            chunk = np.asarray(vmap[start:stop], dtype=np.float32)
            for j, frame_map in enumerate(chunk):
                t = start + j
                if not use[t]:
                    continue
                if frame_map.shape != (H, W):
                    frame_map = cv2.resize(frame_map, (W, H), interpolation=cv2.INTER_LINEAR)
                mask = masks[t]
                has_pixels = bool(mask.any())
                if has_pixels and labels[t]:
                    pos_c.append(coverage_threshold(frame_map[mask]))
                    pos_m.append(float(frame_map.max()))
                elif not has_pixels and not labels[t]:
                    neg_m.append(float(frame_map.max()))
                else:
                    excluded += 1
    as_array = lambda x: np.asarray(x, dtype=np.float64)
    return {"pos_c": as_array(pos_c), "pos_m": as_array(pos_m), "neg_m": as_array(neg_m), "excluded": excluded}


def pixel_roc(pos_c: np.ndarray, pos_m: np.ndarray, neg_m: np.ndarray, rule: str = "ucsd"):
    """(fpr, tpr) points of the pixel-level ROC in order of decreasing threshold, from per-frame statistics
    (see the module doc for both rules). Needs at least one positive and one negative."""
    _check_choice("pixel_rule", rule, PIXEL_RULES)
    pos_c, pos_m, neg_m = (np.asarray(a, dtype=np.float64) for a in (pos_c, pos_m, neg_m))
    vertices = np.unique(np.r_[pos_c, pos_m, neg_m])[::-1]       # distinct values, highest first

    def at_least(values):          # for every vertex v: how many of values are >= v
        return len(values) - np.searchsorted(np.sort(values), vertices, side="left")

    tp = at_least(pos_c)
    neg_alarms = at_least(neg_m)                     # F(t): negatives with an alarm
    if rule == "ucsd":
        fpr = neg_alarms / len(neg_m)
    else:
        under_covered = at_least(pos_m) - tp         # U(t): positives with an alarm, not covered
        fpr = (neg_alarms + under_covered) / (len(neg_m) + under_covered)
    return np.r_[0.0, fpr], np.r_[0.0, tp / len(pos_c)]


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the polyline of points (x, y) taken in the given order (signed where x goes back)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def label_intervals(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of label 1 as [start, end) frame intervals."""
    x = np.r_[0, np.asarray(labels).astype(np.int8) > 0, 0].astype(np.int8)
    edges = np.flatnonzero(np.diff(x))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def peak_persistence(x: np.ndarray) -> dict[int, float]:
    """Topological persistence of every local maximum of a 1-D signal: {frame: persistence}.

    Frames are added from the highest value down (union-find over neighbouring frames). A new frame without
    an added neighbour starts a component whose peak is that frame; when a frame joins two components the one
    with the lower peak dies there, with persistence = its peak value - this frame's value. The global maximum
    never dies: its persistence is max - min. Plateaus give one peak (their first frame)."""
    x = np.asarray(x, dtype=np.float64)
    parent = np.full(len(x), -1, dtype=np.int64)
    peak = {}          # component root -> frame of its peak
    persistence = {}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.argsort(-x, kind="stable"):
        roots = {root(j) for j in (i - 1, i + 1) if 0 <= j < len(x) and parent[j] >= 0}
        if not roots:
            parent[i] = i
            peak[i] = i
            continue
        if len(roots) == 2:
            a, b = roots
            if x[peak[a]] < x[peak[b]] or (x[peak[a]] == x[peak[b]] and peak[a] > peak[b]):
                a, b = b, a  # a: the survivor (higher peak)
            persistence[peak[b]] = x[peak[b]] - x[i]
            parent[b] = a
            roots = {a}
        parent[i] = roots.pop()
    if len(x):
        persistence[int(np.argmax(x))] = x.max() - x.min()
    return {int(k): float(v) for k, v in persistence.items()}


def detect_peaks(x: np.ndarray, min_persistence: float = EVENT_MIN_PERSISTENCE) -> np.ndarray:
    """Frames of the local maxima whose persistence is >= min_persistence x (max - min), sorted; none for a
    constant curve."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if len(x) else 0.0
    if span <= 0:
        return np.zeros(0, dtype=np.int64)
    kept = [i for i, p in peak_persistence(x).items() if p > 0 and p >= min_persistence * span]
    return np.asarray(sorted(kept), dtype=np.int64)




def event_detections(scores: np.ndarray, window: int = EVENT_WINDOW, min_persistence: float = EVENT_MIN_PERSISTENCE,
                     frames: np.ndarray | None = None) -> list[int]:
    """Frame numbers of the detections after merging (sorted): persistence-kept peaks, highest first, each one
    suppressing the lower peaks less than `window` frames away. frames: the frame number of each score (the
    scored frames under unscored="drop"); default 0, 1, 2, ..."""
    scores = np.asarray(scores, dtype=np.float64)
    frames = np.arange(len(scores)) if frames is None else np.asarray(frames)
    peaks = detect_peaks(scores, min_persistence)
    accepted = []
    for p in peaks[np.argsort(-scores[peaks], kind="stable")]:   # highest first; ties: earlier frame
        f = int(frames[p])
        if all(abs(f - q) >= window for q in accepted):
            accepted.append(f)
    return sorted(accepted)


def count_events(scores: np.ndarray, labels: np.ndarray, window: int = EVENT_WINDOW,
                 min_persistence: float = EVENT_MIN_PERSISTENCE, frames: np.ndarray | None = None) -> dict:
    """Event counts of one video: {"detected", "total", "false_alarms"} (see the module doc). labels: every
    frame of the video; frames: as in event_detections. With `frames` (--unscored drop), a ground-truth event
    none of whose frames was scored is left out of the total: no detection could ever fall inside it."""
    accepted = event_detections(scores, window, min_persistence, frames)
    intervals = label_intervals(labels)
    if frames is not None:
        scored = np.zeros(len(labels), bool)
        scored[np.asarray(frames, dtype=np.int64)] = True
        intervals = [(a, b) for a, b in intervals if scored[a:b].any()]
    detected = sum(any(a <= p < b for p in accepted) for a, b in intervals)
    false_alarms = sum(not any(a <= p < b for a, b in intervals) for p in accepted)
    return {"detected": int(detected), "total": len(intervals), "false_alarms": int(false_alarms)}


# ---------------------------------------------------------------------------------------------- evaluation

def _prepare(frame_scores: dict, maps: Mapping | None, ds, normalize: str, smooth: str, unscored: str):
    """Validate scores (and maps) against the dataset and post-process them. Returns per video the evaluated
    curve, every frame's label and the frame numbers of the curve ({"scores", "labels", "frames"}, each keyed
    by video) and the number of unscored frames."""
    test_names = {v.name for v in ds.test}
    for name in frame_scores:
        if name not in test_names:
            raise common.DataError(f"video {name}: scored but not a test video of dataset {ds.name} ({ds.root})")
    curves = {"scores": {}, "labels": {}, "frames": {}}
    unscored_frames = 0
    for video in ds.test:
        if video.name not in frame_scores:
            raise common.DataError(f"video {video.name}: no frame/{video.name} scores for this test video")
        s = np.asarray(frame_scores[video.name], dtype=np.float64)
        if s.ndim != 1 or len(s) != video.num_frames:
            raise common.DataError(f"video {video.name}: {s.shape[0] if s.ndim else 0} frame scores, "
                                   f"the video has {video.num_frames} frames")
        missing = check_scored(s, video.name)
        unscored_frames += int(missing.sum())
        if unscored == "fill":
            s, _ = fill_nan(s, video.name)
            frames = np.arange(len(s))
        else:
            frames = np.flatnonzero(~missing)
            s = s[frames]
        curves["scores"][video.name] = postprocess(s, normalize, smooth)
        curves["labels"][video.name] = np.asarray(video.labels).astype(np.uint8)
        curves["frames"][video.name] = frames
    for video in ds.test if maps else []:
        if video.name not in maps:
            if video.has_masks:
                raise common.DataError(f"video {video.name}: no map/{video.name} although other videos have maps")
            continue
        m = maps[video.name]
        if m.ndim != 3 or len(m) != video.num_frames:
            raise common.DataError(f"video {video.name}: map has shape {tuple(m.shape)}, "
                                   f"expected ({video.num_frames}, h, w)")
        # in chunks: bounds the temporary arrays for full-resolution maps (and reads a memmap piece by piece)
        for start in range(0, len(m), 256):
            if not np.isfinite(m[start:start + 256]).all():
                raise common.DataError(f"video {video.name}: non-finite values in map/{video.name}")
    return curves, unscored_frames


def _evaluate(frame_scores, maps, ds, normalize="none", smooth="none", unscored="fill", pixel_rule="ucsd",
              event_window=EVENT_WINDOW, event_persistence=EVENT_MIN_PERSISTENCE):
    """evaluate() plus what the plots need: (result, curves) with curves as _prepare returns them."""
    check_normalize(normalize)
    parse_smooth(smooth)
    _check_choice("unscored", unscored, UNSCORED_CHOICES)
    _check_choice("pixel_rule", pixel_rule, PIXEL_RULES)
    event_window, event_persistence = check_event_settings(event_window, event_persistence)
    curves, unscored_frames = _prepare(frame_scores, maps, ds, normalize, smooth, unscored)
    scores, labels, frames = curves["scores"], curves["labels"], curves["frames"]
    names = [v.name for v in ds.test]
    scored_labels = {n: labels[n][frames[n]] for n in names}     # the labels of the evaluated frames
    all_labels = np.concatenate([scored_labels[n] for n in names])
    auc_micro, eer = roc_metrics(all_labels, np.concatenate([scores[n] for n in names]))

    per_video, single_class = [], []
    for n in names:
        video_auc, _ = roc_metrics(scored_labels[n], scores[n])
        if video_auc is None:
            single_class.append(n)
        else:
            per_video.append(video_auc)

    pixel_auc = pixel_eer = pixel_frames = None
    if maps and any(v.has_masks for v in ds.test):
        kept = None
        if unscored == "drop":
            kept = {n: np.isin(np.arange(len(labels[n])), frames[n]) for n in names}
        stats = pixel_frame_stats(maps, ds, kept)
        pixel_frames = {"abnormal": len(stats["pos_c"]), "normal": len(stats["neg_m"]),
                        "excluded": stats["excluded"]}
        if len(stats["pos_c"]) and len(stats["neg_m"]):
            fpr, tpr = pixel_roc(stats["pos_c"], stats["pos_m"], stats["neg_m"], pixel_rule)
            pixel_auc = trapezoid_area(fpr, tpr)
            pixel_eer = eer_from_roc(fpr, tpr)

    events = {"detected": 0, "total": 0, "false_alarms": 0}
    for n in names:
        for k, v in count_events(scores[n], labels[n], event_window, event_persistence, frames[n]).items():
            events[k] += v
    claimed = events["detected"] + events["false_alarms"]
    events.update(precision=events["detected"] / claimed if claimed else None, window=event_window,
                  min_persistence=event_persistence)

    protocol = {"normalize": normalize, "smooth": smooth, "unscored": unscored, "pixel_rule": pixel_rule,
                "event_window": event_window, "event_persistence": event_persistence}
    result = {
        "frame_auc_micro": auc_micro,
        "frame_auc_macro": float(np.mean(per_video)) if per_video else None,
        "frame_eer": eer,
        "pixel_auc": pixel_auc,
        "pixel_eer": pixel_eer,
        "events": events,
        "nan_filled": unscored_frames if unscored == "fill" else 0,
        "nan_dropped": unscored_frames if unscored == "drop" else 0,
        "single_class_videos": single_class,
        "normalize": normalize,
        "smooth": smooth,
        "unscored": unscored,
        "pixel_rule": pixel_rule,
        "num_frames": int(len(all_labels)),
        "pixel_frames": pixel_frames,
        "protocol": protocol,
    }
    return result, curves


def evaluate(frame_scores: dict, maps: Mapping | None, ds, *, normalize="none", smooth="none", unscored="fill",
             pixel_rule="ucsd", event_window=EVENT_WINDOW, event_persistence=EVENT_MIN_PERSISTENCE) -> dict:
    """Frame, pixel and event level metrics of one run on ds.test (see the module doc for every rule).
    Bad settings raise ValueError; scores that do not fit the dataset raise common.DataError."""
    return _evaluate(frame_scores, maps, ds, normalize, smooth, unscored, pixel_rule, event_window,
                     event_persistence)[0]


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def protocol_text(result: dict) -> str:
    """The result's evaluation protocol in one short line (the table's protocol column)."""
    p = result["protocol"]
    unscored = f"NaN {p['unscored']}"
    count = result["nan_filled"] or result["nan_dropped"]
    if count:
        unscored += f" ({count})"
    return (f"norm {p['normalize']}, smooth {p['smooth']}, {unscored}, pixel {p['pixel_rule']}, "
            f"events p{p['event_persistence']:g}/w{p['event_window']}")


def summary_line(method: str, result: dict) -> str:
    ev = result["events"]
    return (f"{method}: frame AUC {_pct(result['frame_auc_micro'])}% micro / {_pct(result['frame_auc_macro'])}% "
            f"macro, EER {_pct(result['frame_eer'])}%, pixel AUC {_pct(result['pixel_auc'])}% / EER "
            f"{_pct(result['pixel_eer'])}%, events {ev['detected']}/{ev['total']} detected, "
            f"{ev['false_alarms']} false alarms ({result['num_frames']} frames; {protocol_text(result)})")


def meta_pixel_rule(meta: dict, path: str) -> str:
    """The pixel rule a scores file asks for (meta["pixel_rule"]), else "ucsd"; DataError if not a rule."""
    rule = meta.get("pixel_rule") or "ucsd"
    if rule not in PIXEL_RULES:
        raise common.DataError(f"{path}: meta pixel_rule must be one of {', '.join(PIXEL_RULES)}, got {rule!r}")
    return rule


def evaluate_run(out_dir: str, ds, *, normalize="none", smooth="none", unscored="fill", pixel_rule=None,
                 event_window=EVENT_WINDOW, event_persistence=EVENT_MIN_PERSISTENCE, extra: dict | None = None,
                 plots: bool = True) -> dict:
    """Evaluate out_dir/scores.npz, merge `extra`, write out_dir/metrics.json (+ score_curves.png, roc.png).
    pixel_rule None: the scores file's meta["pixel_rule"] if present, else "ucsd"."""
    path = os.path.join(out_dir, "scores.npz")
    frame_scores, maps, meta = read_scores(path)
    if pixel_rule is None:
        pixel_rule = meta_pixel_rule(meta, path)
    try:
        result, curves = _evaluate(frame_scores, maps, ds, normalize, smooth, unscored, pixel_rule, event_window,
                                   event_persistence)
    except common.DataError as e:
        raise common.DataError(f"{path}: {e}") from None
    method = meta.get("method", os.path.basename(os.path.normpath(out_dir)))
    clash = sorted(set(extra or {}) & (set(result) | {"method", "dataset"}))
    if clash:       # e.g. a script's own protocol string must go under another key ("run_protocol")
        raise ValueError(f"evaluate_run: extra keys {clash} would overwrite the evaluation's own results")
    result = {"method": method, "dataset": meta.get("dataset", ds.name), **result, **(extra or {})}
    common.write_json(os.path.join(out_dir, "metrics.json"), result)
    if plots:
        plot_score_curves(curves["scores"], curves["labels"], os.path.join(out_dir, "score_curves.png"),
                          title=f"{method} on {ds.name}", event_window=event_window,
                          event_persistence=event_persistence, frames=curves["frames"])
        plot_rocs({method: _roc_inputs(curves)}, os.path.join(out_dir, "roc.png"),
                  title=f"frame-level ROC, {ds.name}")
    print(summary_line(method, result))
    return result


def _roc_inputs(curves: dict) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of every evaluated frame, concatenated over the videos."""
    names = list(curves["scores"])
    return (np.concatenate([curves["labels"][n][curves["frames"][n]] for n in names]),
            np.concatenate([curves["scores"][n] for n in names]))


# --------------------------------------------------------------------------------------------------- plots

def plot_score_curves(scores: dict, labels: dict, path: str, title: str = "", event_window: int = EVENT_WINDOW,
                      event_persistence: float = EVENT_MIN_PERSISTENCE, frames: dict | None = None) -> None:
    """One subplot per test video: the evaluated score curve (at its frame numbers), ground-truth abnormal
    intervals shaded, event detections marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        x = np.arange(len(scores[name])) if frames is None else np.asarray(frames[name])
        ax.plot(x, scores[name], lw=0.8, color="tab:blue")
        peaks = event_detections(scores[name], event_window, event_persistence, x)
        ax.plot(peaks, scores[name][np.searchsorted(x, peaks)], "v", ms=4, color="black")
        for a, b in label_intervals(labels[name]):
            ax.axvspan(a - 0.5, b - 0.5, color="tab:red", alpha=0.2, lw=0)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title + " (shaded: ground-truth abnormal frames; triangles: event detections)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_rocs(curves: dict, path: str, title: str = "frame-level ROC") -> None:
    """All runs' frame-level ROC curves in one PNG; curves = {label: (labels, scores)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, s) in curves.items():
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {100 * roc_auc_score(y, s):.1f}%)")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    ax.plot([0, 1], [1, 0], ":", color="gray", lw=0.5)  # the EER line FPR = 1 - TPR
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_overlays(scores: dict, maps: Mapping, ds, out_dir: str, top_k: int = 3, cache_dir=None,
                   frames: dict | None = None) -> int:
    """For each test video with a map: the top_k highest-scoring frames as PNGs (frame, map in colour scaled
    to the video's map range, ground-truth outline in green). frames: the frame number of each score (as in
    plot_score_curves); default 0, 1, 2, ... Returns the number of images written."""
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for video in ds.test:
        if video.name not in maps:
            continue
        vmap = maps[video.name]
        lo, hi = float(np.min(vmap)), float(np.max(vmap))
        image_frames = common.load_frames(video, gray=False, cache_dir=cache_dir)
        masks = video.read_masks() if video.has_masks else None
        H, W = image_frames.shape[1:3]
        numbers = np.arange(len(scores[video.name])) if frames is None else np.asarray(frames[video.name])
        for t in sorted(numbers[np.argsort(-scores[video.name], kind="stable")[:top_k]]):
            heat = cv2.resize(np.asarray(vmap[t], dtype=np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
            heat = np.uint8(np.clip(255 * (heat - lo) / (hi - lo if hi > lo else 1.0), 0, 255))
            bgr = cv2.cvtColor(np.ascontiguousarray(image_frames[t]), cv2.COLOR_RGB2BGR)
            img = cv2.addWeighted(bgr, 0.55, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.45, 0)
            if masks is not None and masks[t].any():
                contours, _ = cv2.findContours(masks[t].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(img, contours, -1, (0, 255, 0), 1)
            cv2.imwrite(os.path.join(out_dir, f"{video.name}_{t:05d}.png"), img)
            written += 1
    return written


# ----------------------------------------------------------------------------------------------------- CLI

def _smooth_arg(spec):
    try:
        parse_smooth(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return spec


def _window_arg(text):
    try:
        return check_event_settings(int(text), EVENT_MIN_PERSISTENCE)[0]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _persistence_arg(text):
    try:
        return check_event_settings(EVENT_WINDOW, float(text))[1]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _resolve(path: str) -> tuple[str, str | None]:
    """A run directory or a scores file -> (scores.npz path, metrics.json path or None)."""
    scores = os.path.join(path, "scores.npz") if os.path.isdir(path) else path
    if not os.path.exists(scores):
        raise FileNotFoundError(f"{scores}: no such scores file")
    metrics = os.path.join(os.path.dirname(scores), "metrics.json")
    return scores, metrics if os.path.isfile(metrics) else None


def _unique(name: str, used: set) -> str:
    base, i = name, 2
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare anomaly-detection runs (scores.npz) on one protocol; "
                                                 "the table's protocol column shows what each row used.")
    parser.add_argument("runs", nargs="+", help="run directories (holding scores.npz) or scores .npz files")
    parser.add_argument("--dataset", choices=common.DATASETS, help="default: meta dataset of each file")
    parser.add_argument("--data-root", help="default: meta args.data_root of each file")
    parser.add_argument("--cache-dir", help="default: meta args.cache_dir, else common's default")
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES,
                        help="default: meta protocol of each file. video_minmax is offline: it rescales each test "
                             "video by the min and max of its own scores over the whole video")
    parser.add_argument("--smooth", type=_smooth_arg,
                        help="none | gaussian:SIGMA | median:K; default: meta protocol. Centred filters: each "
                             "frame's score also uses future frames")
    parser.add_argument("--unscored", choices=UNSCORED_CHOICES,
                        help="frames without a score (NaN): fill = value of the nearest scored frame, drop = left "
                             "out of every metric (as MNAD / ano_pred); default: meta protocol, else fill")
    parser.add_argument("--pixel-rule", choices=PIXEL_RULES,
                        help="ucsd = the usual 40%% rule; strict = a detection covering under 40%% of an abnormal "
                             "frame's pixels is also a false positive (Ravanbakhsh et al. 2017); default: meta "
                             "pixel_rule, else ucsd")
    parser.add_argument("--event-window", type=_window_arg, default=EVENT_WINDOW,
                        help=f"frames within which peaks are one event (default {EVENT_WINDOW})")
    parser.add_argument("--event-persistence", type=_persistence_arg, default=EVENT_MIN_PERSISTENCE,
                        help=f"kept peaks: persistence >= this fraction of each video's own score range (default "
                             f"{EVENT_MIN_PERSISTENCE:g}); relative, so every non-constant video yields a detection")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    parser.add_argument("--plots", help="folder for roc_compare.png and every <run>_score_curves.png (default: each "
                                        "run's score curves in its own folder, roc_compare.png in the first run's)")
    parser.add_argument("--overlays", help="folder for heatmap overlays of runs whose scores have maps")
    parser.add_argument("--top-k", type=int, default=3, help="overlay frames per test video")
    args = parser.parse_args(argv)

    datasets, rows, curves_by_run, used, written = {}, [], {}, set(), []
    first = _resolve(args.runs[0])[0]
    compare_dir = args.plots or os.path.dirname(os.path.abspath(first))
    for run in args.runs:
        path, metrics_path = _resolve(run)
        frame_scores, maps, meta = read_scores(path)
        margs = meta.get("args") if isinstance(meta.get("args"), dict) else {}
        protocol = meta.get("protocol") if isinstance(meta.get("protocol"), dict) else {}
        name = args.dataset or meta.get("dataset")
        if not name:
            raise common.DataError(f"{path}: meta has no dataset; pass --dataset")
        normalize = args.normalize or protocol.get("normalize") or "none"
        smooth = args.smooth or protocol.get("smooth") or "none"
        unscored = args.unscored or protocol.get("unscored") or "fill"
        pixel_rule = args.pixel_rule or meta_pixel_rule(meta, path)
        try:
            check_normalize(normalize)
            parse_smooth(smooth)
            _check_choice("unscored", unscored, UNSCORED_CHOICES)
        except ValueError as e:
            raise common.DataError(f"{path}: meta protocol: {e}") from None
        cache_dir = args.cache_dir or margs.get("cache_dir")
        # the methods load their dataset with these arguments (seed selects the synthetic dataset)
        key = (name, args.data_root or margs.get("data_root"), margs.get("scene"), margs.get("labels_file"),
               cache_dir, int(margs.get("seed") or 0))
        if key not in datasets:
            datasets[key] = common.load_dataset(name, key[1], scene=key[2], labels_file=key[3], cache_dir=key[4],
                                                seed=key[5])
        ds = datasets[key]
        try:
            result, curves = _evaluate(frame_scores, maps, ds, normalize, smooth, unscored, pixel_rule,
                                       args.event_window, args.event_persistence)
        except common.DataError as e:
            raise common.DataError(f"{path}: {e}") from None
        test_fps = None
        if metrics_path:
            try:
                with open(metrics_path) as f:
                    test_fps = json.load(f).get("test_fps")
            except (OSError, ValueError, AttributeError):
                test_fps = None
        method = meta.get("method", os.path.basename(os.path.dirname(os.path.abspath(path))))
        label = _unique(f"{method}_{ds.name}", used)
        row = {"run": path, "method": method, "dataset": ds.name, **result, "test_fps": test_fps}
        rows.append(row)
        curves_by_run[label] = _roc_inputs(curves)
        curve_path = os.path.join(args.plots or os.path.dirname(os.path.abspath(path)), f"{label}_score_curves.png")
        plot_score_curves(curves["scores"], curves["labels"], curve_path, title=f"{method} on {ds.name}",
                          event_window=args.event_window, event_persistence=args.event_persistence,
                          frames=curves["frames"])
        written.append(curve_path)
        if args.overlays and maps:
            write_overlays(curves["scores"], maps, ds, os.path.join(args.overlays, label), args.top_k, cache_dir,
                           frames=curves["frames"])
        if args.json:
            print(json.dumps(row), flush=True)
    plot_rocs(curves_by_run, os.path.join(compare_dir, "roc_compare.png"))
    written.append(os.path.join(compare_dir, "roc_compare.png"))
    if not args.json:
        print("| method | dataset | frame AUC micro (%) | macro (%) | EER (%) | pixel AUC (%) | pixel EER (%) "
              "| events detected/total | false alarms | test fps | protocol |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ev = r["events"]
            fps = "n/a" if r["test_fps"] is None else f"{r['test_fps']:.1f}"
            print(f"| {r['method']} | {r['dataset']} | {_pct(r['frame_auc_micro'])} | {_pct(r['frame_auc_macro'])} "
                  f"| {_pct(r['frame_eer'])} | {_pct(r['pixel_auc'])} | {_pct(r['pixel_eer'])} "
                  f"| {ev['detected']}/{ev['total']} | {ev['false_alarms']} | {fps} | {protocol_text(r)} |")
    if len({json.dumps(r["protocol"], sort_keys=True) for r in rows}) > 1:
        print("note: the runs were evaluated under different protocols (see each row's protocol); pass "
              "--normalize/--smooth/--unscored/--pixel-rule to compare them on one", file=sys.stderr)
    print("plots: " + ", ".join(written), file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
