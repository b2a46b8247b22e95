"""torch's CPU threads on a shared machine: wait without spinning, and follow the others' load.

Two processes' OpenMP teams on too few cores lose most of their speed: a team of two threads
waits at every barrier for the member whose core another process took, and by default each
waiting thread spins (libgomp: 300,000 rounds) on a core the other process wants. Measured on
this project's 2-core CPU beside one process that keeps a core busy (bench/contention.py,
docs/benchmarks.md): ``ddpm train --preset toy2d`` fell from 61 to 13 steps/s and ``ddpm
sample`` from 29 to 10 images/s, while one thread alone made 44 steps/s and 16 images/s.

- ``quiet_waits()``: before torch loads its OpenMP runtime (the CLI's first act), idle OpenMP
  threads spin 1,000 rounds and then sleep (``GOMP_SPINCOUNT``), giving the core back. No
  result changes; idle speed moved by less than this machine's run-to-run noise (-9% for mnist
  training, +19% for toy2d, 2% for sampling: bench/contention.py). A user's own
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.
- ``LoadFollower``: every ``every`` seconds (a clock, not a step count: at 4 s a step, 50 steps
  are minutes) it measures the cores that *other* processes used (the busy time of the cores this
  process may run on, from /proc/stat, less its own CPU time, over the wall time) and sets torch's
  thread count:
  one fewer when the others use more than the cores left beside our threads plus ``DOWN``, one
  more when they use less than ``UP`` of the core it would take. The gap between the two is the
  hysteresis: a team that shrinks gives the others more CPU, so their load measured after a
  drop reads higher than before it.
- ``follow_load()`` installs one for a block (on the CPU, unless ``OMP_NUM_THREADS`` fixes the
  count: the user's choice wins) and restores the caller's count after; ``tick()`` is the cheap
  call the long loops make (every training step, every sampling step, every NLL timestep).

Changing the count changes no sample (the networks' forward passes give the same bits at any
count: tests/core/test_threads.py), but it can change a training step's low bits (a reduction
over the batch splits by threads), so a step-counted training run, promised bit-exact resume,
keeps its count fixed unless asked (``ddpm train --threads auto``); a budgeted run follows the
load always (the clock drives its rates, so it is not bit-exact anyway).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable

__all__ = ["LoadFollower", "follow_load", "quiet_waits", "tick", "ticking", "current", "SPIN_COUNT"]

SPIN_COUNT = "1000"  # libgomp rounds before a waiting thread sleeps (its default: 300,000)
DOWN, UP = 0.55, 0.75  # see the module docstring; measured in cores
EVERY = 2.0  # seconds between measurements


def quiet_waits(environ=os.environ) -> bool:
    """Make idle OpenMP threads sleep soon instead of spinning; True when set. Must run before
    torch is imported (the runtime reads it once, when it loads); a no-op after, or when the user
    set OMP_WAIT_POLICY or GOMP_SPINCOUNT."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def busy_seconds(stat: str = "/proc/stat", cpus: frozenset[int] | None = None) -> float | None:
    """Seconds the CPUs ``cpus`` (default: those this process may run on) spent busy since boot
    (user, nice, system, irq, softirq, steal), or None. Cores outside the process's affinity are
    left out: load there takes nothing from our threads (a container or ``taskset`` on a larger
    machine)."""
    cpus = frozenset(os.sched_getaffinity(0)) if cpus is None else cpus
    total, found = 0, False
    try:
        with open(stat) as f:
            for line in f:
                name, *values = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                user, nice, system, _idle, _iowait, irq, softirq, steal = ([int(v) for v in values[:8]]
                                                                          + [0] * (8 - len(values[:8])))
                total += user + nice + system + irq + softirq + steal
                found = True
    except (OSError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK") if found else None


class LoadFollower:
    """torch's CPU threads following the load of other processes (see the module docstring).

    ``tick()`` re-measures when ``every`` seconds have passed since the last measurement (else it
    only reads the clock); ``update()`` re-measures now. The count stays between 1 and
    ``most`` (default: the count torch had when the follower was made, so a lower count the user
    set is a ceiling). The clocks and the thread setter are parameters for tests."""

    def __init__(self, cores: int | None = None, *, most: int | None = None, every: float = EVERY,
                 busy_seconds: Callable[[], float | None] = busy_seconds,
                 own_seconds: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 get_threads: Callable[[], int] | None = None, set_threads: Callable[[int], None] | None = None):
        import torch

        self.cores = cores or len(os.sched_getaffinity(0))
        self.threads = (get_threads or torch.get_num_threads)()
        self.most = max(1, min(most or self.threads, self.cores))
        self.every = every
        self._busy, self._own, self._clock = busy_seconds, own_seconds, clock
        self._set = set_threads or torch.set_num_threads
        self._last = self._sample()
        self.others: float | None = None  # the others' cores at the last measurement

    def _sample(self):
        return self._busy(), self._own(), self._clock()

    def tick(self) -> int:
        """The thread count, re-measured if ``every`` seconds have passed."""
        if self._clock() - self._last[2] >= self.every:
            return self.update()
        return self.threads

    def update(self) -> int:
        """Re-measure the others' load and set the thread count; returns it."""
        now, last = self._sample(), self._last
        self._last = now
        if now[0] is None or last[0] is None or now[2] - last[2] <= 0:
            return self.threads  # /proc/stat unreadable: keep the count
        others = max(0.0, ((now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2]))
        self.others = others
        n = self.threads
        free = self.cores - n  # cores our team leaves to the others
        if n > 1 and others > free + DOWN:
            n = max(1, min(n - 1, self.cores - int(others - DOWN + 1)))  # as many fewer as they took
        elif n < self.most and others < free - 1 + UP:
            n += 1
        if n != self.threads:
            self._set(n)
            self.threads = n
        return n


_current: LoadFollower | None = None


def current() -> LoadFollower | None:
    """The follower ``follow_load`` installed, if any."""
    return _current


def tick() -> int | None:
    """Let the installed follower re-measure if its time has come; the thread count (None: none)."""
    return _current.tick() if _current is not None else None


def ticking(then: Callable[[int], object] | None = None) -> Callable[[int], None]:
    """An ``on_call(batch)`` hook for ``device.autocast_model``: ``tick()``, then ``then(batch)``
    (a progress bar's update) if given."""
    def on_call(n: int) -> None:
        tick()
        if then is not None:
            then(n)
    return on_call


@contextlib.contextmanager
def follow_load(enabled: bool = True, device=None):
    """Follow the others' load inside the block (see the module docstring): a no-op when not
    ``enabled``, off the CPU, when OMP_NUM_THREADS is set, or inside another ``follow_load``.
    The caller's thread count is restored after."""
    global _current
    import torch

    if (not enabled or _current is not None or "OMP_NUM_THREADS" in os.environ
            or (device is not None and torch.device(device).type != "cpu")):
        yield _current
        return
    before = torch.get_num_threads()
    _current = LoadFollower()
    try:
        yield _current
    finally:
        _current = None
        torch.set_num_threads(before)
