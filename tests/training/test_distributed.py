"""Two gloo processes under torchrun train the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpm.presets import get_preset
from ddpm.training.loop import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endless_gloo_run(out, *, ckpt_every: int) -> subprocess.Popen:
    """``ddpm train --preset tiny`` with two gloo ranks under torchrun, running until stopped."""
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ddpm", "train", "--preset", "tiny", "--no-progress",
           "--steps", "100000", "--ckpt-every", str(ckpt_every), "--device", "cpu", "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def launcher(name: str) -> list[str]:
    """The command that starts two CPU processes: torchrun, or accelerate launch the way that works
    on a CPU (without --multi_gpu, accelerate starts one process; README, "Many GPUs")."""
    if name == "torchrun":
        pytest.importorskip("torch.distributed.run")
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    pytest.importorskip("accelerate", reason="accelerate is not installed (an optional launcher)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_two_gloo_ranks_match_one_process(tmp_path, launch):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    steps, batch = 3, 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launcher(launch) + ["-m", "ddpm", "train", "--preset", "tiny", "--no-progress",
                              "--steps", str(steps), "--batch-size", str(batch), "--device", "cpu", "--out",
                              str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes (gloo)" in proc.stdout and proc.stdout.count("run finished") == 1  # rank 0 speaks

    config = get_preset("tiny").override(**{"train.steps": steps, "train.batch_size": batch, "train.device": "cpu"})
    single = train(config, out=tmp_path / "single")

    ckpt = f"ckpt-{steps:07d}"
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "ddp" / ckpt / f"{name}.safetensors"))
        b = load_file(str(single / ckpt / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            # Gradients agree to float rounding (all-reduce sums in another order); Adam divides by
            # sqrt(v), which magnifies that rounding for near-zero gradients to ~1e-6 after a few
            # steps of lr 1e-3, still far below one update (1e-3).
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=f"{name}:{k}")
    # only rank 0 wrote: one log, one set of checkpoints
    assert len((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) == len(
        (single / "log.jsonl").read_text().splitlines())
    state = torch.load(tmp_path / "ddp" / ckpt / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]["ranks"]) == 2


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    import json
    import re
    import signal
    import time

    from ddpm.io.checkpoint import list_checkpoints

    out = tmp_path / "ddp"
    proc = endless_gloo_run(out, ckpt_every=0)
    try:
        log, deadline = out / "log.jsonl", time.monotonic() + 240
        while not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no log record within 240 s"
            time.sleep(0.1)
        logged = json.loads(log.read_text().splitlines()[-1])["step"]
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # each rank says where it stopped: the same step, and rank 0 saved exactly that one
    steps = {int(s) for s in re.findall(r"interrupted by SIGTERM at step (\d+); checkpoint saved", err)}
    assert len(re.findall(r"interrupted by SIGTERM", err)) == 2 and len(steps) == 1, err[-3000:]
    step = steps.pop()
    assert step >= logged and [s for s, _ in list_checkpoints(out)] == [step]
    state = torch.load(out / f"ckpt-{step:07d}" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]["ranks"]) == 2
    # and it resumes (here in one process: the global batch is the same, the ranks' dropout streams are new)
    from ddpm.io.run import load

    config = get_preset("tiny").override(**{"train.steps": step + 2, "train.device": "cpu", "train.progress": False})
    train(config, out=out, resume=True)
    assert load(out).step == step + 2


def test_kill_9_of_one_rank_stops_the_other_with_one_line(tmp_path):
    import signal
    import time

    out = tmp_path / "ddp"
    proc = endless_gloo_run(out, ckpt_every=5)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("ckpt-*")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        rank1 = [p for p in os.listdir("/proc") if p.isdigit() and _is_rank(int(p), 1)]
        assert len(rank1) == 1, rank1
        os.kill(int(rank1[0]), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)  # never a hang: both ranks gone within 2 minutes
        assert time.monotonic() - t0 < 120
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    # rank 0 says it in one line (or was stopped by torchrun first, before it noticed): never a traceback of ours
    ours = [line for line in err.splitlines() if line.startswith("[rank0]") or line.startswith("ddpm:")]
    assert not [line for line in ours if "Traceback" in line], err[-3000:]
    assert all("another process of this 2-rank run stopped" in line for line in ours if "error" in line), ours
    # and the run resumes from its newest checkpoint, in one process
    from ddpm.io.checkpoint import latest_verified_checkpoint

    assert latest_verified_checkpoint(out, ["ema.safetensors"]) is not None


def _is_rank(pid: int, rank: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return f"RANK={rank}".encode() in env and b"ddpm" in cmd and b"torch.distributed.run" not in cmd


def test_a_failed_collective_is_one_line_only_under_torchrun():
    from ddpm.errors import UserError
    from ddpm.training import guards

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:40334: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")
    with pytest.raises(UserError, match=r"another process of this 2-rank run stopped .*\(Read error "
                                        r"\[127.0.0.1\]:40334: Connection reset by peer\); .* in runs/x is intact"):
        with guards.lost_peers(2, "runs/x"):
            raise gone
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: not a peer's doing
        with guards.lost_peers(1, "runs/x"):
            raise gone
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug is not hidden as a lost peer
        with guards.lost_peers(2, "runs/x"):
            raise RuntimeError("shape mismatch")
