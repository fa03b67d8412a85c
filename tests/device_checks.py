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


def check_graphed_training_step(device, timed_steps: int = 300):
    """gmfc_vae's GraphedTrainStep against its eager train_step, from the same weights (CUDA only). The
    pre-training phase draws no noise, so warm-up, capture, replays, an eager short batch and replays after
    it must give the eager losses and weights to rounding; the VaDE phase (its sampling noise comes from the
    graph's own draws) must give finite losses close to the eager ones. Returns the eager and graphed
    steps/s of the VaDE step, measured in this one run."""
    import time
    import gmfc_vae as gm
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, device=device)
    full = [gm.to_input(patches[i:i + 100]) for i in range(0, 1000, 100)]
    batches = full[:7] + [gm.to_input(patches[:30])] + full[7:]       # the short batch after 3 replays
    results, rates = {}, {}
    for phase in ("pretrain", "vade"):
        for graphed in (False, True):
            torch.manual_seed(1)
            model = gm.GMFCVAE().to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=graphed)
            step = (gm.GraphedTrainStep(model, optimizer, phase, False, 100) if graphed
                    else lambda x: gm.train_step(model, optimizer, x, phase, False))
            losses = [float(step(x)[0].detach()) for x in batches]
            results[phase, graphed] = losses, [p.detach().clone() for p in model.parameters()]
            if phase == "vade":
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(timed_steps):
                    step(full[i % len(full)])
                torch.cuda.synchronize()
                rates[graphed] = timed_steps / (time.perf_counter() - t0)
    (eager, w_eager), (graphed, w_graphed) = results["pretrain", False], results["pretrain", True]
    np.testing.assert_allclose(graphed, eager, rtol=1e-4)
    for a, b in zip(w_graphed, w_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    (eager, _), (graphed, _) = results["vade", False], results["vade", True]
    assert np.isfinite(graphed).all(), graphed
    assert abs(np.mean(graphed) - np.mean(eager)) < 0.05 * abs(np.mean(eager)), (graphed, eager)
    return rates[False], rates[True]
