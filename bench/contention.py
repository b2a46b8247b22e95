"""Throughput beside other work: `ddpm train` and `ddpm sample` alone and beside a duty-cycle load (issue 22).

    python bench/contention.py --run runs/mnist                       # this checkout
    python bench/contention.py --run runs/mnist --src OTHER/src       # another checkout (before/after)
    python bench/contention.py --run runs/mnist --env OMP_NUM_THREADS=1 --duty 0 1

The load is one helper process that keeps one core busy for a share d of each 200 ms period
(d = 0: no helper; 1: busy all the time), like a `pip install` or a second small job. Beside
each load the bench runs, as a user would (a fresh process, the CLI):

- train mnist: ``ddpm train --preset mnist --max-minutes M`` (its time budget, as the preset has):
  steps / training seconds at the last log record;
- train toy2d: ``ddpm train --preset toy2d --data toy:two_moons --steps N`` (no budget):
  the same;
- train toy2d auto: the same with ``--threads auto`` (a step-counted run follows the load only
  when asked: it gives up bit-exact resume);
- sample: ``ddpm sample RUN --num 500 --steps 20`` (the run's sampler and guidance):
  images / (the command's wall time less that of ``--num 1 --steps 1`` under the same load).

Each figure is also given as a share of its idle figure (d = 0, measured in the same run); the
issue's targets are 65% at d = 0.5 and 45% at d = 1 (the ideal being (2 - d) / 2 on 2 cores).
Throughput on this shared machine varies by a few percent between runs: --repeat alternates
the duties that many times and reports the median.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERIOD = 0.2

LOAD = """
import sys, time
duty, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    start = time.monotonic()
    while time.monotonic() - start < duty * period:
        pass
    if duty < 1:
        time.sleep(max(0.0, period - (time.monotonic() - start)))
"""


class Load:
    """One process keeping a core busy for ``duty`` of every period (none at duty 0)."""

    def __init__(self, duty: float):
        self.duty, self.proc = duty, None

    def __enter__(self):
        if self.duty > 0:
            self.proc = subprocess.Popen([sys.executable, "-c", LOAD, str(self.duty), str(PERIOD)])
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def ddpm(args: list[str], env: dict, cwd: str) -> float:
    """Run ``python -m ddpm ARGS``; its wall seconds. Fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ddpm", *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"contention: ddpm {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall


def train_rate(extra: list[str], env: dict, tmp: str) -> float:
    out = Path(tempfile.mkdtemp(dir=tmp))
    ddpm(["train", "--out", str(out / "run"), "--set", "train.sample_every=1000000", "--set", "train.ckpt_every=1000000",
          *extra], env, tmp)
    last = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines() if line.strip()][-1]
    return last["step"] / last["elapsed_s"]


def sample_rate(run: str, env: dict, tmp: str, num: int, steps: int) -> float:
    start = ddpm(["sample", run, "--num", "1", "--steps", "1", "--out", "s.npz"], env, tmp)
    whole = ddpm(["sample", run, "--num", str(num), "--steps", str(steps), "--out", "s.npz"], env, tmp)
    return num / max(whole - start, 1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained mnist run to sample from (ddpm train)")
    p.add_argument("--src", default=str(ROOT / "src"), help="the ddpm package's source folder to measure")
    p.add_argument("--env", nargs="*", default=[], help="NAME=VALUE set for the measured commands")
    p.add_argument("--duty", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--workloads", nargs="+", default=["train-mnist", "train-toy2d", "sample"])
    p.add_argument("--minutes", type=float, default=0.75, help="train mnist's budget (default 0.75)")
    p.add_argument("--toy-steps", type=int, default=1500)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--label", default=None, help="name of this variant in the table")
    p.add_argument("--json", help="append the measurements as one JSON line here")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.src)}
    for item in args.env:
        k, _, v = item.partition("=")
        env[k] = v
    run = os.path.abspath(args.run)
    work = {
        "train-mnist": lambda tmp: train_rate(["--max-minutes", str(args.minutes)], env, tmp),
        "train-toy2d": lambda tmp: train_rate(["--preset", "toy2d", "--data", "toy:two_moons", "--steps",
                                               str(args.toy_steps)], env, tmp),
        "train-toy2d-auto": lambda tmp: train_rate(["--preset", "toy2d", "--data", "toy:two_moons", "--steps",
                                                    str(args.toy_steps), "--threads", "auto"], env, tmp),
        "sample": lambda tmp: sample_rate(run, env, tmp, args.num, args.steps),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            got = {d: [] for d in args.duty}
            for _ in range(args.repeat):
                for d in args.duty:
                    with Load(d):
                        got[d].append(work[name](tmp))
                    print(f"{name} duty {d:g}: {got[d][-1]:.2f}/s", file=sys.stderr, flush=True)
            results[name] = {d: statistics.median(v) for d, v in got.items()}
    label = args.label or " ".join(args.env) or args.src
    unit = {"train-mnist": "steps/s", "train-toy2d": "steps/s", "train-toy2d-auto": "steps/s", "sample": "images/s"}
    lines = [f"| {label} | " + " | ".join(f"d = {d:g}" for d in args.duty) + " |",
             "| --- |" + " ---: |" * len(args.duty)]
    for name, r in results.items():
        idle = r.get(0.0)
        cells = [f"{v:.2f}" + (f" ({v / idle:.0%})" if idle and d else "") for d, v in r.items()]
        lines.append(f"| {name} ({unit[name]}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": label, "env": args.env, "src": args.src, "results": results,
                                "args": vars(args)}) + "\n")


if __name__ == "__main__":
    main()
