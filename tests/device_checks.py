"""Checks of the host -> device copies, shared by the tests and by .ci/gpu_ped2.sh (which runs them on CUDA,
where pytest is not installed): each raises AssertionError when the data on the device differs."""

import warnings

import numpy as np
import torch

import common


def check_prefetch(device):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 255, (3, 8, 8), dtype=np.uint8) for _ in range(5)]
    batches.append(batches[-1][:1].copy())          # a smaller batch: the same pinned buffer
    batches.append(rng.integers(0, 255, (5, 8, 8), dtype=np.uint8))   # a larger one: a new buffer
    batches.append(rng.standard_normal((3, 8)).astype(np.float16))    # another dtype
    read_only = batches[0].copy()
    read_only.flags.writeable = False               # e.g. a memmapped cache
    batches.append(read_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # torch's "NumPy array is not writable" on the memmap
        on_device = list(common.prefetch_to_device(iter(batches), device, depth=2))
    got = [t.cpu().numpy() for t in on_device]      # compared only after every copy was issued, so a buffer
    assert len(got) == len(batches)                 # refilled while its copy is in flight shows up
    for a, b in zip(batches, got):
        np.testing.assert_array_equal(a, b)


def check_to_device(device, tmp_path):
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 255, (n, 6, 5), dtype=np.uint8) for n in (3, 1, 4)]
    np.save(tmp_path / "v.npy", videos[2])
    videos[2] = np.load(tmp_path / "v.npy", mmap_mode="r")           # a read-only memmap, as the caches are
    got, starts = common.concat_to_device(videos, device)
    assert starts.tolist() == [0, 3, 4] and got.device.type == torch.device(device).type
    np.testing.assert_array_equal(got.cpu().numpy(), np.concatenate(videos))
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # torch's "NumPy array is not writable" on a leading memmap
        got, starts = common.concat_to_device(videos[::-1], device)
    np.testing.assert_array_equal(got.cpu().numpy(), np.concatenate(videos[::-1]))
    strided = np.asarray(videos[2])[:, ::2]                            # not contiguous
    np.testing.assert_array_equal(common.to_device(strided, device).cpu().numpy(), strided)
    as_float = common.to_device(videos[2], device, torch.float32)
    assert as_float.dtype == torch.float32 and as_float.cpu().numpy().tolist() == np.asarray(videos[2]).tolist()
