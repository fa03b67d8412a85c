"""Tests for eval.py: metrics against sklearn and hand-worked cases, the 40% pixel rule against a brute-force
threshold sweep, event counting, post-processing, scores.npz validation, and the CLI."""

import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from sklearn.metrics import auc, roc_auc_score, roc_curve

import common
import eval as ev
from conftest import REPO, real_ped2_root


class FakeVideo:
    """Just what evaluate() uses of common.Video, with masks held in memory."""

    def __init__(self, name, labels, masks=None):
        self.name, self.split = name, "test"
        self.labels = np.asarray(labels, dtype=np.uint8)
        self.num_frames = len(self.labels)
        self.masks = masks
        self.has_masks = masks is not None
        self.frame_shape = masks.shape[1:] if masks is not None else (8, 8)
        self.source = f"/fake/{name}"

    def read_masks(self):
        return self.masks


class FakeDataset:
    def __init__(self, videos):
        self.name, self.root, self.layout = "fake", "/fake", "ucsd"
        self.train, self.test = [], videos


def make_ds(label_lists):
    return FakeDataset([FakeVideo(f"Test{i + 1:03d}", y) for i, y in enumerate(label_lists)])


def one_line_error(fn, *names):
    with pytest.raises(common.DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- frame level

def test_frame_auc_micro_macro_and_roc_match_sklearn():
    rng = np.random.default_rng(0)
    labels = [(rng.random(n) < 0.3).astype(np.uint8) for n in (120, 80, 200)]
    scores = {f"Test{i + 1:03d}": y + rng.normal(0, 0.8, len(y)) + i for i, y in enumerate(labels)}
    r = ev.evaluate(scores, None, make_ds(labels))
    y, s = np.concatenate(labels), np.concatenate(list(scores.values()))
    assert r["frame_auc_micro"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["frame_auc_macro"] == pytest.approx(np.mean([roc_auc_score(a, b) for a, b in
                                                          zip(labels, scores.values())]), abs=1e-12)
    assert r["num_frames"] == 400 and r["single_class_videos"] == [] and r["pixel_auc"] is None
    # the EER point (e, 1 - e) lies on sklearn's ROC polyline
    fpr, tpr, _ = roc_curve(y, s)
    e = r["frame_eer"]
    assert 0 < e < 0.5
    on_segment = [abs((x1 - x0) * (1 - e - y0) - (y1 - y0) * (e - x0)) < 1e-9
                  and min(x0, x1) - 1e-12 <= e <= max(x0, x1) + 1e-12 and min(y0, y1) - 1e-12 <= 1 - e <= max(y0, y1) + 1e-12
                  for x0, y0, x1, y1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:])]
    assert any(on_segment)


@pytest.mark.parametrize("pos, neg, expected", [
    ([0.9, 0.8], [0.2, 0.1], 0.0),        # separable
    ([0.2, 0.1], [0.9, 0.8], 1.0),        # perfectly wrong
    ([0.9, 0.4], [0.6, 0.1], 0.5),        # ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): FPR = FNR = .5 at a vertex
    ([0.9, 0.5], [0.5, 0.1], 0.25),       # the tie gives the segment (0,.5)-(.5,1); crossing at FPR = .25
    ([0.8, 0.7, 0.2], [0.9, 0.3, 0.1], 1 / 3),
])
def test_eer_hand_worked(pos, neg, expected):
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    auc, eer = ev.roc_metrics(y, np.r_[pos, neg])
    assert eer == pytest.approx(expected, abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, np.r_[pos, neg]))


def test_macro_excludes_single_class_videos_and_reports_them():
    rng = np.random.default_rng(1)
    labels = [np.r_[np.zeros(30), np.ones(20)], np.ones(40), np.r_[np.ones(10), np.zeros(30)], np.zeros(25)]
    scores = {f"Test{i + 1:03d}": rng.random(len(y)) + y for i, y in enumerate(labels)}
    r = ev.evaluate(scores, None, make_ds(labels))
    assert r["single_class_videos"] == ["Test002", "Test004"]
    expected = np.mean([roc_auc_score(labels[i], scores[f"Test{i + 1:03d}"]) for i in (0, 2)])
    assert r["frame_auc_macro"] == pytest.approx(expected, abs=1e-12)
    y = np.concatenate(labels)
    assert r["frame_auc_micro"] == pytest.approx(roc_auc_score(y, np.concatenate(list(scores.values()))))


# ------------------------------------------------------------------------------------------- pixel level

def square_mask(size=20, side=10):
    m = np.zeros((size, size), bool)
    m[5:5 + side, 5:5 + side] = True
    return m


@pytest.mark.parametrize("covered, is_tp", [(39, False), (40, True), (41, True)])
def test_forty_percent_rule(covered, is_tp):
    mask = square_mask()                       # 100 ground-truth pixels
    amap = np.zeros(mask.shape, np.float32)
    amap[np.nonzero(mask)[0][:covered], np.nonzero(mask)[1][:covered]] = 1.0
    # at t = 0.5 the frame is predicted abnormal (max 1 > t) in every case; TP only with >= 40 px covered
    c = ev.coverage_threshold(amap[mask])
    assert (0.5 < c) == is_tp
    # end to end: a normal frame with map maximum 0.5 ranks between the two outcomes -> AUC 1 or 0
    normal_map = np.full(mask.shape, 0.5, np.float32)
    masks = np.stack([mask, np.zeros_like(mask)])
    ds = FakeDataset([FakeVideo("Test001", [1, 0], masks)])
    r = ev.evaluate({"Test001": np.array([1.0, 0.0])}, {"Test001": np.stack([amap, normal_map])}, ds)
    assert r["pixel_auc"] == (1.0 if is_tp else 0.0)
    assert r["pixel_frames"] == {"abnormal": 1, "normal": 1, "excluded": 0}


def brute_force_pixel_roc(maps, masks, labels, rule="ucsd"):
    """Direct sweep of every threshold, counting pixels frame by frame as the module doc states the rules:
    (fpr, tpr) points in order of decreasing threshold."""
    H, W = masks[0].shape[1:]
    up = [np.stack([cv2.resize(f.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR) for f in m])
          for m in maps]
    values = np.unique(np.concatenate([u.ravel() for u in up]))
    thresholds = np.r_[np.inf, values[::-1], -np.inf]
    pts = []
    for t in thresholds:
        tp = under_covered = false_alarms = npos = nneg = 0
        for u, mk, y in zip(up, masks, labels):
            for f, g, lab in zip(u, mk, y):
                alarm = bool((f > t).any())
                if g.any() and lab:
                    npos += 1
                    covered = 5 * int((f[g] > t).sum()) >= 2 * int(g.sum())     # >= 40% of the mask
                    tp += alarm and covered
                    under_covered += alarm and not covered
                elif not g.any() and not lab:
                    nneg += 1
                    false_alarms += alarm
        if rule == "ucsd":
            pts.append((false_alarms / nneg, tp / npos))
        else:
            pts.append(((false_alarms + under_covered) / (nneg + under_covered), tp / npos))
    return np.array(pts)[:, 0], np.array(pts)[:, 1]


def random_pixel_case(seed, videos=3, T=7, inconsistent=False):
    """Small videos with masks on their abnormal frames and low-resolution float16 maps with coarse values
    (ties), brighter over the masked area on average. inconsistent: also frames labelled abnormal with an
    empty mask and frames labelled normal with mask pixels."""
    rng = np.random.default_rng(seed)
    out, maps = [], {}
    for i in range(videos):
        labels = (rng.random(T) < 0.5).astype(np.uint8)
        masks = np.zeros((T, 12, 16), bool)
        for t in np.flatnonzero(labels):
            y0, x0 = rng.integers(0, 8), rng.integers(0, 10)
            masks[t, y0:y0 + rng.integers(1, 5), x0:x0 + rng.integers(1, 7)] = True
        if inconsistent:
            masks[np.flatnonzero(labels)[:1]] = False                    # abnormal, empty mask
            masks[np.flatnonzero(labels == 0)[:1], 2:4, 3:6] = True      # normal, mask pixels
        m = np.round(rng.random((T, 6, 8)) * 4) / 4
        m += 0.5 * cv2.resize(masks.transpose(1, 2, 0).astype(np.float32), (8, 6)).reshape(6, 8, T).transpose(2, 0, 1)
        name = f"Test{i + 1:03d}"
        out.append(FakeVideo(name, labels, masks))
        maps[name] = m.astype(np.float16)
    return FakeDataset(out), maps


@pytest.mark.parametrize("rule", ["ucsd", "strict"])
@pytest.mark.parametrize("seed", [2, 7])
def test_fast_pixel_roc_equals_brute_force_sweep(rule, seed):
    """The exact per-frame-statistics ROC equals a direct threshold sweep, for both rules, with ties, and with
    frames whose label and mask disagree (excluded). Catches: the under-covered count U left out of the strict
    FPR numerator or denominator, c taken as the max instead of the k-th largest mask value, a loosened 40%
    rule (k off by one), a sweep that misses a vertex."""
    ds, maps = random_pixel_case(seed, inconsistent=(seed == 7))
    r = ev.evaluate({v.name: v.labels.astype(float) for v in ds.test}, maps, ds, pixel_rule=rule)
    fpr, tpr = brute_force_pixel_roc([maps[v.name] for v in ds.test], [v.masks for v in ds.test],
                                     [v.labels for v in ds.test], rule)
    assert r["pixel_auc"] == pytest.approx(ev.trapezoid_area(fpr, tpr), abs=1e-12)
    assert r["pixel_auc"] == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)
    assert r["pixel_eer"] == pytest.approx(ev.eer_from_roc(fpr, tpr), abs=1e-12)
    assert 0 < r["pixel_auc"] < 1 and r["pixel_rule"] == rule and r["protocol"]["pixel_rule"] == rule
    if rule == "ucsd":      # the ordinary ROC: sklearn agrees
        stats = ev.pixel_frame_stats(maps, ds)
        y = np.r_[np.ones(len(stats["pos_c"])), np.zeros(len(stats["neg_m"]))]
        assert r["pixel_auc"] == pytest.approx(roc_auc_score(y, np.r_[stats["pos_c"], stats["neg_m"]]), abs=1e-12)
    else:                   # strict: never above the ucsd AUC, and below it here (some detections misplaced)
        assert r["pixel_auc"] < ev.evaluate({v.name: v.labels.astype(float) for v in ds.test}, maps, ds)["pixel_auc"]


def test_strict_pixel_rule_hand_worked(tmp_path):
    """A detection covering under 40% is a false positive under "strict" and only a miss under "ucsd".
    Frames: A abnormal, map 0.9 on its mask (c = m = 0.9); B abnormal, 0.1 on its mask and 0.95 at one pixel
    outside (c = 0.1, m = 0.95); N normal, 0.5 everywhere. ucsd ROC (0,0) (0,.5) (1,.5) (1,1): AUC .5, EER .5.
    strict: at t < .95 B is in U: FPR = (0 + 1) / (1 + 1) -> (0,0) (.5,0) (.5,.5) (1,.5) (1,1): AUC .25, EER .5.
    Catches: strict equal to ucsd, U missing from the denominator (FPR 1 at t < .95, AUC 0.0), evaluate_run
    ignoring meta["pixel_rule"] or overriding an explicit pixel_rule with it."""
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    a = np.where(mask, 0.9, 0.0).astype(np.float32)
    b = np.where(mask, 0.1, 0.0).astype(np.float32)
    b[0, 0] = 0.95
    n = np.full((4, 4), 0.5, np.float32)
    ds = FakeDataset([FakeVideo("Test001", [1, 1, 0], np.stack([mask, mask, np.zeros_like(mask)]))])
    scores, maps = {"Test001": np.array([1.0, 1.0, 0.0])}, {"Test001": np.stack([a, b, n])}
    ucsd = ev.evaluate(scores, maps, ds)
    strict = ev.evaluate(scores, maps, ds, pixel_rule="strict")
    assert (ucsd["pixel_auc"], ucsd["pixel_eer"]) == (0.5, 0.5)
    assert (strict["pixel_auc"], strict["pixel_eer"]) == (0.25, 0.5)
    fpr, tpr = ev.pixel_roc([0.9, 0.1], [0.9, 0.95], [0.5], "strict")
    assert list(fpr) == [0, 0.5, 0.5, 1, 1] and list(tpr) == [0, 0, 0.5, 0.5, 1]
    with pytest.raises(ValueError):
        ev.evaluate(scores, maps, ds, pixel_rule="loose")
    # evaluate_run: the scores file's meta["pixel_rule"] unless the caller gives one
    meta = {"method": "toy", "dataset": "fake", "pixel_rule": "strict", "protocol": {}, "args": {}}
    common.write_scores(str(tmp_path / "scores.npz"), scores, maps, meta)
    assert ev.evaluate_run(str(tmp_path), ds, plots=False)["pixel_auc"] == 0.25
    assert ev.evaluate_run(str(tmp_path), ds, pixel_rule="ucsd", plots=False)["pixel_auc"] == 0.5
    common.write_scores(str(tmp_path / "scores.npz"), scores, maps, {**meta, "pixel_rule": None})
    assert ev.evaluate_run(str(tmp_path), ds, plots=False)["pixel_rule"] == "ucsd"


def test_pixel_frames_need_label_and_mask_to_agree():
    """Positives are frames labelled abnormal WITH mask pixels, negatives frames labelled normal WITHOUT;
    the rest is excluded. Catches: positives ignoring the frame label (`if has_pixels:`), negatives including
    frames with mask pixels (`elif not labels[t]:`), excluded frames counted as negatives or positives, a 0/1
    integer mask used as an index array."""
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    empty = np.zeros_like(mask)
    # frames: abnormal+mask (TP at any t < 1), normal+empty, normal+mask, abnormal+empty
    masks = np.stack([mask, empty, mask, empty])
    maps = np.stack([np.where(mask, 1.0, 0.0), np.full((4, 4), 0.5), np.full((4, 4), 2.0), np.full((4, 4), 3.0)])
    ds = FakeDataset([FakeVideo("Test001", [1, 0, 0, 1], masks)])
    r = ev.evaluate({"Test001": np.array([1.0, 0, 0, 1])}, {"Test001": maps.astype(np.float32)}, ds)
    assert r["pixel_frames"] == {"abnormal": 1, "normal": 1, "excluded": 2}
    # only frames 0 (c = 1) and 1 (m = 0.5) count: separable. Frame 2 as a positive (c = 2) or a negative
    # (m = 2) or frame 3 as a negative (m = 3) would each change the AUC.
    assert r["pixel_auc"] == 1.0 and r["pixel_eer"] == 0.0
    # masks given as 0/1 integers mean the same (not integer indices into the map)
    ds8 = FakeDataset([FakeVideo("Test001", [1, 0, 0, 1], masks.astype(np.uint8))])
    assert ev.evaluate({"Test001": np.array([1.0, 0, 0, 1])}, {"Test001": maps.astype(np.float32)}, ds8) == r


# ------------------------------------------------------------------------------------------- event level

def test_peak_persistence_small_case():
    assert ev.peak_persistence(np.array([0, 3, 1, 2, 0.0])) == {1: 3.0, 3: 1.0}


def test_event_counting_on_constructed_signal():
    t = np.arange(300)
    bump = lambda c, h, w: h * np.exp(-0.5 * ((t - c) / w) ** 2)
    # GT events [50,100) and [200,230); kept peaks 70 (1.0) and 85 (0.9) inside event 1, 150 (0.8) and
    # 260 (0.6) outside; a tiny bump at 215 (persistence 0.03 < 10% of the range) is not a peak we keep
    s = bump(70, 1.0, 4) + bump(85, 0.9, 4) + bump(150, 0.8, 5) + bump(260, 0.6, 5) + bump(215, 0.03, 3)
    labels = np.zeros(300, np.uint8)
    labels[50:100] = 1
    labels[200:230] = 1
    assert list(ev.detect_peaks(s)) == [70, 85, 150, 260]
    # window 50: 85 merges into 70 -> detections 70, 150, 260: event 1 found, event 2 missed, 2 false alarms
    assert ev.event_detections(s, 50) == [70, 150, 260]
    assert ev.count_events(s, labels, window=50) == {"detected": 1, "total": 2, "false_alarms": 2}
    # window 100: 150 (80 frames from 70) merges into 70 too; 260 stays (190 frames away)
    assert ev.count_events(s, labels, window=100) == {"detected": 1, "total": 2, "false_alarms": 1}
    # a lower peak inside an event is suppressed by a higher one just outside it: the event is missed
    labels2 = np.zeros(300, np.uint8)
    labels2[80:90] = 1
    assert ev.count_events(s, labels2, window=50) == {"detected": 0, "total": 1, "false_alarms": 3}
    r = ev.evaluate({"Test001": s}, None, make_ds([labels]))
    assert r["events"] == {"detected": 1, "total": 2, "false_alarms": 2, "precision": pytest.approx(1 / 3),
                           "window": 50, "min_persistence": 0.1}      # precision: detected / (detected + FA)


def test_event_window_and_persistence_thresholds_are_inclusive():
    """Peaks exactly `window` frames apart are two events; a peak whose persistence is exactly
    event_persistence x range is kept. Catches: the window's `>=` changed to `>` in event_detections, the
    persistence `>=` changed to `>` in detect_peaks."""
    s = np.zeros(200)
    s[[20, 70]] = 1.0                       # 50 frames apart
    s[[120, 169]] = 0.8                     # 49 frames apart
    assert ev.event_detections(s, 50) == [20, 70, 120]
    assert ev.event_detections(s, 51) == [20, 120]
    x = np.array([0.0, 10, 0, 1, 0])        # range 10; the peak at 3 has persistence 1 = 0.1 x 10 exactly
    assert list(ev.detect_peaks(x, 0.1)) == [1, 3]
    assert list(ev.detect_peaks(x, 0.11)) == [1]
    labels = np.zeros(5, np.uint8)
    labels[3] = 1
    assert ev.count_events(x, labels, window=2, min_persistence=0.1) == {"detected": 1, "total": 1, "false_alarms": 1}


def test_relative_persistence_every_normal_video_scores_a_false_alarm():
    """Documented consequence of a threshold relative to each video's own range: any non-constant fully
    normal video yields exactly its global maximum as a detection (one false alarm), however flat; a constant
    one yields none. Catches: an absolute threshold or a span computed over all videos."""
    rng = np.random.default_rng(8)
    flat = 1.0 + 1e-6 * rng.random(300)
    assert ev.count_events(flat, np.zeros(300), min_persistence=1.0) == {"detected": 0, "total": 0, "false_alarms": 1}
    assert ev.count_events(np.full(300, 0.3), np.zeros(300)) == {"detected": 0, "total": 0, "false_alarms": 0}


def test_event_settings_are_keywords_flags_and_recorded(tmp_path):
    """event_window / event_persistence reach the counts through evaluate and evaluate_run and are recorded
    in events and protocol. Catches: evaluate_run hard-coding the window (or the persistence), a keyword not
    passed on, the recorded value not the one used."""
    t = np.arange(300)
    s = np.exp(-0.5 * ((t - 70) / 4) ** 2) + 0.9 * np.exp(-0.5 * ((t - 130) / 4) ** 2) \
        + 0.2 * np.exp(-0.5 * ((t - 250) / 4) ** 2)
    labels = np.zeros(300, np.uint8)
    labels[60:80] = 1
    ds = make_ds([labels])
    assert ev.EVENT_WINDOW == 50 and ev.EVENT_MIN_PERSISTENCE == 0.1
    default = ev.evaluate({"Test001": s}, None, ds)["events"]
    assert default == {"detected": 1, "total": 1, "false_alarms": 2, "precision": pytest.approx(1 / 3), "window": 50,
                       "min_persistence": 0.1}
    wide = ev.evaluate({"Test001": s}, None, ds, event_window=61)["events"]
    assert wide["false_alarms"] == 1 and wide["window"] == 61            # 130 merged into 70
    strict = ev.evaluate({"Test001": s}, None, ds, event_persistence=0.5)
    assert strict["events"]["false_alarms"] == 1 and strict["protocol"]["event_persistence"] == 0.5   # 250 dropped
    meta = {"method": "toy", "dataset": "fake", "protocol": {"normalize": "none", "smooth": "none"}, "args": {}}
    common.write_scores(str(tmp_path / "scores.npz"), {"Test001": s}, None, meta)
    r = ev.evaluate_run(str(tmp_path), ds, event_window=61, event_persistence=0.5, plots=False)
    assert r["events"] == {"detected": 1, "total": 1, "false_alarms": 0, "precision": 1.0, "window": 61,
                           "min_persistence": 0.5}
    assert (r["protocol"]["event_window"], r["protocol"]["event_persistence"]) == (61, 0.5)
    for bad in ({"event_window": 0}, {"event_window": 2.5}, {"event_persistence": 1.5}):
        with pytest.raises(ValueError):
            ev.evaluate({"Test001": s}, None, ds, **bad)


# ------------------------------------------------------------------------------------------ post-processing

def test_nan_filling_from_nearest_scored_frame():
    filled, n = ev.fill_nan(np.array([np.nan, 1, np.nan, np.nan, 4, np.nan]))
    assert n == 4 and list(filled) == [1, 1, 1, 4, 4, 4]
    one_line_error(lambda: ev.fill_nan(np.full(3, np.nan), "Test007"), "Test007")
    r = ev.evaluate({"Test001": np.array([np.nan, 0.1, 0.9, np.nan])}, None, make_ds([[0, 0, 1, 1]]))
    assert r["nan_filled"] == 2 and r["frame_auc_micro"] == 1.0


def test_normalize_and_smooth():
    x = np.array([2.0, 4, 3, 10, 3, 4, 2])
    assert list(ev.postprocess(x, "video_minmax")) == pytest.approx((x - 2) / 8)
    assert list(ev.postprocess(x, "none", "median:3")) == [2, 3, 4, 3, 4, 3, 2]
    from scipy.ndimage import gaussian_filter1d
    assert ev.postprocess(x, "none", "gaussian:1.5") == pytest.approx(gaussian_filter1d(x, 1.5, mode="nearest"))
    assert list(ev.postprocess(np.ones(4), "video_minmax")) == [0, 0, 0, 0]
    for bad in ("gaussian:0", "median:4", "median", "box:3"):
        with pytest.raises(ValueError):
            ev.postprocess(x, "none", bad)
    # per-video min-max changes the micro AUC when videos live on different scales, and is recorded
    ds = make_ds([[0, 0, 1], [0, 0, 1]])
    scores = {"Test001": np.array([10.0, 11, 12]), "Test002": np.array([0.0, 1, 2])}
    raw = ev.evaluate(scores, None, ds)
    norm = ev.evaluate(scores, None, ds, normalize="video_minmax", smooth="median:1")
    assert raw["frame_auc_micro"] < 1.0 and norm["frame_auc_micro"] == 1.0
    assert (norm["normalize"], norm["smooth"], raw["normalize"], raw["smooth"]) == \
        ("video_minmax", "median:1", "none", "none")


def test_smoothing_comes_before_normalising():
    """With video_minmax and smoothing the evaluated curve spans exactly [0, 1] and equals minmax(smooth(x)).
    Catches: smoothing applied after normalising (a smoothed peak no longer reaches 1)."""
    from scipy.ndimage import gaussian_filter1d
    x = np.r_[np.zeros(20), 5.0, np.zeros(20), 2.0, np.zeros(5)]
    out = ev.postprocess(x, "video_minmax", "gaussian:2")
    g = gaussian_filter1d(x, 2, mode="nearest")
    assert out.min() == 0.0 and out.max() == 1.0
    assert out == pytest.approx((g - g.min()) / (g.max() - g.min()), abs=1e-12)
    assert ev.postprocess(x, "video_minmax", "median:3").max() == 0.0     # isolated peaks removed, constant -> 0


def test_smoothing_uses_future_frames():
    """The documented caveat: a centred filter moves a frame's score when only later frames change (so the
    smoothed evaluation is offline). Catches: a docstring claim that no longer matches the filters."""
    x = np.zeros(40)
    x[24] = 1.0
    y = x.copy()
    y[25:27] = 1.0                          # only frames after 24 differ
    for smooth in ("gaussian:2", "median:5"):
        assert ev.postprocess(y, "none", smooth)[24] > ev.postprocess(x, "none", smooth)[24]
    assert "future frames" in ev.__doc__ and "offline" in ev.__doc__


def test_unscored_drop_leaves_nan_frames_out():
    """unscored="drop": NaN frames leave the frame-level ROC, normalisation runs over the scored frames only,
    events keep their frame numbers, the pixel-level ROC skips them; counts recorded. fill stays the default.
    Catches: drop not applied (same AUC as fill), dropped frames' labels kept (length mismatch / wrong AUC),
    detections reported at positions in the shortened curve, dropped frames kept in the pixel-level ROC."""
    labels = [np.r_[np.zeros(10), np.ones(10), np.zeros(10)], np.r_[np.zeros(15), np.ones(15)]]
    s1 = np.r_[np.full(10, np.nan), np.linspace(0.5, 0.6, 10), np.linspace(0.2, 0.3, 10)]
    s2 = np.r_[np.full(2, np.nan), np.linspace(0, 1, 28)]
    scores = {"Test001": s1, "Test002": s2}
    ds = make_ds(labels)
    fill = ev.evaluate(scores, None, ds)
    drop = ev.evaluate(scores, None, ds, unscored="drop", normalize="video_minmax")
    keep = [~np.isnan(s) for s in (s1, s2)]
    y = np.concatenate([lab[k] for lab, k in zip(labels, keep)])
    s = np.concatenate([(v[k] - v[k].min()) / (v[k].max() - v[k].min()) for v, k in zip((s1, s2), keep)])
    assert drop["frame_auc_micro"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert drop["num_frames"] == 48 and fill["num_frames"] == 60
    assert (drop["nan_dropped"], drop["nan_filled"], fill["nan_filled"], fill["nan_dropped"]) == (12, 0, 12, 0)
    assert drop["unscored"] == drop["protocol"]["unscored"] == "drop" and fill["unscored"] == "fill"
    assert drop["frame_auc_micro"] != fill["frame_auc_micro"]
    # events: the peak of Test001's scored frames is frame 19 of the video, inside its event [10, 20)
    _, curves = ev._evaluate(scores, None, ds, "none", "none", "drop")
    assert list(curves["frames"]["Test001"]) == list(range(10, 30))
    assert ev.event_detections(curves["scores"]["Test001"], frames=curves["frames"]["Test001"]) == [19]
    assert drop["events"]["detected"] == 2
    # an event whose frames were all dropped is left out of the total (no detection could fall inside it);
    # one that is partly scored still counts. Catches: the total taken over every frame under drop.
    early = [np.r_[np.ones(3), np.zeros(27)], np.r_[np.ones(4), np.zeros(26)]]    # frames 0-2 / 0-3 abnormal
    s3 = np.r_[np.full(3, np.nan), np.linspace(0, 1, 27)]                       # frames 0-2 unscored
    ds3 = make_ds(early)
    scores3 = {"Test001": s3, "Test002": s3}
    assert ev.evaluate(scores3, None, ds3, unscored="drop")["events"]["total"] == 1
    assert ev.evaluate(scores3, None, ds3)["events"]["total"] == 2
    with pytest.raises(ValueError):
        ev.evaluate(scores, None, ds, unscored="skip")
    # pixel level: the dropped frames are not counted at all
    masks = np.zeros((30, 4, 4), bool)
    masks[10:20, 1:3, 1:3] = True
    pds = FakeDataset([FakeVideo("Test001", labels[0], masks)])
    maps = {"Test001": np.where(masks, 1.0, 0.2).astype(np.float32)}
    assert ev.evaluate({"Test001": s1}, maps, pds)["pixel_frames"] == {"abnormal": 10, "normal": 20, "excluded": 0}
    assert ev.evaluate({"Test001": s1}, maps, pds, unscored="drop")["pixel_frames"] == \
        {"abnormal": 10, "normal": 10, "excluded": 0}


# ------------------------------------------------------------------------------------- scores.npz validation

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_read_scores_roundtrip_and_malformed_files(tmp_path):
    meta = {"method": "m", "dataset": "ped2", "protocol": {"normalize": "none", "smooth": "none"}, "args": {}}
    good = str(tmp_path / "good.npz")
    common.write_scores(good, {"Test001": np.arange(4.0)}, {"Test001": np.zeros((4, 3, 5))}, meta)
    frames, maps, m = ev.read_scores(good)
    assert list(frames["Test001"]) == [0, 1, 2, 3] and maps["Test001"].shape == (4, 3, 5) and m == meta

    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    one_line_error(lambda: ev.read_scores(str(text)), str(text))
    single = str(tmp_path / "single.npy")
    np.save(single, np.zeros(3))
    one_line_error(lambda: ev.read_scores(single), single)
    j = np.array(json.dumps(meta))
    cases = {
        "nometa": {"frame/Test001": np.zeros(3)},
        "badmeta": {"frame/Test001": np.zeros(3), "meta": np.array("{not json")},
        "frame2d": {"frame/Test001": np.zeros((3, 2)), "meta": j},
        "map2d": {"frame/Test001": np.zeros(3), "map/Test001": np.zeros((3, 4)), "meta": j},
        "mapcount": {"frame/Test001": np.zeros(3), "map/Test001": np.zeros((2, 4, 4)), "meta": j},
        "noframes": {"meta": j},
    }
    for name, arrays in cases.items():
        p = write_npz(tmp_path / f"{name}.npz", **arrays)
        one_line_error(lambda: ev.read_scores(p), p)


def test_read_scores_streams_maps(tmp_path, monkeypatch):
    """Maps are not loaded by read_scores: stored members come back as read-only memmaps, compressed ones are
    decompressed only when their video is asked for, and both evaluate exactly like in-memory maps.
    Catches: read_scores loading every map into memory, a wrong data offset (values differ), a memmap that
    ignores the dtype or the Fortran order."""
    ds, maps = random_pixel_case(11)
    maps["Test002"] = np.asfortranarray(maps["Test002"])
    scores = {v.name: v.labels + 0.1 * np.arange(v.num_frames) for v in ds.test}
    meta = {"method": "m", "dataset": "fake", "protocol": {}, "args": {}}
    stored = str(tmp_path / "stored.npz")
    common.write_scores(stored, scores, maps, meta)
    packed = str(tmp_path / "packed.npz")
    np.savez_compressed(packed, meta=np.array(json.dumps(meta)),
                        **{f"frame/{k}": v for k, v in scores.items()}, **{f"map/{k}": v for k, v in maps.items()})
    reads = []
    real_read_array = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: reads.append(1) or real_read_array(*a, **k))

    _, lazy, _ = ev.read_scores(stored)
    assert not isinstance(lazy, dict) and sorted(lazy) == ["Test001", "Test002", "Test003"]
    assert all(isinstance(lazy[k], np.memmap) for k in lazy) and lazy.shape("Test001") == (7, 6, 8)
    for k in maps:
        assert lazy[k].dtype == np.float16 and np.array_equal(lazy[k], maps[k])
    _, packed_maps, _ = ev.read_scores(packed)
    loaded = len(reads)                                  # frame scores and meta only
    first = packed_maps["Test001"]
    assert len(reads) == loaded + 1 and np.array_equal(first, maps["Test001"])
    expected = ev.evaluate(scores, maps, ds)
    for m in (lazy, packed_maps):
        r = ev.evaluate(scores, m, ds, pixel_rule="ucsd")
        assert (r["pixel_auc"], r["pixel_eer"], r["pixel_frames"]) == \
            (expected["pixel_auc"], expected["pixel_eer"], expected["pixel_frames"])


def test_evaluate_errors_name_the_video():
    masks = np.zeros((4, 6, 6), bool)
    masks[2:, 1:3, 1:3] = True
    ds = FakeDataset([FakeVideo("Test001", [0, 0, 1, 1], masks), FakeVideo("Test002", [0, 1, 1, 0], masks)])
    scores = {"Test001": np.arange(4.0), "Test002": np.arange(4.0)}
    maps = {"Test001": np.zeros((4, 3, 3), np.float16), "Test002": np.zeros((4, 3, 3), np.float16)}
    assert ev.evaluate(scores, maps, ds)["pixel_auc"] is not None
    one_line_error(lambda: ev.evaluate({"Test001": scores["Test001"]}, None, ds), "Test002", "no frame")
    one_line_error(lambda: ev.evaluate({**scores, "Test002": np.arange(5.0)}, None, ds), "Test002", "5")
    bad_map = maps["Test002"].copy()
    bad_map[1, 0, 0] = np.nan
    one_line_error(lambda: ev.evaluate(scores, {**maps, "Test002": bad_map}, ds), "Test002", "non-finite")


def test_evaluate_run_writes_metrics_and_plots(tmp_path, capsys):
    labels = [np.r_[np.zeros(20), np.ones(10)], np.r_[np.ones(5), np.zeros(25)]]
    ds = make_ds(labels)
    scores = {f"Test{i + 1:03d}": y + np.linspace(0, 0.5, len(y)) for i, y in enumerate(labels)}
    meta = {"method": "toy", "dataset": "fake", "protocol": {"normalize": "none", "smooth": "none"}, "args": {}}
    common.write_scores(str(tmp_path / "scores.npz"), scores, None, meta)
    r = ev.evaluate_run(str(tmp_path), ds, smooth="gaussian:1", extra={"test_fps": 9.5})
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(r)) and saved["test_fps"] == 9.5 and saved["method"] == "toy"
    assert saved["smooth"] == "gaussian:1" and saved["pixel_auc"] is None
    assert (tmp_path / "score_curves.png").stat().st_size > 0 and (tmp_path / "roc.png").stat().st_size > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("toy: frame AUC")
    one_line_error(lambda: ev.evaluate_run(str(tmp_path), make_ds(labels + [np.zeros(4)])),
                   "Test003", str(tmp_path / "scores.npz"))
    # A script's extra must not overwrite the evaluation's own keys (a protocol string over the protocol dict).
    with pytest.raises(ValueError, match="protocol"):
        ev.evaluate_run(str(tmp_path), ds, extra={"protocol": "paper settings"}, plots=False)


# ------------------------------------------------------------------------------------------------- CLI

def write_ucsd_tree(root, rng):
    """A tiny UCSDped2 tree: one training video, two test videos with masks and the .m label file."""
    base = os.path.join(root, "UCSDped2")
    os.makedirs(os.path.join(base, "Train", "Train001"))
    for t in range(6):
        cv2.imwrite(os.path.join(base, "Train", "Train001", f"{t + 1:03d}.tif"), rng.integers(0, 255, (24, 32), np.uint8))
    ranges = {"Test001": (5, 10), "Test002": (1, 4)}     # 1-based inclusive abnormal frames
    for name, (a, b) in ranges.items():
        os.makedirs(os.path.join(base, "Test", name))
        os.makedirs(os.path.join(base, "Test", name + "_gt"))
        for t in range(12):
            cv2.imwrite(os.path.join(base, "Test", name, f"{t + 1:03d}.tif"), rng.integers(0, 255, (24, 32), np.uint8))
            mask = np.zeros((24, 32), np.uint8)
            if a <= t + 1 <= b:
                mask[8:16, 10:20] = 255
            cv2.imwrite(os.path.join(base, "Test", name + "_gt", f"{t + 1:03d}.bmp"), mask)
    with open(os.path.join(base, "Test", "UCSDped2.m"), "w") as f:
        f.write("TestVideoFile = {};\n")
        for name, (a, b) in ranges.items():
            f.write(f"TestVideoFile{{end+1}}.gt_frame = [{a}:{b}];\n")
    return root


def test_cli_json_table_plots_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(3)
    root = write_ucsd_tree(str(tmp_path / "data"), rng)
    ds = common.load_dataset("ped2", root, cache_dir=str(tmp_path / "cache"))
    assert [v.name for v in ds.test] == ["Test001", "Test002"]
    run = tmp_path / "runs" / "fake" / "ped2"
    run.mkdir(parents=True)
    scores = {v.name: v.labels + rng.normal(0, 0.7, v.num_frames) for v in ds.test}
    maps = {v.name: v.read_masks()[:, ::2, ::2] + rng.random((v.num_frames, 12, 16)) for v in ds.test}
    meta = {"method": "fake", "dataset": "ped2", "protocol": {"normalize": "video_minmax", "smooth": "none"},
            "args": {"data_root": root, "cache_dir": str(tmp_path / "cache")}}
    common.write_scores(str(run / "scores.npz"), scores, maps, meta)
    common.write_json(str(run / "metrics.json"), {"test_fps": 123.4})

    plots, overlays = tmp_path / "plots", tmp_path / "overlays"
    ev.main([str(run), str(run / "scores.npz"), "--json", "--plots", str(plots), "--overlays", str(overlays),
             "--top-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    row = json.loads(lines[0])
    y = np.concatenate([v.labels for v in ds.test])
    s = np.concatenate([ev.postprocess(scores[v.name], "video_minmax") for v in ds.test])
    assert row["frame_auc_micro"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)  # float32 storage
    assert row["normalize"] == "video_minmax" and row["test_fps"] == 123.4 and row["pixel_auc"] is not None
    assert row["events"]["total"] == 2
    assert sorted(os.listdir(plots)) == ["fake_ped2_2_score_curves.png", "fake_ped2_score_curves.png",
                                         "roc_compare.png"]
    assert len(os.listdir(overlays / "fake_ped2")) == 4

    ev.main([str(run), "--smooth", "gaussian:2", "--plots", str(plots)])
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and table[2].startswith("| fake | ped2 |") and "123.4" in table[2]

    # bad input through the real command line: one line on stderr, exit status 2
    common.write_scores(str(run / "scores.npz"), {"Test001": scores["Test001"]}, None, meta)
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), str(run), "--plots", str(plots)],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Test002" in p.stderr, p.stderr


def test_cli_protocol_column_flags_and_each_runs_plot_folder(tmp_path, capsys):
    """The table's last column and every JSON row carry the protocol (normalize, smooth, unscored, pixel rule,
    event settings); runs under different protocols get a note on stderr; without --plots each run's score
    curves go into that run's own folder. Catches: a table without the protocol column, a JSON row without
    the protocol, a flag not reaching the evaluation, plots of every run written into the first run's folder,
    meta pixel_rule ignored."""
    rng = np.random.default_rng(9)
    root = write_ucsd_tree(str(tmp_path / "data"), rng)
    ds = common.load_dataset("ped2", root, cache_dir=str(tmp_path / "cache"))
    margs = {"data_root": root, "cache_dir": str(tmp_path / "cache")}
    run_a, run_b = tmp_path / "runs" / "a" / "ped2", tmp_path / "runs" / "b" / "ped2"
    for run in (run_a, run_b):
        run.mkdir(parents=True)
    scores = {v.name: v.labels + rng.normal(0, 0.7, v.num_frames) for v in ds.test}
    maps = {v.name: v.read_masks()[:, ::2, ::2] + rng.random((v.num_frames, 12, 16)) for v in ds.test}
    common.write_scores(str(run_a / "scores.npz"), scores, maps,
                        {"method": "a", "dataset": "ped2", "pixel_rule": "strict", "args": margs,
                         "protocol": {"normalize": "video_minmax", "smooth": "none"}})
    with_nan = {k: np.r_[np.nan, v[1:]] for k, v in scores.items()}
    common.write_scores(str(run_b / "scores.npz"), with_nan, None,
                        {"method": "b", "dataset": "ped2", "args": margs,
                         "protocol": {"normalize": "none", "smooth": "none"}})

    ev.main([str(run_a), str(run_b)])
    captured = capsys.readouterr()
    table = captured.out.strip().splitlines()
    assert table[0].endswith("| test fps | protocol |") and table[1].count("|") == table[0].count("|")
    assert table[2].startswith("| a | ped2 |") and table[2].endswith(
        "| norm video_minmax, smooth none, NaN fill, pixel strict, events p0.1/w50 |")
    assert table[3].startswith("| b | ped2 |") and table[3].endswith(
        "| norm none, smooth none, NaN fill (2), pixel ucsd, events p0.1/w50 |")
    assert "different protocols" in captured.err
    assert sorted(os.listdir(run_a)) == ["a_ped2_score_curves.png", "roc_compare.png", "scores.npz"]
    assert sorted(os.listdir(run_b)) == ["b_ped2_score_curves.png", "scores.npz"]

    plots = tmp_path / "plots"
    ev.main([str(run_a), str(run_b), "--json", "--normalize", "none", "--pixel-rule", "ucsd", "--unscored", "drop",
             "--event-persistence", "0.2", "--event-window", "30", "--plots", str(plots)])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    expected = {"normalize": "none", "smooth": "none", "unscored": "drop", "pixel_rule": "ucsd",
                "event_window": 30, "event_persistence": 0.2}
    assert [r["protocol"] for r in rows] == [expected, expected] and "different protocols" not in captured.err
    assert rows[1]["nan_dropped"] == 2 and rows[1]["num_frames"] == 22 and rows[0]["events"]["window"] == 30
    assert sorted(os.listdir(plots)) == ["a_ped2_score_curves.png", "b_ped2_score_curves.png", "roc_compare.png"]

    with pytest.raises(SystemExit) as e:
        ev.main([str(run_a), "--event-persistence", "2"])
    assert e.value.code == 2
    common.write_scores(str(run_b / "scores.npz"), scores, None, {"method": "b", "dataset": "ped2", "args": margs,
                                                                 "pixel_rule": "40%"})
    one_line_error(lambda: ev.main([str(run_b)]), str(run_b / "scores.npz"), "pixel_rule")


def test_cli_help_states_the_offline_options(capsys):
    """--normalize and --smooth say they use the whole test video / future frames. Catches: help text that
    hides the offline nature of the two options."""
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "offline" in text and "future frames" in text and "--event-persistence" in text


# ------------------------------------------------------------------------------------------- real Ped2

needs_ped2 = pytest.mark.skipif(real_ped2_root() is None, reason="VAD_DATA_ROOT has no UCSDped2")


@needs_ped2
def test_real_ped2_labels_plus_noise_cli_matches_sklearn(tmp_path, cache_dir):
    root = real_ped2_root()
    ds = common.load_dataset("ped2", root, cache_dir=cache_dir)
    rng = np.random.default_rng(4)
    scores = {v.name: (v.labels + rng.normal(0, 1.0, v.num_frames)).astype(np.float32) for v in ds.test}
    meta = {"method": "noise", "dataset": "ped2", "protocol": {"normalize": "none", "smooth": "none"},
            "args": {"data_root": root}}
    path = str(tmp_path / "noise.npz")
    common.write_scores(path, scores, None, meta)
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), path, "--dataset", "ped2",
                        "--data-root", root, "--cache-dir", cache_dir, "--json"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.strip().splitlines()[0])
    y = np.concatenate([v.labels for v in ds.test])
    expected = roc_auc_score(y, np.concatenate([scores[v.name] for v in ds.test]))
    assert y.sum() == 1648 and row["num_frames"] == 2010
    assert abs(row["frame_auc_micro"] - expected) < 1e-6


@needs_ped2
@pytest.mark.slow
def test_real_ped2_full_resolution_pixel_eval_benchmark(tmp_path):
    """Benchmark (outside the default suite; prints its timing, asserts no time): full-resolution float16 maps
    of the whole Ped2 test split, written and read back through scores.npz (memory-mapped), both pixel rules."""
    ds = common.load_dataset("ped2", real_ped2_root())
    rng = np.random.default_rng(5)
    maps = {}
    for v in ds.test:
        m = rng.random((v.num_frames, 240, 360), dtype=np.float32)
        m += v.read_masks()
        maps[v.name] = m.astype(np.float16)
    scores = {v.name: v.labels + rng.normal(0, 1.0, v.num_frames) for v in ds.test}
    path = str(tmp_path / "scores.npz")
    common.write_scores(path, scores, maps, {"method": "noise", "dataset": "ped2", "protocol": {}, "args": {}})
    del maps
    _, lazy, _ = ev.read_scores(path)
    auc = {}
    for rule in ("ucsd", "strict"):
        start = time.perf_counter()
        r = ev.evaluate(scores, lazy, ds, pixel_rule=rule)
        elapsed = time.perf_counter() - start
        print(f"pixel-level evaluation ({rule}), 2010 frames at 240x360 from a memory-mapped scores.npz: "
              f"{elapsed:.1f} s ({2010 / elapsed:.0f} frames/s), pixel AUC {r['pixel_auc']:.3f}")
        assert r["pixel_frames"] == {"abnormal": 1648, "normal": 362, "excluded": 0}
        auc[rule] = r["pixel_auc"]
    # uniform noise + 1 on the masks: every frame is covered at a low threshold (ucsd), but at high
    # thresholds only a few mask pixels exceed t, which the strict rule counts as false positives
    assert auc["ucsd"] > 0.9 and auc["strict"] < auc["ucsd"]
