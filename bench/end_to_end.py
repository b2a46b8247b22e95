"""What a user waits for: a whole ``ddpm sample RUN --num 64`` call against diffusers doing the same.

    python bench/end_to_end.py RUN [--reps 3] [--num 64]

Every contestant is a fresh process (interpreter start-up, imports, loading the weights, any
compilation and the sampling loop all count), timed in alternation (A B C D, A B C D, ...) with
the median of ``--reps`` reported, by wall clock and by the CPU time of the child process:

- ``ddpm sample RUN --num N``: ours with no flags (``--amp auto``: bf16 autocast where the CPU
  has native bf16, else float32; the run's preview sampler and steps).
- ``ddpm sample RUN --num N --amp off``: ours on the float32 path.
- for a run with an autoguidance guide (the ``mnist`` preset's), the same two with
  ``--autoguidance 1``: the work ``DDPMPipeline`` does (one network call per step; the default
  makes two).
- diffusers' ``DDPMPipeline`` on the same weights (``ddpm export RUN --format diffusers``, done
  once before timing), ``num_inference_steps`` = the run's preview steps, float32 (its default)
  and under bf16 autocast with channels_last (its best eager mode).

And the short call, ``--num 1``, ours by default against ours in float32 (the default must not
make the first sample slower; unguided as well for a guided run). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIFFUSERS = """
import sys, torch
from diffusers import DDPMPipeline
path, num, steps, best, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
pipe = DDPMPipeline.from_pretrained(path)
if best:
    pipe.unet.to(memory_format=torch.channels_last)
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=best):
    images = pipe(batch_size=num, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
images[0].save(out)
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one child process running ``cmd`` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text())
    steps = config["sample"]["steps"]
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-e2e-"))
    exported = tmp / "diffusers"
    ddpm = [sys.executable, "-m", "ddpm"]
    subprocess.run([*ddpm, "export", str(args.run), "--format", "diffusers", str(exported)], check=True,
                   capture_output=True)
    n = str(args.num)
    contestants = {
        f"ddpm sample --num {n} (default)": [*ddpm, "sample", str(args.run), "--num", n, "--out", str(tmp / "a.png")],
        f"ddpm sample --num {n} --amp off": [*ddpm, "sample", str(args.run), "--num", n, "--amp", "off",
                                             "--out", str(tmp / "b.png")],
        f"diffusers DDPMPipeline, {n} images, float32": [sys.executable, "-c", DIFFUSERS, str(exported), n,
                                                         str(steps), "0", str(tmp / "c.png")],
        f"diffusers DDPMPipeline, {n} images, bf16 autocast + channels_last": [
            sys.executable, "-c", DIFFUSERS, str(exported), n, str(steps), "1", str(tmp / "d.png")],
        "ddpm sample --num 1 (default)": [*ddpm, "sample", str(args.run), "--num", "1", "--out", str(tmp / "e.png")],
        "ddpm sample --num 1 --amp off": [*ddpm, "sample", str(args.run), "--num", "1", "--amp", "off",
                                          "--out", str(tmp / "f.png")],
    }
    if config["train"].get("guide_at") and config["sample"].get("autoguidance", 1) != 1:
        for name, cmd in list(contestants.items()):
            if name.startswith("ddpm sample"):  # ..., "--out", PATH: the unguided twin writes beside it
                twin = [*cmd[:-2], "--autoguidance", "1", "--out", cmd[-1] + "-1.png"]
                contestants[f"{name} --autoguidance 1"] = twin
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in contestants}
    for rep in range(args.reps):
        for name, cmd in contestants.items():
            samples[name].append(timed(cmd))
            print(f"rep {rep}: {name}: {samples[name][-1][0]:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.run}, {steps} sampling steps, {os.cpu_count()} CPUs, median of {args.reps} fresh processes\n")
    print("| call | wall clock | CPU time |")
    print("| --- | ---: | ---: |")
    for name, v in samples.items():
        wall, cpu = statistics.median(w for w, _ in v), statistics.median(c for _, c in v)
        print(f"| {name} | {wall:.1f} s | {cpu:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
