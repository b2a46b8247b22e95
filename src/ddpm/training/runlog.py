"""What a training run records as it goes: ``log.jsonl``, TensorBoard scalars and the progress bar.

One JSON object per log interval (``step``, mean ``loss`` over the interval's steps with a finite
loss, ``lr``, ``grad_norm`` of the last step, ``skipped_nonfinite`` steps, ``ema_decay``,
``it_per_s``, ``elapsed_s`` (training time, counted on across resumes), ``progress`` (the fraction of
the learning-rate schedule reached: by steps, or by the clock under ``train.max_minutes``; see
``ddpm.training.budget``) and with a time budget ``time_fraction`` (its share used) and, on the CPU, the torch
``threads`` chosen for the load; under fp16 also ``skipped_overflow``, the steps the loss scaler
skipped, and ``loss_scale``), written by rank 0 and flushed at once. NaN/Inf are written as null, so every
line stays JSON that strict parsers (``jq``, JavaScript) accept.

A record falls due every ``train.log_every`` steps (a window) and, off that cadence, when the run
stops (its last step, the time budget, a signal). Such a stop record averages the window so far
but does not close it: the window's sums (``LogWindow``) are saved in every checkpoint, so a
resumed run goes on averaging the same window and its log.jsonl equals the uninterrupted run's
record for record. A resumed run first drops the records after the step it resumes from (a killed
run may have logged steps it never saved, and it redoes them now, so step numbers never repeat; a
line cut short by the kill goes too) and the stop record at that step, which the uninterrupted run
never wrote. TensorBoard is told the same with ``purge_step``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import UserError
from ..io.files import atomic_write_text, open_append, own_dir, refuse_link

__all__ = ["RunLog", "LogWindow"]


class LogWindow:
    """The open log window: summed per step on the device, [loss, non-finite steps, fp16 overflow
    steps], since step ``since`` (the last record on the ``log_every`` cadence). Saved in state.pt
    (``state_dict``) so that a resumed run averages the window the uninterrupted run averages."""

    def __init__(self, device: torch.device | str = "cpu", since: int = 0):
        self.sums = torch.zeros(3, device=device)
        self.since = since

    def state_dict(self) -> dict:
        return {"sums": self.sums.tolist(), "since": self.since}

    def load_state_dict(self, state, path, step: int) -> None:
        sums = state.get("sums") if isinstance(state, dict) else None
        since = state.get("since") if isinstance(state, dict) else None
        ok = (isinstance(sums, list) and len(sums) == 3 and all(_is_number(v) for v in sums)
              and not any(math.isnan(v) for v in sums) and sums[1] >= 0 and sums[2] >= 0
              and isinstance(since, int) and not isinstance(since, bool) and 0 <= since <= step)
        if not ok:
            raise UserError(f"checkpoint {path} is not a usable training state: log_window is not three sums and "
                            f"a step <= {step}")
        # float32, as they were summed: the resumed sums continue bit for bit
        self.sums = torch.tensor(sums, dtype=torch.float32, device=self.sums.device)
        self.since = since


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RunLog:
    """log.jsonl, TensorBoard and the progress bar of one process (files on rank 0 only);
    what needs closing goes on ``stack``."""

    def __init__(self, run_dir: Path, *, rank: int, world: int, step: int, steps: int, progress: bool,
                 window: LogWindow, log_every: int, stack: contextlib.ExitStack, time_fraction: float = 0.0):

        self.world, self.file, self.tb = world, None, None
        if rank == 0:
            path = Path(run_dir) / "log.jsonl"
            # the stop record at ``step`` goes when the window it averaged was carried on (still open)
            _drop_records_after(path, step, keep_stop_record=window.since == step)
            self.file = stack.enter_context(open_append(path))
            self.tb = _tensorboard(Path(run_dir), purge_step=step + 1)
            if self.tb is not None:
                stack.callback(self.tb.close)
        self.bar = stack.enter_context(tqdm(total=steps, initial=step, disable=not progress or rank != 0,
                                            unit="step", dynamic_ncols=True))
        self.window, self.log_every = window, log_every
        self.t_last = time.monotonic()
        self.step_last = self.step_first = step  # for it_per_s: steps of this session only
        self.fraction_first = time_fraction  # of the time budget, used before this session

    def add(self, step_loss: torch.Tensor, flags: torch.Tensor) -> None:
        """Count one step (no host sync): its loss unless ``flags[0]`` (non-finite), and ``flags``
        ([non-finite, fp16 overflow], each 0 or 1)."""
        self.window.sums += torch.cat([torch.where(flags[0] > 0, 0.0, step_loss).view(1), flags])

    def write(self, step: int, lr: float, grad_norm: torch.Tensor, ema_decay: float, *,
              progress: float, elapsed: float, time_fraction: float | None = None, threads: int | None = None,
              loss_scale: float | None = None) -> None:
        """One record of the mean loss over the open window (averaged over ranks: every rank calls
        this); a record on the ``log_every`` cadence closes the window, a stop record leaves it open.
        ``loss_scale`` (fp16 runs) adds it and the overflow count to the record. With a time
        budget (``time_fraction``) the progress bar's total becomes the number of steps the budget
        is projected to allow."""
        w = self.window
        if self.world > 1:
            dist.all_reduce(w.sums)
            w.sums /= self.world  # every rank skipped the same steps: their count survives the mean
            # every rank now holds the same sums, so an open window carried on stays the ranks' mean
        now, steps = time.monotonic(), step - w.since
        loss_sum, skipped, overflow = w.sums.tolist()
        skipped, overflow = round(skipped), round(overflow)
        # Finite losses can still sum past float32's range (a run diverging slowly): null, as for NaN.
        mean_loss = _finite_or_none(loss_sum / (steps - skipped)) if steps > skipped else None
        record = {"step": step, "loss": mean_loss, "lr": lr,
                  "grad_norm": _finite_or_none(float(grad_norm)), "skipped_nonfinite": skipped,
                  "ema_decay": ema_decay, "it_per_s": (step - self.step_last) / max(now - self.t_last, 1e-9),
                  "elapsed_s": elapsed, "progress": progress}
        if threads is not None:  # a budgeted CPU run adapting its threads to the load (ddpm.training.budget)
            record["threads"] = threads
        if time_fraction:
            record["time_fraction"] = time_fraction
            if self.fraction_first < time_fraction < 1:  # at this session's pace, where the budget ends
                projected = self.step_first + (step - self.step_first) * (1 - self.fraction_first) / (
                    time_fraction - self.fraction_first)
                if projected < self.bar.total:  # the clock, not the step count, will end the run
                    self.bar.total = max(step, round(projected))
        if loss_scale is not None:
            record.update(skipped_overflow=overflow, loss_scale=loss_scale)
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm"):
                if record[key] is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], step)
        shown = {"loss": "nan" if record["loss"] is None else f"{record['loss']:.4f}", "lr": f"{lr:.2e}"}
        shown.update({"skipped": skipped} if skipped else {}, **({"overflow": overflow} if overflow else {}))
        self.bar.set_postfix(**shown)
        if step % self.log_every == 0:  # the window closes on the cadence only (see the module docstring)
            w.sums.zero_()
            w.since = step
        self.t_last, self.step_last = now, step


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _drop_records_after(path: Path, step: int, keep_stop_record: bool = True) -> None:
    """Rewrite log.jsonl without records past ``step`` (and without a line cut by a kill); without
    the record at ``step`` too unless ``keep_stop_record``. A symbolic link there is refused before
    it is read (its target's lines would be copied into the run), as ``open_append`` refuses it."""
    refuse_link(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _record_step(line) < step or (keep_stop_record and _record_step(line) == step)]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # unreadable: dropped


def _tensorboard(run_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(own_dir(run_dir / "tb")), purge_step=purge_step)
