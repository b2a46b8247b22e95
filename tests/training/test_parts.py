"""The parts of a training run, each tested alone: ddpm.training.guards (memory check, stop signals,
resource errors), ddpm.training.previews (the run's sampling options, preview grids and scatters),
ddpm.training.runlog (log.jsonl records and their resume) and ddpm.training.data (the training data
checked against the model, class names, batches by index).

Sizes asserted for grids follow from ``ddpm.evaluation.viz.make_grid``'s layout: tiles of H x W with
2 pixels of padding around and between them, so a side of k tiles is k * (H + 2) + 2 pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm.config import DistillConfig, build_model
from ddpm.errors import UserError
from ddpm.training import guards, previews
from ddpm.training.data import get_batch, open_training_data, with_class_names
from ddpm.training.runlog import LogWindow, RunLog
from test_unet import randomized

CPU = torch.device("cpu")


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# -- guards.check_memory ----------------------------------------------------------------------------

def with_free_memory(monkeypatch, free):
    monkeypatch.setattr(guards, "available_memory", lambda device: free)


@pytest.mark.parametrize("overrides, numel", [
    ({}, 1 * 28 * 28),  # the tiny U-Net's items
    ({"data.image_size": 64}, 1 * 64 * 64),  # the data is resized to 64x64 before its shape is compared
    ({"data.image_size": 64, "data.channels": 3}, 3 * 64 * 64),
    ({"data.image_size": (16, 100)}, 1 * 16 * 100),
    ({"data.image_size": 8}, 1 * 28 * 28),  # smaller data: the model's items still count
])
def test_check_memory_refuses_a_batch_of_noise_larger_than_the_free_memory(monkeypatch, tiny, overrides, numel):
    config = tiny(**{"train.batch_size": 8, **overrides})
    need = 8 * numel * 4  # float32 noise of the whole global batch
    with_free_memory(monkeypatch, need)
    guards.check_memory(config, CPU)  # exactly enough is enough
    with_free_memory(monkeypatch, need - 1)
    with pytest.raises(UserError) as e:
        guards.check_memory(config, CPU)
    msg = one_line(e)
    assert f"batch_size 8 of items of {numel} values" in msg and "lower train.batch_size" in msg


def test_check_memory_counts_points_of_a_2d_run(monkeypatch):
    config = ddpm.get_preset("toy2d").override(**{"train.batch_size": 1000})
    with_free_memory(monkeypatch, 1000 * 2 * 4)
    guards.check_memory(config, CPU)
    with_free_memory(monkeypatch, 1000 * 2 * 4 - 1)
    with pytest.raises(UserError, match="of items of 2 values"):
        guards.check_memory(config, CPU)


def test_check_memory_passes_when_the_free_memory_is_unknown(monkeypatch, tiny):
    with_free_memory(monkeypatch, None)
    guards.check_memory(tiny(**{"train.batch_size": 10**12}), CPU)  # no number to compare with: no refusal


def test_an_absurd_batch_is_refused_by_the_real_memory_check_without_allocating(tiny):
    # 1e9 MNIST-sized items need 3.1 TB; the check only multiplies, so it answers at once.
    free = guards.available_memory(CPU)
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        guards.check_memory(tiny(**{"train.batch_size": 10**9}), CPU)
    assert time.monotonic() - t0 < 1.0
    msg = one_line(e)
    assert f"needs {10**9 * 784 * 4 / 1e9:.3g} GB" in msg and "available on cpu" in msg


# -- guards.resource_errors ------------------------------------------------------------------------

@pytest.mark.parametrize("exc, needles", [
    (MemoryError(), ["saving ran out of memory", "lower train.batch_size"]),
    (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nsee the docs"), ["CUDA out of memory. Tried"]),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), ["ran out of memory"]),
    (OSError(errno.ENOSPC, "No space left on device", "/run/ckpt"), ["saving: /run/ckpt: No space left on device"]),
    (OSError(errno.EROFS, "Read-only file system"), ["saving: Read-only file system"]),
    (PermissionError(errno.EACCES, "Permission denied", "/run"), ["saving: /run: Permission denied"]),
])
def test_resource_errors_become_one_line_user_errors(exc, needles):
    with pytest.raises(UserError) as e, guards.resource_errors("saving"):
        raise exc
    msg = one_line(e)
    assert all(n in msg for n in needles), msg
    assert "see the docs" not in msg  # only the first line of a long message


@pytest.mark.parametrize("exc", [RuntimeError("shapes do not match"), FileNotFoundError(errno.ENOENT, "No such file"),
                                 ValueError("bad")])
def test_other_errors_pass_through_resource_errors_unchanged(exc):
    # Bugs and plain missing files are not resource problems: they keep their type and traceback.
    with pytest.raises(type(exc)) as e, guards.resource_errors("saving"):
        raise exc
    assert e.value is exc


# -- guards.stop_signals ----------------------------------------------------------------------------

@contextlib.contextmanager
def recording_handlers():
    """A recording handler on every stop signal while the test runs (the previous ones restored
    after), so a signal that escapes the code under test is seen instead of ending pytest."""
    got = []

    def record(signum, frame):
        got.append(signum)

    before = {s: signal.signal(s, record) for s in guards.STOP_SIGNALS}
    try:
        yield record, got
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def send(sig):
    """Signal this process and give Python the chance to run the handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.02)  # sleep returns early on a signal, after the Python handler ran


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_the_first_stop_signal_is_recorded_and_later_terms_and_hangups_are_ignored(first):
    with recording_handlers() as (_, got), guards.stop_signals() as flag:
        assert flag == [None]
        send(first)
        assert flag[0] == first
        send(signal.SIGTERM)  # a scheduler repeating itself must not cut the save short
        send(signal.SIGHUP)
        assert flag[0] == first
    assert got == []  # the handlers of stop_signals took them, not the previous ones


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_after_a_stop_signal_stops_at_once(first):
    with recording_handlers(), guards.stop_signals() as flag:
        send(first)
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
        assert flag[0] == first


def test_the_previous_handlers_are_restored_also_after_an_error():
    with recording_handlers() as (record, got):
        with pytest.raises(RuntimeError), guards.stop_signals():
            assert all(signal.getsignal(s) is not record for s in guards.STOP_SIGNALS)
            raise RuntimeError("the loop failed")
        assert all(signal.getsignal(s) is record for s in guards.STOP_SIGNALS)
        send(signal.SIGTERM)  # and they really receive the signals again
        assert got == [signal.SIGTERM]


def test_outside_the_main_thread_no_handler_is_set():
    # signal.signal only works in the main thread: elsewhere the flag is yielded and never set.
    seen = {}

    def body():
        before = {s: signal.getsignal(s) for s in guards.STOP_SIGNALS}
        with guards.stop_signals() as flag:
            seen["flag"] = list(flag)
            seen["same"] = all(signal.getsignal(s) is before[s] for s in guards.STOP_SIGNALS)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert seen == {"flag": [None], "same": True}


def test_signal_names():
    assert [guards.signal_name(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == [
        "SIGINT", "SIGTERM", "SIGHUP"]
    assert guards.signal_name(12345) == "signal 12345"


# -- previews ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, variance, clip", [
    ("eps", "fixed_small", True), ("v", "fixed_large", False), ("x0", "fixed_small", False)])
def test_preview_kwargs_are_the_runs_prediction_variance_and_clipping(tiny, prediction, variance, clip):
    config = tiny(**{"diffusion.prediction": prediction, "diffusion.variance": variance,
                     "diffusion.clip_denoised": clip})
    assert previews.preview_kwargs(config) == {"prediction": prediction, "variance": variance, "clip_denoised": clip}


def test_an_analytic_variance_is_previewed_with_fixed_small_until_it_is_estimated(tiny):
    config = tiny(**{"diffusion.variance": "analytic"})
    assert previews.preview_kwargs(config)["variance"] == "fixed_small"
    assert config.diffusion.variance == "analytic"  # the run's config itself is unchanged


def test_a_distilled_run_previews_on_its_grid_spacing(tiny):
    config = dataclasses.replace(tiny(), distill=DistillConfig(teacher="t", teacher_checkpoint="t/ema.safetensors",
                                                               teacher_steps=8, steps=4, iters_per_round=1))
    assert previews.preview_kwargs(config)["spacing"] == "trailing"
    assert "spacing" not in previews.preview_kwargs(tiny())


def model_and_schedule(config, seed=0):
    # Random weights everywhere: the paper's init zeroes the output layer, so that two fresh
    # networks would both predict 0 and be indistinguishable.
    return randomized(build_model(config.model), seed), config.diffusion.make_schedule()


def preview(config, path, model=None, guide=None):
    m, schedule = model_and_schedule(config)
    previews.save_preview(m if model is None else model, schedule, config, path, device=CPU, amp="off", guide=guide)
    return Image.open(path)


@pytest.mark.parametrize("num, cols, rows", [(4, 2, 2), (6, 3, 2), (2, 2, 1), (100, 8, 8)])  # at most 64 images
def test_a_preview_grid_is_a_png_of_ceil_sqrt_columns(tmp_path, tiny, num, cols, rows):
    path = tmp_path / "samples" / "step-0000002.png"  # samples/ does not exist yet
    image = preview(tiny(**{"sample.num": num, "sample.steps": 2}), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.mode == "L"  # one channel: grey
    assert image.size == (cols * 30 + 2, rows * 30 + 2)


def test_previews_are_seeded_by_the_run_seed(tmp_path, tiny):
    # Successive previews of a run draw the same noise, so they show the model's progress alone.
    config = tiny(**{"sample.steps": 2})
    a = np.asarray(preview(config, tmp_path / "a.png"))
    b = np.asarray(preview(config, tmp_path / "b.png"))
    c = np.asarray(preview(config.override(**{"train.seed": 1}), tmp_path / "c.png"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("classes, num, rows, per_class", [(3, 7, 3, 2), (5, 4, 5, 1), (10, 4, 10, 1),
                                                          (2, 64, 2, 32)])
def test_a_conditional_preview_has_one_row_per_class(tmp_path, tiny, monkeypatch, classes, num, rows, per_class):
    config = tiny(**{"model.num_classes": classes, "sample.num": num, "sample.steps": 2, "sample.guidance": 2.5,
                     "diffusion.clip_denoised": False})
    calls = []
    real = previews.sample

    def spy(model, schedule, shape, **kwargs):
        calls.append((shape, kwargs))
        return real(model, schedule, shape, **kwargs)

    monkeypatch.setattr(previews, "sample", spy)
    image = preview(config, tmp_path / "p.png")
    (shape, kwargs), = calls
    assert shape == (rows * per_class, 1, 28, 28)
    # sample i has label i // per_class, at the run's guidance and with the run's sampling options
    assert kwargs["labels"].tolist() == [i // per_class for i in range(rows * per_class)]
    assert kwargs["guidance"] == 2.5 and kwargs["clip_denoised"] is False and kwargs["generator"] == config.train.seed
    # every class, even with fewer samples asked; one sample a class is one row of classes
    assert image.size == ((per_class * 30 + 2, rows * 30 + 2) if per_class > 1 else (rows * 30 + 2, 32))


def test_a_2d_preview_is_a_scatter_of_all_samples(tmp_path, monkeypatch):
    config = ddpm.get_preset("toy2d").override(**{"sample.num": 300, "sample.steps": 2})
    shapes = []
    real = previews.sample
    monkeypatch.setattr(previews, "sample", lambda m, s, shape, **kw: shapes.append(shape) or real(m, s, shape, **kw))
    image = preview(config, tmp_path / "final.png")
    assert shapes == [(300, 2)]  # points are not capped at the 64 images of a grid
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (512, 512)


def test_a_preview_is_autoguided_only_with_a_guide_and_a_scale_other_than_1(tmp_path, tiny):
    config = tiny(**{"sample.steps": 2})
    guide, _ = model_and_schedule(config, seed=1)  # another network than the model's seed-0 one
    plain = np.asarray(preview(config, tmp_path / "plain.png"))
    off = np.asarray(preview(config, tmp_path / "off.png", guide=guide))  # sample.autoguidance 1 = off
    guided = np.asarray(preview(config.override(**{"sample.autoguidance": 3.0}), tmp_path / "on.png", guide=guide))
    assert np.array_equal(plain, off)
    assert not np.array_equal(plain, guided)


# -- runlog -----------------------------------------------------------------------------------------

def strict_records(path):
    """The records of log.jsonl, parsed as strict JSON parsers do (no NaN, no Infinity)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="utf-8").splitlines()]


def open_log(run_dir, stack, *, step=0, steps=100, rank=0, time_fraction=0.0, log_every=1):
    return RunLog(run_dir, rank=rank, world=1, step=step, steps=steps, progress=False, window=LogWindow(CPU, step),
                  log_every=log_every, stack=stack, time_fraction=time_fraction)


def add(log, loss, nonfinite=0, overflow=0):
    log.add(torch.tensor(float(loss)), torch.tensor([float(nonfinite), float(overflow)]))


FIELDS = {"step", "loss", "lr", "grad_norm", "skipped_nonfinite", "ema_decay", "it_per_s", "elapsed_s", "progress"}


def test_each_record_is_one_json_line_with_the_interval_mean_loss(tmp_path):
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack)
        add(log, 1.0), add(log, 3.0)
        log.write(2, 1e-3, torch.tensor(0.5), 0.9, progress=0.02, elapsed=1.5)
        assert len(strict_records(tmp_path / "log.jsonl")) == 1  # flushed at once, before the file closes
        add(log, 5.0), add(log, 6.0), add(log, 7.0)
        log.write(5, 2e-3, torch.tensor(0.25), 0.95, progress=0.05, elapsed=3.0)
    first, second = strict_records(tmp_path / "log.jsonl")
    assert set(first) == set(second) == FIELDS  # no fp16, time-budget or thread fields without them
    assert first["loss"] == 2.0 and second["loss"] == 6.0  # means over each interval's own steps
    assert (first["step"], first["lr"], first["grad_norm"], first["ema_decay"], first["progress"], first["elapsed_s"]) \
        == (2, 1e-3, 0.5, 0.9, 0.02, 1.5)
    assert (second["step"], second["lr"], second["grad_norm"], second["ema_decay"]) == (5, 2e-3, 0.25, 0.95)
    assert first["skipped_nonfinite"] == second["skipped_nonfinite"] == 0
    assert first["it_per_s"] > 0 and second["it_per_s"] > 0


def test_nonfinite_steps_are_counted_and_left_out_and_nan_inf_are_null(tmp_path):
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack)
        add(log, 1.0), add(log, float("nan"), nonfinite=1), add(log, 3.0)
        log.write(3, 1e-3, torch.tensor(float("inf")), 0.9, progress=0.03, elapsed=1.0)
        add(log, float("inf"), nonfinite=1), add(log, float("nan"), nonfinite=1)
        log.write(5, 1e-3, torch.tensor(float("nan")), 0.9, progress=0.05, elapsed=2.0)
    text = (tmp_path / "log.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    first, second = strict_records(tmp_path / "log.jsonl")
    assert (first["loss"], first["skipped_nonfinite"], first["grad_norm"]) == (2.0, 1, None)
    assert (second["loss"], second["skipped_nonfinite"], second["grad_norm"]) == (None, 2, None)  # no finite step


def test_a_finite_loss_too_large_to_sum_in_float32_is_still_written(tmp_path):
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack)
        add(log, 3e38), add(log, 3e38)  # each finite in float32, their sum is not
        log.write(2, 1e-3, torch.tensor(1.0), 0.9, progress=0.02, elapsed=1.0)
    (record,) = strict_records(tmp_path / "log.jsonl")
    assert record["loss"] is None  # the float32 sum overflowed: written as null, not a crash


def test_optional_fields_fp16_time_budget_and_threads(tmp_path):
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack)
        add(log, 1.0), add(log, 2.0, overflow=1), add(log, 3.0, overflow=1)
        log.write(3, 1e-3, torch.tensor(1.0), 0.9, progress=0.4, elapsed=1.0, time_fraction=0.4, threads=2,
                  loss_scale=32768.0)
    (record,) = strict_records(tmp_path / "log.jsonl")
    assert set(record) == FIELDS | {"skipped_overflow", "loss_scale", "time_fraction", "threads"}
    assert (record["skipped_overflow"], record["loss_scale"], record["time_fraction"], record["threads"]) \
        == (2, 32768.0, 0.4, 2)
    assert record["loss"] == 2.0  # overflow steps are finite losses: still in the mean


@pytest.mark.parametrize("step_first, fraction_first, step, fraction, total", [
    (0, 0.0, 10, 0.25, 40),  # 10 steps took a quarter of the budget: 40 in all
    (20, 0.5, 30, 0.75, 40),  # resumed at half the budget: this session's pace, 10 steps per quarter
    (0, 0.0, 10, 0.05, 100),  # projected 200 is more than the steps: the step count ends the run
    (0, 0.0, 10, 1.0, 100),  # the budget is spent: nothing left to project
])
def test_a_time_budget_projects_the_progress_bar_total(tmp_path, step_first, fraction_first, step, fraction, total):
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack, step=step_first, steps=100, time_fraction=fraction_first)
        add(log, 1.0)
        log.write(step, 1e-3, torch.tensor(1.0), 0.9, progress=fraction, elapsed=1.0, time_fraction=fraction)
        assert log.bar.total == total


def test_a_resume_drops_records_past_its_step_and_appends_after_them(tmp_path):
    path = tmp_path / "log.jsonl"
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack)
        for step in (2, 4, 6):
            add(log, step), add(log, step)
            log.write(step, 1e-3, torch.tensor(1.0), 0.9, progress=step / 10, elapsed=float(step))
    kept = path.read_text().splitlines()[:2]
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the run was killed while writing step 8
    with contextlib.ExitStack() as stack:
        log = open_log(tmp_path, stack, step=4)  # the last checkpoint was at step 4
        assert path.read_text().splitlines() == kept  # steps 6 and 8 were never saved: they go
        add(log, 10.0), add(log, 20.0)
        log.write(6, 1e-3, torch.tensor(1.0), 0.9, progress=0.6, elapsed=7.0)
    lines = path.read_text().splitlines()
    assert lines[:2] == kept
    records = strict_records(path)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[-1]["loss"] == 15.0  # the redone step 6's own losses


def test_only_rank_0_writes_files(tmp_path):
    for rank in (1, 0):
        run_dir = tmp_path / f"rank{rank}"
        run_dir.mkdir()
        with contextlib.ExitStack() as stack:
            log = open_log(run_dir, stack, rank=rank)
            add(log, 1.0)
            log.write(1, 1e-3, torch.tensor(1.0), 0.9, progress=0.01, elapsed=1.0)
        assert (run_dir / "log.jsonl").is_file() == (rank == 0)
        assert (run_dir / "tb").exists() == (rank == 0)  # TensorBoard is installed in the test environment


# -- data -------------------------------------------------------------------------------------------

def write_npz(path, images, **extra):
    np.savez(path, images=images, **extra)
    return f"npz:{path}"


def test_open_training_data_returns_the_configured_items(tmp_path, tiny):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8), dtype=np.uint8)
    config = tiny(**{"model.image_size": 8, "data.source": write_npz(tmp_path / "d.npz", images)})
    dataset = open_training_data(config)
    assert tuple(dataset.shape) == (1, 8, 8) and len(dataset) == 5
    batch = get_batch(dataset, torch.tensor([3, 0, 3]))
    # pixels scaled to [-1, 1] as u / 127.5 - 1 (the paper's scaling, section 4)
    expected = torch.from_numpy(images[[3, 0, 3]][:, None].astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)


def test_a_resized_source_fits_the_model(tmp_path, tiny):
    images = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    source = write_npz(tmp_path / "rgb.npz", images)
    config = tiny(**{"model.image_size": 8, "data.source": source, "data.image_size": 8, "data.channels": 1})
    assert get_batch(open_training_data(config), torch.arange(3)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("overrides, found, want", [
    ({"data.image_size": 16}, (1, 16, 16), (1, 28, 28)),
    ({"data.channels": 3}, (3, 28, 28), (1, 28, 28)),
    ({"model.image_size": 32}, (1, 28, 28), (1, 32, 32)),
])
def test_a_source_of_another_shape_is_refused_naming_both_shapes(tiny, overrides, found, want):
    with pytest.raises(UserError) as e:
        open_training_data(tiny(**overrides))
    msg = one_line(e)
    assert f"items of shape {found}" in msg and f"expects {want}" in msg and "'mnist'" in msg


def test_points_of_another_dimension_are_refused():
    with pytest.raises(UserError) as e:
        open_training_data(ddpm.get_preset("toy2d").override(**{"model.dim": 3}))
    assert "items of shape (2,) but the model expects (3,)" in one_line(e)
    assert open_training_data(ddpm.get_preset("toy2d")).shape == (2,)


def test_a_conditional_run_needs_labels_and_their_number(tmp_path, tiny):
    unlabelled = write_npz(tmp_path / "u.npz", np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(UserError) as e:
        open_training_data(tiny(**{"model.num_classes": 2, "data.source": unlabelled}))
    assert "has no labels" in one_line(e)
    with pytest.raises(UserError) as e:
        open_training_data(tiny(**{"model.num_classes": 3}))
    msg = one_line(e)
    assert "has 10 classes but model.num_classes is 3" in msg and "model.num_classes=10" in msg
    labelled = write_npz(tmp_path / "l.npz", np.zeros((4, 28, 28), dtype=np.uint8), labels=np.array([0, 1, 2, 1]))
    dataset = open_training_data(tiny(**{"model.num_classes": 3, "data.source": labelled}))
    assert dataset.get_batch_labels(torch.tensor([2, 3])).tolist() == [2, 1]


def test_a_conditional_run_records_its_class_names_and_refuses_others_on_resume(tmp_path, tiny):
    source = write_npz(tmp_path / "n.npz", np.zeros((3, 28, 28), dtype=np.uint8), labels=np.array([0, 1, 1]),
                       class_names=np.array(["cat", "dog"]))
    config = tiny(**{"model.num_classes": 2, "data.source": source})
    dataset = open_training_data(config)
    named = with_class_names(config, dataset)
    assert named.data.class_names == ("cat", "dog") and config.data.class_names is None
    assert with_class_names(named, dataset) == named  # a resume on the same data
    other = config.override(**{"data.class_names": ["dog", "cat"]})
    with pytest.raises(UserError) as e:
        with_class_names(other, dataset)
    msg = one_line(e)
    assert "cat, dog" in msg and "dog, cat" in msg
    unconditional = tiny(**{"data.source": source})
    assert with_class_names(unconditional, open_training_data(unconditional)).data.class_names is None


def test_get_batch_stacks_items_of_a_dataset_without_get_batch():
    items = [torch.full((2,), float(i)) for i in range(5)]
    assert get_batch(items, torch.tensor([4, 1])).tolist() == [[4.0, 4.0], [1.0, 1.0]]
