"""Tests for common.py: readers on small trees written here (with the real datasets' quirks), the synthetic
dataset, caches, optical flow, sampling helpers, run plumbing, downloads, and the real Ped2 when present."""

import functools
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def level(indices):
    """Gray levels that encode frame indices (10 apart, so they survive JPEG/MJPEG compression)."""
    return [(10 * i + 5) % 256 for i in indices]


def assert_frame_order(frames, indices):
    """Each decoded frame shows the level of the frame index expected at its position (away from the
    inverted 4x4 corner patch), so a reordered, shifted or repeated frame fails."""
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    got = frames[:, h // 2, w // 2].astype(int)
    np.testing.assert_allclose(got, level(indices), atol=4)


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
                "% TestVideoFile{end+1}.gt_frame = [1:2];   a commented-out line is no video\n"
                "TestVideoFile{end+1}.gt_frame = [2:3, 5:6];  % frames 2-3 and 5-6\n"
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
    text = Path(m).read_text().replace("[1:4]", "[1:9]")           # Test002 has 4 frames
    Path(m).write_text(text)
    return m, None


def _break_mask_count(base, root):
    d = os.path.join(base, "Test", "Test001_gt")
    os.remove(os.path.join(d, "frame008.bmp"))
    return d, None


def test_unparsable_ucsd_label_entry_names_its_line(tmp_path):
    """The make_ucsd .m file with Test002's range typed as '1-4': the error gives the file, the line (comment
    lines counted) and the test video. Catches: line numbers shifted by the comment stripping, the video
    counted from 0."""
    base, _ = make_ucsd(str(tmp_path))
    m = os.path.join(base, "Test", "UCSDped2.m")
    Path(m).write_text(Path(m).read_text().replace("[1:4]", "[1-4]"))
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, m)
    assert "line 4 (test video 2)" in str(e.value) and "'1-4'" in str(e.value)


def test_empty_ucsd_folder_is_named_as_such(tmp_path):
    """Catches: a UCSDped2 folder without Train/ or Test/ reported as if no folder were there."""
    (tmp_path / "UCSDped2").mkdir()
    with pytest.raises(common.DataError, match=r"UCSDped2 exists but holds neither Train/ nor Test/"):
        common.load_dataset("ped2", str(tmp_path))


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
    for v, n in (("01", 5), ("02", 4)):     # unpadded names 0..n-1: numeric order is frame order
        write_frames(os.path.join(base, "training", "frames", v), level(range(n)), names=[f"{i}.jpg" for i in range(n)])
    labels = {"01": [0, 0, 1, 1, 0, 1], "02": [1, 1, 1]}
    for v, lab in labels.items():
        write_frames(os.path.join(base, "testing", "frames", v), level(range(len(lab))),
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
    """Frames encode their index; mutation caught (besides the three label sources): frames read in another
    order."""
    base, labels = make_frames_layout(str(tmp_path), labels_source=labels_source)
    ds = common.load_dataset("ped2", str(tmp_path))
    assert ds.layout == "frames"
    assert [(v.name, v.num_frames) for v in ds.train] == [("01", 5), ("02", 4)]
    for v in ds.test:
        np.testing.assert_array_equal(v.labels, labels[v.name])
    assert [v.has_masks for v in ds.test] == [True, False]
    assert ds.video("01") is ds.test[0]          # test videos win when names repeat across splits
    np.testing.assert_array_equal(ds.test[0].read_masks().any(axis=(1, 2)), labels["01"])
    assert_frame_order(ds.train[0].read_frames(), range(5))
    assert_frame_order(ds.test[0].read_frames(), range(6))


def test_cli_flows_of_both_splits_when_names_repeat(tmp_path):
    """`common.py --flows` computes the flows of both splits of a frames-layout dataset whose train and test
    videos share names (01, 02). Mutation caught: one shared name-keyed call for both splits (a KeyError,
    or one of each pair of same-named videos lost)."""
    make_frames_layout(str(tmp_path))
    proc = subprocess.run([sys.executable, "common.py", "--dataset", "ped2", "--data-root", str(tmp_path),
                           "--cache-dir", str(tmp_path / "cache"), "--flows", "--image-size", "32", "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "flows: 14 flow fields" in proc.stdout            # (5 - 1) + (4 - 1) train, (6 - 1) + (3 - 1) test


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
    hf2vad = os.path.join(base, "ground_truth_demo", "gt_label.json")      # HF2-VAD's pickled labels
    os.makedirs(os.path.dirname(hf2vad))
    with open(hf2vad, "wb") as f:
        f.write(b"\x80\x04pickle")
    with pytest.raises(common.DataError, match="HF2-VAD.*not read.*frame_labels_ped2.npy") as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, hf2vad)
    np.save(bad, np.zeros((1, 9)))
    pix = os.path.join(base, "testing", "test_pixel_mask", "01.npy")
    np.save(pix, np.zeros((5, H, W), np.uint8))   # 6 frames on disk
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, pix)


def test_frames_layout_only_under_the_datasets_own_name(tmp_path):
    """Mutations caught: the frames-layout finder accepting the data root itself whatever its name (then
    `--dataset avenue --data-root .../ped2` loads Ped2 as Avenue), or any sub-folder with testing/frames;
    the labels finder trying another dataset's label file (ped2.mat, frame_labels_ped2.npy) for avenue."""
    root = str(tmp_path)
    base, labels = make_frames_layout(root, name="ped2", labels_source="mat")
    np.save(os.path.join(root, "frame_labels_ped2.npy"), np.array([labels["01"] + labels["02"]]))
    for name, data_root in (("avenue", base), ("avenue", root), ("shanghaitech", base), ("ped1", root)):
        with pytest.raises(common.DataError, match=f"no {name} dataset found"):
            common.load_dataset(name, data_root)
    # the data root itself counts when it is named for the dataset; letter case does not matter
    assert common.load_dataset("ped2", base).root == os.path.abspath(base)
    os.rename(base, os.path.join(root, "Avenue"))
    with pytest.raises(common.DataError) as e:      # an avenue folder, but only ped2's labels around
        common.load_dataset("avenue", root)
    assert_one_line(e.value, os.path.join(root, "Avenue"))
    assert "ped2" not in str(e.value)
    np.save(os.path.join(root, "frame_labels_avenue.npy"), np.array([labels["01"] + labels["02"]]))
    ds = common.load_dataset("avenue", root)
    assert ds.name == "avenue" and [v.name for v in ds.test] == ["01", "02"]


class _MakeDirOnUnpickle:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.mark.parametrize("bad", ["pickle", "garbage", "object_array", "wrong_shape", "text_dtype"])
def test_bad_frame_label_npy_is_one_line_error(tmp_path, bad):
    """Mutations caught: np.load with allow_pickle=True (the pickle is unpickled: its code runs) or without
    catching ValueError (a traceback), a non-numeric array accepted as labels, and frame_labels_<name>.npy
    of any shape accepted when only its size matches."""
    make_frames_layout(str(tmp_path), labels_source="npy")
    path = os.path.join(str(tmp_path), "frame_labels_ped2.npy")
    ran = str(tmp_path / "unpickling_ran")
    if bad == "pickle":         # a pickle whose loading would create a folder: it must never be unpickled
        import pickle
        with open(path, "wb") as f:
            pickle.dump(_MakeDirOnUnpickle(ran), f)
    elif bad == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY garbage")
    elif bad == "object_array":
        np.save(path, np.array([[0, 1]] * 9 + [None], dtype=object), allow_pickle=True)
    elif bad == "wrong_shape":
        np.save(path, np.zeros((3, 3)))             # 9 values, as many as test frames, but not (1, 9) or (9,)
    else:
        np.save(path, np.array(["0"] * 9))
    with pytest.raises(common.DataError) as e:
        common.load_dataset("ped2", str(tmp_path))
    assert_one_line(e.value, path)
    assert "expected" in str(e.value) and not os.path.exists(ran)


def test_unreadable_data_and_cache_are_one_line_errors(tmp_path, cache_dir, monkeypatch, capsys):
    """Mutations caught: os.listdir / os.stat / the cache or run-folder write (_atomic_write) / load_dataset
    letting PermissionError or another OSError through as a traceback instead of a DataError naming the
    path, and an unreadable cache entry treated as damaged and rebuilt (the tests run as root, so
    permission errors are simulated)."""
    root = str(tmp_path / "data")
    base, _ = make_ucsd(root)
    ds = common.load_dataset("ped2", root)
    train = os.path.join(base, "Train")
    real_listdir, real_stat = os.listdir, os.stat
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def listdir(path="."):
        if os.path.abspath(path) == os.path.abspath(train):
            raise PermissionError(13, "Permission denied", path)
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(common.DataError, match="cannot list the folder") as e:
        common.load_dataset("ped2", root)
    assert_one_line(e.value, train)
    monkeypatch.setattr(os, "listdir", real_listdir)

    frame_file = ds.train[0].frame_files[3]

    def stat(path, *a, **k):
        if os.fspath(path) == frame_file:
            raise OSError(5, "Input/output error", path)
        return real_stat(path, *a, **k)
    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(common.DataError) as e:
        common.load_frames(ds.train[0], cache_dir=cache_dir)
    assert_one_line(e.value, frame_file)
    monkeypatch.setattr(os, "stat", real_stat)

    def no_temp(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", dir)
    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    with pytest.raises(common.DataError) as e:
        common.load_frames(ds.train[0], cache_dir=cache_dir)
    assert_one_line(e.value, os.path.join(cache_dir, "frames"))
    assert "cache" in str(e.value)
    with pytest.raises(common.DataError) as e:       # a run folder that cannot be written
        common.write_json(str(tmp_path / "run" / "metrics.json"), {"auc": 0.5})
    assert_one_line(e.value, str(tmp_path / "run" / "metrics.json"))
    with pytest.raises(common.DataError) as e:       # the synthetic dataset is generated into the cache
        common.load_dataset("synthetic", cache_dir=str(tmp_path / "other_cache"))
    assert_one_line(e.value, str(tmp_path / "other_cache"))
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    monkeypatch.setattr(tempfile, "mkdtemp", real_mkdtemp)

    entry = common.load_frames(ds.train[0], cache_dir=cache_dir).filename
    real_load = np.load

    def load(path, *a, **k):
        if os.fspath(path) == entry:
            raise PermissionError(13, "Permission denied", path)
        return real_load(path, *a, **k)
    monkeypatch.setattr(np, "load", load)
    capsys.readouterr()
    with pytest.raises(common.DataError, match="cannot read the cache entry") as e:
        common.load_frames(ds.train[0], cache_dir=cache_dir)
    assert_one_line(e.value, entry)
    assert "rebuilding" not in capsys.readouterr().err     # unreadable is not damaged: it is not rebuilt


def write_avi(path, values, h=H * 2, w=W * 2):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    assert out.isOpened()
    for v in values:
        out.write(cv2.cvtColor(frame(v, h, w), cv2.COLOR_GRAY2BGR))
    out.release()


def test_shanghaitech_layout_and_scene_filter(tmp_path):
    """Frames encode their index. Mutations caught (besides names, labels, the scene filter): training avi
    frames or testing frame files read in another order."""
    base = os.path.join(str(tmp_path), "shanghaitech")
    write_avi(os.path.join(base, "training", "videos", "01_001.avi"), level(range(7)))
    write_avi(os.path.join(base, "training", "videos", "02_001.avi"), level(range(3)))
    labels = {"01_0014": [0, 1, 1, 0], "02_0001": [0, 0, 1]}
    os.makedirs(os.path.join(base, "testing", "test_frame_mask"))
    os.makedirs(os.path.join(base, "testing", "test_pixel_mask"))
    for v, lab in labels.items():
        write_frames(os.path.join(base, "testing", "frames", v), level(range(len(lab))),
                     names=[f"{i:03d}.jpg" for i in range(len(lab))])
        np.save(os.path.join(base, "testing", "test_frame_mask", v + ".npy"), np.array(lab))
        np.save(os.path.join(base, "testing", "test_pixel_mask", v + ".npy"), box_masks(lab).astype(np.uint8))
    ds = common.load_dataset("shanghaitech", str(tmp_path))
    assert [v.name for v in ds.test] == ["01_0014", "02_0001"]        # name order, not last-number order
    assert ds.summary()["anomalous_frames"] == 3 and ds.summary()["videos_with_masks"] == 2
    tr = ds.video("01_001")
    assert tr.num_frames == 7 and tr.frame_shape == (2 * H, 2 * W)
    frames = tr.read_frames()
    assert frames.shape == (7, 2 * H, 2 * W)
    assert_frame_order(frames, range(7))
    assert_frame_order(ds.video("01_0014").read_frames(), range(4))
    one = common.load_dataset("shanghaitech", str(tmp_path), scene="1")
    assert [v.name for v in one.train] == ["01_001"] and [v.name for v in one.test] == ["01_0014"]
    np.testing.assert_array_equal(one.test[0].labels, labels["01_0014"])
    with pytest.raises(common.DataError):
        common.load_dataset("shanghaitech", str(tmp_path), scene="07")


def test_avenue_reader(tmp_path, cache_dir):
    """Frames encode their index. Mutation caught (besides labels and masks): video frames decoded in
    another order."""
    base = os.path.join(str(tmp_path), "Avenue Dataset")
    write_avi(os.path.join(base, "training_videos", "01.avi"), level(range(6)))
    lengths = {"01.avi": [0, 0, 1, 1, 0], "02.avi": [1, 1, 1, 1]}      # 02: abnormal in every frame
    label_dir = os.path.join(str(tmp_path), "ground_truth_demo", "testing_label_mask")
    os.makedirs(label_dir)
    for i, (fn, lab) in enumerate(lengths.items()):
        write_avi(os.path.join(base, "testing_videos", fn), level(range(i, i + len(lab))))   # 02 starts at level 1
        cells = np.empty((1, len(lab)), dtype=object)
        for t, m in enumerate(box_masks(lab)):
            cells[0, t] = cv2.resize(m.astype(np.uint8), (2 * W, 2 * H), interpolation=cv2.INTER_NEAREST)
        scipy.io.savemat(os.path.join(label_dir, f"{i + 1}_label.mat"), {"volLabel": cells})   # not zero-padded
    ds = common.load_dataset("avenue", str(tmp_path), cache_dir=cache_dir)
    assert [v.name for v in ds.test] == ["01", "02"]
    for i, (v, lab) in enumerate(zip(ds.test, lengths.values())):
        np.testing.assert_array_equal(v.labels, lab)
        assert v.read_masks().shape == (len(lab), 2 * H, 2 * W)
        assert_frame_order(v.read_frames(), range(i, i + len(lab)))
    assert_frame_order(ds.train[0].read_frames(), range(6))
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
def test_umn_reader(tmp_path, fmt, cache_dir):
    """Frames encode their index. Mutations caught: a clip's start offset in the avi ignored (same counts,
    other frames), frames decoded in another order."""
    write_avi(os.path.join(str(tmp_path), "UMN", "Crowd-Activity-All.avi"), level(range(20)))
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
    assert_frame_order(ds.test[0].read_frames(), range(8, 20))      # avi frames 9..20 (1-based)
    assert_frame_order(ds.train[0].read_frames(), range(8))
    assert_frame_order(common.load_frames(ds.test[0], (H, W), cache_dir=cache_dir), range(8, 20))
    with pytest.raises(common.DataError) as e:
        common.load_dataset("umn", str(tmp_path))
    assert_one_line(e.value, "Crowd-Activity-All.avi")


# ------------------------------------------------------------------------------------------ synthetic

@pytest.mark.slow
def test_synthetic_generation_benchmark(tmp_path):
    """Benchmark, outside the default suite (a wall-clock limit fails on a busy machine): generating the
    synthetic dataset takes ~1-2 s on 2 free cores; the bound only catches a gross slow-down."""
    t0 = time.perf_counter()
    common.load_dataset("synthetic", cache_dir=str(tmp_path / "c"), seed=0)
    seconds = time.perf_counter() - t0
    print(f"synthetic dataset generated in {seconds:.1f} s")
    assert seconds < 30


def test_synthetic_dataset(shared_cache, tmp_path, monkeypatch):
    ds = common.load_dataset("synthetic", "/nonexistent", cache_dir=shared_cache, seed=0)
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
    # deterministic: a second generation with the same seed is identical, another seed differs (each video
    # draws from its own (seed, split, index) stream, so fewer videos keep the third test video the same)
    monkeypatch.setattr(common, "_SYN_TRAIN", 1)
    monkeypatch.setattr(common, "_SYN_TEST", 3)
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


def bmp_video(folder, values):
    """A frame folder of BMP files: rewriting one with other pixels keeps its name and its size."""
    write_frames(folder, values, ext=".bmp")
    files = common._list_images(folder)
    return common.Video("bmp", "train", len(files), (H, W), None, False, folder, frame_files=files)


def test_frame_cache_follows_rewritten_frames_and_settings(tmp_path, cache_dir, monkeypatch):
    """Mutations caught: the frame cache keyed on the folder's mtime, or on the files' names and sizes
    without their mtimes (a frame rewritten in place is then served stale from the cache); the resize
    interpolation or the cache format version left out of the key."""
    folder = str(tmp_path / "v")
    v = bmp_video(folder, level(range(5)))
    assert_frame_order(common.load_frames(v, cache_dir=cache_dir), range(5))
    path = os.path.join(folder, "003.bmp")
    size, folder_mtime = os.path.getsize(path), os.stat(folder).st_mtime_ns
    assert cv2.imwrite(path, frame(level([9])[0]))                        # rewrite frame 3 in place
    os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns + 10**9))  # a later mtime, even on coarse clocks
    assert os.path.getsize(path) == size and os.stat(folder).st_mtime_ns == folder_mtime
    assert_frame_order(common.load_frames(v, cache_dir=cache_dir), [0, 1, 9, 3, 4])
    # the resize interpolation and the format version are part of the key
    small = np.array(common.load_frames(v, (10, 15), cache_dir=cache_dir))
    entries = set(os.listdir(os.path.join(cache_dir, "frames")))
    monkeypatch.setattr(common, "RESIZE_INTERPOLATION", ("INTER_NEAREST", cv2.INTER_NEAREST))
    nearest = np.array(common.load_frames(v, (10, 15), cache_dir=cache_dir))
    assert not np.array_equal(small, nearest)       # at 2.4x the corner patch's edges are blended by INTER_AREA only
    monkeypatch.setattr(common, "CACHE_VERSION", common.CACHE_VERSION + 1)
    common.load_frames(v, (10, 15), cache_dir=cache_dir)
    assert len(set(os.listdir(os.path.join(cache_dir, "frames"))) - entries) == 2


def test_flow_cache_keyed_on_flow_parameters(tmp_path, cache_dir, capsys, monkeypatch):
    """Mutations caught: the flow parameters left out of the flow cache key (changed Farneback settings
    then reuse the old flows), or the workers computing with the module's globals instead of the
    parameters that went into the key."""
    v = shifted_texture_video(str(tmp_path / "v"), dx=2, dy=-1)
    original = dict(common.FARNEBACK_PARAMS)
    first = np.array(common.load_flows(v, (64, 64), cache_dir=cache_dir, workers=1))
    capsys.readouterr()
    monkeypatch.setitem(common.FARNEBACK_PARAMS, "winsize", 5)
    monkeypatch.setitem(common.FARNEBACK_PARAMS, "levels", 1)
    second = np.array(common.load_flows(v, (64, 64), cache_dir=cache_dir, workers=1))
    assert "frames/s" in capsys.readouterr().out                   # computed, not read from the cache
    assert not np.array_equal(first, second)
    frames_path = common.load_frames(v, (64, 64), cache_dir=cache_dir).filename
    np.testing.assert_array_equal(first, common._flow_chunk(("farneback", original, frames_path, 0, 3)))
    assert len(os.listdir(os.path.join(cache_dir, "flows"))) == 2


def test_written_files_keep_the_umask_and_stale_temp_files_go(tmp_path, cache_dir):
    """Mutations caught: _atomic_write without its chmod (mkstemp's 0600 stays: a shared cache or run folder
    unreadable by other users), and temp files of killed runs never removed (or young ones of a writer
    still running, or files that are not ours, removed too)."""
    v = bmp_video(str(tmp_path / "v"), level(range(3)))
    old = os.umask(0o002)
    try:
        common.write_json(str(tmp_path / "run" / "metrics.json"), {"auc": 0.5})
        assert os.stat(tmp_path / "run" / "metrics.json").st_mode & 0o777 == 0o664
        os.umask(0o022)
        entry = common.load_frames(v, cache_dir=cache_dir).filename
        assert os.stat(entry).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    frames_dir = os.path.dirname(entry)
    names = {"stale": "Test001_8x8_gray_0123456789abcdef.npy.k3j_x9q2.tmp",
             "young": "Test002_8x8_gray_0123456789abcdef.npy.a1b2c3d4.tmp",
             "stale_part": "UCSD_Anomaly_Dataset.tar.gz.zz9_8yy7.part",
             "not_ours": "notes.tmp"}
    for key, name in names.items():
        with open(os.path.join(frames_dir, name), "wb") as f:
            f.write(b"x")
        if key != "young":
            os.utime(os.path.join(frames_dir, name), (time.time() - common.STALE_TEMP_SECONDS - 60,) * 2)
    common.load_frames(v, (8, 8), cache_dir=cache_dir)        # writes an entry into that folder
    left = set(os.listdir(frames_dir))
    assert names["stale"] not in left and names["stale_part"] not in left
    assert names["young"] in left and names["not_ours"] in left and os.path.basename(entry) in left


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "wrong_shape"])
def test_damaged_cache_entry_is_rebuilt(tmp_path, cache_dir, capsys, damage):
    """Mutation caught: _load_cached letting EOFError (zero-byte file) through, or trusting an entry of the
    wrong shape / a truncated one instead of warning and rebuilding it."""
    v = bmp_video(str(tmp_path / "v"), level(range(4)))
    entry = common.load_frames(v, cache_dir=cache_dir).filename
    data = Path(entry).read_bytes()
    damaged = {"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"not an npy file",
               "wrong_shape": None}[damage]
    if damaged is None:
        np.save(entry, np.zeros((3, H, W), np.uint8))
    else:
        Path(entry).write_bytes(damaged)
    capsys.readouterr()
    assert_frame_order(common.load_frames(v, cache_dir=cache_dir), range(4))
    assert f"warning: {entry}" in capsys.readouterr().err
    assert Path(entry).read_bytes() == data                         # rebuilt in place


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
    whole = Path(path).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[:len(whole) // 2])      # an interrupted copy
    with pytest.raises(common.DataError) as e:
        common.load_checkpoint(str(tmp_path / "truncated.pt"))
    assert_one_line(e.value, "truncated.pt")
    assert "--train --overwrite" in str(e.value)
    torch.save({"obj": argparse_namespace()}, str(tmp_path / "pickled.pt"))   # fine for pickle, not weights_only
    with pytest.raises(common.DataError) as e:
        common.load_checkpoint(str(tmp_path / "pickled.pt"))
    assert_one_line(e.value, "pickled.pt")


def test_load_optimizer_state_keeps_this_machines_kernel_choice():
    # a checkpoint written without fused Adam (a CPU run) resumed where fused is chosen (CUDA), and back
    def adam_after_one_step(fused):
        param = torch.nn.Parameter(torch.arange(3.0))
        optimizer = torch.optim.Adam([param], lr=0.1, fused=fused)
        param.square().sum().backward()
        optimizer.step()
        return optimizer
    saved = adam_after_one_step(None).state_dict()
    for fused in (True, False):
        target = adam_after_one_step(fused)
        common.load_optimizer_state(target, saved)
        assert target.param_groups[0]["fused"] is fused
        assert saved["param_groups"][0]["fused"] is None               # the caller's dict is left as it was
        state = next(iter(target.state.values()))
        assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"])
        assert state["step"].item() == 1.0
        assert state["step"].dtype == torch.float32 and state["step"].device == target.param_groups[0]["params"][0].device
    plain = adam_after_one_step(True)
    plain.load_state_dict(saved)                                         # what the helper is for
    assert plain.param_groups[0]["fused"] is None


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


def test_run_main_out_of_gpu_memory_and_peak_memory(capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free.\nmore")
    with pytest.raises(SystemExit) as e:
        common.run_main(oom, report_memory=True)
    captured = capsys.readouterr()
    assert e.value.code == 2
    assert captured.err.startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free. "
                                   "A smaller --test-batch-size") and "more" not in captured.err
    assert captured.out.startswith("peak memory: ") and "GiB host" in captured.out
    with pytest.raises(ValueError):                     # other errors keep their traceback, and print nothing
        common.run_main(lambda: int("x"))
    assert capsys.readouterr().out == ""


def test_peak_memory_counts_what_a_process_touches():
    # a fresh process that fills 400 MiB must report at least that as its peak resident set, and one that
    # does not must report well under it (the interpreter with numpy is ~30 MiB)
    code = ("import sys, numpy as np, common; a = np.ones(int(sys.argv[1]) * 2 ** 20, np.uint8); "
            "print(common.peak_memory()['host_rss_gib'])")
    big, small = (float(subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True,
                                       check=True, cwd=REPO).stdout) for n in (400, 1))
    assert big >= 400 / 1024 and small < 200 / 1024
    if not torch.cuda.is_available():
        assert set(common.peak_memory()) == {"host_rss_gib"}


def test_peak_memory_without_proc_falls_back_to_getrusage(monkeypatch):
    vmhwm = common.peak_memory()["host_rss_gib"]

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)
    monkeypatch.setattr("builtins.open", no_proc)
    fallback = common.peak_memory()["host_rss_gib"]
    assert fallback >= vmhwm - 0.01                     # ru_maxrss: at least this process's own peak
    assert common.memory_line({"host_rss_gib": None}) == "peak memory: not measurable here"


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
    together = None         # a threading.Barrier: "/together" waits there halfway through the transfer

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        if self.path == "/short":      # the server dies mid-transfer
            self.wfile.write(self.payload[:1000])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/together":   # both concurrent downloads are halfway before either finishes
            half = len(self.payload) // 2
            self.wfile.write(self.payload[:half])
            self.wfile.flush()
            try:
                self.together.wait()
            except threading.BrokenBarrierError:
                pass
            self.wfile.write(self.payload[half:])
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
    server.server_close()


def test_download(tmp_path, http_url):
    good = hashlib.sha256(_Handler.payload).hexdigest()
    dest = str(tmp_path / "a" / "file.bin")
    assert common.download(http_url + "/file.bin", dest, good) == dest
    assert Path(dest).read_bytes() == _Handler.payload and os.listdir(tmp_path / "a") == ["file.bin"]
    with pytest.raises(common.DataError, match="sha256"):
        common.download(http_url + "/file.bin", str(tmp_path / "b.bin"), "0" * 64)
    with pytest.raises(common.DataError) as e:
        common.download(http_url + "/short", str(tmp_path / "c.bin"))
    assert_one_line(e.value, "/short")
    assert sorted(os.listdir(tmp_path)) == ["a"]        # no partial or bad files kept
    with pytest.raises(common.DataError, match="svip-lab"):
        common.download_dataset("shanghaitech", str(tmp_path))


def test_concurrent_downloads_use_their_own_part_files(tmp_path, http_url):
    """Mutation caught: one fixed `<dest>.part` shared by concurrent downloads of the same file (the second
    one truncates the first one's bytes, and its rename then finds no file)."""
    _Handler.together = threading.Barrier(2, timeout=20)
    dest = str(tmp_path / "file.bin")
    good = hashlib.sha256(_Handler.payload).hexdigest()
    results, errors = [], []

    def fetch():
        try:
            results.append(common.download(http_url + "/together", dest, good))
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [dest, dest]
    assert Path(dest).read_bytes() == _Handler.payload and os.listdir(tmp_path) == ["file.bin"]


@pytest.fixture
def file_server(tmp_path):
    """(folder, base URL, list of requested paths): a local HTTP server over a folder the test fills."""
    folder = tmp_path / "serve"
    folder.mkdir()
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


def ucsd_archive(tmp_path, folder):
    """A UCSD_Anomaly_Dataset.tar.gz like the official one (a small tree) in `folder`: (path, sha256, summary)."""
    import tarfile
    stage = str(tmp_path / "stage")
    make_ucsd(stage)
    summary = common.load_dataset("ped2", stage).summary()
    path = os.path.join(str(folder), "UCSD_Anomaly_Dataset.tar.gz")
    with tarfile.open(path, "w:gz") as t:
        t.add(os.path.join(stage, "UCSD_Anomaly_Dataset.v1p2"), arcname="UCSD_Anomaly_Dataset.v1p2")
    return path, common._sha256_file(path), summary


def test_download_dataset_unpacks_atomically(tmp_path, file_server, monkeypatch):
    """Mutations caught: unpacking straight into the data root (an interrupted unpack is then taken for a
    complete dataset: the rerun skips it and the reader sees a partial tree), the kept archive fetched again
    on the rerun, no fallback to the next mirror URL, and temp folders of killed unpacks never removed."""
    import tarfile
    folder, url, requested = file_server
    _, sha, summary = ucsd_archive(tmp_path, folder)
    monkeypatch.setitem(common.DOWNLOADS, "ped2", [dict(
        common.DOWNLOADS["ped2"][0], sha256=sha,
        urls=(url + "/gone/UCSD_Anomaly_Dataset.tar.gz", url + "/UCSD_Anomaly_Dataset.tar.gz"))])
    root = str(tmp_path / "data")
    real_makefile, made = tarfile.TarFile.makefile, []

    def killed_midway(self, tarinfo, targetpath):      # the user presses Ctrl-C after 5 files
        if len(made) == 5:
            raise KeyboardInterrupt
        made.append(targetpath)
        return real_makefile(self, tarinfo, targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        common.download_dataset("ped2", root)
    assert len(made) == 5 and sorted(os.listdir(root)) == ["downloads"]       # nothing half-unpacked in view
    assert not common._dataset_present("ped2", root)
    with pytest.raises(common.DataError, match="no ped2 dataset found"):
        common.load_dataset("ped2", root)
    monkeypatch.setattr(tarfile.TarFile, "makefile", real_makefile)
    killed = os.path.join(root, ".unpack-abcd1234")             # what a kill -9 during an unpack leaves
    os.makedirs(os.path.join(killed, "UCSD_Anomaly_Dataset.v1p2"))
    os.utime(killed, (time.time() - common.STALE_TEMP_SECONDS - 60,) * 2)
    common.download_dataset("ped2", root)
    assert common.load_dataset("ped2", root).summary() == summary
    assert sorted(os.listdir(root)) == ["UCSD_Anomaly_Dataset.v1p2", "downloads"]
    assert os.listdir(os.path.join(root, "downloads")) == ["UCSD_Anomaly_Dataset.tar.gz"]
    assert requested == ["/gone/UCSD_Anomaly_Dataset.tar.gz", "/UCSD_Anomaly_Dataset.tar.gz"]   # fetched once
    common.download_dataset("ped2", root)                       # present: nothing fetched
    assert len(requested) == 2


def test_download_dataset_checksum_mismatch_keeps_nothing(tmp_path, file_server, monkeypatch):
    """Mutations caught: the pinned sha256 not checked (or a mismatching archive kept or unpacked), and a
    mismatch answered by trying the next mirror instead of stopping."""
    folder, url, requested = file_server
    ucsd_archive(tmp_path, folder)
    monkeypatch.setitem(common.DOWNLOADS, "ped2", [dict(
        common.DOWNLOADS["ped2"][0], sha256="0" * 64,
        urls=(url + "/UCSD_Anomaly_Dataset.tar.gz", url + "/UCSD_Anomaly_Dataset.tar.gz"))])
    root = str(tmp_path / "data")
    with pytest.raises(common.DataError, match="sha256 mismatch") as e:
        common.download_dataset("ped2", root)
    assert_one_line(e.value, "UCSD_Anomaly_Dataset.tar.gz")
    assert sorted(os.listdir(root)) == ["downloads"] and os.listdir(os.path.join(root, "downloads")) == []
    assert len(requested) == 1


def test_download_table_pins_published_checksums():
    """Mutation caught: an archive of UCSD or Avenue left without its sha256 (the check never runs on real
    data)."""
    for name in ("ped1", "ped2", "avenue"):
        for item in common.DOWNLOADS[name]:
            assert re.fullmatch(r"[0-9a-f]{64}", item["sha256"]), (name, item["urls"][0])
            assert item["urls"][0].startswith("https://")


def _tar(path, members):
    """A tar file from (name, kind, target) members: kind "file" (target = content), "symlink" or "hardlink"."""
    import io
    import tarfile
    with tarfile.open(path, "w") as t:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(target)
                t.addfile(info, io.BytesIO(target))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = target
                t.addfile(info)
    return path


@pytest.mark.parametrize("filters", ["tarfile filter", "no tarfile filter"])
def test_unpack_rejects_members_escaping_the_folder(tmp_path, monkeypatch, filters):
    """Mutation caught: on a Python without tarfile's extraction filters (before 3.11.4), extractall with
    no checks of its own (a '../' name or a link leads outside the data root); with filters, extractall
    without filter="data"."""
    import tarfile
    if filters == "no tarfile filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile extraction filters")
    dest = tmp_path / "data"
    dest.mkdir()
    good = _tar(str(tmp_path / "good.tar"), [("ds/a.txt", "file", b"a"), ("ds/sub/b.txt", "file", b"b"),
                                            ("ds/link", "symlink", "a.txt"), ("ds/hard", "hardlink", "ds/a.txt")])
    common._unpack(good, str(dest))
    assert (dest / "ds" / "sub" / "b.txt").read_bytes() == b"b" and (dest / "ds" / "link").read_bytes() == b"a"
    outside = tmp_path / "outside.txt"
    for i, members in enumerate([[("../../outside.txt", "file", b"x")],
                                 [("ev/link", "symlink", "../../../outside.txt"), ("ev/link", "file", b"x")],
                                 [("ev/abs", "symlink", str(outside))],
                                 [("ev/hard", "hardlink", "../../outside.txt")]]):
        evil = _tar(str(tmp_path / f"evil{i}.tar"), members)
        with pytest.raises(common.DataError) as e:
            common._unpack(evil, str(dest))
        assert_one_line(e.value, evil)
        assert not os.path.lexists(outside) and sorted(os.listdir(dest)) == ["ds"], members


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
