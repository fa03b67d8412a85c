"""Evaluation for the video anomaly detection scripts: metrics, protocols, comparison table and plots.

Every method writes `scores.npz` (SPEC section 2) and is judged here the same way:

    frame/<video>  float (T,)      frame scores, higher = more abnormal, NaN where the method cannot score
    map/<video>    float (T,h,w)   optional anomaly maps at any resolution (upsampled bilinearly to the masks)
    meta           JSON string     {"method", "dataset", "protocol": {"normalize", "smooth"}, "args"}

Post-processing (explicit, recorded in the result, never fitted on the test set), in this order per video:
  1. NaN frame scores are filled from the nearest scored frame (count reported as `nan_filled`);
     a video without any finite score, or with an infinite score, is an error.
  2. smooth: none | gaussian:SIGMA (scipy.ndimage.gaussian_filter1d) | median:K (scipy.ndimage.median_filter,
     odd K); both with mode="nearest" so the ends of a video are not pulled towards zero.
  3. normalize: none | video_minmax, (s - min) / (max - min) per video (a constant video becomes all 0).
  Smoothing comes before normalising so that a normalised curve spans exactly [0, 1].

Metrics (all AUC / EER are fractions in [0, 1]):
- Frame level: ROC AUC over all test frames concatenated (micro, the headline; sklearn roc_auc_score) and the
  mean of per-video AUCs (macro) over the videos that contain both classes; one-class videos are listed in
  `single_class_videos`. EER: the ROC (sklearn roc_curve) is walked until FPR >= miss rate (1 - TPR) and the
  crossing is interpolated linearly on that ROC segment.
- Pixel level, UCSD protocol (40% rule). At threshold t a frame is predicted abnormal when any pixel of its map
  (bilinearly upsampled to the mask size with cv2.INTER_LINEAR) is > t (strict). A predicted-abnormal frame
  with ground-truth anomaly is a true positive only when at least 40% of its n ground-truth pixels are > t,
  i.e. count(map[mask] > t) >= k with k = ceil(0.4 n); predicted-abnormal normal frames are false positives.
  This ROC is computed exactly from two numbers per frame:
      m = max of the map;   c = the k-th largest map value on the mask (abnormal frames only).
  count(map[mask] > t) >= k  <=>  c > t, and c <= m (mask pixels are map pixels), so an abnormal frame is a TP
  exactly when t < c, and a normal frame is an FP exactly when t < m. Sweeping t over every real number is
  therefore the ordinary ROC of the scores c (abnormal frames) and m (normal frames), which sklearn's
  roc_curve / roc_auc_score compute (trapezoid AUC; tied scores give the diagonal step a sweep gives).
  Positives: frames whose mask has at least one pixel (TPR denominator). Negatives: frames labelled normal with
  an empty mask (FPR denominator). Frames labelled abnormal with an empty mask (or normal with mask pixels)
  are excluded and counted in `pixel_frames`. Only videos with masks take part; None without maps or masks.
  Maps are used as written: the frame-score post-processing does not touch them.
- Event level: per video, the local maxima of the post-processed score curve with topological persistence
  >= EVENT_MIN_PERSISTENCE x (max - min of that curve) are kept (1-D persistence of peaks: a peak dies when
  its rising region merges into one with a higher peak; the global maximum has persistence max - min).
  Merging (Hasan et al. 2016 treat extrema within 50 frames as one abnormal event; Sun et al. 2021): kept peaks
  are visited from the highest down and a peak less than `event_window` frames from an already accepted
  one is merged into it (non-maximum suppression), so accepted detections are >= event_window frames apart.
  Greedy suppression rather than chaining neighbours: a chain would let a noisy curve merge a whole video
  into one detection. Counted, per video and summed:
      total        ground-truth events = maximal runs of label 1
      detected     ground-truth events that contain at least one accepted detection (frame a <= p < b)
      false_alarms accepted detections outside every ground-truth event

Besides the contract's keys the result records `pixel_frames` ({"abnormal", "normal", "excluded"} or None)
and the event parameters `events["window"]`, `events["min_persistence"]`.

Library (used by the method scripts):
    frame_scores, maps, meta = read_scores("runs/stan/ped2/scores.npz")
    result = evaluate(frame_scores, maps, ds, normalize="video_minmax", smooth="none")
    result = evaluate_run("runs/stan/ped2", ds, normalize="video_minmax", extra={"test_fps": 41.0})

CLI (comparison table; dataset, data root and protocol default to each file's meta):
    python eval.py runs/*/ped2
    python eval.py runs/stan/ped2 other/scores.npz --dataset ped2 --data-root ../shared/data --json
    python eval.py runs/gmfc_vae/ped2 --overlays overlays/ --plots plots/
"""

import argparse
import json
import math
import os
import sys
import zipfile

import cv2
import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score, roc_curve

import common

NORMALIZE_CHOICES = ("none", "video_minmax")
PIXEL_COVERAGE = 0.4            # the UCSD protocol's 40% rule
EVENT_MIN_PERSISTENCE = 0.1     # kept peaks: persistence >= 10% of the video's post-processed score range
PIXEL_CHUNK = 64                # frames converted float16 -> float32 at a time (bounds the memory used)


# ----------------------------------------------------------------------------------------------- scores.npz

def read_scores(path: str) -> tuple[dict, dict, dict]:
    """Read and validate a scores.npz: returns (frame_scores, maps, meta); DataError (one line) if malformed."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise common.DataError(f"{path}: not a readable .npz scores file ({type(e).__name__})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load also opens plain .npy files
        raise common.DataError(f"{path}: not a .npz scores file (a single array)")
    frame_scores, maps, meta = {}, {}, None
    with npz:
        for key in npz.files:
            try:
                arr = npz[key]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                raise common.DataError(f"{path}: key {key!r} cannot be read ({type(e).__name__})") from None
            if key == "meta":
                try:
                    meta = json.loads(str(arr.item()) if arr.ndim == 0 else "")
                except (ValueError, TypeError):
                    meta = None
                if not isinstance(meta, dict):
                    raise common.DataError(f"{path}: key 'meta' must be a JSON object string")
            elif key.startswith("frame/"):
                if arr.ndim != 1 or arr.dtype.kind not in "fiu":
                    raise common.DataError(f"{path}: {key} must be a 1-D float array, got {arr.dtype} {arr.shape}")
                frame_scores[key[len("frame/"):]] = arr.astype(np.float64)
            elif key.startswith("map/"):
                if arr.ndim != 3 or arr.dtype.kind not in "fiu" or 0 in arr.shape:
                    raise common.DataError(f"{path}: {key} must be a (T, h, w) float array, got {arr.dtype} {arr.shape}")
                maps[key[len("map/"):]] = arr
            # other keys are ignored so that methods may store extras
    if meta is None:
        raise common.DataError(f"{path}: no 'meta' key (JSON string with method, dataset, protocol, args)")
    if not frame_scores:
        raise common.DataError(f"{path}: no frame/<video> scores")
    for name, arr in maps.items():
        if name not in frame_scores:
            raise common.DataError(f"{path}: map/{name} has no matching frame/{name}")
        if len(arr) != len(frame_scores[name]):
            raise common.DataError(f"{path}: map/{name} has {len(arr)} frames but frame/{name} has "
                                   f"{len(frame_scores[name])}")
    return frame_scores, maps, meta


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


def check_normalize(spec: str) -> str:
    if spec not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {spec!r}")
    return spec


def fill_nan(scores: np.ndarray, name: str = "?") -> tuple[np.ndarray, int]:
    """NaN frames take the value of the nearest scored frame (ties: either neighbour); returns (filled, count)."""
    s = np.asarray(scores, dtype=np.float64)
    missing = np.isnan(s)
    if np.isinf(s).any():
        raise common.DataError(f"video {name}: infinite frame score at frame {int(np.flatnonzero(np.isinf(s))[0])}")
    if missing.all():
        raise common.DataError(f"video {name}: no finite frame score at all")
    if not missing.any():
        return s, 0
    # index of the nearest non-missing frame for every frame, via the 1-D Euclidean distance transform
    _, nearest = ndimage.distance_transform_edt(missing, return_indices=True)
    return s[nearest[0]], int(missing.sum())


def postprocess(scores: np.ndarray, normalize: str = "none", smooth: str = "none") -> np.ndarray:
    """Smooth then normalise one video's (already NaN-filled) frame scores."""
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
    """Equal error rate: the point of the ROC polyline where FPR equals the miss rate 1 - TPR.

    d = FPR - (1 - TPR) never decreases along a ROC curve (from -1 at (0,0) to +1 at (1,1)); take the first
    point with d >= 0 and interpolate linearly between it and the previous point."""
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


def pixel_frame_stats(maps: dict, ds) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-frame statistics for the pixel-level ROC over the test videos with masks:
    (c of every positive frame, m of every negative frame, number of excluded frames). See the module doc."""
    pos, neg, excluded = [], [], 0
    for video in ds.test:
        if not video.has_masks:
            continue
        masks = video.read_masks()
        if masks is None:
            continue
        vmap = maps[video.name]
        H, W = masks.shape[1:]
        labels = np.asarray(video.labels).astype(bool)
        for start in range(0, len(vmap), PIXEL_CHUNK):
            chunk = np.asarray(vmap[start:start + PIXEL_CHUNK], dtype=np.float32)
            for j, frame_map in enumerate(chunk):
                t = start + j
                if frame_map.shape != (H, W):
                    frame_map = cv2.resize(frame_map, (W, H), interpolation=cv2.INTER_LINEAR)
                mask = masks[t]
                has_pixels = bool(mask.any())
                if has_pixels and labels[t]:
                    pos.append(coverage_threshold(frame_map[mask]))
                elif not has_pixels and not labels[t]:
                    neg.append(float(frame_map.max()))
                else:
                    excluded += 1
    return np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64), excluded


def pixel_roc(pos: np.ndarray, neg: np.ndarray):
    """(fpr, tpr) of the 40%-rule ROC from per-frame statistics (c of positives, m of negatives)."""
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, _ = roc_curve(y, np.r_[pos, neg])
    return fpr, tpr


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


def event_detections(scores: np.ndarray, window: int = 50,
                     min_persistence: float = EVENT_MIN_PERSISTENCE) -> list[int]:
    """Frames of the detections after merging (sorted): persistence-kept peaks, highest first, each one
    suppressing the lower peaks less than `window` frames away."""
    scores = np.asarray(scores, dtype=np.float64)
    peaks = detect_peaks(scores, min_persistence)
    accepted = []
    for p in peaks[np.argsort(-scores[peaks], kind="stable")]:   # highest first; ties: earlier frame
        if all(abs(p - q) >= window for q in accepted):
            accepted.append(int(p))
    return sorted(accepted)


def count_events(scores: np.ndarray, labels: np.ndarray, window: int = 50,
                 min_persistence: float = EVENT_MIN_PERSISTENCE) -> dict:
    """Event counts of one video: {"detected", "total", "false_alarms"} (see the module doc)."""
    accepted = event_detections(scores, window, min_persistence)
    intervals = label_intervals(labels)
    detected = sum(any(a <= p < b for p in accepted) for a, b in intervals)
    false_alarms = sum(not any(a <= p < b for a, b in intervals) for p in accepted)
    return {"detected": int(detected), "total": len(intervals), "false_alarms": int(false_alarms)}


# ---------------------------------------------------------------------------------------------- evaluation

def _prepare(frame_scores: dict, maps: dict | None, ds, normalize: str, smooth: str):
    """Validate scores against the dataset and post-process them: (scores, labels, nan_filled) keyed by video."""
    check_normalize(normalize)
    parse_smooth(smooth)
    test_names = {v.name for v in ds.test}
    for name in frame_scores:
        if name not in test_names:
            raise common.DataError(f"video {name}: scored but not a test video of dataset {ds.name} ({ds.root})")
    scores, labels, nan_filled = {}, {}, 0
    for video in ds.test:
        if video.name not in frame_scores:
            raise common.DataError(f"video {video.name}: no frame/{video.name} scores for this test video")
        s = np.asarray(frame_scores[video.name], dtype=np.float64)
        if s.ndim != 1 or len(s) != video.num_frames:
            raise common.DataError(f"video {video.name}: {s.shape[0] if s.ndim else 0} frame scores, "
                                   f"the video has {video.num_frames} frames")
        s, filled = fill_nan(s, video.name)
        nan_filled += filled
        scores[video.name] = postprocess(s, normalize, smooth)
        labels[video.name] = np.asarray(video.labels).astype(np.uint8)
    for video in ds.test if maps else []:
        if video.name not in maps:
            if video.has_masks:
                raise common.DataError(f"video {video.name}: no map/{video.name} although other videos have maps")
            continue
        m = maps[video.name]
        if m.ndim != 3 or len(m) != video.num_frames:
            raise common.DataError(f"video {video.name}: map has shape {tuple(m.shape)}, "
                                   f"expected ({video.num_frames}, h, w)")
        # in chunks: bounds the temporary boolean array for full-resolution maps
        for start in range(0, len(m), 256):
            if not np.isfinite(m[start:start + 256]).all():
                raise common.DataError(f"video {video.name}: non-finite values in map/{video.name}")
    return scores, labels, nan_filled


def _evaluate(frame_scores, maps, ds, normalize, smooth, event_window):
    """evaluate() plus what the plots need: (result, processed scores, labels)."""
    scores, labels, nan_filled = _prepare(frame_scores, maps, ds, normalize, smooth)
    names = [v.name for v in ds.test]
    all_labels = np.concatenate([labels[n] for n in names])
    all_scores = np.concatenate([scores[n] for n in names])
    auc_micro, eer = roc_metrics(all_labels, all_scores)

    per_video, single_class = [], []
    for n in names:
        video_auc, _ = roc_metrics(labels[n], scores[n])
        if video_auc is None:
            single_class.append(n)
        else:
            per_video.append(video_auc)

    pixel_auc = pixel_eer = pixel_frames = None
    if maps and any(v.has_masks for v in ds.test):
        pos, neg, excluded = pixel_frame_stats(maps, ds)
        pixel_frames = {"abnormal": len(pos), "normal": len(neg), "excluded": excluded}
        if len(pos) and len(neg):
            fpr, tpr = pixel_roc(pos, neg)
            pixel_auc = float(auc(fpr, tpr))   # trapezoid over every distinct threshold
            pixel_eer = eer_from_roc(fpr, tpr)

    events = {"detected": 0, "total": 0, "false_alarms": 0}
    for n in names:
        for k, v in count_events(scores[n], labels[n], event_window).items():
            events[k] += v
    events.update(window=int(event_window), min_persistence=EVENT_MIN_PERSISTENCE)

    result = {
        "frame_auc_micro": auc_micro,
        "frame_auc_macro": float(np.mean(per_video)) if per_video else None,
        "frame_eer": eer,
        "pixel_auc": pixel_auc,
        "pixel_eer": pixel_eer,
        "events": events,
        "nan_filled": nan_filled,
        "single_class_videos": single_class,
        "normalize": normalize,
        "smooth": smooth,
        "num_frames": int(len(all_labels)),
        "pixel_frames": pixel_frames,
    }
    return result, scores, labels


def evaluate(frame_scores: dict, maps: dict | None, ds, *, normalize="none", smooth="none",
             event_window=50) -> dict:
    """Frame, pixel and event level metrics of one run on ds.test (see the module doc for every rule)."""
    return _evaluate(frame_scores, maps, ds, normalize, smooth, event_window)[0]


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def summary_line(method: str, result: dict) -> str:
    ev = result["events"]
    return (f"{method}: frame AUC {_pct(result['frame_auc_micro'])}% micro / {_pct(result['frame_auc_macro'])}% "
            f"macro, EER {_pct(result['frame_eer'])}%, pixel AUC {_pct(result['pixel_auc'])}% / EER "
            f"{_pct(result['pixel_eer'])}%, events {ev['detected']}/{ev['total']} detected, "
            f"{ev['false_alarms']} false alarms ({result['num_frames']} frames, {result['nan_filled']} NaN filled, "
            f"normalize={result['normalize']}, smooth={result['smooth']})")


def evaluate_run(out_dir: str, ds, *, normalize="none", smooth="none", extra: dict | None = None,
                 plots: bool = True) -> dict:
    """Evaluate out_dir/scores.npz, merge `extra`, write out_dir/metrics.json (+ score_curves.png, roc.png)."""
    path = os.path.join(out_dir, "scores.npz")
    frame_scores, maps, meta = read_scores(path)
    try:
        result, scores, labels = _evaluate(frame_scores, maps, ds, normalize, smooth, 50)
    except common.DataError as e:
        raise common.DataError(f"{path}: {e}") from None
    method = meta.get("method", os.path.basename(os.path.normpath(out_dir)))
    result = {"method": method, "dataset": meta.get("dataset", ds.name), **result, **(extra or {})}
    common.write_json(os.path.join(out_dir, "metrics.json"), result)
    if plots:
        plot_score_curves(scores, labels, os.path.join(out_dir, "score_curves.png"), title=f"{method} on {ds.name}")
        plot_rocs({method: (np.concatenate(list(labels.values())), np.concatenate(list(scores.values())))},
                  os.path.join(out_dir, "roc.png"), title=f"frame-level ROC, {ds.name}")
    print(summary_line(method, result))
    return result


# --------------------------------------------------------------------------------------------------- plots

def plot_score_curves(scores: dict, labels: dict, path: str, title: str = "", event_window: int = 50) -> None:
    """One subplot per test video: the evaluated score curve, ground-truth abnormal intervals shaded, event
    detections marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(scores[name], lw=0.8, color="tab:blue")
        peaks = event_detections(scores[name], event_window)
        ax.plot(peaks, scores[name][peaks], "v", ms=4, color="black")
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


def write_overlays(scores: dict, maps: dict, ds, out_dir: str, top_k: int = 3, cache_dir=None) -> int:
    """For each test video with a map: the top_k highest-scoring frames as PNGs (frame, map in colour scaled
    to the video's map range, ground-truth outline in green). Returns the number of images written."""
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for video in ds.test:
        if video.name not in maps:
            continue
        vmap = maps[video.name]
        lo, hi = float(np.min(vmap)), float(np.max(vmap))
        frames = common.load_frames(video, gray=False, cache_dir=cache_dir)
        masks = video.read_masks() if video.has_masks else None
        H, W = frames.shape[1:3]
        for t in sorted(np.argsort(-scores[video.name], kind="stable")[:top_k]):
            heat = cv2.resize(np.asarray(vmap[t], dtype=np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
            heat = np.uint8(np.clip(255 * (heat - lo) / (hi - lo if hi > lo else 1.0), 0, 255))
            bgr = cv2.cvtColor(np.ascontiguousarray(frames[t]), cv2.COLOR_RGB2BGR)
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
    parser = argparse.ArgumentParser(description="Compare anomaly-detection runs (scores.npz) on one protocol.")
    parser.add_argument("runs", nargs="+", help="run directories (holding scores.npz) or scores .npz files")
    parser.add_argument("--dataset", choices=common.DATASETS, help="default: meta dataset of each file")
    parser.add_argument("--data-root", help="default: meta args.data_root of each file")
    parser.add_argument("--cache-dir", help="default: meta args.cache_dir, else common's default")
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, help="default: meta protocol of each file")
    parser.add_argument("--smooth", type=_smooth_arg, help="none | gaussian:SIGMA | median:K; default: meta protocol")
    parser.add_argument("--event-window", type=int, default=50, help="frames within which peaks are merged")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead of a table")
    parser.add_argument("--plots", help="folder for roc_compare.png and <run>_score_curves.png "
                                        "(default: the first run's folder)")
    parser.add_argument("--overlays", help="folder for heatmap overlays of runs whose scores have maps")
    parser.add_argument("--top-k", type=int, default=3, help="overlay frames per test video")
    args = parser.parse_args(argv)

    datasets, rows, curves, used = {}, [], {}, set()
    first = _resolve(args.runs[0])[0]
    plot_dir = args.plots or os.path.dirname(os.path.abspath(first)) or os.getcwd()
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
        try:
            check_normalize(normalize)
            parse_smooth(smooth)
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
            result, scores, labels = _evaluate(frame_scores, maps, ds, normalize, smooth, args.event_window)
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
        curves[label] = (np.concatenate(list(labels.values())), np.concatenate(list(scores.values())))
        plot_score_curves(scores, labels, os.path.join(plot_dir, f"{label}_score_curves.png"),
                          title=f"{method} on {ds.name}", event_window=args.event_window)
        if args.overlays and maps:
            write_overlays(scores, maps, ds, os.path.join(args.overlays, label), args.top_k, cache_dir)
        if args.json:
            print(json.dumps(row), flush=True)
    plot_rocs(curves, os.path.join(plot_dir, "roc_compare.png"))
    if not args.json:
        print("| method | dataset | frame AUC micro (%) | macro (%) | EER (%) | pixel AUC (%) | pixel EER (%) "
              "| events detected/total | false alarms | test fps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ev = r["events"]
            fps = "n/a" if r["test_fps"] is None else f"{r['test_fps']:.1f}"
            print(f"| {r['method']} | {r['dataset']} | {_pct(r['frame_auc_micro'])} | {_pct(r['frame_auc_macro'])} "
                  f"| {_pct(r['frame_eer'])} | {_pct(r['pixel_auc'])} | {_pct(r['pixel_eer'])} "
                  f"| {ev['detected']}/{ev['total']} | {ev['false_alarms']} | {fps} |")
    print(f"plots: {plot_dir}", file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
