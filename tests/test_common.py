"""Tests for common.py: readers on small trees written here (with the real datasets' quirks), the synthetic
dataset, caches, optical flow, sampling helpers, run plumbing, downloads, and the real Ped2 when present."""

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import scipy.io
import torch

import common
from conftest import REPO, real_ped2_root

H, W = 24, 36


def frame(value, h=H, w=W):
    """A frame whose content identifies it: a constant level plus a small fixed pattern."""
    img = np.full((h, w), value, np.uint8)
    img[2:6, 2:6] = 255 - value
    return img


def write_frames(folder, values, names=None, ext=".png"):
    os.makedirs(folder, exist_ok=True)
    for i, v in enumerate(values):
        name = names[i] if names else f"{i + 1:03d}{ext}"
        assert cv2.imwrite(os.path.join(folder, name), frame(v))


def write_masks(folder, masks, pattern="{:03d}.bmp"):
    os.makedirs(folder, exist_ok=True)
    for i, m in enumerate(masks):
        assert cv2.imwrite(os.path.join(folder, pattern.format(i + 1)), m.astype(np.uint8) * 255)


def box_masks(labels):
    masks = np.zeros((len(labels), H, W), bool)
    masks[np.asarray(labels, bool), 5:10, 8:20] = True
    return masks


def make_ucsd(root, folder="UCSDped2", v1p2=True):
    """A UCSD tree with every quirk: AppleDouble/.DS_Store/backup/Thumbs.db files, unpadded frame names
    (numeric sort), mixed image extensions, frame001.bmp mask names, multi-range and all-abnormal .m lines,
    a test video without masks (as in Ped1)."""
    base = os.path.join(root, "UCSD_Anomaly_Dataset.v1p2", folder) if v1p2 else os.path.join(root, folder)
    tr1 = os.path.join(base, "Train", "Train001")
    write_frames(tr1, [10 * i for i in range(12)], names=[f"{i + 1}.png" for i in range(12)])   # 1..12 unpadded
    for junk in ("._1.png", ".DS_Store", "3.png~", "Thumbs.db"):
        with open(os.path.join(tr1, junk), "wb") as f:
            f.write(b"\x00\x05junk")
    write_frames(os.path.join(base, "Train", "Train002"), [1, 2, 3, 4, 5],
                 names=["001.tif", "002.png", "003.bmp", "004.tiff", "005.png"])                   # mixed extensions
    test = os.path.join(base, "Test")
    labels = {"Test001": [0, 1, 1, 0, 1, 1, 0, 0], "Test002": [1, 1, 1, 1], "Test003": [0, 0, 1, 1, 1, 0]}
    for name, lab in labels.items():
        write_frames(os.path.join(test, name), [20 * i for i in range(len(lab))])
    write_masks(os.path.join(test, "Test001_gt"), box_masks(labels["Test001"]), "frame{:03d}.bmp")
    write_masks(os.path.join(test, "Test002_gt"), box_masks(labels["Test002"]))
    os.makedirs(os.path.join(test, "Test003_gt"))     # an empty _gt folder means: no masks for Test003
    with open(os.path.join(test, folder + ".m"), "w") as f:
        f.write("TestVideoFile = {};\n"
                "TestVideoFile{end+1}.gt_frame = [2:3, 5:6];\n"
                "TestVideoFile{end+1}.gt_frame = [1:4];\n"
                "TestVideoFile{end+1}.gt_frame = [3:5];\n")
    with open(os.path.join(test, "._" + folder + ".m"), "wb") as f:
        f.write(b"\x00\x05\x16\x07 AppleDouble")
    return base, labels


def tree_snapshot(folder):
    return sorted((os.path.relpath(os.path.join(d, n), folder), os.path.getmtime(os.path.join(d, n)))
                  for d, _, names in os.walk(folder) for n in names)


def assert_one_line(err, path):
    assert isinstance(err, common.DataError)
    msg = str(err)
    assert "\n" not in msg and path in msg, msg


# ------------------------------------------------------------------------------------------- UCSD

def test_ucsd_reader_with_quirks(tmp_path, monkeypatch):
    base, labels = make_ucsd(str(tmp_path))
    decoded = []
    real_decode = common._decode_image
    monkeypatch.setattr(common, "_decode_image", lambda p, gray: decoded.append(p) or real_decode(p, gray))
    ds = common.load_dataset("ped2", str(tmp_path))
    # listing peeks at one frame per video for its size; nothing else is decoded yet
    assert len(decoded) == len(ds.train) + len(ds.test) == 5
    assert ds.layout == "ucsd" and ds.root == os.path.abspath(base)
    assert [v.name for v in ds.train] == ["Train001", "Train002"]
    assert [v.name for v in ds.test] == ["Test001", "Test002", "Test003"]
    tr = ds.video("Train001")
    assert tr.num_frames == 12 and tr.labels is None and tr.frame_shape == (H, W)
    np.testing.assert_array_equal(tr.read_frames()[:, 10, 10], [10 * i for i in range(12)])   # numeric order
    assert tr.read_frames(gray=False).shape == (12, H, W, 3)
    np.testing.assert_array_equal(ds.video("Train002").read_frames()[:, 10, 10], [1, 2, 3, 4, 5])
    for v in ds.test:
        np.testing.assert_array_equal(v.labels, labels[v.name])
        assert v.labels.dtype == np.uint8
    assert [v.has_masks for v in ds.test] == [True, True, False]
    m1 = ds.video("Test001").read_masks()                  # frame001.bmp names
    assert m1.dtype == bool and m1.shape == (8, H, W)
    np.testing.assert_array_equal(m1.any(axis=(1, 2)), labels["Test001"])
    assert ds.video("Test002").read_masks().all(axis=0)[6, 10]      # all-abnormal video
    assert ds.video("Test003").read_masks() is None
    assert ds.summary() == {"dataset": "ped2", "train_videos": 2, "train_frames": 17, "test_videos": 3,
                            "test_frames": 18, "anomalous_frames": 11, "videos_with_masks": 2, "frame_shape": [H, W]}


def test_ucsd_without_v1p2_folder_and_ped1(tmp_path):
    make_ucsd(str(tmp_path), folder="UCSDped1", v1p2=False)
    ds = common.load_dataset("ped1", str(tmp_path))
    assert ds.name == "ped1" and len(ds.test) == 3
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, str(tmp_path))


def _break_missing_root(base, root):
    return os.path.join(root, "nope"), None


def _break_empty_video(base, root):
    d = os.path.join(base, "Train", "Train002")
    for n in os.listdir(d):
        os.remove(os.path.join(d, n))
    return d, None


def _break_corrupt_image(base, root):
    p = os.path.join(base, "Test", "Test002", "003.png")
    with open(p, "wb") as f:
        f.write(b"\x89PNG this is not a png")
    return p, "Test002"


def _break_label_length(base, root):
    m = os.path.join(base, "Test", "UCSDped2.m")
    with open(m, "a") as f:
        f.write("TestVideoFile{end+1}.gt_frame = [1:3];\n")       # one video too many
    return m, None


def _break_label_range(base, root):
    m = os.path.join(base, "Test", "UCSDped2.m")
    text = open(m).read().replace("[1:4]", "[1:9]")                # Test002 has 4 frames
    open(m, "w").write(text)
    return m, None


def _break_mask_count(base, root):
    d = os.path.join(base, "Test", "Test001_gt")
    os.remove(os.path.join(d, "frame008.bmp"))
    return d, None


@pytest.mark.parametrize("breaker", [_break_missing_root, _break_empty_video, _break_corrupt_image,
                                     _break_label_length, _break_label_range, _break_mask_count])
def test_ucsd_errors_name_the_path(tmp_path, breaker, cache_dir):
    root = str(tmp_path / "data")
    base, _ = make_ucsd(root)
    path, read_video = breaker(base, root)
    data_root = path if breaker is _break_missing_root else root
    with pytest.raises(common.DataError) as e:
        ds = common.load_dataset("ped2", data_root)
        common.load_frames(ds.video(read_video), cache_dir=cache_dir)
    assert_one_line(e.value, path)
    # the command line ends in one "error: ..." line naming the path, exit 2, no traceback (a progress bar
    # that was running may stand before it)
    proc = subprocess.run([sys.executable, "common.py", "--dataset", "ped2", "--data-root", data_root,
                           "--cache-dir", cache_dir, "--frames"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and path in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and sum(line.startswith("error") for line in lines) == 1


# --------------------------------------------------------------------------------- frames layout

def make_frames_layout(root, name="ped2", labels_source="mat"):
    """MNAD / ano_pred style: <name>/{training,testing}/frames/<video>/<n>.jpg, labels in one of three places."""
    base = os.path.join(root, name)
    for v, n in (("01", 5), ("02", 4)):
        write_frames(os.path.join(base, "training", "frames", v), [30] * n, names=[f"{i}.jpg" for i in range(n)])
    labels = {"01": [0, 0, 1, 1, 0, 1], "02": [1, 1, 1]}
    for v, lab in labels.items():
        write_frames(os.path.join(base, "testing", "frames", v), [30] * len(lab),
                     names=[f"{i:04d}.jpg" for i in range(len(lab))])
    if labels_source == "mat":       # per video a 2 x K array of 1-based start/end rows
        gt = np.empty((1, 2), dtype=object)
        gt[0, 0] = np.array([[3, 6], [4, 6]])
        gt[0, 1] = np.array([[1], [3]])
        scipy.io.savemat(os.path.join(base, name + ".mat"), {"gt": gt})
    elif labels_source == "npy":     # MNAD: one (1, total) array next to the dataset folders
        np.save(os.path.join(root, f"frame_labels_{name}.npy"), np.array([labels["01"] + labels["02"]]))
    else:
        os.makedirs(os.path.join(base, "testing", "test_frame_mask"))
        for v, lab in labels.items():
            np.save(os.path.join(base, "testing", "test_frame_mask", v + ".npy"), np.array(lab))
    os.makedirs(os.path.join(base, "testing", "test_pixel_mask"))
    np.save(os.path.join(base, "testing", "test_pixel_mask", "01.npy"), box_masks(labels["01"]).astype(np.uint8))
    return base, labels


@pytest.mark.parametrize("labels_source", ["mat", "npy", "frame_mask"])
def test_frames_layout(tmp_path, labels_source):
    base, labels = make_frames_layout(str(tmp_path), labels_source=labels_source)
    ds = common.load_dataset("ped2", str(tmp_path))
    assert ds.layout == "frames"
    assert [(v.name, v.num_frames) for v in ds.train] == [("01", 5), ("02", 4)]
    for v in ds.test:
        np.testing.assert_array_equal(v.labels, labels[v.name])
    assert [v.has_masks for v in ds.test] == [True, False]
    assert ds.video("01") is ds.test[0]          # test videos win when names repeat across splits
    np.testing.assert_array_equal(ds.test[0].read_masks().any(axis=(1, 2)), labels["01"])


def test_frames_layout_label_errors(tmp_path):
    base, _ = make_frames_layout(str(tmp_path), labels_source="npy")
    bad = os.path.join(str(tmp_path), "frame_labels_ped2.npy")
    np.save(bad, np.zeros((1, 8)))                # 9 test frames on disk
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, bad)
    os.remove(bad)
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, base)
    np.save(bad, np.zeros((1, 9)))
    pix = os.path.join(base, "testing", "test_pixel_mask", "01.npy")
    np.save(pix, np.zeros((5, H, W), np.uint8))   # 6 frames on disk
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, pix)


def write_avi(path, values, h=H * 2, w=W * 2):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    assert out.isOpened()
    for v in values:
        out.write(cv2.cvtColor(frame(v, h, w), cv2.COLOR_GRAY2BGR))
    out.release()


def test_shanghaitech_layout_and_scene_filter(tmp_path):
    base = os.path.join(str(tmp_path), "shanghaitech")
    write_avi(os.path.join(base, "training", "videos", "01_001.avi"), [40] * 7)
    write_avi(os.path.join(base, "training", "videos", "02_001.avi"), [40] * 3)
    labels = {"01_0014": [0, 1, 1, 0], "02_0001": [0, 0, 1]}
    os.makedirs(os.path.join(base, "testing", "test_frame_mask"))
    os.makedirs(os.path.join(base, "testing", "test_pixel_mask"))
    for v, lab in labels.items():
        write_frames(os.path.join(base, "testing", "frames", v), [50] * len(lab),
                     names=[f"{i:03d}.jpg" for i in range(len(lab))])
        np.save(os.path.join(base, "testing", "test_frame_mask", v + ".npy"), np.array(lab))
        np.save(os.path.join(base, "testing", "test_pixel_mask", v + ".npy"), box_masks(lab).astype(np.uint8))
    ds = common.load_dataset("shanghaitech", str(tmp_path))
    assert [v.name for v in ds.test] == ["01_0014", "02_0001"]        # name order, not last-number order
    assert ds.summary()["anomalous_frames"] == 3 and ds.summary()["videos_with_masks"] == 2
    tr = ds.video("01_001")
    assert tr.num_frames == 7 and tr.frame_shape == (2 * H, 2 * W)
    frames = tr.read_frames()
    assert frames.shape == (7, 2 * H, 2 * W) and abs(int(frames[0, 20, 20]) - 40) < 8
    one = common.load_dataset("shanghaitech", str(tmp_path), scene="1")
    assert [v.name for v in one.train] == ["01_001"] and [v.name for v in one.test] == ["01_0014"]
    np.testing.assert_array_equal(one.test[0].labels, labels["01_0014"])
    with pytest.raises(common.DataError):
        common.load_dataset("shanghaitech", str(tmp_path), scene="07")


def test_avenue_reader(tmp_path, cache_dir):
    base = os.path.join(str(tmp_path), "Avenue Dataset")
    write_avi(os.path.join(base, "training_videos", "01.avi"), [60] * 6)
    lengths = {"01.avi": [0, 0, 1, 1, 0], "02.avi": [1, 1, 1, 1]}      # 02: abnormal in every frame
    label_dir = os.path.join(str(tmp_path), "ground_truth_demo", "testing_label_mask")
    os.makedirs(label_dir)
    for i, (fn, lab) in enumerate(lengths.items()):
        write_avi(os.path.join(base, "testing_videos", fn), [70] * len(lab))
        cells = np.empty((1, len(lab)), dtype=object)
        for t, m in enumerate(box_masks(lab)):
            cells[0, t] = cv2.resize(m.astype(np.uint8), (2 * W, 2 * H), interpolation=cv2.INTER_NEAREST)
        scipy.io.savemat(os.path.join(label_dir, f"{i + 1}_label.mat"), {"volLabel": cells})   # not zero-padded
    ds = common.load_dataset("avenue", str(tmp_path), cache_dir=cache_dir)
    assert [v.name for v in ds.test] == ["01", "02"]
    for v, lab in zip(ds.test, lengths.values()):
        np.testing.assert_array_equal(v.labels, lab)
        assert v.read_masks().shape == (len(lab), 2 * H, 2 * W)
    again = common.load_dataset("avenue", str(tmp_path), cache_dir=cache_dir)     # labels from the cache
    np.testing.assert_array_equal(again.test[1].labels, [1, 1, 1, 1])
    # a label file with another frame count than its video
    cells = np.empty((1, 3), dtype=object)
    for t in range(3):
        cells[0, t] = np.zeros((2 * H, 2 * W), np.uint8)
    bad = os.path.join(label_dir, "2_label.mat")
    scipy.io.savemat(bad, {"volLabel": cells})
    with pytest.raises(common.DataError) as e:
        common.load_dataset("avenue", str(tmp_path), cache_dir=cache_dir)
    assert_one_line(e.value, bad)


@pytest.mark.parametrize("fmt", ["json", "txt"])
def test_umn_reader(tmp_path, fmt):
    write_avi(os.path.join(str(tmp_path), "UMN", "Crowd-Activity-All.avi"), [80] * 20)
    labels = os.path.join(str(tmp_path), "labels." + fmt)
    with open(labels, "w") as f:
        if fmt == "json":
            json.dump({"clips": [{"name": "lawn_train", "split": "train", "frames": [1, 8]},
                                 {"name": "lawn_test", "split": "test", "frames": [9, 20], "abnormal": [[15, 20]]}]}, f)
        else:
            f.write("# name split frames abnormal...\nlawn_train train 1-8\nlawn_test test 9-20 15-20  # panic\n")
    ds = common.load_dataset("umn", str(tmp_path), labels_file=labels)
    assert [(v.name, v.num_frames) for v in ds.train + ds.test] == [("lawn_train", 8), ("lawn_test", 12)]
    np.testing.assert_array_equal(ds.test[0].labels, [0] * 6 + [1] * 6)
    assert ds.test[0].read_frames().shape == (12, 2 * H, 2 * W)
    with pytest.raises(common.DataError) as e:
        common.load_dataset("umn", str(tmp_path))
    assert_one_line(e.value, "Crowd-Activity-All.avi")


# ------------------------------------------------------------------------------------------ synthetic

def test_synthetic_dataset(shared_cache, tmp_path):
    t0 = time.time()
    ds = common.load_dataset("synthetic", "/nonexistent", cache_dir=shared_cache, seed=0)
    assert time.time() - t0 < 5
    root = os.path.join(shared_cache, "synthetic", "seed0", "UCSDsynthetic")
    assert ds.root == os.path.abspath(root) and os.path.isfile(os.path.join(root, "Test", "UCSDsynthetic.m"))
    s = ds.summary()
    assert (s["train_videos"], s["train_frames"], s["test_videos"], s["test_frames"]) == (8, 640, 6, 480)
    assert s["frame_shape"] == [120, 180] and s["videos_with_masks"] == 6
    assert 0.35 <= s["anomalous_frames"] / s["test_frames"] <= 0.55
    for v in ds.test:
        frames, masks = v.read_frames(), v.read_masks()
        np.testing.assert_array_equal(v.labels, masks.any(axis=(1, 2)))        # labels derived from masks
        assert 0 < v.labels.sum() < v.num_frames and v.labels[0] == 0          # normal stretch, then anomalies
        # anomalies stand out: dark objects on the brighter scene
        normal_mean = frames[~masks].mean()
        assert normal_mean - frames[masks].mean() > 50
    # fast movers, carts and off-walkway walkers: very different speeds and sizes
    areas = [m.sum(axis=(1, 2)) for m in (v.read_masks() for v in ds.test)]
    assert max(a.max() for a in areas) > 400          # a cart (~30 x 20 px)
    centroid_x = [np.nonzero(m)[1].mean() for m in ds.test[0].read_masks() if m.any()]   # Test001: fast movers
    assert np.median(np.abs(np.diff(centroid_x))) >= 5
    # deterministic: a second generation with the same seed is identical, another seed differs
    again = common.load_dataset("synthetic", cache_dir=str(tmp_path / "c2"), seed=0)
    np.testing.assert_array_equal(again.test[2].read_frames(), ds.test[2].read_frames())
    other = common.load_dataset("synthetic", cache_dir=str(tmp_path / "c2"), seed=1)
    assert not np.array_equal(other.test[2].read_frames(), ds.test[2].read_frames())


# --------------------------------------------------------------------------------------- caches/flow

def test_frame_cache(tmp_path, cache_dir, monkeypatch):
    make_ucsd(str(tmp_path / "data"))
    before = tree_snapshot(str(tmp_path / "data"))
    v = common.load_dataset("ped2", str(tmp_path / "data")).video("Test001")
    a = common.load_frames(v, (12, 18), cache_dir=cache_dir)
    assert isinstance(a, np.memmap) and a.dtype == np.uint8 and a.shape == (8, 12, 18) and not a.flags.writeable
    rgb = common.load_frames(v, None, gray=False, cache_dir=cache_dir)
    assert rgb.shape == (8, H, W, 3)
    files = sorted(os.listdir(os.path.join(cache_dir, "frames")))
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    monkeypatch.setattr(common.Video, "read_frames", lambda *a, **k: pytest.fail("decoded instead of cache"))
    b = common.load_frames(v, (12, 18), cache_dir=cache_dir)
    np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(os.path.join(cache_dir, "frames"))) == files
    assert tree_snapshot(str(tmp_path / "data")) == before          # nothing written into the dataset


def shifted_texture_video(folder, dx, dy, n=4, size=64):
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.uniform(0, 255, (size + 40, size + 40)).astype(np.float32), (0, 0), 2)
    big = cv2.normalize(big, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    os.makedirs(folder)
    for t in range(n):   # content moves by (+dx, +dy) per frame
        y0, x0 = 20 - t * dy, 20 - t * dx
        cv2.imwrite(os.path.join(folder, f"{t}.png"), big[y0:y0 + size, x0:x0 + size])
    files = common._list_images(folder)
    return common.Video("shift", "train", n, (size, size), None, False, folder, frame_files=files)


@pytest.mark.parametrize("method,workers", [("farneback", 2), ("dis", 1)])
def test_flow_direction_and_magnitude(tmp_path, cache_dir, method, workers, capsys, monkeypatch):
    monkeypatch.setattr(common, "_POOL_MIN_FRAMES", 0)     # use the worker processes even for 3 frame pairs
    v = shifted_texture_video(str(tmp_path / "v"), dx=2, dy=-1)
    flows = common.load_flows(v, (64, 64), method=method, cache_dir=cache_dir, workers=workers)
    assert flows.dtype == np.float16 and flows.shape == (3, 64, 64, 2)
    mean = np.asarray(flows[:, 16:48, 16:48], np.float32).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, [2, -1], atol=0.3)
    assert "frames/s" in capsys.readouterr().out
    again = common.load_flows(v, (64, 64), method=method, cache_dir=cache_dir)
    assert isinstance(again, np.memmap) and "frames/s" not in capsys.readouterr().out


def test_split_loaders_and_unknown_flow(tmp_path, cache_dir):
    make_ucsd(str(tmp_path))
    ds = common.load_dataset("ped2", str(tmp_path))
    frames = common.load_split_frames(ds, "test", (H, W), cache_dir=cache_dir)
    assert list(frames) == ["Test001", "Test002", "Test003"]
    flows = common.load_split_flows(ds, "train", (H, W), method="dis", cache_dir=cache_dir, workers=1)
    assert [f.shape for f in flows.values()] == [(11, H, W, 2), (4, H, W, 2)]
    with pytest.raises(common.DataError):
        common.load_flows(ds.train[0], (H, W), method="lucas", cache_dir=cache_dir)


def test_window_indices_and_clip_starts():
    w = common.window_indices(6, 2, 1)
    assert w.dtype == np.int64
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]])
    assert common.window_indices(3, 2, 1).shape == (0, 4)
    np.testing.assert_array_equal(common.clip_starts(10, 4, 3), [0, 3, 6])
    np.testing.assert_array_equal(common.clip_starts(11, 4, 3), [0, 3, 6, 7])     # last clip ends at 11
    np.testing.assert_array_equal(common.clip_starts(4, 4, 2), [0])
    assert len(common.clip_starts(3, 4, 1)) == 0


# ------------------------------------------------------------------------------------------ plumbing

def test_parse_args_defaults(monkeypatch):
    monkeypatch.setenv("VAD_DATA_ROOT", "/some/data")
    monkeypatch.setenv("VAD_CACHE_DIR", "/some/cache")
    parser = common.build_parser("stan", "STAN")
    args = common.parse_args(parser, [])
    assert (args.dataset, args.data_root, args.cache_dir) == ("synthetic", "/some/data", "/some/cache")
    assert args.out == os.path.join("runs", "stan", "synthetic") and args.train and args.test
    assert args.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert (args.epochs, args.batch_size, args.lr, args.normalize) == (None, None, None, None)
    assert (args.smooth, args.num_panels, args.workers, args.seed) == ("none", 4, 0, 0)
    args = common.parse_args(parser, ["--test", "--dataset", "ped2", "--device", "cpu", "--out", "x",
                                      "--normalize", "video_minmax", "--data-root", "d"])
    assert (args.train, args.test, args.out, args.data_root, args.device) == (False, True, "x", "d", torch.device("cpu"))
    with pytest.raises(SystemExit):
        common.parse_args(parser, ["--normalize", "zscore"])
    json.dumps(common.args_to_dict(args))          # JSON-safe


def test_checkpoint_atomic_and_weights_only(tmp_path):
    path = str(tmp_path / "run" / "model.pt")
    args = common.parse_args(common.build_parser("x", "x"), ["--device", "cpu"])
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "args": common.args_to_dict(args)}
    common.save_checkpoint(path, state)
    loaded = common.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    with pytest.raises(Exception):                         # a failed save leaves the old file and no temp
        common.save_checkpoint(path, {"bad": lambda: 0})
    assert common.load_checkpoint(path)["epoch"] == 3 and os.listdir(tmp_path / "run") == ["model.pt"]
    with pytest.raises(common.DataError) as e:
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    assert_one_line(e.value, "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.DataError) as e:
        common.load_checkpoint(str(tmp_path / "garbage.pt"))
    assert_one_line(e.value, "garbage.pt")
    torch.save({"obj": argparse_namespace()}, str(tmp_path / "pickled.pt"))   # fine for pickle, not weights_only
    with pytest.raises(common.DataError) as e:
        common.load_checkpoint(str(tmp_path / "pickled.pt"))
    assert_one_line(e.value, "pickled.pt")


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)


def test_write_scores_and_json(tmp_path):
    path = str(tmp_path / "out" / "scores.npz")
    common.write_scores(path, {"Test001": [0.1, float("nan")]}, {"Test001": np.ones((2, 4, 6))},
                        {"method": "m", "protocol": {"normalize": "none"}, "x": np.float32(1.5)})
    with np.load(path) as z:
        assert sorted(z.files) == ["frame/Test001", "map/Test001", "meta"]
        assert z["frame/Test001"].dtype == np.float32 and np.isnan(z["frame/Test001"][1])
        assert z["map/Test001"].dtype == np.float16 and z["map/Test001"].shape == (2, 4, 6)
        assert json.loads(str(z["meta"])) == {"method": "m", "protocol": {"normalize": "none"}, "x": 1.5}
    common.write_json(str(tmp_path / "m.json"), {"auc": np.float64(0.5), "eer": float("nan"), "n": np.int64(3)})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"auc": 0.5, "eer": None, "n": 3} and "\n  " in text
    assert sorted(os.listdir(tmp_path)) == ["m.json", "out"] and os.listdir(tmp_path / "out") == ["scores.npz"]


def test_run_main_and_check_finite(capsys):
    def bad():
        raise common.DataError("/x/y: folder not found (expected frames)")
    with pytest.raises(SystemExit) as e:
        common.run_main(bad)
    assert e.value.code == 2 and capsys.readouterr().err == "error: /x/y: folder not found (expected frames)\n"
    common.check_finite(torch.tensor(1.0), "epoch 1")
    with pytest.raises(common.TrainingError, match="non-finite loss at epoch 2 batch 3; nothing saved"):
        common.check_finite(torch.tensor(float("nan")), "epoch 2 batch 3")
    with pytest.raises(common.TrainingError):
        common.check_finite(float("inf"), "x")


def test_cli_summary_and_lazy_import(tmp_path):
    make_ucsd(str(tmp_path))
    proc = subprocess.run([sys.executable, "common.py", "--dataset", "ped2", "--data-root", str(tmp_path), "--summary"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["anomalous_frames"] == 11
    code = ("import sys; sys.modules['torchvision'] = None; import common; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=dict(os.environ, VAD_CACHE_DIR=str(tmp_path / "c")))
    assert not os.path.exists(tmp_path / "c")      # importing did no work


# ------------------------------------------------------------------------------------------- download

class _Handler(http.server.BaseHTTPRequestHandler):
    payload = os.urandom(300_000)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        if self.path == "/short":      # the server dies mid-transfer
            self.wfile.write(self.payload[:1000])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download(tmp_path, http_url):
    good = hashlib.sha256(_Handler.payload).hexdigest()
    dest = str(tmp_path / "a" / "file.bin")
    assert common.download(http_url + "/file.bin", dest, good) == dest
    assert open(dest, "rb").read() == _Handler.payload and os.listdir(tmp_path / "a") == ["file.bin"]
    with pytest.raises(common.DataError, match="sha256"):
        common.download(http_url + "/file.bin", str(tmp_path / "b.bin"), "0" * 64)
    with pytest.raises(common.DataError) as e:
        common.download(http_url + "/short", str(tmp_path / "c.bin"))
    assert_one_line(e.value, "/short")
    assert sorted(os.listdir(tmp_path)) == ["a"]        # no partial or bad files kept
    with pytest.raises(common.DataError, match="svip-lab"):
        common.download_dataset("shanghaitech", str(tmp_path))


# ------------------------------------------------------------------------------------------ real data

@pytest.mark.skipif(real_ped2_root() is None, reason="VAD_DATA_ROOT does not contain UCSDped2")
def test_real_ped2(cache_dir):
    root = real_ped2_root()
    proc = subprocess.run([sys.executable, "common.py", "--dataset", "ped2", "--data-root", root, "--summary"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == {"dataset": "ped2", "train_videos": 16, "train_frames": 2550,
                                       "test_videos": 12, "test_frames": 2010, "anomalous_frames": 1648,
                                       "videos_with_masks": 12, "frame_shape": [240, 360]}
    ds = common.load_dataset("ped2", root)
    masks = ds.video("Test006").read_masks()                # frame001.bmp names
    assert masks.shape == (180, 240, 360) and masks.any()
    frames = common.load_frames(ds.video("Test006"), (120, 180), cache_dir=cache_dir)
    assert frames.shape == (180, 120, 180)


# ----------------------------------------------------------------------------------------------------------
# AlexNet weights (torchvision's file) for the two scripts that define AlexNet themselves
# ----------------------------------------------------------------------------------------------------------

def _alexnet_features():
    """torchvision's alexnet().features layout, written out (torchvision is not installed here)."""
    import torch.nn as nn
    model = nn.Module()
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    return model


def test_alexnet_weights_from_path_and_bad_files(tmp_path, capsys):
    from torchvision_alexnet import TORCHVISION_ALEXNET_FEATURES, torchvision_like_state
    assert {k: tuple(v.shape) for k, v in _alexnet_features().state_dict().items()} == TORCHVISION_ALEXNET_FEATURES
    state = torchvision_like_state()
    path = str(tmp_path / "alexnet.pth")
    torch.save(state, path)
    model = _alexnet_features()
    desc = common.load_alexnet_features(model, path)
    assert desc.startswith("alexnet-file") and path in desc
    for k, v in model.state_dict().items():       # features.* loaded, classifier.* ignored
        assert torch.equal(v, state[k])
    # a wrong shape and a missing key are one-line DataErrors naming the key; a missing file names the file
    bad = dict(state)
    bad["features.3.weight"] = torch.zeros(256, 64, 5, 5)
    torch.save(bad, str(tmp_path / "bad.pth"))
    with pytest.raises(common.DataError, match="features.3.weight"):
        common.load_alexnet_features(model, str(tmp_path / "bad.pth"))
    del bad["features.3.weight"]
    torch.save(bad, str(tmp_path / "missing_key.pth"))
    with pytest.raises(common.DataError, match="lack features.3.weight"):
        common.load_alexnet_features(model, str(tmp_path / "missing_key.pth"))
    with pytest.raises(common.DataError, match="nope.pth.*not found"):
        common.load_alexnet_features(model, str(tmp_path / "nope.pth"))
    # "none" keeps the random weights and says so loudly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capsys.readouterr()
    assert common.load_alexnet_features(model, "none") == "alexnet-random"
    assert "RANDOM weights" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_alexnet_weights_through_torch_hub_from_local_server(tmp_path, monkeypatch):
    from torchvision_alexnet import torchvision_like_state
    serve = tmp_path / "serve"
    serve.mkdir()
    state = torchvision_like_state(seed=3)
    torch.save(state, serve / "alexnet-local.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alexnet-local.pth"
    try:
        model = _alexnet_features()
        assert common.load_alexnet_features(model, "imagenet", url=url) == "alexnet-imagenet"
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-local.pth").is_file()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the server is gone: the second load comes from the TORCH_HOME cache
    again = _alexnet_features()
    common.load_alexnet_features(again, "imagenet", url=url)
    assert torch.equal(again.features[0].weight, state["features.0.weight"])
    # an unreachable file is a one-line DataError that names the way out
    with pytest.raises(common.DataError, match="could not fetch.*--backbone-weights"):
        common.load_alexnet_features(_alexnet_features(), "imagenet", url=url.replace("alexnet-local", "alexnet-other"))
