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

With ``--student RUN4`` (a run distilled from RUN, ``ddpm distill``) it races the student instead,
``--num`` images per call (1,000 by default then), and scores every contestant's images with
bench/mnist_quality.py (pass rate, Frechet distance in the classifier's features):

- ``ddpm sample RUN4 --num N --out x.npz``: the student, its distilled steps, default mode;
- diffusers' ``DDPMPipeline`` on the teacher's weights at the teacher's preview steps (float32);
- the same U-Net with diffusers' ``DPMSolverMultistepScheduler`` at 20 steps, float32 and under
  bf16 autocast (diffusers' fastest setting on this CPU).

    python bench/end_to_end.py runs/mnist --student runs/mnist-4 --reps 1
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


DIFFUSERS_NPZ = """
import sys, numpy as np, torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler
path, num, steps, solver, bf16, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", sys.argv[6]
pipe = DDPMPipeline.from_pretrained(path)
if solver == "dpm":
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    images = pipe(batch_size=num, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
np.savez(out, images=(np.clip(images, 0, 1) * 255).round().astype(np.uint8))
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
    p.add_argument("--student", type=Path, help="a distilled run of RUN: race it (see above)")
    args = p.parse_args(argv)
    if args.student is not None:
        return race_student(args)
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


def race_student(args) -> int:
    import numpy as np
    import torch

    from mnist_quality import score

    num = str(args.num if args.num != 64 else 1000)
    steps = json.loads((args.run / "config.json").read_text())["sample"]["steps"]
    student_steps = json.loads((args.student / "config.json").read_text())["distill"]["steps"]
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-e2e-"))
    exported = tmp / "diffusers"
    subprocess.run([sys.executable, "-m", "ddpm", "export", str(args.run), "--format", "diffusers", str(exported)],
                   check=True, capture_output=True)
    contestants = {
        f"ddpm sample STUDENT --num {num} ({student_steps} steps, default mode)":
            ([sys.executable, "-m", "ddpm", "sample", str(args.student), "--num", num, "--out", str(tmp / "s.npz")],
             tmp / "s.npz"),
        f"diffusers DDPMPipeline, teacher weights, {steps} steps, float32":
            ([sys.executable, "-c", DIFFUSERS_NPZ, str(exported), num, str(steps), "ddpm", "0", str(tmp / "p.npz")],
             tmp / "p.npz"),
        "diffusers DPMSolverMultistep, teacher weights, 20 steps, float32":
            ([sys.executable, "-c", DIFFUSERS_NPZ, str(exported), num, "20", "dpm", "0", str(tmp / "d.npz")],
             tmp / "d.npz"),
        "diffusers DPMSolverMultistep, teacher weights, 20 steps, bf16 autocast":
            ([sys.executable, "-c", DIFFUSERS_NPZ, str(exported), num, "20", "dpm", "1", str(tmp / "b.npz")],
             tmp / "b.npz"),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in contestants}
    for rep in range(args.reps):
        for name, (cmd, _) in contestants.items():
            times[name].append(timed(cmd))
            print(f"rep {rep}: {name}: {times[name][-1][0]:.1f} s", file=sys.stderr, flush=True)
    print(f"student {args.student} of {args.run}, {num} images per call, {os.cpu_count()} CPUs, median of "
          f"{args.reps} fresh processes; pass rate and FD of the last call's images\n")
    print("| call | wall clock | CPU time | pass rate | FD |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (_, out) in contestants.items():
        array = np.load(out)["images"]
        images = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        q = score(images)
        wall, cpu = statistics.median(w for w, _ in times[name]), statistics.median(c for _, c in times[name])
        print(f"| {name} | {wall:.1f} s | {cpu:.1f} s | {q['pass_rate']:.1%} | {q['fd']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
