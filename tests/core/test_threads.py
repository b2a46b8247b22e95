"""ddpm.core.threads: the load follower's rule, its clock, polite OpenMP waits, and that a
changing thread count changes no sample."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ddpm
from ddpm.config import MLPConfig
from ddpm.core import threads
from ddpm.core.schedules import NoiseSchedule
from ddpm.nets.mlp import MLPDenoiser
from ddpm.nets.unet import UNet


class Machine:
    """A fake machine: the follower's clocks and thread setter, advanced by hand."""

    def __init__(self, threads_now: int = 2):
        self.busy, self.own, self.t, self.threads, self.calls = 0.0, 0.0, 0.0, threads_now, []

    def run(self, seconds: float, others: float, own: float | None = None):
        """``seconds`` pass; other processes use ``others`` cores, we use ``own`` (default: our threads)."""
        own = self.threads if own is None else own
        self.t += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds

    def follower(self, cores: int = 2, **kw) -> threads.LoadFollower:
        def set_threads(n):
            self.calls.append(n)
            self.threads = n
        return threads.LoadFollower(cores, busy_seconds=lambda: self.busy, own_seconds=lambda: self.own,
                                    clock=lambda: self.t, get_threads=lambda: self.threads,
                                    set_threads=set_threads, **kw)


def test_the_follower_gives_a_core_up_under_load_and_takes_it_back():
    m = Machine()
    f = m.follower()
    m.run(2, others=0.05)  # alone but for a little kernel noise
    assert f.tick() == 2 and m.calls == []
    m.run(2, others=0.4)  # a job at half a core: two threads are still faster (bench/contention.py)
    assert f.tick() == 2
    m.run(2, others=0.67, own=1.33)  # a job that keeps a core busy, sharing the two cores with our two threads
    assert f.tick() == 1 and m.calls == [1]
    m.run(2, others=1.0)  # still there: with one thread we leave it its core, and it uses all of it
    assert f.tick() == 1
    m.run(2, others=0.6, own=1)  # it now wants less than 3/4 of the core our second thread would take
    assert f.tick() == 2 and m.calls == [1, 2]


def test_the_follower_looks_on_a_clock_not_at_every_call():
    m = Machine()
    f = m.follower(every=2.0)
    m.run(1.5, others=1.0, own=1.0)
    assert f.tick() == 2 and f.others is None  # 1.5 s: not yet measured
    m.run(1.0, others=1.0, own=1.0)
    assert f.tick() == 1 and f.others == pytest.approx(1.0)  # 2.5 s: measured over the whole window
    m.busy = None  # /proc/stat unreadable: the count is kept
    m.t += 3
    assert f.update() == 1


def test_the_follower_on_many_cores_drops_what_the_others_took_and_keeps_the_users_ceiling():
    m = Machine(threads_now=8)
    f = m.follower(cores=8)
    m.run(2, others=2.3, own=5.7)
    assert f.tick() == 6  # 8 - ceil(2.3 - 0.55)
    m = Machine(threads_now=3)  # the user set 3 threads on 8 cores: never more than that
    f = m.follower(cores=8)
    for _ in range(3):
        m.run(2, others=0.0)
        assert f.tick() == 3
    assert m.calls == []


def test_follow_load_installs_one_follower_restores_the_count_and_yields_to_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with threads.follow_load() as f:
        assert threads.current() is f and f is not None
        with threads.follow_load() as inner:  # nested: the outer one goes on
            assert inner is f
        torch.set_num_threads(1)
    assert threads.current() is None and torch.get_num_threads() == before
    assert threads.tick() is None
    with threads.follow_load(device="cuda") as f:  # off the CPU: nothing to follow
        assert f is None and threads.current() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's count wins
    with threads.follow_load() as f:
        assert f is None


def test_quiet_waits_is_set_by_the_cli_before_torch_loads_unless_the_user_chose():
    code = ("import os, sys\nfrom ddpm.cli.main import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", threads.SPIN_COUNT]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", "None"]
    assert not threads.quiet_waits({})  # torch is loaded in this process: too late, nothing set


@pytest.mark.parametrize("name", ["mlp", "unet-f32", "unet-bf16"])
def test_a_thread_count_that_changes_at_every_network_call_changes_no_sample(name):
    # what lets sampling and evaluation follow the load without breaking "an image depends only on its seed"
    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=2)) if name == "mlp" else UNet.from_preset("tiny")
    shape = (512, 2) if name == "mlp" else (6, 1, 28, 28)
    schedule = NoiseSchedule.from_name("linear", 1000)
    before = torch.get_num_threads()
    calls = []

    def flipping(x, t, *args, **kwargs):
        torch.set_num_threads(1 + len(calls) % 2)
        calls.append(1)
        return net(x, t, *args, **kwargs)

    def draw(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "unet-bf16"):
            return ddpm.sample(model, schedule, shape, sampler="ddpm", steps=8, generator=torch.Generator().manual_seed(3))

    try:
        torch.set_num_threads(2)
        fixed = draw(net)
        flipped = draw(flipping)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 8
    assert torch.equal(fixed, flipped)


def test_busy_seconds_counts_only_the_cores_this_process_may_use(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 900 5000 0 0 0 0 0 0\n"
                    "cpu0 100 0 50 1000 7 0 0 0 0 0\n"
                    "cpu1 200 5 20 1000 0 1 2 3 0 0\n"
                    "cpu2 600 0 830 3000 0 0 0 0 0 0\n"  # a core of the host we may not run on
                    "intr 12345\n")
    assert threads.busy_seconds(str(stat), cpus=frozenset({0, 1})) == pytest.approx((150 + 231) / hz)
    assert threads.busy_seconds(str(stat), cpus=frozenset({2})) == pytest.approx(1430 / hz)
    assert threads.busy_seconds(str(stat), cpus=frozenset({7})) is None  # none of ours listed
    assert threads.busy_seconds(str(tmp_path / "missing")) is None
    assert threads.busy_seconds() is not None  # this machine's own /proc/stat
