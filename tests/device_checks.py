"""Checks of the host -> device copies and of the CUDA-graph training steps, shared by the tests and by
.ci/gpu_ped2.sh (which runs them on CUDA without pytest): each raises AssertionError when the data on the
device, or a graphed step's training, differs from what it should be."""

import contextlib
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


@contextlib.contextmanager
def _cudnn(**flags):
    """torch.backends.cudnn flags (benchmark, deterministic, allow_tf32) set for a block, then restored."""
    saved = {name: getattr(torch.backends.cudnn, name) for name in flags}
    for name, value in flags.items():
        setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.backends.cudnn, name, value)


def _train(build, graphed, batches, batch_size):
    """build(capturable) -> (step, optimizers, parameters), from seed 1; the step run eagerly or as a
    common.GraphedStep over batches. Returns (step, losses, final parameters)."""
    torch.manual_seed(1)
    step, optimizers, parameters = build(graphed)
    if graphed:
        step = common.GraphedStep(step, optimizers, batch_size)
    losses = [float(step(*batch)[0].detach()) for batch in batches]
    if graphed:
        assert step.graph is not None and not step.eager_only, "the training step was not captured"
    assert np.isfinite(losses).all(), losses
    return step, losses, [p.detach().clone() for p in parameters]


def _same_training(build, batches, batch_size):
    """Eager and graphed runs of the same batches from the same weights, with deterministic cuDNN kernels:
    True when they give the same losses and weights to rounding; also returns both loss sequences."""
    with _cudnn(benchmark=False, deterministic=True):
        _, eager, w_eager = _train(build, False, batches, batch_size)
        _, graphed, w_graphed = _train(build, True, batches, batch_size)
    same = np.allclose(graphed, eager, rtol=1e-4) and all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(w_graphed, w_eager))
    return same, eager, graphed


def _rates(build, batches, batch_size, steps):
    """Eager and graphed steps/s over `steps` calls after warm-up and capture, measured in this one run."""
    import time
    rates = []
    for graphed in (False, True):
        step, _, _ = _train(build, graphed, batches[:5], batch_size)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            step(*batches[i % len(batches)])
        torch.cuda.synchronize()
        rates.append(steps / (time.perf_counter() - t0))
    return tuple(rates)


def check_graphed_training_step(device, timed_steps: int = 300):
    """The CUDA-graph training steps (common.GraphedStep) of gmfc_vae and gan_flow against their eager steps,
    from the same weights (CUDA only). Without random draws (gmfc_vae's pre-training, gan_flow with dropout
    off), warm-up, capture, replays, an eager short batch and replays after it must give the eager losses
    and weights to rounding. With draws (gmfc_vae's VaDE sampling layer, gan_flow's dropout) the step must
    be captured and give finite losses close to the eager ones; whether the draws are the eager run's is
    reported. Then, under the scripts' own settings (cuDNN benchmark; gmfc_vae without TF32), and with
    --amp, each step must be captured. Returns {name: (eager steps/s, graphed steps/s, same draws)}:
    gmfc_vae's VaDE step at batch 100, gan_flow's step of one cGAN at the paper's size, batch 1."""
    import gmfc_vae as gm
    import gan_flow as gf
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, device=device)
    full = [(gm.to_input(patches[i:i + 100]),) for i in range(0, 1000, 100)]
    batches = full[:7] + [(gm.to_input(patches[:30]),)] + full[7:]     # the short batch after 3 replays

    def vae(phase, amp=False):
        def build(capturable):
            model = gm.GMFCVAE().to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=capturable)
            return lambda x: gm.train_step(model, optimizer, x, phase, amp), [optimizer], list(model.parameters())
        return build

    same, _, _ = _same_training(vae("pretrain"), batches, 100)
    assert same, "gmfc_vae pre-training: graphed and eager steps differ"
    same_draws, eager, graphed = _same_training(vae("vade"), batches, 100)
    assert abs(np.mean(graphed) - np.mean(eager)) < 0.05 * abs(np.mean(eager)), (graphed, eager)
    rates = {}
    with _cudnn(benchmark=True, allow_tf32=False):           # gmfc_vae's own settings on CUDA
        rates["gmfc_vae"] = (*_rates(vae("vade"), full, 100, timed_steps), same_draws)
        _train(vae("vade", amp=True), True, batches, 100)

    def pix2pix(size, ngf, dropout, amp=False):
        def build(capturable):
            net = gf.Pix2Pix(1, 3, size, ngf, ngf, dropout).to(device)
            opt_G, opt_D = gf.make_optimizers(net, 2e-4, 0.5, capturable=capturable)
            return (lambda x, y: gf.pix2pix_step(net, opt_G, opt_D, x, y, 100.0, amp), [opt_G, opt_D],
                    list(net.parameters()))
        return build

    pairs = [(torch.rand(1, 1, 64, 64, device=device) * 2 - 1, torch.rand(1, 3, 64, 64, device=device) * 2 - 1)
             for _ in range(8)]
    same, _, _ = _same_training(pix2pix(64, 8, 0.0), pairs, 1)
    assert same, "gan_flow with dropout off: graphed and eager steps differ"
    same_draws, eager, graphed = _same_training(pix2pix(64, 8, 0.5), pairs, 1)
    assert abs(np.mean(graphed) - np.mean(eager)) < 0.2 * abs(np.mean(eager)), (graphed, eager)
    pairs = [(torch.rand(1, 1, 256, 256, device=device) * 2 - 1, torch.rand(1, 3, 256, 256, device=device) * 2 - 1)
             for _ in range(8)]
    with _cudnn(benchmark=True):                              # gan_flow's own settings (TF32 on)
        rates["gan_flow"] = (*_rates(pix2pix(256, 64, 0.5), pairs, 1, timed_steps // 3), same_draws)
        _train(pix2pix(256, 64, 0.5, amp=True), True, pairs, 1)
    return rates
