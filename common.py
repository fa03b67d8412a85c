"""Shared data layer and run plumbing for the video anomaly detection reference scripts.

What lives here (names starting with `_` are private):

* Dataset readers, layout detected from what is on disk, never from hard-coded frame counts:
  - UCSD Ped1/Ped2 original layout (`UCSD_Anomaly_Dataset.v1p2/UCSDpedN/` or `UCSDpedN/`),
  - the "frames" layout used by MNAD / ano_pred / HF2-VAD (`<name>/{training,testing}/frames/<video>/`, in a
    folder named for the dataset: ped1, ped2, avenue, shanghaitech/shanghai/SHTech), labels from
    `<name>.mat` (key gt), `frame_labels_<name>.npy` or `testing/test_frame_mask/*.npy`. HF2-VAD's own label
    file, `ground_truth_demo/gt_label.json`, is a pickle (unpickling a file can run code), so it is not
    read; convert a copy you trust once, e.g. for ped2, in the data root (this writes frame_labels_ped2.npy
    beside ped2/):
        python -c "import pickle, numpy as np; gt = pickle.load(open('ped2/ground_truth_demo/gt_label.json', 'rb')); \
                   np.save('frame_labels_ped2.npy', np.concatenate([np.ravel(v) for v in gt.values()]))"
    (one label per test frame, videos in the file's order, which HF2-VAD pairs with the sorted folders of
    testing/frames, as this reader does; the total frame count is checked),
  - CUHK Avenue (`training_videos/*.avi`, `testing_videos/*.avi`, `volLabel` masks),
  - ShanghaiTech campus (training avi, testing frames, frame/pixel masks, `--scene` filter),
  - UMN (`Crowd-Activity-All.avi` plus a label file the user writes, `--labels-file`; frame numbers are
    1-based and inclusive, counted in the avi; JSON or one clip per text line):
        {"clips": [{"name": "lawn_train", "split": "train", "frames": [1, 480]},
                   {"name": "lawn_test", "split": "test", "frames": [481, 625], "abnormal": [[530, 625]]}]}
        lawn_train train 1-480
        lawn_test  test  481-625 530-625        # name split start-end [abnormal start-end ...]
  - "synthetic": 120x180 gray, 8 training and 6 test videos of 80 frames, generated deterministically from
    --seed into the cache and read by the UCSD reader: pedestrians on a walkway; test anomalies (fast
    bikes/skaters, a large slow cart, people walking off the walkway) with exact pixel masks.
  Readers list folders and read label files only; besides one frame per video (for its size), frames are
    decoded when `Video.read_frames` is called. Bad input (a missing, unreadable or malformed file) is a
    `DataError` whose one-line message names the file and what was expected.
* Caches under `--cache-dir` (env VAD_CACHE_DIR, else ~/.cache/vad), never inside a dataset folder:
  decoded/resized frames (uint8 .npy memmaps) and optical flows (float16 .npy memmaps), keyed by the
  source files' names, sizes and mtimes, the frame range, size, colour, resize interpolation, flow method
  and parameters and a cache format version, so a changed frame or setting gets a fresh entry. Entries are
  written atomically (temp file, then os.replace) because several processes may build the same entry at
  once; a damaged entry is rebuilt with a warning; files get the usual permissions (0o666 less the umask)
  and temp files left by killed runs are removed after STALE_TEMP_SECONDS.
* Optical flow (OpenCV Farneback by default, DIS as a faster option) in parallel worker processes.
* Run plumbing shared by the five method scripts: argparse flags, device, seeding, atomic checkpoints
  loaded with `weights_only=True`, `scores.npz` / `metrics.json` writers, `run_main` error handling,
  `peak_memory`; for time-boxed, resumable training and a fed GPU: `TimeBudget`, `report_time_stop`,
  `resume_checkpoint`, `get_rng_state` / `set_rng_state`, `restore_training_args`, `LossMonitor`,
  `to_device`, `prefetch_to_device`, `concat_to_device`, `batch_segments`, `pad_batch`, `synchronize`,
  `StepRate`, `GraphedStep`.
* `download` / `download_dataset` (`--download`, only when the user asks): the public archives with a
  progress bar and their published sha256 (UCSD, Avenue), unpacked into a temp folder and renamed into
  place; `load_alexnet_features` for torchvision's ImageNet AlexNet weights.

Command line:
    python common.py --dataset ped2 --data-root ../shared/data --summary      # one JSON object
    python common.py --dataset ped2 --data-root ../shared/data --frames       # build/load the frame cache
    python common.py --dataset ped2 --data-root ../shared/data --flows --image-size 240 360
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

DATASETS = ("ped1", "ped2", "avenue", "shanghaitech", "umn", "synthetic")

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv")

# Farneback parameters (OpenCV's documented example values); part of the flow cache key.
FARNEBACK_PARAMS = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
DIS_PRESET = "medium"
FLOW_METHODS = ("farneback", "dis")

# Cache entries are keyed by everything that changes their content: the source files' names, sizes and
# mtimes, the frame range, the size, colour, the resize interpolation below, flow method and parameters
# (and, for flows, OpenCV's version), and this format version (raise it when the decoding or the stored
# layout changes).
CACHE_VERSION = 2
RESIZE_INTERPOLATION = ("INTER_AREA", cv2.INTER_AREA)
# Temp files (`*.tmp`, `*.part`) and temp folders left by killed runs are removed after this long.
STALE_TEMP_SECONDS = 6 * 3600


class DataError(Exception):
    """Bad input. str(e) is ONE line naming the path and what was expected."""


class TrainingError(Exception):
    """Training cannot continue (e.g. a non-finite loss); nothing was saved."""


# --------------------------------------------------------------------------------------------------
# Videos and datasets
# --------------------------------------------------------------------------------------------------

@dataclass
class Video:
    name: str                    # "Train001", "Test001", "01", "01_0014", ...
    split: str                   # "train" | "test"
    num_frames: int
    frame_shape: tuple           # (H, W) native
    labels: np.ndarray | None    # (T,) uint8, 1 = abnormal; None for training videos
    has_masks: bool
    source: str                  # folder or video-file path (error messages, cache keys)
    # Private: where the frames and masks come from. Exactly one of frame_files / video_file is set.
    frame_files: list | None = field(default=None, repr=False, compare=False)
    video_file: str | None = field(default=None, repr=False, compare=False)
    start: int = field(default=0, repr=False, compare=False)          # first frame inside video_file
    mask_files: list | None = field(default=None, repr=False, compare=False)   # one image per frame
    mask_file: str | None = field(default=None, repr=False, compare=False)     # (T,H,W) .npy or Avenue .mat

    def read_frames(self, gray: bool = True) -> np.ndarray:
        """All frames at native size: (T,H,W) uint8 gray or (T,H,W,3) uint8 RGB. No cache."""
        if self.frame_files is not None:
            frames = _read_images(self.frame_files, gray)
        elif self.video_file is not None:
            frames = _read_video_file(self.video_file, self.start, self.num_frames, gray)
        else:
            raise DataError(f"{self.source}: video {self.name} has no frame source")
        if len(frames) != self.num_frames:
            raise DataError(f"{self.source}: expected {self.num_frames} frames, decoded {len(frames)}")
        if frames.shape[1:3] != tuple(self.frame_shape):
            raise DataError(f"{self.source}: frames are {frames.shape[1]}x{frames.shape[2]}, "
                            f"expected {self.frame_shape[0]}x{self.frame_shape[1]}")
        return frames

    def read_masks(self) -> np.ndarray | None:
        """Pixel masks (T,H,W) bool at native size, or None when the video has none."""
        if not self.has_masks:
            return None
        if self.mask_files is not None:
            masks = _read_images(self.mask_files, gray=True) > 0
            where = os.path.dirname(self.mask_files[0])
        elif self.mask_file is not None and self.mask_file.endswith(".npy"):
            masks = _load_npy(self.mask_file, f"({self.num_frames}, H, W) pixel masks of {self.name}") > 0
            where = self.mask_file
        elif self.mask_file is not None:
            masks = _load_vollabel(self.mask_file) > 0
            where = self.mask_file
        else:
            return None
        if masks.ndim != 3 or len(masks) != self.num_frames:
            raise DataError(f"{where}: expected {self.num_frames} masks for video {self.name}, "
                            f"found shape {tuple(masks.shape)}")
        if masks.shape[1:] != tuple(self.frame_shape):
            raise DataError(f"{where}: masks are {masks.shape[1]}x{masks.shape[2]}, expected "
                            f"{self.frame_shape[0]}x{self.frame_shape[1]} like the frames of {self.name}")
        return masks


@dataclass
class Dataset:
    name: str
    root: str
    layout: str
    train: list
    test: list

    def video(self, name: str) -> Video:
        """The test video with this name, else the training video (Avenue/MNAD reuse names in both)."""
        for v in self.test + self.train:
            if v.name == name:
                return v
        raise KeyError(f"{self.root}: no video named {name!r} in dataset {self.name}")

    def summary(self) -> dict:
        first = (self.train or self.test)[0]
        return {
            "dataset": self.name,
            "train_videos": len(self.train),
            "train_frames": int(sum(v.num_frames for v in self.train)),
            "test_videos": len(self.test),
            "test_frames": int(sum(v.num_frames for v in self.test)),
            "anomalous_frames": int(sum(int(v.labels.sum()) for v in self.test if v.labels is not None)),
            "videos_with_masks": int(sum(v.has_masks for v in self.test)),
            "frame_shape": [int(first.frame_shape[0]), int(first.frame_shape[1])],
        }


def default_cache_dir() -> str:
    """env VAD_CACHE_DIR, else ~/.cache/vad."""
    return os.environ.get("VAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vad")


# --------------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------------

def _is_junk(filename: str) -> bool:
    """macOS AppleDouble files, Finder/Explorer litter and editor backups."""
    return (filename.startswith(".") or filename.endswith("~") or filename == "Thumbs.db"
            or filename.lower() == "desktop.ini")


def _frame_number(filename: str) -> int:
    """The last run of digits in the file stem: '001.tif' -> 1, 'frame012.bmp' -> 12."""
    digits = re.findall(r"\d+", os.path.splitext(filename)[0])
    return int(digits[-1]) if digits else -1


def _list_images(folder: str) -> list:
    """Image files in `folder`, junk skipped, sorted by the number in their names."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise DataError(f"{folder}: folder not found (expected a folder of image frames)") from None
    except NotADirectoryError:
        raise DataError(f"{folder}: not a folder (expected a folder of image frames)") from None
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e}); expected a readable folder of "
                        f"image frames") from None
    names = [n for n in names if not _is_junk(n) and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    names.sort(key=lambda n: (_frame_number(n), n))
    numbers = [_frame_number(n) for n in names]
    for a, b, na, nb in zip(numbers, numbers[1:], names, names[1:]):
        if a == b and a >= 0:
            raise DataError(f"{folder}: two files for frame {a} ({na}, {nb}); expected one image per frame")
    return [os.path.join(folder, n) for n in names]


def _video_frames(folder: str) -> list:
    files = _list_images(folder)
    if not files:
        raise DataError(f"{folder}: no image frames (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: 'Test2' < 'Test10', '01_0014' < '02_0001'."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _listdir(folder: str, expected: str) -> list:
    """os.listdir; a missing or unreadable folder is a DataError naming it and what it should hold."""
    try:
        return os.listdir(folder)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise DataError(f"{folder}: cannot list the folder ({reason}); expected {expected}") from None


def _subdirs(folder: str, pattern: str) -> list:
    """Sub-folders of `folder` whose names fully match `pattern`, in natural order."""
    names = [n for n in _listdir(folder, "a readable folder of video folders") if not _is_junk(n)
             and re.fullmatch(pattern, n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=_natural_key)


def _load_npy(path: str, expected: str, mmap_mode=None) -> np.ndarray:
    """A numeric .npy array, never unpickled (allow_pickle=False: loading a pickle can run code). A pickled,
    truncated or garbage file, or an unreadable one, is a DataError naming the file and what was expected."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if "pickle" in str(e):        # numpy says "pickled" for any file without the .npy header
            reason = "not a plain numpy array: a pickle, an object array or not an .npy file at all"
        else:
            reason = " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__
        raise DataError(f"{path}: cannot read ({reason}); expected a numpy .npy file holding {expected}") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{path}: holds {getattr(array, 'dtype', type(array).__name__)} data, expected {expected}")
    return array


def _decode_image(path: str, gray: bool) -> np.ndarray:
    # np.fromfile + imdecode: a corrupt file gives None silently (imread would log to stderr), and
    # non-ASCII paths work on every platform.
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read image file ({e.strerror or e})") from None
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise DataError(f"{path}: cannot decode image (expected a valid {os.path.splitext(path)[1]} file)")
    return img if gray else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _read_images(paths: list, gray: bool) -> np.ndarray:
    """Decode image files into one (T,H,W[,3]) uint8 array; threads help because cv2 releases the GIL."""
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        images = list(pool.map(lambda p: _decode_image(p, gray), paths))
    shape = images[0].shape
    for path, img in zip(paths, images):
        if img.shape != shape:
            raise DataError(f"{path}: image is {img.shape[0]}x{img.shape[1]}, expected "
                            f"{shape[0]}x{shape[1]} like {os.path.basename(paths[0])}")
    return np.stack(images)


def _image_shape(path: str) -> tuple:
    """(H, W) of one image; readers call it on the first frame of each video only."""
    return tuple(_decode_image(path, gray=True).shape[:2])


def _open_video(path: str):
    if not os.path.isfile(path):
        raise DataError(f"{path}: video file not found")
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise DataError(f"{path}: cannot open video (expected a readable {os.path.splitext(path)[1]} file)")
    return cap


def _video_file_info(path: str) -> tuple:
    """(num_frames, (H, W)) from the container header, without decoding."""
    cap = _open_video(path)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    shape = (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)))
    cap.release()
    if n <= 0 or shape[0] <= 0:
        raise DataError(f"{path}: video reports no frames (expected a readable video)")
    return n, shape


def _read_video_file(path: str, start: int, count: int, gray: bool) -> np.ndarray:
    cap = _open_video(path)
    # Skip by grabbing instead of seeking: CAP_PROP_POS_FRAMES is not frame-exact for every codec.
    for _ in range(start):
        if not cap.grab():
            break
    frames = []
    while len(frames) < count:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if gray else cv2.COLOR_BGR2RGB))
    cap.release()
    if len(frames) != count:
        raise DataError(f"{path}: expected {count} frames from frame {start}, decoded {len(frames)}")
    return np.stack(frames)


def _file_mode() -> int:
    """0o666 less the process umask: what open() would give. mkstemp creates 0600 files, which would make a
    shared cache or a run folder unreadable by the other users of a machine."""
    try:
        with open("/proc/self/status") as f:       # Linux: read the umask without changing it
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)                      # elsewhere: set it to read it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


# Names of the temp files and folders this module creates: mkstemp/mkdtemp add 8 random characters.
_TEMP_NAME = re.compile(r"(.+\.[A-Za-z0-9_]{8}\.(tmp|part)(\..*)?|\.(tmp|stale|unpack)-[A-Za-z0-9_]{8})")


def _remove_stale_temp(folder: str, max_age: float | None = None) -> None:
    """Remove temp files/folders of ours in `folder` older than STALE_TEMP_SECONDS: what a killed run left.
    Younger ones may belong to a process still writing, so they stay."""
    cutoff = time.time() - (STALE_TEMP_SECONDS if max_age is None else max_age)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if not _TEMP_NAME.fullmatch(entry.name) or entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.remove(entry.path)
        except OSError:
            pass


def _atomic_write(path: str, write_fn, suffix: str = "", expected: str = "a writable folder") -> None:
    """Write through a temp file in the same folder, then os.replace: readers never see a half file.
    The file gets the usual permissions (0o666 less the umask); stale temp files of killed runs in the
    folder are removed. A folder that cannot be written (permissions, a full disk) is a DataError naming
    `path` and `expected`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_temp(folder)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise DataError(f"{path}: cannot write ({e.strerror or type(e).__name__}); expected {expected}") from None
        raise


def _runs(labels: np.ndarray) -> list:
    """[(start, end)] 0-based inclusive runs of ones."""
    padded = np.concatenate([[0], np.asarray(labels, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def _labels_from_ranges(ranges, num_frames: int, where: str) -> np.ndarray:
    """1-based inclusive (start, end) ranges -> (T,) uint8; a range past the video is a DataError."""
    labels = np.zeros(num_frames, dtype=np.uint8)
    for a, b in ranges:
        a, b = int(a), int(b)
        if not 1 <= a <= b <= num_frames:
            raise DataError(f"{where}: abnormal range {a}:{b} does not fit the video's {num_frames} frames")
        labels[a - 1:b] = 1
    return labels


# --------------------------------------------------------------------------------------------------
# UCSD original layout (also used by the synthetic dataset)
# --------------------------------------------------------------------------------------------------

def _parse_ucsd_m(path: str) -> list:
    """Ranges per test video from `TestVideoFile{end+1}.gt_frame = [a:b, c:d];` lines (1-based, inclusive)."""
    try:
        with open(path, "r", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the label file ({e.strerror or type(e).__name__}); expected a readable "
                        f"UCSD .m file") from None
    text = re.sub(r"%[^\n]*", "", text)          # MATLAB comments (newlines kept: line numbers stay right)
    videos = []
    for entry in re.finditer(r"gt_frame\s*=\s*\[([^\]]*)\]", text):
        ranges = []
        for part in re.split(r"[,;\s]+", entry.group(1).strip()):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?::(\d+))?", part)
            if m is None:
                line = text.count("\n", 0, entry.start()) + 1
                raise DataError(f"{path}, line {line} (test video {len(videos) + 1}): cannot parse gt_frame entry "
                                f"{part!r} (expected a or a:b ranges, 1-based)")
            ranges.append((int(m.group(1)), int(m.group(2) or m.group(1))))
        videos.append(ranges)
    if not videos:
        raise DataError(f"{path}: no 'TestVideoFile{{end+1}}.gt_frame = [a:b];' lines found")
    return videos


def _ucsd_candidates(data_root: str, folder: str):
    return os.path.join(data_root, "UCSD_Anomaly_Dataset.v1p2", folder), os.path.join(data_root, folder)


def _find_ucsd(data_root: str, folder: str):
    for cand in _ucsd_candidates(data_root, folder):
        if os.path.isdir(os.path.join(cand, "Train")) or os.path.isdir(os.path.join(cand, "Test")):
            return cand
    if os.path.basename(os.path.normpath(data_root)) == folder and os.path.isdir(data_root):
        return data_root
    return None


def _read_ucsd(root: str, name: str) -> Dataset:
    folder = os.path.basename(os.path.normpath(root))
    train_dir, test_dir = os.path.join(root, "Train"), os.path.join(root, "Test")
    for d in (train_dir, test_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d}: folder not found (expected the UCSD layout {folder}/Train, {folder}/Test)")
    train = []
    for vname in _subdirs(train_dir, r"Train\d+"):
        files = _video_frames(os.path.join(train_dir, vname))
        train.append(Video(vname, "train", len(files), _image_shape(files[0]), None, False,
                           os.path.join(train_dir, vname), frame_files=files))
    test_names = _subdirs(test_dir, r"Test\d+")
    if not train or not test_names:
        raise DataError(f"{root}: expected TrainNNN folders in Train/ and TestNNN folders in Test/")

    m_path = os.path.join(test_dir, folder + ".m")
    if not os.path.isfile(m_path):
        others = [n for n in _listdir(test_dir, "the UCSD TestNNN folders and .m label file") if n.endswith(".m")
                  and not _is_junk(n)]
        if len(others) != 1:
            raise DataError(f"{m_path}: label file not found (expected the UCSD frame-label .m file)")
        m_path = os.path.join(test_dir, others[0])
    ranges = _parse_ucsd_m(m_path)
    if len(ranges) != len(test_names):
        raise DataError(f"{m_path}: has labels for {len(ranges)} videos, expected {len(test_names)} "
                        f"(one per TestNNN folder)")

    test = []
    for vname, vranges in zip(test_names, ranges):
        vdir = os.path.join(test_dir, vname)
        files = _video_frames(vdir)
        labels = _labels_from_ranges(vranges, len(files), f"{m_path} ({vname})")
        gt_dir = os.path.join(test_dir, vname + "_gt")
        masks = _list_images(gt_dir) if os.path.isdir(gt_dir) else []
        if masks and len(masks) != len(files):
            raise DataError(f"{gt_dir}: has {len(masks)} masks, expected {len(files)} (one per frame of {vname})")
        test.append(Video(vname, "test", len(files), _image_shape(files[0]), labels, bool(masks), vdir,
                          frame_files=files, mask_files=masks or None))
    return Dataset(name, os.path.abspath(root), "ucsd", train, test)


# --------------------------------------------------------------------------------------------------
# Synthetic dataset: a small UCSD-layout dataset generated from a seed
# --------------------------------------------------------------------------------------------------

SYNTHETIC_VERSION = 1
_SYN_H, _SYN_W, _SYN_T = 120, 180, 80
_SYN_TRAIN, _SYN_TEST = 8, 6
_WALK_TOP, _WALK_BOTTOM = 46, 84          # walkway rows [top, bottom); pedestrians' feet stay inside


def _syn_scene(rng) -> np.ndarray:
    """Static gray scene: blurred-noise texture, a brighter walkway band with curbs, a few static shapes."""
    H, W = _SYN_H, _SYN_W
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 2.5)
    coarse /= coarse.std() + 1e-6
    fine = rng.normal(0, 1, (H, W)).astype(np.float32)
    scene = 95 + 16 * coarse + 6 * fine
    scene[_WALK_TOP:_WALK_BOTTOM] = 170 + 3 * coarse[_WALK_TOP:_WALK_BOTTOM] + 2 * fine[_WALK_TOP:_WALK_BOTTOM]
    scene[_WALK_TOP - 2:_WALK_TOP] = 135
    scene[_WALK_BOTTOM:_WALK_BOTTOM + 2] = 135
    # benches (dark boxes) and shrubs (blobs) off the walkway
    for _ in range(3):
        y = int(rng.choice([rng.integers(6, _WALK_TOP - 16), rng.integers(_WALK_BOTTOM + 6, H - 14)]))
        x = int(rng.integers(5, W - 30))
        cv2.rectangle(scene, (x, y), (x + int(rng.integers(14, 26)), y + int(rng.integers(5, 9))), 60, -1)
    for _ in range(3):
        y = int(rng.choice([rng.integers(8, _WALK_TOP - 10), rng.integers(_WALK_BOTTOM + 8, H - 8)]))
        cv2.circle(scene, (int(rng.integers(8, W - 8)), y), int(rng.integers(4, 8)), 130, -1)
    return scene


def _syn_person(layer, x, y, phase, arms=False):
    """Head + body + legs, feet at (x, y); the legs swing with the walking phase (gait wobble)."""
    x, y = int(round(x)), int(round(y))
    swing = int(round(2.5 * math.sin(phase)))
    bob = int(round(0.6 * abs(math.sin(phase))))
    cv2.circle(layer, (x, y - 16 - bob), 2, 1, -1)
    cv2.ellipse(layer, (x, y - 9 - bob), (3, 5), 0, 0, 360, 1, -1)
    cv2.line(layer, (x, y - 5), (x - swing, y), 1, 2)
    cv2.line(layer, (x, y - 5), (x + swing, y), 1, 2)
    if arms:
        cv2.line(layer, (x - 7, y - 11 - bob), (x + 7, y - 11 - bob), 1, 2)


def _syn_bike(layer, x, y, direction):
    """Two wheels, a frame and an upright rider: wider than a pedestrian and a different outline."""
    x, y = int(round(x)), int(round(y))
    cv2.circle(layer, (x - 7, y - 4), 4, 1, 2)
    cv2.circle(layer, (x + 7, y - 4), 4, 1, 2)
    cv2.line(layer, (x - 7, y - 4), (x + 7, y - 4), 1, 2)
    cv2.line(layer, (x, y - 4), (x + 2 * direction, y - 14), 1, 2)
    cv2.circle(layer, (x + 2 * direction, y - 19), 3, 1, -1)
    cv2.line(layer, (x + 2 * direction, y - 13), (x + 7 * direction, y - 10), 1, 2)


def _syn_cart(layer, x, y):
    """A large box on wheels, about 30 x 20 px: twice a pedestrian's width and area."""
    x, y = int(round(x)), int(round(y))
    cv2.rectangle(layer, (x - 15, y - 22), (x + 15, y - 4), 1, -1)
    cv2.circle(layer, (x - 10, y - 2), 2, 1, -1)
    cv2.circle(layer, (x + 10, y - 2), 2, 1, -1)


def _syn_video(scene, rng, num_frames, anomaly_start=None, kinds=()):
    """(frames (T,H,W) uint8, masks (T,H,W) bool). Anomalies appear from `anomaly_start` to the end."""
    H, W = scene.shape
    frames = np.empty((num_frames, H, W), np.uint8)
    masks = np.zeros((num_frames, H, W), bool)
    layer = np.zeros((H, W), np.uint8)

    def new_person(at_edge):
        d = 1 if rng.random() < 0.5 else -1
        x = (-8.0 if d > 0 else W + 8.0) if at_edge else float(rng.uniform(10, W - 10))
        return dict(x=x, y=float(rng.uniform(_WALK_TOP + 18, _WALK_BOTTOM - 2)), vx=d * float(rng.uniform(1.0, 2.0)),
                    vy=0.0, phase=float(rng.uniform(0, 6.3)), shade=float(rng.uniform(30, 60)))

    people = [new_person(False) for _ in range(int(rng.integers(2, 4)))]
    anomalies = []          # dicts with kind, x, y, vx, vy, shade
    for t in range(num_frames):
        img = scene.copy()
        # normal pedestrians: a few at a time, entering at either end of the walkway
        if len(people) < 4 and rng.random() < 0.08:
            people.append(new_person(True))
        for p in people:
            layer[:] = 0
            _syn_person(layer, p["x"], p["y"], p["phase"])
            img[layer > 0] = p["shade"]
            p["x"] += p["vx"]
            p["phase"] += 0.6
        people = [p for p in people if -12 <= p["x"] <= W + 12]

        if anomaly_start is not None and t >= anomaly_start:
            if t == anomaly_start:
                for kind in kinds:
                    d = 1 if rng.random() < 0.5 else -1
                    if kind == "cart":      # enters from the side, already partly visible, slow
                        anomalies.append(dict(kind=kind, x=-8.0 if d > 0 else W + 8.0, vx=d * float(rng.uniform(1.0, 1.5)),
                                              y=float(rng.uniform(_WALK_TOP + 24, _WALK_BOTTOM - 1)), vy=0.0, shade=20.0))
                    elif kind == "offwalk":  # a pedestrian on the textured ground above/below the walkway
                        top = rng.random() < 0.5
                        anomalies.append(dict(kind=kind, x=float(rng.uniform(20, W - 20)), vx=d * float(rng.uniform(1.0, 1.8)),
                                              y=float(rng.uniform(20, _WALK_TOP - 6) if top else rng.uniform(_WALK_BOTTOM + 20, H - 3)),
                                              vy=float(rng.uniform(-0.3, 0.3)), shade=25.0, phase=0.0))
            # fast movers (bike or skater) keep coming: a new one as soon as the previous one has left
            if "fast" in kinds and not any(a["kind"] in ("bike", "skater") for a in anomalies):
                d = 1 if rng.random() < 0.5 else -1
                anomalies.append(dict(kind="bike" if rng.random() < 0.6 else "skater", x=-6.0 if d > 0 else W + 6.0,
                                      vx=d * float(rng.uniform(6.0, 10.0)), y=float(rng.uniform(_WALK_TOP + 22, _WALK_BOTTOM - 2)),
                                      vy=0.0, shade=15.0, phase=0.0))
            for a in anomalies:
                layer[:] = 0
                if a["kind"] == "bike":
                    _syn_bike(layer, a["x"], a["y"], 1 if a["vx"] > 0 else -1)
                elif a["kind"] == "cart":
                    _syn_cart(layer, a["x"], a["y"])
                else:   # skater (arms spread, no stride) or off-walkway walker
                    _syn_person(layer, a["x"], a["y"], a.get("phase", 0.0), arms=a["kind"] == "skater")
                    a["phase"] = a.get("phase", 0.0) + (0.0 if a["kind"] == "skater" else 0.6)
                img[layer > 0] = a["shade"]
                masks[t] |= layer > 0
                a["x"] += a["vx"]
                a["y"] += a["vy"]
            anomalies = [a for a in anomalies if -25 <= a["x"] <= W + 25]

        img += rng.normal(0, 2.0, img.shape).astype(np.float32)     # mild sensor noise
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames, masks


def _write_synthetic(dest: str, seed: int) -> None:
    """Write the synthetic dataset in the UCSD layout into `dest` (named UCSDsynthetic)."""
    scene = _syn_scene(np.random.default_rng((seed, 0)))
    kinds_cycle = (("fast",), ("cart",), ("offwalk",), ("fast", "cart"), ("offwalk", "fast"), ("cart", "offwalk"))
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    for i in range(_SYN_TRAIN):
        frames, _ = _syn_video(scene, np.random.default_rng((seed, 1, i)), _SYN_T)
        vdir = os.path.join(dest, "Train", f"Train{i + 1:03d}")
        os.makedirs(vdir)
        for t, f in enumerate(frames):
            cv2.imwrite(os.path.join(vdir, f"{t + 1:03d}.png"), f, png)
    lines = ["TestVideoFile = {};"]
    for i in range(_SYN_TEST):
        rng = np.random.default_rng((seed, 2, i))
        start = int(rng.integers(38, 49))      # a normal stretch first, then ~40-50% abnormal frames
        frames, masks = _syn_video(scene, rng, _SYN_T, start, kinds_cycle[i % len(kinds_cycle)])
        vdir = os.path.join(dest, "Test", f"Test{i + 1:03d}")
        os.makedirs(vdir)
        os.makedirs(vdir + "_gt")
        for t, (f, m) in enumerate(zip(frames, masks)):
            cv2.imwrite(os.path.join(vdir, f"{t + 1:03d}.png"), f, png)
            cv2.imwrite(os.path.join(vdir + "_gt", f"{t + 1:03d}.bmp"), m.astype(np.uint8) * 255)
        labels = masks.reshape(len(masks), -1).any(axis=1)        # abnormal iff the mask is non-empty
        ranges = ", ".join(f"{a + 1}:{b + 1}" for a, b in _runs(labels))
        lines.append(f"TestVideoFile{{end+1}}.gt_frame = [{ranges}];")
    with open(os.path.join(dest, "Test", os.path.basename(dest) + ".m"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(dest, "generator.json"), "w") as f:
        json.dump({"version": SYNTHETIC_VERSION, "seed": seed, "frame_shape": [_SYN_H, _SYN_W]}, f)


def _synthetic_root(cache_dir: str, seed: int) -> str:
    """Generate once (atomic directory rename, safe against concurrent processes) and return the folder."""
    parent = os.path.join(cache_dir, "synthetic", f"seed{seed}")
    dest = os.path.join(parent, "UCSDsynthetic")
    marker = os.path.join(dest, "generator.json")

    def current():
        try:
            with open(marker) as f:
                return json.load(f).get("version") == SYNTHETIC_VERSION
        except (OSError, ValueError):
            return False

    if current():
        return dest
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temp(parent)      # half-written copies of killed runs
    if os.path.isdir(dest) and not current():   # an older generator version: move it out of the way
        stale = tempfile.mkdtemp(prefix=".stale-", dir=parent)
        try:
            os.replace(dest, os.path.join(stale, "UCSDsynthetic"))
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    work = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        _write_synthetic(os.path.join(work, "UCSDsynthetic"), seed)
        try:
            os.rename(os.path.join(work, "UCSDsynthetic"), dest)
        except OSError:
            if not current():   # lost a race only if the winner's copy is complete
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------
# Frames layout (MNAD / ano_pred / HF2-VAD) and ShanghaiTech campus
# --------------------------------------------------------------------------------------------------

# Folder names the frames layout uses for each dataset, and the names of its label files.
_FRAMES_NAMES = {
    "ped1": ("ped1",), "ped2": ("ped2",), "avenue": ("avenue", "Avenue"),
    "shanghaitech": ("shanghaitech", "ShanghaiTech", "shanghai", "SHTech"),
}


def _is_frames_name(name: str, folder_name: str) -> bool:
    """Whether a folder called `folder_name` may hold dataset `name` in the frames layout (any letter case)."""
    return folder_name.lower() in {n.lower() for n in _FRAMES_NAMES.get(name, ())}


def _find_frames_layout(name: str, data_root: str):
    """(dataset folder, folder name) of a frames-layout dataset, or None. Only a folder named for the
    dataset counts (data_root/ped2, or data_root itself when it is called ped2): a frames-layout folder
    of another dataset must never be read under this name."""
    try:
        entries = sorted(os.listdir(data_root))
    except OSError:
        entries = []
    candidates = [(os.path.join(data_root, n), n) for n in entries if _is_frames_name(name, n)]
    own = os.path.basename(os.path.normpath(os.path.abspath(data_root)))
    if _is_frames_name(name, own):
        candidates.append((data_root, own))
    for folder, fname in candidates:
        if os.path.isdir(os.path.join(folder, "testing", "frames")):
            return folder, fname
    return None


def _scene_filter(names: list, scene: str | None, where: str) -> list:
    if scene is None:
        return names
    prefix = (f"{int(scene):02d}" if str(scene).isdigit() else str(scene)) + "_"
    kept = [n for n in names if n.startswith(prefix)]
    if not kept:
        raise DataError(f"{where}: no videos of scene {scene} (expected names starting with {prefix})")
    return kept


def _frames_layout_labels(name: str, folder: str, fname: str, videos: list) -> list:
    """Frame labels for all (unfiltered) test videos, from the first source found:
    testing/test_frame_mask/<video>.npy, <name>.mat (key gt), frame_labels_<name>.npy, where <name> is
    one of the dataset's own names (never another dataset's), looked up in the dataset folder and the
    folder above it. HF2-VAD's ground_truth_demo/gt_label.json is a pickle and is not read."""
    mask_dir = os.path.join(folder, "testing", "test_frame_mask")
    if os.path.isdir(mask_dir):
        labels = []
        for v in videos:
            path = os.path.join(mask_dir, v.name + ".npy")
            if not os.path.isfile(path):
                raise DataError(f"{path}: frame labels not found (expected one .npy per test video)")
            lab = _load_npy(path, f"the {v.num_frames} frame labels of {v.name}").reshape(-1)
            if len(lab) != v.num_frames:
                raise DataError(f"{path}: has {len(lab)} labels, expected {v.num_frames} (frames in {v.source})")
            labels.append((lab > 0).astype(np.uint8))
        return labels
    stems = [fname] + [n for n in _FRAMES_NAMES[name] if n != fname]    # fname is one of the dataset's names
    parent = os.path.dirname(os.path.abspath(folder))
    for d in (folder, parent):
        for stem in stems:
            path = os.path.join(d, stem + ".mat")
            if os.path.isfile(path):
                gt = _loadmat(path, "gt").ravel()
                if len(gt) != len(videos):
                    raise DataError(f"{path}: gt has {len(gt)} videos, expected {len(videos)} (test videos found)")
                labels = []
                for v, ranges in zip(videos, gt):
                    r = np.atleast_2d(np.asarray(ranges, dtype=np.int64))
                    if r.size and r.shape[0] != 2 and r.shape[1] == 2:
                        r = r.T                                  # K x 2 instead of 2 x K
                    labels.append(_labels_from_ranges(zip(r[0], r[1]) if r.size else [], v.num_frames,
                                                      f"{path} ({v.name})"))
                return labels
            path = os.path.join(d, f"frame_labels_{stem}.npy")
            if os.path.isfile(path):
                total = sum(v.num_frames for v in videos)
                flat = _load_npy(path, f"one label per test frame, shape ({total},) or (1, {total})")
                if flat.ndim > 2 or (flat.ndim == 2 and flat.shape[0] != 1) or flat.size != total:
                    raise DataError(f"{path}: has shape {flat.shape}, expected ({total},) or (1, {total}) "
                                    f"(all frames of the {len(videos)} test videos, in sorted order)")
                flat = flat.reshape(-1)
                ends = np.cumsum([v.num_frames for v in videos])
                return [(part > 0).astype(np.uint8) for part in np.split(flat, ends[:-1])]
    hf2vad = os.path.join(folder, "ground_truth_demo", "gt_label.json")
    hint = (f"; {hf2vad} (HF2-VAD's labels) is a pickle and is not read: convert it to "
            f"frame_labels_{fname}.npy as the common.py docstring shows") if os.path.isfile(hf2vad) else ""
    raise DataError(f"{folder}: no frame labels found (expected testing/test_frame_mask/*.npy, "
                    f"{fname}.mat or frame_labels_{fname}.npy){hint}")


def _read_frames_layout(name: str, folder: str, fname: str, scene: str | None) -> Dataset:
    train_frames = os.path.join(folder, "training", "frames")
    train_videos = os.path.join(folder, "training", "videos")
    test_frames = os.path.join(folder, "testing", "frames")
    train = []
    if os.path.isdir(train_frames):
        for vname in _scene_filter(_subdirs(train_frames, r".+"), scene, train_frames):
            files = _video_frames(os.path.join(train_frames, vname))
            train.append(Video(vname, "train", len(files), _image_shape(files[0]), None, False,
                               os.path.join(train_frames, vname), frame_files=files))
    elif os.path.isdir(train_videos):       # ShanghaiTech ships its training set as .avi files
        avis = sorted((n for n in _listdir(train_videos, "ShanghaiTech training videos (*.avi)") if not _is_junk(n)
                       and n.lower().endswith(VIDEO_EXTENSIONS)), key=_natural_key)
        for fn in _scene_filter(avis, scene, train_videos):
            path = os.path.join(train_videos, fn)
            n, shape = _video_file_info(path)
            train.append(Video(os.path.splitext(fn)[0], "train", n, shape, None, False, path, video_file=path))
    else:
        raise DataError(f"{folder}: no training videos (expected training/frames/<video>/ or training/videos/*.avi)")

    all_test = []
    for vname in _subdirs(test_frames, r".+"):
        files = _video_frames(os.path.join(test_frames, vname))
        all_test.append(Video(vname, "test", len(files), _image_shape(files[0]), None, False,
                              os.path.join(test_frames, vname), frame_files=files))
    if not train or not all_test:
        raise DataError(f"{folder}: expected video folders in training/ and testing/frames/")
    for v, lab in zip(all_test, _frames_layout_labels(name, folder, fname, all_test)):
        v.labels = lab
    keep = set(_scene_filter([v.name for v in all_test], scene, test_frames))
    test = [v for v in all_test if v.name in keep]
    pixel_dir = os.path.join(folder, "testing", "test_pixel_mask")
    for v in test:
        path = os.path.join(pixel_dir, v.name + ".npy")
        if os.path.isfile(path):
            expected = f"({v.num_frames}, H, W) pixel masks of {v.name}"
            shape = _load_npy(path, expected, mmap_mode="r").shape     # header only
            if len(shape) != 3 or shape[0] != v.num_frames:
                raise DataError(f"{path}: mask array has shape {shape}, expected ({v.num_frames}, H, W) "
                                f"(frames in {v.source})")
            v.has_masks, v.mask_file = True, path
    return Dataset(name, os.path.abspath(folder), "frames", train, test)


# --------------------------------------------------------------------------------------------------
# CUHK Avenue (original release: avi files + volLabel masks)
# --------------------------------------------------------------------------------------------------

def _loadmat(path: str, key: str):
    import scipy.io
    try:
        data = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError/NotImplementedError (v7.3 HDF5)/OSError
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: cannot read .mat file ({type(e).__name__}: {reason})") from None
    if key not in data:
        raise DataError(f"{path}: no variable {key!r} (expected the dataset's ground-truth file)")
    return data[key]


def _load_vollabel(path: str) -> np.ndarray:
    """Avenue ground truth: volLabel, a 1xT cell of HxW masks -> (T,H,W) uint8."""
    cells = _loadmat(path, "volLabel").ravel()
    try:
        return np.stack([np.asarray(c) for c in cells]).astype(np.uint8)
    except ValueError:
        raise DataError(f"{path}: volLabel masks differ in size (expected one HxW mask per frame)") from None


def _find_avenue(data_root: str):
    for n in ("Avenue Dataset", "Avenue_Dataset", "avenue", "Avenue", "CUHK_Avenue", ""):
        folder = os.path.join(data_root, n) if n else data_root
        if os.path.isdir(os.path.join(folder, "testing_videos")):
            return folder
    return None


def _numbered_videos(folder: str) -> list:
    names = [n for n in _listdir(folder, "video files NN.avi")
             if not _is_junk(n) and n.lower().endswith(VIDEO_EXTENSIONS)]
    if not names:
        raise DataError(f"{folder}: no video files (expected NN.avi)")
    return sorted(names, key=_natural_key)


def _find_avenue_labels(folder: str, data_root: str):
    """ground_truth_demo/testing_label_mask inside the Avenue folder, in the data root or beside the folder."""
    for d in (folder, data_root, os.path.dirname(os.path.abspath(folder))):
        cand = os.path.join(d, "ground_truth_demo", "testing_label_mask")
        if os.path.isdir(cand):
            return cand
    return None


def _read_avenue(folder: str, data_root: str, cache_dir: str | None) -> Dataset:
    train_dir, test_dir = os.path.join(folder, "training_videos"), os.path.join(folder, "testing_videos")
    if not os.path.isdir(train_dir):
        raise DataError(f"{train_dir}: folder not found (expected Avenue training_videos/NN.avi)")
    label_dir = _find_avenue_labels(folder, data_root)
    if label_dir is None:
        raise DataError(f"{os.path.join(folder, 'ground_truth_demo', 'testing_label_mask')}: folder not found "
                        f"(expected the Avenue ground_truth_demo with <n>_label.mat files)")
    train = []
    for fn in _numbered_videos(train_dir):
        path = os.path.join(train_dir, fn)
        n, shape = _video_file_info(path)
        train.append(Video(os.path.splitext(fn)[0], "train", n, shape, None, False, path, video_file=path))
    test = []
    for fn in _numbered_videos(test_dir):
        path = os.path.join(test_dir, fn)
        n, shape = _video_file_info(path)
        mat = os.path.join(label_dir, f"{_frame_number(fn)}_label.mat")     # not zero-padded: 1_label.mat
        if not os.path.isfile(mat):
            raise DataError(f"{mat}: label file not found (expected one <n>_label.mat per testing video)")
        labels = _cached_labels(mat, cache_dir, lambda: _load_vollabel(mat))
        if len(labels) != n:
            raise DataError(f"{mat}: has {len(labels)} masks, expected {n} (frames in {path})")
        test.append(Video(os.path.splitext(fn)[0], "test", n, shape, labels, True, path, video_file=path,
                          mask_file=mat))
    return Dataset("avenue", os.path.abspath(folder), "avenue", train, test)


def _cached_labels(mat: str, cache_dir: str | None, load_masks) -> np.ndarray:
    """Frame labels (any mask pixel set) of a mask file, cached: Avenue's volLabel files take seconds
    to decompress and the labels are needed every time the dataset is listed."""
    desc = json.dumps([CACHE_VERSION, os.path.abspath(mat), *_file_stats([mat])])
    key = hashlib.sha1(desc.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), "labels", f"{os.path.basename(mat)}_{key}.npy")
    cached = _load_cached(path, (None,))     # any length: the caller checks it against the video
    if cached is not None:
        return np.array(cached)
    masks = load_masks()
    return np.array(_save_cached(path, masks.reshape(len(masks), -1).any(axis=1).astype(np.uint8)))


# --------------------------------------------------------------------------------------------------
# UMN (one avi; the user supplies clip and label ranges)
# --------------------------------------------------------------------------------------------------

_UMN_AVI = "Crowd-Activity-All.avi"


def _find_umn_avi(data_root: str):
    for d in ("UMN", "umn", ""):
        path = os.path.join(data_root, d, _UMN_AVI) if d else os.path.join(data_root, _UMN_AVI)
        if os.path.isfile(path):
            return path
    return None


def _read_umn_labels(path: str) -> list:
    """UMN clips from a label file. All frame numbers are 1-based, inclusive, counted in the avi.

    JSON:  {"clips": [{"name": "lawn_train", "split": "train", "frames": [1, 480]},
                      {"name": "lawn_test", "split": "test", "frames": [481, 625], "abnormal": [[530, 625]]}]}
    Text:  one clip per line, `name split start-end [abnormal-start-abnormal-end ...]`, '#' starts a comment:
           lawn_train train 1-480
           lawn_test  test  481-625 530-625
    Returns [(name, split, start, end, [(a, b), ...])].
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: UMN label file not found (expected JSON or text frame ranges, see common.py)")
    with open(path) as f:
        text = f.read()
    clips = []
    try:
        if text.lstrip().startswith("{"):
            for c in json.loads(text)["clips"]:
                clips.append((str(c["name"]), str(c["split"]), int(c["frames"][0]), int(c["frames"][1]),
                              [(int(a), int(b)) for a, b in c.get("abnormal", [])]))
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                ranges = [tuple(int(x) for x in p.split("-")) for p in parts[2:]]
                if len(parts) < 3 or any(len(r) != 2 for r in ranges):
                    raise ValueError(line)
                clips.append((parts[0], parts[1], ranges[0][0], ranges[0][1], ranges[1:]))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path}: cannot parse UMN labels ({type(e).__name__}: {e}); expected "
                        f"'name split start-end [a-b ...]' lines or JSON with a 'clips' list") from None
    if not clips:
        raise DataError(f"{path}: no clips (expected at least one train and one test clip)")
    return clips


def _read_umn(data_root: str, labels_file: str | None) -> Dataset:
    avi = _find_umn_avi(data_root)
    if avi is None:
        raise DataError(f"{os.path.join(data_root, 'UMN', _UMN_AVI)}: video not found (expected the UMN {_UMN_AVI})")
    if labels_file is None:
        for cand in ("umn_labels.json", "umn_labels.txt"):
            if os.path.isfile(os.path.join(os.path.dirname(avi), cand)):
                labels_file = os.path.join(os.path.dirname(avi), cand)
        if labels_file is None:
            raise DataError(f"{avi}: UMN has no official label file; pass --labels-file with frame ranges "
                            f"(expected JSON or text, see common.py _read_umn_labels)")
    total, shape = _video_file_info(avi)
    train, test = [], []
    for name, split, start, end, abnormal in _read_umn_labels(labels_file):
        where = f"{labels_file} ({name})"
        if split not in ("train", "test"):
            raise DataError(f"{where}: split {split!r}, expected train or test")
        if not 1 <= start <= end <= total:
            raise DataError(f"{where}: frames {start}-{end} do not fit {avi} ({total} frames)")
        n = end - start + 1
        labels = None
        if split == "test":
            labels = _labels_from_ranges([(a - start + 1, b - start + 1) for a, b in abnormal], n, where)
        elif abnormal:
            raise DataError(f"{where}: a training clip has abnormal ranges (expected only normal frames)")
        (train if split == "train" else test).append(
            Video(name, split, n, shape, labels, False, avi, video_file=avi, start=start - 1))
    if not train or not test:
        raise DataError(f"{labels_file}: expected at least one train clip and one test clip")
    return Dataset("umn", os.path.abspath(os.path.dirname(avi)), "umn", train, test)


# --------------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------------

def _os_error(e: OSError, expected: str) -> DataError:
    """An OSError the readers did not expect (permissions, I/O errors, a full disk) as one line naming the path."""
    where = e.filename if e.filename is not None else "(unknown path)"
    return DataError(f"{where}: {e.strerror or type(e).__name__} (expected {expected})")


def load_dataset(name: str, data_root: str | None = None, *, scene: str | None = None,
                 labels_file: str | None = None, cache_dir: str | None = None, seed: int = 0) -> Dataset:
    """Find and list a dataset under `data_root` (frames are not decoded here).

    "synthetic" is generated once into <cache_dir>/synthetic/seed<seed>/UCSDsynthetic; data_root is unused.
    Any error is a DataError naming the file or folder and what was expected.
    """
    try:
        return _load_dataset(name, data_root, scene, labels_file, cache_dir, seed)
    except OSError as e:
        raise _os_error(e, f"readable {name} dataset files and a writable cache folder") from None


def _load_dataset(name, data_root, scene, labels_file, cache_dir, seed) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"{name}: unknown dataset (expected one of {', '.join(DATASETS)})")
    if name == "synthetic":
        root = _synthetic_root(cache_dir or default_cache_dir(), seed)
        return _read_ucsd(root, "synthetic")
    data_root = data_root or os.environ.get("VAD_DATA_ROOT") or "./data"
    if not os.path.isdir(data_root):
        raise DataError(f"{data_root}: data root folder not found (expected a folder holding the {name} dataset; "
                        f"set --data-root or VAD_DATA_ROOT)")
    if name in ("ped1", "ped2"):
        folder = "UCSDped1" if name == "ped1" else "UCSDped2"
        root = _find_ucsd(data_root, folder)
        if root is not None:
            return _read_ucsd(root, name)
        expected = f"{data_root}/UCSD_Anomaly_Dataset.v1p2/{folder}, {data_root}/{folder} or {data_root}/{name}/testing/frames"
        empty = [d for d in _ucsd_candidates(data_root, folder) if os.path.isdir(d)]
        if empty:
            expected += f"; {empty[0]} exists but holds neither Train/ nor Test/"
    elif name == "avenue":
        root = _find_avenue(data_root)
        if root is not None:
            return _read_avenue(root, data_root, cache_dir)
        expected = f"{data_root}/Avenue Dataset/testing_videos or {data_root}/avenue/testing/frames"
    elif name == "shanghaitech":
        expected = f"{data_root}/shanghaitech/testing/frames"
    else:
        return _read_umn(data_root, labels_file)
    found = _find_frames_layout(name, data_root)
    if found is not None:
        return _read_frames_layout(name, found[0], found[1], scene)
    raise DataError(f"{data_root}: no {name} dataset found (expected {expected})")


# --------------------------------------------------------------------------------------------------
# Frame and flow caches
# --------------------------------------------------------------------------------------------------

def _file_stats(paths: list) -> list:
    """[name, size, mtime_ns] of each file: what tells a changed source file from the one a cache entry was
    built from (a frame rewritten in place changes neither its folder's mtime nor, for BMP, its size)."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__}); expected the file the "
                            f"dataset listing found there") from None
        stats.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    return stats


def _cache_key(video: Video, *parts) -> str:
    """Key of a cache entry: the cache format version, the video (absolute source, name, frame range), the
    name, size and mtime of every file its frames come from (so a frame rewritten in place, a regenerated
    or a replaced dataset gets fresh entries) and the caller's parameters (size, colour, interpolation,
    flow method and parameters)."""
    files = video.frame_files if video.frame_files is not None else [video.video_file or video.source]
    desc = json.dumps([CACHE_VERSION, os.path.abspath(video.source), video.name, video.start, video.num_frames,
                       _file_stats(files), [str(p) for p in parts]])
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


def _cache_path(cache_dir: str | None, kind: str, video: Video, label: str, *parts) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", video.name)
    return os.path.join(cache_dir or default_cache_dir(), kind, f"{safe}_{label}_{_cache_key(video, label, *parts)}.npy")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _load_cached(path: str, shape: tuple | None = None):
    """The cached array as a read-only memmap, or None when there is none yet. A damaged entry (zero-byte,
    truncated, not an .npy, or not of `shape`, where None matches any length) is reported with a warning and
    None is returned, so the caller rebuilds it; an entry this user may not read is a DataError naming it."""
    if not os.path.isfile(path):
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError as e:
        raise DataError(f"{path}: cannot read the cache entry ({e.strerror}); expected a cache folder this user "
                        f"can read and write (--cache-dir or VAD_CACHE_DIR)") from None
    except (ValueError, EOFError, OSError) as e:
        _warn(f"{path}: damaged cache entry ({type(e).__name__}: {' '.join(str(e).split())}); rebuilding it")
        return None
    if shape is not None and (array.ndim != len(shape) or
                              any(want is not None and got != want for got, want in zip(array.shape, shape))):
        _warn(f"{path}: cache entry has shape {array.shape}, expected {tuple(shape)}; rebuilding it")
        return None
    return array


def _save_cached(path: str, array: np.ndarray) -> np.ndarray:
    where = "a writable cache folder (--cache-dir or VAD_CACHE_DIR)"
    _atomic_write(path, lambda f: np.save(f, array), expected=where)   # permissions, a full disk: DataError
    try:
        return np.load(path, mmap_mode="r")
    except OSError as e:
        raise DataError(f"{path}: cannot read the cache entry just written ({e.strerror or type(e).__name__}); "
                        f"expected {where}") from None


def _resize_frames(frames: np.ndarray, size) -> np.ndarray:
    H, W = int(size[0]), int(size[1])
    if frames.shape[1:3] == (H, W):
        return frames
    return np.stack([cv2.resize(f, (W, H), interpolation=RESIZE_INTERPOLATION[1]) for f in frames])


def load_frames(video: Video, size: tuple | None = None, gray: bool = True, cache_dir: str | None = None) -> np.ndarray:
    """uint8 (T,H,W) or (T,H,W,3) RGB at size=(H, W) (INTER_AREA; None = native), a read-only memmap
    of the cache entry, built on the first call (and rebuilt when a source file or a setting changed)."""
    size = tuple(int(s) for s in (size or video.frame_shape))
    path = _cache_path(cache_dir, "frames", video, f"{size[0]}x{size[1]}_{'gray' if gray else 'rgb'}",
                       RESIZE_INTERPOLATION[0])
    cached = _load_cached(path, (video.num_frames, *size) + (() if gray else (3,)))
    if cached is not None:
        return cached
    return _save_cached(path, _resize_frames(video.read_frames(gray), size))


def _flow_params(method: str) -> dict:
    if method == "farneback":
        return dict(FARNEBACK_PARAMS)
    if method == "dis":
        return dict(preset=DIS_PRESET)
    raise DataError(f"{method}: unknown optical flow method (expected one of {', '.join(FLOW_METHODS)})")


def _flow_chunk(task) -> np.ndarray:
    """Worker: flows between consecutive frames start..stop of a cached gray-frame .npy -> float16
    (stop-start, H, W, 2). Workers open the memmap themselves, so no frames are pickled; the parameters
    travel with the task (the ones in the cache key), not through this module's globals."""
    method, params, frames_path, start, stop = task
    cv2.setNumThreads(1)      # one process per core already; OpenCV's own threads would oversubscribe
    frames = np.load(frames_path, mmap_mode="r")
    out = np.empty((stop - start,) + frames.shape[1:3] + (2,), np.float16)
    dis = None
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{params['preset'].upper()}"))
    prev = np.asarray(frames[start])
    for t in range(start, stop):
        nxt = np.asarray(frames[t + 1])
        if dis is not None:
            out[t - start] = dis.calc(prev, nxt, None)
        else:
            out[t - start] = cv2.calcOpticalFlowFarneback(prev, nxt, None, **params)
        prev = nxt
    return out


_POOL_MIN_FRAMES = 64


def _flow_pool(workers: int):
    """A process pool, or None for in-process work. 'spawn' because forking a process that already runs
    OpenCV/torch threads can deadlock; the workers import only this module."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        return None
    import multiprocessing
    return multiprocessing.get_context("spawn").Pool(workers)


def _flows_for(videos: list, size, method: str, cache_dir, workers: int, desc: str) -> dict:
    """Flows for several videos: cached ones are memmapped, the rest computed in one shared pool
    (chunks of 16 frame pairs from all videos queued together, so no core idles between videos)."""
    size = tuple(int(s) for s in size)
    params = _flow_params(method)
    out, todo = {}, []
    for v in videos:
        # the frames' resize interpolation and OpenCV's version (its flow output can change between releases)
        # are part of the key too: either changes the flow
        path = _cache_path(cache_dir, "flows", v, f"{size[0]}x{size[1]}_{method}", json.dumps(params, sort_keys=True),
                           RESIZE_INTERPOLATION[0], cv2.__version__)
        out[v.name] = _load_cached(path, (max(v.num_frames - 1, 0), *size, 2))
        if out[v.name] is None:
            todo.append((v, path))
    if not todo:
        return out
    tasks, owner = [], []
    for v, path in tqdm(todo, desc="frames for flow", unit="video", disable=len(todo) < 2):
        frames_path = load_frames(v, size, gray=True, cache_dir=cache_dir).filename
        for s in range(0, v.num_frames - 1, 16):
            tasks.append((method, params, frames_path, s, min(s + 16, v.num_frames - 1)))
            owner.append((v, path))
    parts = {v.name: [] for v, _ in todo}
    total = sum(v.num_frames - 1 for v, _ in todo)
    # starting worker processes costs about a second; not worth it for a few dozen frame pairs
    pool = _flow_pool(workers) if total >= _POOL_MIN_FRAMES else None
    t0 = time.time()
    try:
        results = pool.imap(_flow_chunk, tasks) if pool is not None else map(_flow_chunk, tasks)
        with tqdm(total=total, desc=desc, unit="frame") as bar:
            for (v, path), part, task in zip(owner, results, tasks):
                parts[v.name].append(part)
                bar.update(len(part))
                if task[-1] == v.num_frames - 1:     # last chunk of this video: cache it
                    out[v.name] = _save_cached(path, np.concatenate(parts.pop(v.name)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for v, path in todo:     # single-frame videos have no pairs, hence no task
        if out[v.name] is None:
            out[v.name] = _save_cached(path, np.zeros((0,) + size + (2,), np.float16))
    dt = max(time.time() - t0, 1e-9)
    print(f"optical flow ({method}, {size[0]}x{size[1]}): {total} frames in {dt:.1f} s = {total / dt:.1f} frames/s")
    return {v.name: out[v.name] for v in videos}


def load_flows(video: Video, size: tuple, method: str = "farneback", cache_dir: str | None = None,
               workers: int = 0) -> np.ndarray:
    """float16 (T-1, H, W, 2): flows[t] = optical flow (pixels at `size`, dx then dy) from frame t to
    frame t+1, computed on gray frames at that size; cached like frames. workers=0 -> os.cpu_count()."""
    return _flows_for([video], size, method, cache_dir, workers, f"flow {video.name}")[video.name]


def load_split_frames(ds: Dataset, split: str, size, gray: bool = True, cache_dir: str | None = None) -> dict:
    """{video name: frames} for one split ("train" or "test"), in dataset order."""
    videos = _split_videos(ds, split)
    return {v.name: load_frames(v, size, gray, cache_dir) for v in tqdm(videos, desc=f"frames {ds.name}/{split}", unit="video")}


def load_split_flows(ds: Dataset, split: str, size, method: str = "farneback", cache_dir: str | None = None,
                     workers: int = 0) -> dict:
    """{video name: flows} for one split, in dataset order; prints frames/s when anything was computed."""
    return _flows_for(_split_videos(ds, split), size, method, cache_dir, workers, f"flow {ds.name}/{split}")


def _split_videos(ds: Dataset, split: str) -> list:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return ds.train if split == "train" else ds.test


# --------------------------------------------------------------------------------------------------
# Windows and clips
# --------------------------------------------------------------------------------------------------

def window_indices(num_frames: int, before: int, after: int) -> np.ndarray:
    """(N, before+1+after) int64 indices of every full window; row i is centred at frame before+i."""
    width = before + 1 + after
    n = max(num_frames - width + 1, 0)
    return np.arange(n, dtype=np.int64)[:, None] + np.arange(width, dtype=np.int64)[None, :]


def clip_starts(num_frames: int, length: int, stride: int) -> np.ndarray:
    """Starts of clips [s, s+length) every `stride` frames, plus a last clip ending at num_frames."""
    if num_frames < length:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, num_frames - length + 1, stride, dtype=np.int64)
    if starts[-1] + length < num_frames:
        starts = np.append(starts, num_frames - length)
    return starts


# --------------------------------------------------------------------------------------------------
# Run plumbing shared by the five scripts
# --------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not already say its default and X means something."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text:
            return text
        return super()._get_help_string(action)


def _smooth_spec(spec: str) -> str:
    """--smooth checked when the command line is parsed, not after training (eval.parse_smooth's rules)."""
    import eval as vad_eval                  # eval imports common: imported here, not at module level
    try:
        vad_eval.parse_smooth(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def build_parser(method: str, description: str) -> argparse.ArgumentParser:
    """The flags every method script shares; a script adds its own after these."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.set_defaults(method=method)
    p.add_argument("--dataset", choices=DATASETS, default="synthetic", help="dataset to train/test on")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: env VAD_DATA_ROOT, else ./data)")
    p.add_argument("--train", action="store_true", help="train (with neither --train nor --test: both)")
    p.add_argument("--test", action="store_true", help="test (with neither --train nor --test: both)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's / the method's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the paper's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=0, help="random seed (also selects the synthetic dataset)")
    p.add_argument("--out", default=None, help=f"output folder (default: runs/{method}/<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue training from <out>/model.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch even though <out>/model.pt exists, replacing it (without this flag "
                        "training refuses to replace a checkpoint)")
    p.add_argument("--workers", type=int, default=0, help="worker processes for flow/data (0 = all cores)")
    p.add_argument("--cache-dir", default=None, help="frame/flow cache (default: env VAD_CACHE_DIR, else ~/.cache/vad)")
    p.add_argument("--scene", default=None, help="ShanghaiTech scene filter, e.g. 01")
    p.add_argument("--labels-file", default=None, help="UMN frame-range label file (JSON or text, see common.py)")
    p.add_argument("--download", action="store_true", help="download the public dataset archives into --data-root first")
    p.add_argument("--normalize", choices=("none", "video_minmax"), default=None,
                   help="score normalisation for evaluation (default: the paper's protocol)")
    p.add_argument("--smooth", default="none", type=_smooth_spec,
                   help="score smoothing: none, gaussian:SIGMA or median:K")
    p.add_argument("--num-panels", type=int, default=4,
                   help="example panels to plot (adv3dae draws none: eval.py --overlays draws any run's maps)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                   help="network input size: H W, or one number for a square (default: the paper's)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time-boxed training slice: after M minutes stop at the next step boundary, save the "
                        "checkpoint and print the command that continues (--resume); exits without testing")
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse and resolve defaults: data_root, cache_dir, out, device (torch.device), train/test."""
    args = parser.parse_args(argv)
    args.data_root = args.data_root or os.environ.get("VAD_DATA_ROOT") or "./data"
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.out = args.out or os.path.join("runs", args.method, args.dataset)
    if not args.train and not args.test:
        args.train = args.test = True
    checkpoint = os.path.join(args.out, "model.pt")
    if args.train and not args.resume and not args.overwrite and os.path.isfile(checkpoint):
        raise DataError(f"{checkpoint} exists and training from scratch would replace it: --resume continues it (a "
                        f"finished run is only tested), --test tests it, --overwrite retrains and replaces it, or "
                        f"choose another --out")
    if getattr(args, "image_size", None) is not None:
        size = tuple(args.image_size)
        if len(size) == 1:
            size = size * 2
        if len(size) != 2 or min(size) < 1:
            raise DataError(f"--image-size {' '.join(map(str, args.image_size))}: expected H W, or one number for a square")
        args.image_size = size
    if getattr(args, "max_minutes", None) is not None and args.max_minutes <= 0:
        raise DataError(f"--max-minutes {args.max_minutes}: expected a positive number of minutes")
    import torch
    # Trained weights, activations and Adam's second moments can hold denormal floats (|x| < 1.2e-38), and x86
    # CPUs take a slow path for every operation on one: a gmfc_vae appearance model after one pre-training epoch
    # trained 6x slower (739 vs 117 ms per step, forward 9x) until they were flushed. Flushing changes only values
    # below float32's normal range (the same Ped2 metrics on a re-test); it does nothing on CUDA.
    torch.set_flush_denormal(True)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        raise DataError(f"--device {args.device}: not a torch device ({e})") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: CUDA is not available on this machine (expected --device cpu)")
    if args.device.type == "cuda" and args.device.index is not None:
        torch.cuda.set_device(args.device)          # the device the CUDA memory statistics (peak_memory) describe
    if getattr(args, "download", False):
        download_dataset(args.dataset, args.data_root)
    return args


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save through a temp file + os.replace, so an interrupted save never leaves a broken model.pt."""
    import torch
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, map_location="cpu", method: str | None = None) -> dict:
    """torch.load(weights_only=True); a missing or unreadable file, or one written by a script other than
    `method`'s, is a DataError naming it."""
    import torch
    expected = f"a model.pt written by {method}.py --train" if method else "a model.pt written by --train"
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found (expected {expected})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated/foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot load checkpoint ({first}; expected {expected}); copy it again if it "
                        f"was copied, or train a new one with --train --overwrite") from None
    saved_args = state.get("args") if isinstance(state, dict) else None
    written_by = saved_args.get("method") if isinstance(saved_args, dict) else None
    if method and written_by and written_by != method:
        raise DataError(f"{path}: written by {written_by}.py, not {method}.py (test it with {written_by}.py, or "
                        f"give {method}.py another --out)")
    return state


def _json_safe(obj):
    """Plain JSON types: numpy scalars/arrays, tuples, paths, devices converted; NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def args_to_dict(args) -> dict:
    """JSON-safe copy of an argparse namespace (torch.device -> 'cpu', etc.)."""
    return _json_safe(vars(args))


def check_finite(loss, where: str) -> None:
    """Raise TrainingError if `loss` (tensor or number) has a NaN/inf."""
    if hasattr(loss, "detach"):
        import torch
        ok = bool(torch.isfinite(loss.detach()).all())
    else:
        ok = bool(np.all(np.isfinite(np.asarray(loss, dtype=np.float64))))
    if not ok:
        raise TrainingError(f"non-finite loss at {where}; nothing saved")


def write_scores(path: str, frame_scores: dict, maps: dict | None, meta: dict) -> None:
    """scores.npz: frame/<video> float32 (T,), map/<video> float16 (T,h,w), meta = JSON string. Atomic."""
    arrays = {f"frame/{k}": np.asarray(v, dtype=np.float32) for k, v in frame_scores.items()}
    for k, v in (maps or {}).items():
        arrays[f"map/{k}"] = np.asarray(v, dtype=np.float16)
    arrays["meta"] = np.array(json.dumps(_json_safe(meta)))
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def write_json(path: str, obj) -> None:
    """JSON with indent 2, written atomically; NaN/inf are written as null."""
    text = json.dumps(_json_safe(obj), indent=2) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def peak_memory() -> dict:
    """This process's peak memory so far, in GiB: the host's peak resident set and, when the process has used
    CUDA, the most the PyTorch allocator held in tensors (max_memory_allocated) and reserved from the driver
    (max_memory_reserved: what another process on the same GPU could not have), on the current device
    (parse_args makes --device's the current one). On Linux the host figure is VmHWM from /proc, not
    getrusage's ru_maxrss, which survives exec: a script started from a large process (a notebook, a test
    runner) would report its parent's size. Where neither exists (Windows) the host figure is None."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            import resource
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
        except ImportError:
            kib = None
    peak = {"host_rss_gib": None if kib is None else round(kib / 2 ** 20, 2)}
    torch = sys.modules.get("torch")          # imported by the caller if at all: common.py imports it lazily
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        peak["cuda_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    return peak


def memory_line(peak: dict) -> str:
    """peak_memory() as the one line the method scripts print when they exit."""
    parts = []
    if "cuda_allocated_gib" in peak:
        parts.append(f"{peak['cuda_allocated_gib']:.2f} GiB of CUDA tensors ({peak['cuda_reserved_gib']:.2f} GiB "
                     f"reserved)")
    if peak["host_rss_gib"] is not None:
        parts.append(f"{peak['host_rss_gib']:.2f} GiB host (peak resident set)")
    return "peak memory: " + (", ".join(parts) or "not measurable here")


def run_main(main_fn, report_memory: bool = False) -> None:
    """Call main_fn(); bad input / training failure -> one 'error: ...' line on stderr, exit 2, no traceback.
    Running out of GPU memory is such a failure too: its line names the flags that lower the memory a run
    needs. report_memory: print the process's peak memory (memory_line) when it ends, however it ends (a
    failure to print it, e.g. into a closed pipe, never replaces the run's own outcome)."""
    try:
        main_fn()
    except (DataError, TrainingError, FileNotFoundError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        torch = sys.modules.get("torch")
        out_of_memory = None if torch is None else getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        if out_of_memory is None or not isinstance(e, out_of_memory):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        print(f"error: {first_line.rstrip('.')}. A smaller --test-batch-size lowers what a test needs; a smaller "
              f"--batch-size lowers what training needs but changes the run (and is not the paper's where the "
              f"paper gives one).", file=sys.stderr)
        sys.exit(2)
    finally:
        if report_memory:
            try:
                print(memory_line(peak_memory()), flush=True)
            except Exception:
                pass


# --------------------------------------------------------------------------------------------------
# Resumable, time-boxed training and a fed GPU
# --------------------------------------------------------------------------------------------------

class TimeBudget:
    """--max-minutes: a wall-clock budget for one training slice, checked by the caller at step boundaries."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else 60.0 * float(minutes)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


def continue_command(script: str, argv=None) -> str:
    """The shell command that continues a time-boxed run: the same arguments, plus --resume once."""
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", os.path.basename(script), *map(str, args)])


def report_time_stop(script: str, argv, checkpoint: str, progress: str, budget: TimeBudget) -> None:
    """The one line a time-boxed slice prints when it stops: how far it got and the command that continues."""
    print(f"stopped after {budget.elapsed() / 60:.1f} min (--max-minutes) at {progress}; checkpoint {checkpoint}; "
          f"continue with: {continue_command(script, argv)}", flush=True)


def resume_checkpoint(path: str, resume: bool, map_location="cpu", method: str | None = None) -> dict | None:
    """--resume: the checkpoint at `path`, or None (saying so) when there is none yet: a fresh start."""
    if not resume:
        return None
    if not os.path.isfile(path):
        print(f"--resume: no {path} yet, starting fresh", flush=True)
        return None
    return load_checkpoint(path, map_location=map_location, method=method)


def load_optimizer_state(optimizer, saved: dict) -> None:
    """optimizer.load_state_dict(saved), keeping this optimizer's device-dependent kernel choices.

    A state dict carries the "fused" / "foreach" / "capturable" flags of the machine that wrote it, and
    load_state_dict would take them (a CPU-started run resumed on CUDA would lose fused Adam). They are set
    to this optimizer's before loading, because the flags also decide where each step counter is put."""
    saved = {**saved, "param_groups": [dict(group) for group in saved["param_groups"]]}
    for group, current in zip(saved["param_groups"], optimizer.param_groups):
        for key in ("fused", "foreach", "capturable"):
            if key in current:
                group[key] = current[key]
    optimizer.load_state_dict(saved)


def get_rng_state(generators: dict | None = None) -> dict:
    """Every random state a training run draws from, in types torch.load(weights_only=True) accepts:
    torch (CPU and every CUDA device), numpy's and Python's global generators, and the named
    `generators` (np.random.Generator or torch.Generator objects, e.g. a sampler's)."""
    import torch
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)],
             "python": list(random.getstate()), "generators": {}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for key_name, gen in (generators or {}).items():
        if isinstance(gen, torch.Generator):
            state["generators"][key_name] = gen.get_state()
        else:
            state["generators"][key_name] = gen.bit_generator.state
    return state


def set_rng_state(state: dict, generators: dict | None = None) -> None:
    """Restore what get_rng_state saved (the named `generators` in place)."""
    import torch
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda" in state and torch.cuda.is_available():
        _warn(f"the checkpoint holds the random state of {len(state['cuda'])} CUDA devices, this machine has "
              f"{torch.cuda.device_count()}: CUDA random draws will not continue the saved sequence")
    for key_name, gen in (generators or {}).items():
        saved = state["generators"][key_name]
        if isinstance(gen, torch.Generator):
            gen.set_state(saved)
        else:
            gen.bit_generator.state = saved


def restore_training_args(args, parser: argparse.ArgumentParser, saved: dict, keys) -> list:
    """A test-only run reports the settings the model was trained with: copy `keys` from the checkpoint's
    saved args into `args`, and warn for each flag the command line set to a different value. Call it on
    the freshly parsed args, before a script fills its own defaults in. Returns the warnings."""
    warnings = []
    if saved.get("dataset") not in (None, getattr(args, "dataset", None)):
        warnings.append(f"warning: the checkpoint was trained on {saved['dataset']}; this run uses --dataset {args.dataset}")
        print(warnings[-1], file=sys.stderr, flush=True)
    for key in keys:
        if key not in saved:
            continue
        given, default = getattr(args, key, None), parser.get_default(key)
        value = saved[key]
        value = tuple(value) if isinstance(value, list) else value
        if given is not None and given != default and _json_safe(given) != _json_safe(value):
            flag = "--" + key.replace("_", "-")
            shown = " ".join(map(str, given)) if isinstance(given, (list, tuple)) else given
            warnings.append(f"warning: {flag} {shown} ignored: the checkpoint was trained with {value}")
            print(warnings[-1], file=sys.stderr, flush=True)
        setattr(args, key, value)
    return warnings


class LossMonitor:
    """Sums losses on their device and checks them for NaN/inf every `every` steps and at `means()`: one
    host sync per check instead of one per step. A non-finite sum stops training with a message; the
    checkpoint on disk is the last finite one."""

    def __init__(self, every: int = 50):
        self.every = every
        self.sums, self.count = {}, 0

    def add(self, where: str, **losses) -> None:
        for name, loss in losses.items():
            value = loss.detach().float() if hasattr(loss, "detach") else float(loss)
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1
        if self.count % self.every == 0:
            self.check(where)

    def check(self, where: str) -> dict:
        values = {k: float(v) for k, v in self.sums.items()}      # the one host sync
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"non-finite {', '.join(bad)} loss at or before {where}; "
                                f"training stopped, the last checkpoint is kept")
        return values

    def means(self, where: str) -> dict:
        """Mean of each loss since the last call (checked), then reset."""
        values = self.check(where)
        means = {k: v / max(self.count, 1) for k, v in values.items()}
        self.sums, self.count = {}, 0
        return means


def host_tensor(array, pin: bool = False):
    """A host array (a read-only memmap too) as a CPU tensor in one copy at most: pinned (page-locked) when
    `pin`, for an asynchronous copy to the GPU. A writeable contiguous array that is not pinned is shared."""
    import torch
    if isinstance(array, torch.Tensor):
        return array.pin_memory() if pin else array
    if not pin and array.flags.writeable and array.flags.c_contiguous:
        return torch.from_numpy(array)
    return stage_batch(None, array, pin)[1]       # straight from the memmap: no intermediate copy


def torch_dtype(numpy_dtype):
    """The torch dtype of a numpy dtype (without wrapping an array: torch warns on read-only memmaps)."""
    import torch
    return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype


def to_device(array, device, dtype=None):
    """One host array/tensor on `device`; on CUDA through pinned memory with non_blocking=True."""
    import torch
    cuda = torch.device(device).type == "cuda"
    t = host_tensor(array, pin=cuda)
    if dtype is not None and not t.is_floating_point() and dtype.is_floating_point and not cuda:
        return t.to(dtype)
    t = t.to(device, non_blocking=True) if cuda else t.to(device)
    return t if dtype is None else t.to(dtype)


def prefetch_to_device(batches, device, depth: int = 2):
    """Yield each host batch (numpy array or CPU tensor) as a tensor on `device`. On CUDA the copies go
    through `depth` reused pinned buffers on a side stream with non_blocking=True, issued `depth - 1`
    batches ahead, so the next batch is read and copied while the GPU computes on the current one."""
    import torch
    from collections import deque
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    copy_stream = torch.cuda.Stream(device)
    pinned, copied = [None] * depth, [None] * depth   # per slot: a pinned byte buffer, grown when too small
    pending = deque()
    for i, batch in enumerate(batches):
        slot = i % depth
        if copied[slot] is not None:
            copied[slot].synchronize()             # that buffer's previous copy must be done before reuse
        pinned[slot], staged = stage_batch(pinned[slot], batch, pin=True)
        with torch.cuda.stream(copy_stream):
            on_device = staged.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        copied[slot] = done
        pending.append((on_device, done))
        if len(pending) == depth:
            yield _take(pending.popleft(), device)
    while pending:
        yield _take(pending.popleft(), device)


def stage_batch(buffer, batch, pin: bool):
    """Copy a host batch (numpy array, read-only memmap, or CPU tensor) into `buffer`, a byte tensor that is
    replaced by a larger one (pinned when `pin`) only when the batch does not fit, so batches of other shapes
    (the last one, videos of other lengths) reuse it. Returns (buffer, the batch's view into it)."""
    import torch
    host = batch if isinstance(batch, torch.Tensor) else np.asarray(batch)
    dtype = host.dtype if isinstance(host, torch.Tensor) else torch_dtype(host.dtype)
    nbytes = math.prod(host.shape) * dtype.itemsize
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
    staged = buffer[:nbytes].view(dtype).view(tuple(host.shape))
    if isinstance(host, torch.Tensor):
        staged.copy_(host)
    else:
        np.copyto(staged.numpy(), host)          # a read-only memmap too, without a torch view of it
    return buffer, staged


def _take(item, device):
    import torch
    tensor, done = item
    stream = torch.cuda.current_stream(device)
    stream.wait_event(done)
    tensor.record_stream(stream)            # the caching allocator must not reuse it while `stream` works
    return tensor


def concat_to_device(videos, device):
    """The videos (arrays or memmaps of one frame shape and dtype) laid end to end in one tensor on `device`,
    copied one video at a time (no whole-split copy on the host). Returns (tensor, first row of each video)."""
    import torch
    lengths = [len(v) for v in videos]
    out = torch.empty((sum(lengths),) + tuple(videos[0].shape[1:]), dtype=torch_dtype(videos[0].dtype), device=device)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    for first, n, video in zip(starts, lengths, videos):
        out[first:first + n] = to_device(video, device)
    return out, starts


def batch_segments(ranges, batch: int) -> list:
    """Rows of several videos laid end to end, cut into batches of `batch` rows that run across video
    boundaries, so that short videos do not each end in a padded batch (only the last batch is short).
    ranges: [(video, first, end)] rows first .. end-1 of each video, in order. Returns, per batch, its
    segments [(video, first, end)]."""
    batches, current, filled = [], [], 0
    for video, first, end in ranges:
        while first < end:
            take = min(batch - filled, end - first)
            current.append((video, first, first + take))
            filled, first = filled + take, first + take
            if filled == batch:
                batches.append(current)
                current, filled = [], 0
    if current:
        batches.append(current)
    return batches


def pad_batch(batch, size: int):
    """Pad a batch along axis 0 to `size` rows by repeating its last row, so every batch has one shape
    (no cuDNN re-tuning or re-compilation for a short last batch). Returns (padded, number of real rows)."""
    n = len(batch)
    if n == size:
        return batch, n
    if n == 0 or n > size:
        raise ValueError(f"pad_batch: {n} rows do not fit a batch of {size}")
    if isinstance(batch, np.ndarray):
        return np.concatenate([batch, np.repeat(batch[-1:], size - n, axis=0)]), n
    import torch
    return torch.cat([batch, batch[-1:].expand(size - n, *batch.shape[1:])]), n


def fits_on_device(num_bytes: int, device, fraction: float = 0.5) -> bool:
    """True on CUDA when `num_bytes` take at most `fraction` of the device's free memory (False elsewhere):
    whether a whole training split can be held on the GPU."""
    import torch
    device = torch.device(device)
    return device.type == "cuda" and num_bytes <= fraction * torch.cuda.mem_get_info(device)[0]


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU): call before reading a timer."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class GraphedStep:
    """A training step, step(*inputs) -> output tensors (forward, losses, backward, optimizer steps), captured
    once as a CUDA graph and replayed (CUDA only; PyTorch's whole-network capture recipe).

    A step of small kernels (a batch of small patches, or a batch of one image) is paced by eager PyTorch
    launching them one by one; a replay launches the whole step at once. The first `warmup` calls run
    eagerly on a side stream, so lazy set-up (cuBLAS/cuDNN handles, optimizer state) stays out of the
    capture; the next call whose inputs have `batch_size` rows is captured and replayed; inputs of another
    shape (an epoch's short last batch) run eagerly. The replayed kernels are the eager ones, and each
    replay advances the CUDA generator as the eager step would, so random draws (dropout, a sampling layer)
    should be those of an eager run too (the GPU check in tests/device_checks.py reports whether they are).
    A capture that fails warns and leaves every later call eager. The outputs of a replay are the graph's
    static tensors: read them (e.g. LossMonitor.add) before the next call. After an eager call following
    the capture, `p.grad` holds that call's gradients while replays use the graph's own buffers: nothing
    may read `p.grad` between steps. The optimizers must be built with capturable=True."""

    def __init__(self, step, optimizers, batch_size: int, warmup: int = 3):
        self.step, self.optimizers, self.batch_size, self.warmup = step, list(optimizers), batch_size, warmup
        self.calls, self.graph, self.static_inputs, self.static_out = 0, None, None, None
        self.eager_only = False

    def eager(self, inputs, side_stream=False):
        import torch
        with warnings.catch_warnings():        # torch warns that a capturable optimizer is stepped uncaptured
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            if not side_stream:
                return self.step(*inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out

    def capture(self, inputs):
        import torch
        self.static_inputs = [x.clone() for x in inputs]
        self.graph = torch.cuda.CUDAGraph()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)          # the gradients are allocated by the capture
        with torch.cuda.graph(self.graph):
            self.static_out = self.step(*self.static_inputs)

    def __call__(self, *inputs):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.eager(inputs, side_stream=True)
        if self.graph is None and not self.eager_only and len(inputs[0]) == self.batch_size:
            try:
                self.capture(inputs)
            except Exception as error:     # a capture runs no kernel: weights and optimizer state are as before
                print(f"warning: CUDA-graph capture of the training step failed ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:200]}); stepping eagerly (as --no-cuda-graphs)", file=sys.stderr)
                self.graph, self.static_inputs, self.static_out, self.eager_only = None, None, None, True
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                return self.eager(inputs)
            self.graph.replay()                # capturing runs nothing: this replay is the step on `inputs`
            return self.static_out
        if self.graph is not None and [x.shape for x in inputs] == [x.shape for x in self.static_inputs]:
            for static, x in zip(self.static_inputs, inputs):
                static.copy_(x)
            self.graph.replay()
            return self.static_out
        return self.eager(inputs)


class StepRate:
    """Training steps/s of a stretch of a loop, the first step left out (cuDNN autotuning and lazy set-up on
    CUDA): call step_done() after each step and rate() at the end. The device is synchronised only after
    the first step and in rate(), so the GPU still runs ahead of the loop in between and the figure counts
    finished steps, not queued ones. With a single step, rate() times that step (from the StepRate's
    creation); with none, it is NaN."""

    def __init__(self, device):
        self.device, self.steps, self.t_first, self.t_start = device, 0, None, time.time()

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == 1:
            synchronize(self.device)
            self.t_first = time.time()

    def rate(self) -> float:
        if self.steps == 0:
            return float("nan")
        if self.steps == 1:
            return 1 / max(self.t_first - self.t_start, 1e-9)
        synchronize(self.device)
        return (self.steps - 1) / max(time.time() - self.t_first, 1e-9)


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------

def download(url, dest: str, sha256: str | None = None) -> str:
    """Fetch `url` (or the first of a list of mirror URLs that answers) to `dest` (a file path, or an existing
    folder to keep the URL's file name) with a progress bar. The bytes go to a temp file of this call's own
    (`<dest>.<random>.part`, so concurrent downloads of one file never share it), renamed to `dest` only when
    complete and, given `sha256`, verified. A failed or short transfer or a sha256 mismatch is a DataError;
    nothing is kept. An existing complete `dest` (with the right sha256) is not fetched again."""
    urls = [url] if isinstance(url, str) else list(url)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(urls[0].split("?")[0]) or "download")
    expected_sha = sha256.lower() if sha256 else None
    if os.path.isfile(dest) and (expected_sha is None or _sha256_file(dest) == expected_sha):
        return dest
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temp(folder)          # .part files of killed downloads
    failures = []
    for u in urls:
        try:
            part, digest = _fetch(u, dest)
        except DataError as e:          # try the next mirror
            failures.append(str(e))
            continue
        if expected_sha is not None and digest != expected_sha:
            _remove(part)
            raise DataError(f"{u}: sha256 mismatch (expected {expected_sha}, got {digest}); nothing kept at {dest}")
        os.chmod(part, _file_mode())
        os.replace(part, dest)
        return dest
    raise DataError("; then ".join(failures))


def _fetch(url: str, dest: str) -> tuple:
    """Stream `url` into a new unique temp file beside `dest`: (temp path, sha256 hex digest)."""
    fd, part = tempfile.mkstemp(prefix=os.path.basename(dest) + ".", suffix=".part",
                                dir=os.path.dirname(os.path.abspath(dest)))
    digest, received, expected = hashlib.sha256(), 0, None
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except Exception as e:  # URLError, HTTPError, IncompleteRead, timeouts, resets, a full disk: "transfer failed"
        _remove(part)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{url}: download failed after {received} bytes ({type(e).__name__}: {reason})") from None
    except BaseException:   # Ctrl-C: no half file left behind
        _remove(part)
        raise
    if expected is not None and received != expected:
        _remove(part)
        raise DataError(f"{url}: transfer interrupted, received {received} of {expected} bytes")
    return part, digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Official archives, per dataset: the URLs to try in order, the sha256, and where the file goes ("unpack":
# kept in <data_root>/downloads/ and unpacked into data_root; "keep": saved as data_root/<keep>/<file>), plus
# `present(data_root)`, true when what the archive holds is already there (it is then not fetched).
# The sha256 sums are the ones anomalib publishes for these exact files (openvinotoolkit/anomalib,
# src/anomalib/data/datamodules/video/ucsd_ped.py and src/anomalib/data/datamodules/video/avenue.py,
# `DownloadInfo.hashsum`, verified there with sha256). Whether the two university hosts serve https could
# not be checked from here: https is tried first and plain http second, which the pinned sha256 makes safe.
# UMN publishes no checksum, so its video is not verified.
_UCSD_ARCHIVE = dict(
    urls=("https://www.svcl.ucsd.edu/projects/anomaly/UCSD_Anomaly_Dataset.tar.gz",
          "http://www.svcl.ucsd.edu/projects/anomaly/UCSD_Anomaly_Dataset.tar.gz"),
    sha256="2329af326951f5097fdd114c50e853957d3e569493a49d22fc082a9fd791915b",     # anomalib ucsd_ped.py
    unpack=True,
    present=lambda root: os.path.isdir(os.path.join(root, "UCSD_Anomaly_Dataset.v1p2")))
DOWNLOADS = {
    "ped1": [_UCSD_ARCHIVE],
    "ped2": [_UCSD_ARCHIVE],
    "avenue": [
        dict(urls=("https://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/Avenue_Dataset.zip",
                   "http://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/Avenue_Dataset.zip"),
             sha256="fc9cb8432a11ca79c18aa180c72524011411b69d3b0ff27c8816e41c0de61531",   # anomalib avenue.py
             unpack=True, present=lambda root: _find_avenue(root) is not None),
        dict(urls=("https://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/ground_truth_demo.zip",
                   "http://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/ground_truth_demo.zip"),
             sha256="60fec1728ec8f73a58aad3aeb5729d70a805a47e0b8eb4bf91ab67ef06386d77",   # anomalib avenue.py
             unpack=True, present=lambda root: _find_avenue_labels(_find_avenue(root) or root, root) is not None),
    ],
    "umn": [dict(urls=("https://mha.cs.umn.edu/Movies/Crowd-Activity-All.avi",
                       "http://mha.cs.umn.edu/Movies/Crowd-Activity-All.avi"),
                 sha256=None, keep="UMN", present=lambda root: _find_umn_avi(root) is not None)],
    "shanghaitech": [],     # hosted on cloud drives without a direct link: see the dataset page
    "synthetic": [],        # generated locally
}
_DOWNLOAD_PAGES = {"shanghaitech": "https://svip-lab.github.io/dataset/campus_dataset.html"}


def _dataset_present(name: str, data_root: str) -> bool:
    if name in ("ped1", "ped2"):
        return _find_ucsd(data_root, "UCSDped1" if name == "ped1" else "UCSDped2") is not None
    if name == "avenue":
        folder = _find_avenue(data_root)
        return folder is not None and _find_avenue_labels(folder, data_root) is not None
    if name == "umn":
        return _find_umn_avi(data_root) is not None
    return name == "synthetic" or _find_frames_layout(name, data_root) is not None


def download_dataset(name: str, data_root: str) -> None:
    """--download: fetch and unpack the official archives of `name` into data_root (skipped when the
    dataset is already there). Archives are kept in <data_root>/downloads/ so a rerun does not refetch;
    each is unpacked into a temp folder inside data_root and renamed into place when complete, so an
    interrupted unpack never looks like a dataset."""
    if _dataset_present(name, data_root):
        return
    if not DOWNLOADS.get(name):
        raise DataError(f"{name}: no direct download; get it from {_DOWNLOAD_PAGES.get(name, 'the dataset page')} "
                        f"and unpack it under {data_root}")
    try:
        for item in DOWNLOADS[name]:
            if item["present"](data_root):
                continue
            filename = os.path.basename(item["urls"][0])
            if not item.get("unpack"):
                download(item["urls"], os.path.join(data_root, item["keep"], filename), item["sha256"])
                continue
            archive = download(item["urls"], os.path.join(data_root, "downloads", filename), item["sha256"])
            print(f"unpacking {archive} into {data_root}", flush=True)
            _unpack(archive, data_root)
    except OSError as e:
        raise _os_error(e, f"a writable data root {data_root} with room for the {name} archives") from None


def _unpack(archive: str, dest: str) -> None:
    """Unpack into a fresh temp folder inside `dest`, then rename each top-level entry into `dest`. An
    existing entry of the same name is never overwritten or merged into (a DataError says so)."""
    import tarfile
    import zipfile
    _remove_stale_temp(dest)            # .unpack-* folders of killed runs
    work = tempfile.mkdtemp(prefix=".unpack-", dir=dest)
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:     # ZipFile.extractall strips '..' and absolute paths
                    z.extractall(work)
            else:
                with tarfile.open(archive) as t:
                    _extract_tar(t, work, archive)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{archive}: cannot unpack ({type(e).__name__}: {reason})") from None
        for entry in sorted(os.listdir(work)):
            if entry == "__MACOSX" or _is_junk(entry):
                continue
            target = os.path.join(dest, entry)
            if os.path.lexists(target):
                raise DataError(f"{target}: already exists, so {archive} was not unpacked over it; move it away and "
                                f"run --download again (or unpack the archive by hand)")
            os.rename(os.path.join(work, entry), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract_tar(t, work: str, archive: str) -> None:
    """extractall with tarfile's "data" filter (no absolute paths, '..', links leaving the folder, devices).
    Pythons without extraction filters (before 3.8.17/3.9.17/3.10.12/3.11.4) get the same checks here."""
    import tarfile
    if hasattr(tarfile, "data_filter"):
        t.extractall(work, filter="data")
        return
    root = os.path.abspath(work)

    def inside(path: str) -> bool:
        path = os.path.abspath(path)
        return path == root or path.startswith(root + os.sep)

    members = []
    for m in t.getmembers():
        if os.path.isabs(m.name) or m.name.startswith(("/", "\\")) or not inside(os.path.join(root, m.name)):
            raise DataError(f"{archive}: member {m.name!r} would land outside the unpack folder; not unpacked")
        if m.issym() or m.islnk():
            base = os.path.dirname(os.path.join(root, m.name)) if m.issym() else root
            if os.path.isabs(m.linkname) or not inside(os.path.join(base, m.linkname)):
                raise DataError(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the unpack folder; "
                                f"not unpacked")
        elif not (m.isfile() or m.isdir()):
            raise DataError(f"{archive}: member {m.name!r} is a device or pipe; not unpacked")
        m.mode &= 0o755                 # no setuid/setgid/sticky bits, no group/other write, as the filter does
        members.append(m)
    t.extractall(work, members=members)


# torchvision's published ImageNet AlexNet (SPEC section 2); gan_flow and deep_anomaly define the network
# themselves with torchvision's `features.*` names, so this file loads into them without torchvision.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def load_alexnet_features(model, spec: str, url: str = ALEXNET_URL) -> str:
    """Fill `model` (whose state dict has torchvision's `alexnet().features` keys and shapes) from
    spec = "imagenet" (`url` through torch.hub.load_state_dict_from_url, cached under $TORCH_HOME), a PATH to
    a state dict, or "none" (keep the random weights, warned loudly). Only `features.*` entries are used;
    `classifier.*` are ignored. Returns "alexnet-imagenet", "alexnet-file:<path>" or "alexnet-random" for the
    run's protocol string. Bad weights are a one-line DataError naming the file and the key."""
    import torch

    if spec == "none":
        bar = "!" * 100
        print(f"{bar}\nWARNING: --backbone-weights none: AlexNet has RANDOM weights, not ImageNet ones.\n"
              f"Results are NOT comparable with the paper's.\n{bar}", file=sys.stderr, flush=True)
        return "alexnet-random"
    if spec == "imagenet":
        where = url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                       weights_only=True)
        except Exception as e:  # no network, HTTP error, hash mismatch: all one message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{url}: could not fetch AlexNet ImageNet weights ({type(e).__name__}: {first}); "
                            "pass --backbone-weights PATH (alexnet-owt-7be5be79.pth) or --backbone-weights none") from None
        source = "alexnet-imagenet"
    else:
        where = os.path.expanduser(spec)
        if not os.path.isfile(where):
            raise DataError(f"{where}: AlexNet weights not found (expected torchvision's alexnet-owt-7be5be79.pth, "
                            "'imagenet' or 'none')")
        try:
            state = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{where}: cannot load AlexNet weights ({type(e).__name__})") from None
        source = f"alexnet-file:{where}"
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{where}: not a state dict (expected torchvision AlexNet keys features.*)")
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise DataError(f"{where}: AlexNet weights lack {key} (expected torchvision's alexnet keys)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise DataError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: state[k] for k in expected})
    return source


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _cli(argv=None) -> None:
    p = argparse.ArgumentParser(description="Inspect a dataset, build its frame/flow caches.")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic")
    p.add_argument("--data-root", default=None, help="default: env VAD_DATA_ROOT, else ./data")
    p.add_argument("--cache-dir", default=None, help="default: env VAD_CACHE_DIR, else ~/.cache/vad")
    p.add_argument("--scene", default=None)
    p.add_argument("--labels-file", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download", action="store_true", help="download the dataset archives first")
    p.add_argument("--summary", action="store_true", help="print one JSON object describing the dataset")
    p.add_argument("--frames", action="store_true", help="build (or load) the frame cache of every video, timed")
    p.add_argument("--flows", action="store_true", help="compute (or load) optical flow of every video, timed")
    p.add_argument("--image-size", "--size", dest="size", type=int, nargs="+", default=None, metavar="N",
                   help="frame size H W, or one number for a square (default: native)")
    p.add_argument("--gray", choices=("yes", "no"), default="yes")
    p.add_argument("--flow-method", choices=FLOW_METHODS, default="farneback")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    if args.size is not None:
        if len(args.size) not in (1, 2) or min(args.size) < 1:
            raise DataError(f"--image-size {' '.join(map(str, args.size))}: expected H W, or one number for a square")
        args.size = tuple(args.size) * (3 - len(args.size))
    data_root = args.data_root or os.environ.get("VAD_DATA_ROOT") or "./data"
    if args.download:
        download_dataset(args.dataset, data_root)
    ds = load_dataset(args.dataset, data_root, scene=args.scene, labels_file=args.labels_file,
                      cache_dir=args.cache_dir, seed=args.seed)
    if args.summary or not (args.frames or args.flows):
        print(json.dumps(ds.summary()))
    videos = ds.train + ds.test
    if args.frames:
        t0 = time.time()
        n = 0
        for v in tqdm(videos, desc="frames", unit="video"):
            n += len(np.array(load_frames(v, args.size, args.gray == "yes", args.cache_dir)))   # read through
        dt = time.time() - t0
        print(f"frames: {n} frames of {len(videos)} videos decoded/cached or read from the cache in {dt:.2f} s "
              f"({n / max(dt, 1e-9):.0f} frames/s)")
    if args.flows:
        size = args.size or videos[0].frame_shape
        t0 = time.time()
        # one call per split: train and test videos can share names (Avenue's 01, 02, ...)
        count = sum(len(f) for split in (ds.train, ds.test) if split
                    for f in _flows_for(split, size, args.flow_method, args.cache_dir, args.workers,
                                        f"flow {ds.name}").values())
        print(f"flows: {count} flow fields in {time.time() - t0:.2f} s (incl. cache)")


if __name__ == "__main__":
    run_main(_cli)
