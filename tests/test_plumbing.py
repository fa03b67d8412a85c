"""Run plumbing shared by the five scripts: flags, time-boxed slices, resume, RNG state, loss checks, device feeding."""

import contextlib
import io
import random
import shlex
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
from conftest import REPO
from device_checks import check_prefetch, check_to_device


def _parse(argv):
    return common.parse_args(common.build_parser("demo", "demo"), ["--device", "cpu", *argv])


def test_image_size_one_number_is_square_and_two_are_h_w():
    """Catches: one number not duplicated, or H and W swapped."""
    assert _parse(["--image-size", "224"]).image_size == (224, 224)
    assert _parse(["--image-size", "64", "96"]).image_size == (64, 96)
    assert _parse([]).image_size is None


def test_parse_args_flushes_denormals():
    """Catches: denormal floats left on, which slowed CPU training steps of trained models 6x."""
    torch.set_flush_denormal(False)     # before making the denormal: with flushing on it would be 0 at creation
    try:
        tiny = torch.tensor([1e-39], dtype=torch.float32)
        assert (tiny * 1.0).item() != 0.0
        _parse([])
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(True)


@pytest.mark.parametrize("argv", [["--image-size", "1", "2", "3"], ["--image-size", "0"], ["--max-minutes", "0"]])
def test_bad_size_or_budget_is_a_data_error(argv):
    """Catches: three sizes, a zero size or a zero budget accepted silently."""
    with pytest.raises(common.DataError, match=argv[0]):
        _parse(argv)


def test_time_budget_expires_after_its_minutes(monkeypatch):
    """Catches: minutes taken as seconds, or a budget of None that expires."""
    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    budget, unlimited = common.TimeBudget(0.5), common.TimeBudget(None)
    clock[0] += 29.0
    assert not budget.expired()
    clock[0] += 1.0
    assert budget.expired() and budget.elapsed() == pytest.approx(30.0)
    clock[0] += 1e6
    assert not unlimited.expired()


def test_step_rate_leaves_out_the_first_step_and_synchronises(monkeypatch):
    """Catches: the first step counted (its cuDNN autotuning would lower the rate), the timer started before
    it, or a rate read without waiting for the device."""
    clock, synced = [50.0], []
    monkeypatch.setattr(common.time, "time", lambda: clock[0])
    monkeypatch.setattr(common, "synchronize", lambda device: synced.append(clock[0]))
    rate = common.StepRate("cuda")
    clock[0] += 7.0                          # the first step, slow
    rate.step_done()
    for _ in range(4):                       # four more, 0.5 s each
        clock[0] += 0.5
        rate.step_done()
    assert rate.rate() == pytest.approx(4 / 2.0) and synced == [57.0, 59.0]
    single = common.StepRate("cpu")          # one step: its own time, from the StepRate's creation
    clock[0] += 4.0
    single.step_done()
    assert single.rate() == pytest.approx(0.25) and np.isnan(common.StepRate("cpu").rate())


def test_continue_command_adds_resume_once_and_quotes():
    """Catches: --resume appended twice, or arguments with spaces left unquoted."""
    cmd = common.continue_command("/x/stan.py", ["--train", "--out", "runs/a b", "--max-minutes", "9"])
    assert shlex.split(cmd) == ["python", "stan.py", "--train", "--out", "runs/a b", "--max-minutes", "9", "--resume"]
    again = common.continue_command("stan.py", ["--resume"])
    assert shlex.split(again).count("--resume") == 1


def test_resume_checkpoint_missing_starts_fresh_and_says_so(tmp_path, capsys):
    """Catches: a missing checkpoint under --resume raising, or loading without --resume."""
    path = tmp_path / "model.pt"
    assert common.resume_checkpoint(str(path), True) is None
    assert "starting fresh" in capsys.readouterr().out
    common.save_checkpoint(str(path), {"epoch": 3})
    assert common.resume_checkpoint(str(path), False) is None
    assert common.resume_checkpoint(str(path), True)["epoch"] == 3


def test_training_refuses_to_replace_a_checkpoint_without_overwrite(tmp_path):
    """Catches: a fresh training run silently replacing a trained model.pt (also in the default train+test
    mode), or refusing where --resume, --test or --overwrite make it safe."""
    out = tmp_path / "run"
    _parse(["--out", str(out)])                                  # nothing there yet: fine
    out.mkdir()
    common.save_checkpoint(str(out / "model.pt"), {"epoch": 3})
    for argv in (["--train"], []):
        with pytest.raises(common.DataError, match=r"model\.pt exists.*--overwrite"):
            _parse(["--out", str(out), *argv])
    for argv in (["--train", "--resume"], ["--test"], ["--train", "--overwrite"]):
        _parse(["--out", str(out), *argv])


def test_bad_smooth_is_refused_when_parsing(capsys):
    """Catches: a bad --smooth accepted by the scripts' parser and found only by the evaluation after training."""
    assert _parse(["--smooth", "gaussian:2"]).smooth == "gaussian:2"
    with pytest.raises(SystemExit):
        _parse(["--smooth", "gauss:2"])
    assert "gaussian:SIGMA" in capsys.readouterr().err


def test_checkpoint_of_another_method_is_a_data_error(tmp_path):
    """Catches: a model.pt written by another script loaded as this one's (it failed later with a KeyError)."""
    path = str(tmp_path / "model.pt")
    common.save_checkpoint(path, {"args": {"method": "adv3dae"}, "streams": {}})
    assert common.load_checkpoint(path, method="adv3dae")["streams"] == {}
    assert common.load_checkpoint(path)["streams"] == {}
    with pytest.raises(common.DataError, match="written by adv3dae.py, not stan.py"):
        common.load_checkpoint(path, method="stan")
    with pytest.raises(common.DataError, match="not stan.py"):
        common.resume_checkpoint(path, True, method="stan")


def test_help_states_each_default_once():
    """Catches: argparse's "(default: None)" after a help text that already names the real default."""
    text = common.build_parser("demo", "demo").format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 0)" in " ".join(text.split())             # --seed: a real default is still shown


def _draws(sampler, torch_gen):
    return (torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            sampler.random(3).tolist(), torch.rand(3, generator=torch_gen).tolist())


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    """Every source must be restored: leaving out any one of torch, numpy, python or a named generator in
    set_rng_state (or saving a type weights_only refuses) fails here."""
    sampler, torch_gen = np.random.default_rng(7), torch.Generator().manual_seed(11)
    generators = {"sampler": sampler, "dropout": torch_gen}
    common.seed_everything(5)
    _draws(sampler, torch_gen)                     # move every generator off its seed
    buffer = io.BytesIO()
    torch.save({"rng": common.get_rng_state(generators)}, buffer)
    expected = _draws(sampler, torch_gen)
    _draws(sampler, torch_gen)                     # and further on
    buffer.seek(0)
    common.set_rng_state(torch.load(buffer, weights_only=True)["rng"], generators)
    got = _draws(sampler, torch_gen)
    for name, a, b in zip(("torch", "numpy", "python", "sampler", "named torch"), expected, got):
        assert a == b, f"{name} generator not restored"


def test_restore_training_args_copies_and_warns_on_disagreement(capsys):
    """Catches: the command line's value kept instead of the checkpoint's, a warning for a flag left at its
    default, or no warning when a given flag disagrees."""
    parser = common.build_parser("demo", "demo")
    parser.add_argument("--pixel-weight", type=float, default=None)
    args = common.parse_args(parser, ["--device", "cpu", "--test", "--epochs", "3", "--image-size", "96"])
    saved = {"epochs": 10, "image_size": [224, 224], "batch_size": 3, "pixel_weight": 1.0}
    warnings = common.restore_training_args(args, parser, saved, ["epochs", "image_size", "batch_size",
                                                                  "pixel_weight", "not_saved"])
    assert (args.epochs, args.image_size, args.batch_size, args.pixel_weight) == (10, (224, 224), 3, 1.0)
    assert len(warnings) == 2 and "--epochs 3" in warnings[0] and "--image-size 96 96" in warnings[1]
    assert "--epochs 3 ignored" in capsys.readouterr().err
    same = common.parse_args(parser, ["--device", "cpu", "--epochs", "10"])
    assert common.restore_training_args(same, parser, saved, ["epochs"]) == []
    other = common.parse_args(parser, ["--device", "cpu", "--dataset", "ped2"])
    warned = common.restore_training_args(other, parser, {**saved, "dataset": "synthetic"}, ["epochs"])
    assert warned == ["warning: the checkpoint was trained on synthetic; this run uses --dataset ped2"]


def test_loss_monitor_means_and_stops_on_a_nan_between_checks():
    """Catches: a NaN in a step that is not a check step going unnoticed, or means over the wrong count."""
    monitor = common.LossMonitor(every=4)
    for value in (1.0, 2.0, 3.0):
        monitor.add("step", g=torch.tensor(value), d=torch.tensor(2 * value))
    assert monitor.means("epoch 0") == {"g": pytest.approx(2.0), "d": pytest.approx(4.0)}
    monitor.add("step 1", g=torch.tensor(float("nan")))        # not a check step ...
    monitor.add("step 2", g=torch.tensor(1.0))
    monitor.add("step 3", g=torch.tensor(1.0))
    with pytest.raises(common.TrainingError, match="non-finite g loss at or before step 4"):
        monitor.add("step 4", g=torch.tensor(1.0))           # ... but the next check catches it


def test_pad_batch_repeats_the_last_row_to_a_fixed_shape():
    """Catches: zero padding, or the real-row count returned as the padded size."""
    padded, n = common.pad_batch(np.arange(6).reshape(3, 2), 5)
    assert n == 3 and padded.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    tpadded, tn = common.pad_batch(torch.arange(3.0), 4)
    assert tn == 3 and tpadded.tolist() == [0.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        common.pad_batch(np.zeros((6, 2)), 5)


def test_stage_batch_reuses_a_buffer_that_fits():
    """The staging buffer of the CUDA prefetch: every batch's values, shape and dtype come back exactly; a
    smaller batch reuses the buffer, a larger one gets a new one. Catches: a view of the wrong length or
    dtype, the buffer reallocated for every shape, or a stale buffer too small for the batch."""
    rng = np.random.default_rng(3)
    big = rng.integers(0, 255, (4, 6, 5), dtype=np.uint8)
    batches = [big, big[:1].copy(), rng.standard_normal((2, 3)).astype(np.float16),
               torch.arange(6, dtype=torch.float32).reshape(2, 3), rng.integers(0, 255, (5, 6, 5), dtype=np.uint8)]
    read_only = big.copy()
    read_only.flags.writeable = False
    batches.append(read_only)
    buffer, pointers = None, []
    for batch in batches:
        buffer, staged = common.stage_batch(buffer, batch, pin=False)
        want = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))
        assert staged.dtype == want.dtype and torch.equal(staged, want)
        pointers.append(buffer.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2] == pointers[3]    # smaller batches: the same buffer
    assert pointers[4] != pointers[3] and pointers[5] == pointers[4]   # a larger one grows it once


def test_prefetch_to_device_yields_every_batch_in_order_on_cpu():
    """Catches: a dropped last batch, reordering, or a failure on read-only (memmapped) arrays."""
    check_prefetch("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_to_device_yields_every_batch_in_order_on_cuda():
    """Catches: a pinned buffer overwritten while its copy is in flight (wrong data), or a lost batch."""
    check_prefetch("cuda")


def test_host_tensor_shares_or_copies_exactly(tmp_path):
    """Catches: a writeable array copied when it could be shared, a read-only memmap or a non-contiguous
    array taken as is (torch refuses or mis-strides them), values or dtype changed on the way, a pinned copy
    asked for off CUDA, and concat_to_device / to_device losing rows."""
    writeable = np.arange(12, dtype=np.float16).reshape(3, 4)
    shared = common.host_tensor(writeable)
    writeable[0, 0] = 7                                                 # no copy: the tensor sees the change
    assert shared[0, 0].item() == 7 and shared.dtype == torch.float16
    np.save(tmp_path / "m.npy", writeable)
    memmap = np.load(tmp_path / "m.npy", mmap_mode="r")
    copied = common.host_tensor(memmap)
    assert torch.equal(copied, torch.from_numpy(writeable)) and not copied.is_pinned()
    column = common.host_tensor(writeable[:, 1])
    assert column.is_contiguous() and column.tolist() == writeable[:, 1].tolist()
    check_to_device("cpu", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_through_pinned_memory_on_cuda(tmp_path):
    """Catches: a pinned copy that fails on a read-only memmap, or data lost in the asynchronous copy."""
    assert common.host_tensor(np.zeros((2, 3), np.uint8), pin=True).is_pinned()
    check_to_device("cuda", tmp_path)


def _fake_cuda_graphs(monkeypatch, events, capture_fails=False):
    """torch.cuda's streams and graphs replaced by recorders: a step run inside torch.cuda.graph records a
    capture, a replay records 'replay'."""
    stream = lambda *a: SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: events.append("replay")))
    capturing = []

    @contextlib.contextmanager
    def graph(g):
        if capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        capturing.append(True)
        yield
        capturing.pop()
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return lambda x: events.append(("capture" if capturing else "eager", len(x), float(x[0]))) or (x.sum(),)


def test_graphed_step_warms_up_captures_full_batches_and_replays_fresh_inputs(monkeypatch):
    """Catches: a replay that reads stale inputs, a short batch captured (every later full batch would then
    run eagerly), a capture without the replay that runs its step, warm-up calls skipped."""
    events = []
    graphed = common.GraphedStep(_fake_cuda_graphs(monkeypatch, events), [], batch_size=2, warmup=1)
    graphed(torch.tensor([1.0, 0.0]))                      # warm-up, eager
    graphed(torch.tensor([5.0]))                           # short: eager, not captured
    out = graphed(torch.tensor([2.0, 0.0]))                # captured, then replayed
    graphed(torch.tensor([4.0, 0.0]))                      # replayed on the new input
    graphed(torch.tensor([3.0]))                           # short: eager
    assert events == [("eager", 2, 1.0), ("eager", 1, 5.0), ("capture", 2, 2.0), "replay", "replay",
                      ("eager", 1, 3.0)]
    assert float(graphed.static_inputs[0][0]) == 4.0 and out is graphed.static_out


def test_graphed_step_steps_eagerly_after_a_failed_capture(monkeypatch, capsys):
    """Catches: a failed capture that stops training, or one retried (and failing) at every step."""
    events = []
    graphed = common.GraphedStep(_fake_cuda_graphs(monkeypatch, events, capture_fails=True), [], batch_size=2,
                                 warmup=1)
    for value in (1.0, 2.0, 3.0):
        graphed(torch.tensor([value, 0.0]))
    assert events == [("eager", 2, 1.0), ("eager", 2, 2.0), ("eager", 2, 3.0)] and graphed.eager_only
    assert capsys.readouterr().err.count("CUDA-graph capture of the training step failed") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_steps_train_as_the_eager_steps_on_cuda():
    """Catches: a replay that does not update the weights, gradients accumulated across replays, a static
    input not refreshed, a step left uncaptured (gmfc_vae's and gan_flow's common.GraphedStep)."""
    from device_checks import check_graphed_training_step
    rates = check_graphed_training_step("cuda", timed_steps=20)
    assert set(rates) == {"gmfc_vae", "gan_flow"} and all(e > 0 and g > 0 for e, g, _ in rates.values())


def test_fits_on_device_compares_with_a_fraction_of_free_cuda_memory(monkeypatch):
    """Catches: the fraction ignored, total instead of free memory, or True off CUDA."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    assert common.fits_on_device(500, "cuda") and not common.fits_on_device(501, "cuda")
    assert common.fits_on_device(250, "cuda", 0.25) and not common.fits_on_device(251, "cuda", 0.25)
    assert not common.fits_on_device(1, "cpu")


@pytest.mark.parametrize("script", ["stan.py", "gan_flow.py", "deep_anomaly.py", "gmfc_vae.py", "adv3dae.py"])
def test_script_entry_point_reports_bad_input_and_its_peak_memory(script, tmp_path):
    """Each script, run as a user runs it, on a data root without the dataset: one error line naming what is
    missing (exit 2, no traceback), and its peak memory on stdout however it ended.
    Catches: a script's entry point not going through common.run_main, or not asking for the memory line."""
    proc = subprocess.run([sys.executable, script, "--dataset", "ped2", "--data-root", str(tmp_path), "--device",
                           "cpu", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "ped2" in proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("peak memory: ") and "GiB host" in proc.stdout
