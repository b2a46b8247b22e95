"""The training loop: exact resume, accumulation, flips, time budget, Ctrl-C, clean-up on a crash,
schedules, periodic evaluation, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from ddpm.training.budget import TimeBudget
from ddpm.training.budget import lr_at as _lr_at
from ddpm.io.checkpoint import list_checkpoints
from ddpm.io.run import load
from ddpm.config import TrainConfig
from ddpm.data.sources import open_source
from ddpm.errors import UserError
from ddpm.data.loader import IndexStream
from ddpm.presets import get_preset
from ddpm.training.loop import _ema_decay_at, train
from ddpm.nets.unet import UNet


def weights(run_dir, step, name="model"):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def assert_same_tensors(a: dict, b: dict, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def optimizer_tensors(run_dir, step):
    state = torch.load(run_dir / f"ckpt-{step:07d}" / "state.pt", weights_only=True)
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


@contextlib.contextmanager
def network_inputs(raise_at_call=None):
    """Record the x_t of every training forward of a U-Net (a global forward pre-hook, so the
    network under test is the one ``train`` builds); optionally raise at call ``raise_at_call``.
    Previews run under no_grad and are not recorded."""
    seen = []

    def hook(module, args):
        if isinstance(module, UNet) and torch.is_grad_enabled():
            if len(seen) == raise_at_call:
                raise RuntimeError(f"network failed at training forward {raise_at_call}")
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny):
    # Dropout on, so the restored RNG state matters too.
    config = tiny(**{"model.dropout": 0.1, "train.steps": 6, "train.ckpt_every": 3})
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": 3}), out=tmp_path / "split")
    split = train(config, out=tmp_path / "split", resume=True)
    for name in ("model", "ema"):
        assert_same_tensors(weights(straight, 6, name), weights(split, 6, name))
    assert_same_tensors(optimizer_tensors(straight, 6), optimizer_tensors(split, 6))
    # and training did move the weights between the two checkpoints
    w3, w6 = weights(straight, 3), weights(straight, 6)
    assert any(not torch.equal(w3[k], w6[k]) for k in w3)


def test_a_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path, tiny):
    # The stop at step 3 falls inside the window of steps 1-4 (log_every 4): the resumed run must
    # average steps 1-4 for its record at step 4, not 4 alone, and drop the stop record at 3.
    config = tiny(**{"model.dropout": 0.1, "train.steps": 10, "train.ckpt_every": 3, "train.log_every": 4})
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": 3}), out=tmp_path / "split")
    assert [r["step"] for r in read_log(tmp_path / "split")] == [3]  # the stop record
    split = train(config, out=tmp_path / "split", resume=True)
    a, b = read_log(straight), read_log(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8, 10]
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "skipped_nonfinite", "ema_decay", "progress"):
            assert ra[key] == rb[key], (ra["step"], key)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny):
    full = train(tiny(**{"train.steps": 2, "train.ckpt_every": 0}), out=tmp_path / "full")
    accum = train(tiny(**{"train.steps": 2, "train.ckpt_every": 0, "train.grad_accum": 2}), out=tmp_path / "accum")
    assert_same_tensors(weights(full, 2), weights(accum, 2), exact=False, atol=1e-6)


def test_time_budget_stops_with_checkpoint_and_final_grid(tmp_path, tiny):
    run_dir = train(tiny(**{"train.steps": 1000, "train.max_minutes": 1e-9}), out=tmp_path / "r")
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]
    assert (run_dir / "samples" / "final.png").is_file()


def test_hflip_mirrors_a_random_half_of_the_batch_and_nothing_without_it(tmp_path, tiny):
    # With betas of 1e-10, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is x0 to within 1e-4, so
    # the network's input shows which x0 it was given: the stored image or its mirror image.
    flat = {"diffusion.timesteps": 2, "diffusion.linear_start": 1e-10, "diffusion.linear_end": 1e-10,
            "sample.steps": 2, "train.steps": 3, "train.ckpt_every": 0}
    data = open_source("mnist")

    def mirrored_per_item(hflip):
        config = tiny(**flat, **{"data.hflip": hflip})
        with network_inputs() as seen:
            train(config, out=tmp_path / f"hflip-{hflip}")
        stream = IndexStream(len(data), config.train.batch_size, config.train.seed)
        mirrored = []
        for step, x_t in enumerate(seen):
            x0 = data.get_batch(stream.batch(step))
            as_stored = (x_t - x0).abs().amax(dim=(1, 2, 3)) < 1e-3
            as_mirror = (x_t - x0.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-3
            assert torch.all(as_stored ^ as_mirror), f"step {step}: an input is neither the item nor its mirror"
            mirrored.append(as_mirror)
        assert len(mirrored) == 3
        return torch.stack(mirrored)

    flipped = mirrored_per_item(True)
    assert 0 < int(flipped.sum()) < flipped.numel()  # some items mirrored, some not: a coin per item
    assert len({tuple(m.tolist()) for m in flipped}) > 1  # fresh coins every step, not a fixed pattern
    assert not mirrored_per_item(False).any()


def test_fast_paths_and_toy_data_train(tmp_path, tiny):
    # channels_last weights are saved contiguous and load back into a plain model; bf16 autocast
    fast = train(tiny(**{"train.steps": 2, "train.channels_last": True, "train.amp": "bf16"}), out=tmp_path / "fast")
    run = load(fast)
    assert run.step == 2 and all(torch.isfinite(v).all() for v in run.model.state_dict().values())
    toy = get_preset("toy2d").override(**{"train.steps": 3, "train.batch_size": 32, "train.progress": False,
                                           "train.ckpt_every": 0, "sample.num": 50, "sample.steps": 3})
    run_dir = train(toy, out=tmp_path / "toy")
    run = load(run_dir)
    assert run.shape == (2,) and (run_dir / "samples" / "final.png").is_file()


def test_ctrl_c_in_a_real_process_saves_a_checkpoint_exits_130_and_resumes(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "ddpm", "train", "--preset", "tiny", "--steps", "100000", "--ckpt-every", "0",
           "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        log, deadline = out / "log.jsonl", time.monotonic() + 120
        while not (log.is_file() and log.read_text().strip()):  # the loop runs: its handler is installed
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no log record within 120 s"
            time.sleep(0.05)
        logged = json.loads(log.read_text().splitlines()[-1])["step"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    stopped = re.search(r"interrupted at step (\d+)", err)
    assert stopped and "--resume" in err and "Traceback" not in err, err
    step = int(stopped.group(1))
    # the step in flight completes, then a checkpoint of exactly that step is saved (the only one)
    assert step >= logged and [s for s, _ in list_checkpoints(out)] == [step]
    saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    train(saved.override(**{"train.steps": step + 2}), out=out, resume=True)
    assert load(out).step == step + 2
    # and its log has no seam: record for record the uninterrupted run's
    straight = train(saved.override(**{"train.steps": step + 2}), out=tmp_path / "straight")
    keys = ("step", "loss", "lr", "grad_norm", "skipped_nonfinite")  # (progress is a share of each run's --steps)
    assert [[r[k] for k in keys] for r in read_log(out)] == [[r[k] for k in keys] for r in read_log(straight)]


def test_a_crash_inside_the_loop_closes_every_resource(tmp_path, tiny, capsys):
    run_dir = tmp_path / "r"
    config = tiny(**{"train.steps": 10, "train.num_workers": 2, "train.progress": True, "train.log_every": 1})
    handler_before = signal.getsignal(signal.SIGINT)
    with network_inputs(raise_at_call=2), pytest.raises(RuntimeError, match="training forward 2") as info:
        train(config, out=run_dir)
    # ``info`` still holds the traceback and with it the loop's frame, so nothing below has been
    # closed by garbage collection: only the loop's own clean-up can have closed it.
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ddpm-data") and t.is_alive()]
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert capsys.readouterr().err.endswith("\n")  # the progress bar was closed: it ended its line
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 2  # steps 1 and 2, flushed
    if os.path.isdir("/proc/self/fd"):  # Linux: no file under the run directory is left open
        open_files = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert not [f for f in open_files if f.startswith(str(run_dir))], open_files


def test_lr_warmup_cosine_and_ema_warmup():
    c = get_preset("mnist").override(**{"train.steps": 1100, "optim.warmup": 100, "optim.lr": 1e-3,
                                      "optim.decay": "cosine", "optim.min_lr_ratio": 0.1})
    assert _lr_at(c, 0) == pytest.approx(1e-5) and _lr_at(c, 99) == pytest.approx(1e-3)
    assert _lr_at(c, 100) == pytest.approx(1e-3)
    assert _lr_at(c, 600) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert _lr_at(c, 1100) == pytest.approx(1e-4)
    assert _ema_decay_at(c, 0) == pytest.approx(1 / 10) and _ema_decay_at(c, 10**6) == 0.999
    c = c.override(**{"train.ema_warmup": 0})
    assert _ema_decay_at(c, 0) == 0.999


def test_the_clock_drives_the_decay_when_it_is_ahead_of_the_steps():
    c = get_preset("mnist").override(**{"train.steps": 1100, "optim.warmup": 100, "optim.lr": 1e-3,
                                      "optim.decay": "cosine", "optim.min_lr_ratio": 0.1})
    at = lambda p: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    assert _lr_at(c, 200, time_fraction=0.5) == pytest.approx(at(0.5))  # the clock ahead: it decides
    assert _lr_at(c, 600, time_fraction=0.2) == pytest.approx(at(0.5))  # the steps ahead: they decide
    assert _lr_at(c, 200, time_fraction=1.7) == pytest.approx(1e-4)  # a spent budget: the floor, not past it
    assert _lr_at(c, 50, time_fraction=0.9) == pytest.approx(1e-3 * 51 / 100)  # the warm-up is counted in steps
    with pytest.raises(UserError, match="elapsed_s"):
        TimeBudget(1.0).load_state_dict({"elapsed_s": float("nan")}, "state.pt")


def test_a_budgeted_cpu_run_without_omp_num_threads_records_its_threads_and_restores_them(
        tmp_path, tiny, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    run = train(tiny(**{"train.steps": 10**6, "train.max_minutes": 0.5 / 60, "train.log_every": 1,
                        "train.ckpt_every": 0}), out=tmp_path / "r")
    threads = [r["threads"] for r in read_log(run)]
    assert threads and all(1 <= n <= len(os.sched_getaffinity(0)) for n in threads)
    assert torch.get_num_threads() == before


def test_a_step_counted_run_keeps_its_thread_count_unless_asked(tmp_path, tiny, monkeypatch):
    # bit-exact resume needs a fixed count (a reduction over the batch splits by threads), so only
    # threads="auto" makes a step-counted run follow the load; an integer fixes the count.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    config = tiny(**{"train.steps": 3, "train.log_every": 1, "train.ckpt_every": 0})
    fixed = train(config, out=tmp_path / "fixed")
    assert [r.get("threads") for r in read_log(fixed)] == [None] * 3  # not following: not recorded
    follow = train(config, out=tmp_path / "follow", threads="auto")
    assert all(1 <= r["threads"] <= before for r in read_log(follow))
    from ddpm.training import loop

    seen, real = [], loop._optimizer_step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", spy)
    train(config, out=tmp_path / "one", threads=1)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
    for bad in (0, -2, "many", True):
        with pytest.raises(UserError, match="threads must be 'auto' or a count"):
            train(config, out=tmp_path / f"bad-{bad}", threads=bad)
        assert not (tmp_path / f"bad-{bad}").exists()  # refused before anything is written


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_time_budgeted_run_finishes_its_decay_and_a_resume_continues_the_budget(tmp_path, tiny):
    # 10**6 steps could never finish in 2 s: without the clock the rate would barely move.
    c = tiny(**{"train.steps": 10**6, "train.max_minutes": 2 / 60, "train.log_every": 1, "train.ckpt_every": 0,
                "optim.decay": "cosine", "optim.min_lr_ratio": 0.1})
    run = train(c, out=tmp_path / "r")
    records = read_log(run)
    step = records[-1]["step"]
    assert 10 < step < 10**6 and [s for s, _ in list_checkpoints(run)] == [step]
    assert records[-1]["progress"] == 1.0 and records[-1]["time_fraction"] > 1  # stopped by the clock
    assert records[-1]["elapsed_s"] >= 2
    after_warmup = [r["lr"] for r in records[2:]]
    assert after_warmup == sorted(after_warmup, reverse=True)  # decaying all the way
    assert after_warmup[-1] < 1e-3 * 0.15  # down to the floor's neighbourhood (0.1 of the peak) by the end
    progress = [r["progress"] for r in records]
    assert progress == sorted(progress) and progress[len(progress) // 2] > 0.2  # the clock, not the steps
    state = torch.load(run / f"ckpt-{step:07d}" / "state.pt", weights_only=True)
    assert state["time_budget"]["elapsed_s"] >= 2
    assert "threads" not in records[-1]  # OMP_NUM_THREADS (set by conftest) fixes the thread count

    with pytest.raises(UserError, match="already used its 0.0333333-minute budget"):
        train(c, out=run, resume=True)
    train(c.override(**{"train.max_minutes": 4 / 60}), out=run, resume=True)
    resumed = [r for r in read_log(run) if r["step"] > step]
    assert resumed and resumed[0]["time_fraction"] > 0.5  # the first session's 2 s count against the budget
    assert resumed[0]["lr"] < 1e-3 * 0.6 and resumed[-1]["progress"] == 1.0
    assert resumed[-1]["elapsed_s"] < records[-1]["elapsed_s"] + 4  # ~2 s more: the 4 s budget in all


def test_periodic_eval_runs_every_n_steps_when_asked_and_is_off_by_default(tmp_path):
    base = {"train.steps": 4, "train.batch_size": 32, "train.progress": False, "train.ckpt_every": 0,
            "train.sample_every": 0, "sample.num": 16, "sample.steps": 2}
    off = train(get_preset("toy2d").override(**base), out=tmp_path / "off")
    assert not (off / "eval").exists()

    on = get_preset("toy2d").override(**base, **{"eval.every": 2, "eval.num": 64, "eval.steps": 3,
                                                  "eval.nll_timesteps": 2})
    run_dir = train(on, out=tmp_path / "on")
    records = [json.loads(line) for line in (run_dir / "eval" / "periodic.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["toy"]["num_samples"] == 64 and math.isfinite(r["nll"]["bpd"])
    with pytest.raises(ValueError, match="periodic metric"):
        get_preset("toy2d").override(**{"eval.metrics": ["psnr"]})


def test_tensorboard_scalars_match_the_jsonl_log(tmp_path, tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny(**{"train.steps": 6, "train.log_every": 2, "train.sample_every": 0}), out=tmp_path / "r")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [r["step"] for r in records] == [2, 4, 6]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in records], rel=1e-6)


def _scaler(**kwargs):
    """optim.make_grad_scaler with GradScaler options (enabled for fp16, as the original)."""
    def make(amp, device):
        return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16", **kwargs)
    return make


def test_fp16_resume_restores_the_loss_scale_bit_for_bit(tmp_path, tiny, monkeypatch):
    # growth every step: the scale at the resume point differs from a fresh scaler's
    monkeypatch.setattr("ddpm.training.optim.make_grad_scaler", _scaler(growth_interval=1))
    config = tiny(**{"train.amp": "fp16", "train.steps": 6, "train.ckpt_every": 3})
    straight = train(config, out=tmp_path / "straight")
    train(config.override(**{"train.steps": 3}), out=tmp_path / "split")
    split = train(config, out=tmp_path / "split", resume=True)
    saved = torch.load(split / "ckpt-0000003" / "state.pt", weights_only=True)["grad_scaler"]
    assert saved["scale"] != 65536.0  # grown (and halved after overflows): not a fresh scaler's
    for name in ("model", "ema"):
        assert_same_tensors(weights(straight, 6, name), weights(split, 6, name))
    assert torch.load(split / "ckpt-0000006" / "state.pt", weights_only=True)["grad_scaler"] == \
        torch.load(straight / "ckpt-0000006" / "state.pt", weights_only=True)["grad_scaler"]


def test_fp16_overflow_skips_are_logged_and_are_not_divergence(tmp_path, tiny, monkeypatch):
    # a scale of 2^40 overflows fp16 gradients until the scaler has halved it far enough
    monkeypatch.setattr("ddpm.training.optim.make_grad_scaler", _scaler(init_scale=2.0**40))
    config = tiny(**{"train.amp": "fp16", "train.steps": 30, "train.log_every": 1, "train.ckpt_every": 0,
                     "train.max_nonfinite": 1})
    run_dir = train(config, out=tmp_path / "r")  # no TrainingDiverged although max_nonfinite is 1
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    overflow = [r["skipped_overflow"] for r in records]
    assert overflow[0] == 1 and 0 < sum(overflow) < 30 and overflow[-1] == 0
    assert all(r["skipped_nonfinite"] == 0 and r["loss"] > 0 for r in records)
    scales = [r["loss_scale"] for r in records]
    assert scales[0] == 2.0**39 and scales[-1] == 2.0**40 / 2**sum(overflow)  # halved once per overflow
    state = torch.load(run_dir / "ckpt-0000030" / "state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] == scales[-1]
    # only the applied steps moved Adam
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {30.0 - sum(overflow)}
