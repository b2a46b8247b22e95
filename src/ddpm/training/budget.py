"""The learning-rate schedule and the wall-clock budget that can drive it.

A run's schedule is defined by its *progress*, a fraction from 0 to 1. Without a time budget it
is the share of ``train.steps`` done, as in every step-counted recipe. With ``train.max_minutes``
the run ends when the budget is spent, which on a slow or busy machine comes before the last
step: a decay defined by steps alone is then cut off part-way (a loaded 2-core CPU stopped the
``mnist`` recipe at step 3,586 of 5,000 with the rate still at 28% of its peak). So with a budget
the progress is the larger of the step share and the share of the budget used, and whichever
limit is reached first, the decay has finished when it is.

The budget counts the run's training time across resumes (``TimeBudget.state_dict`` goes into
every checkpoint), so a resumed run continues its decay where it stopped. Because the clock
drives the rate, a budgeted run is not reproducible bit for bit (its rates depend on the
machine's speed; log.jsonl records the progress reached at every record); leave ``max_minutes``
unset for a step-exact run.

The EMA needs no clock: the recipes' warm-up ``(1 + t) / (w + t)`` averages over about the last
``1 / (w - 1)`` of the steps taken, however many the budget allowed.

A budgeted run on the CPU also lets its torch threads follow the load of other processes
(``ddpm.core.threads``): two processes each running one OpenMP thread per core on a 2-core
machine wait at each other's barriers (two ``mnist`` runs at once made 1.1 steps/s each, against
5.3 for one alone, and 3.9 each with one thread apiece). ``OMP_NUM_THREADS`` fixes the count.
"""

from __future__ import annotations

import math
import time

from ..errors import UserError

__all__ = ["TimeBudget", "lr_at", "schedule_progress", "step_progress"]


class TimeBudget:
    """The wall-clock budget of a run (``minutes``; None: no budget) and its use so far.

    ``elapsed()`` is the training time of this session plus that of the sessions before it
    (restored with ``load_state_dict``); ``fraction()`` is its share of the budget (0 without one).
    """

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.before = 0.0  # seconds used by earlier sessions of the run
        self.t_start = time.monotonic()

    def start(self) -> None:
        self.t_start = time.monotonic()

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.t_start

    def fraction(self) -> float:
        return 0.0 if self.minutes is None else self.elapsed() / (60 * self.minutes)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state, path) -> None:
        seconds = state.get("elapsed_s") if isinstance(state, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise UserError(f"checkpoint {path} is not a usable training state: time_budget.elapsed_s "
                            f"{seconds!r} is not a number of seconds")
        self.before = float(seconds)


def step_progress(config, step: int) -> float:
    """The share of the decay phase (after ``optim.warmup``) that ``step`` has reached by steps."""
    o, steps = config.optim, config.train.steps
    return min(1.0, max(0.0, (step - o.warmup) / max(1, steps - o.warmup)))


def schedule_progress(config, step: int, time_fraction: float = 0.0) -> float:
    """The schedule's progress: the larger of the step share and the budget share, at most 1."""
    return min(1.0, max(step_progress(config, step), time_fraction))


def lr_at(config, step: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up over ``optim.warmup`` steps, then constant or cosine decay to
    ``min_lr_ratio * lr`` over ``schedule_progress``."""
    o = config.optim
    if o.warmup and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.decay == "constant":
        return o.lr
    p = schedule_progress(config, step, time_fraction)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
