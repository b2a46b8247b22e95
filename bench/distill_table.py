"""Distilled students against their teacher on MNIST: quality, wall time and network calls (issue 20).

    ddpm train --out runs/mnist                                             # the teacher (default preset)
    ddpm distill runs/mnist --steps 8 --teacher-steps 64 --iters-per-round 500 --out runs/mnist-8   # 64 -> ... -> 8
    ddpm distill runs/mnist-8 --steps 4 --iters-per-round 500 --out runs/mnist-4
    ddpm distill runs/mnist-4 --steps 2 --iters-per-round 500 --out runs/mnist-2
    ddpm distill runs/mnist-2 --steps 1 --iters-per-round 500 --out runs/mnist-1
    python bench/distill_table.py runs/mnist runs/mnist-8 runs/mnist-4 runs/mnist-2 runs/mnist-1

(Step-counted rounds: rounds on a time budget, --max-minutes, get fewer iterations on a busy
machine and so a worse student. What these gave: docs/distillation.md.)

Rows, all on the same per-sample seeds (SEED, i), i < --num (an image depends only on its seed):

- the teacher with its default sampler and the guidance its students were distilled with (what
  ``ddpm sample RUN`` does with that guidance: for ``mnist`` 100 ancestral steps with autoguidance,
  for ``mnist-cond`` 100 steps with classifier-free guidance, each in its guidance interval);
- the teacher with DDIM and with DPM-Solver++(2M) at 8 and 4 steps, same guidance (what a user can
  do without distilling);
- each student with its own distilled step count (guidance baked in);
- the data: --num MNIST training digits, scored the same way (the floor of every column).

Columns: the pass rate (bench/mnist_quality.py: the share its CNN classifies with confidence > 0.9)
with its binomial standard error; the Frechet distance in the CNN's 128 penultimate features
against the 10,000 MNIST test digits ("fd"; with 1,000 samples it has a floor above 0, the data
row); the smallest and largest digit share among the passing samples (fair: 10%); for a
class-conditional run (labels: --num / 10 of each class) the share the CNN classifies as the
class it was asked for, mean and lowest class, and the stricter share that is also classified
with confidence > 0.9 (bench/guidance_table.py's accuracy); the wall
time to draw the --num samples in this process (the run's default autocast, --batch-size per
call, after one warm-up batch; start-up is bench/end_to_end.py's business); and the network calls
per image, counted by hooks on the networks (a guided step that evaluates a batch of 2B counts 2).
The students and the teacher's 4-step DDIM are drawn again at SEED + 1: the spread says what a
difference between rows must exceed to mean something.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import ddpm
from ddpm.errors import UserError
from ddpm.sampling.batches import sample_batches, sampler_settings
from mnist_quality import _mnist, score

THRESHOLD = 0.9


class CallCounter:
    """Images that passed through the hooked networks: per image drawn, the network calls."""

    def __init__(self, *nets):
        self.images = 0
        self.handles = [n.register_forward_pre_hook(self._hook) for n in nets if isinstance(n, torch.nn.Module)]

    def _hook(self, module, args):
        self.images += args[0].shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


def draw(run, sampler, steps, guidance: float, args, seed: int,
         **extra) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """(images, labels or None, wall seconds for --num images, network calls per image); ``extra``
    goes to ``sample_batches`` (autoguidance, guidance_interval)."""
    settings = sampler_settings(run, sampler, steps)
    labels = None
    if run.num_classes is not None:
        labels = torch.arange(run.num_classes).repeat_interleave(math.ceil(args.num / run.num_classes))[:args.num]
    kw = dict(batch_size=args.batch_size, device=args.device, progress=False, guidance=guidance, **extra)
    # warm-up: one batch on other seeds (allocator, autocast caches), not timed
    sample_batches(run, min(args.batch_size, args.num), settings, seed=seed + 10_000, **kw,
                   labels=None if labels is None else labels[:args.batch_size])
    counter = CallCounter(run.model, run.guide)
    t0 = time.perf_counter()
    images = sample_batches(run, args.num, settings, seed=seed, labels=labels, **kw)
    wall = time.perf_counter() - t0
    counter.close()
    return images.clamp(-1, 1), labels, wall, counter.images / args.num


def row(name: str, images, labels, wall, calls) -> dict:
    s = score(images, THRESHOLD, labels=labels)
    n = len(images)
    out = {"name": name, "n": n, "pass_rate": s["pass_rate"],
           "pass_se": math.sqrt(max(s["pass_rate"] * (1 - s["pass_rate"]), 1e-12) / n), "fd": s["fd"],
           "min_share": s["min_share"], "max_share": s["max_share"], "wall_s": wall, "calls": calls}
    for k in ("class_accuracy", "min_class_accuracy", "per_class_accuracy", "confident_class_accuracy"):
        if k in s:
            out[k] = s[k]
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def measure(teacher_path: str, student_paths: list[str], args) -> dict:
    teacher = ddpm.load(teacher_path, device=args.device)
    if teacher.shape != (1, 28, 28):
        raise UserError(f"{teacher.path} is not an MNIST run (items {teacher.shape})")
    students = [ddpm.load(p, device=args.device) for p in student_paths]
    for s in students:
        if s.config.distill is None:
            raise UserError(f"{s.path} is not a distilled run (make one with ddpm distill)")
    # the teacher is sampled with the guidance its students were distilled with (ddpm distill's
    # --guidance, --autoguidance, --guidance-interval), else with the run's own defaults
    d, T = students[0].config.distill if students else None, teacher.schedule.num_timesteps
    own = teacher.config.sample
    w = (own.guidance if d is None else d.teacher_guidance) if teacher.num_classes is not None else 1.0
    guide = {"autoguidance": own.autoguidance if d is None else d.teacher_autoguidance,
             "guidance_interval": (own.guidance_interval if d is None else d.teacher_guidance_interval) or (0, T - 1)}
    preview = sampler_settings(teacher)
    contestants = [(f"teacher, {preview.sampler} {preview.steps} steps (default)", teacher, None, None, w, guide)]
    for sampler in ("ddim", "dpm++2m"):
        for steps in (8, 4):
            contestants.append((f"teacher, {sampler} {steps} steps", teacher, sampler, steps, w, guide))
    for s in students:
        contestants.append((f"student, {s.config.distill.steps} step{'s' * (s.config.distill.steps > 1)}",
                            s, None, None, 1.0, {}))
    rows, spread = [], []
    for name, run, sampler, steps, guidance, extra in contestants:
        rows.append(row(name, *draw(run, sampler, steps, guidance, args, args.seed, **extra)))
        if run is not teacher or (sampler, steps) == ("ddim", 4):
            again = row(name + f" (seed {args.seed + 1})",
                        *draw(run, sampler, steps, guidance, args, args.seed + 1, **extra))
            spread.append({"name": name, "pass_rate": [rows[-1]["pass_rate"], again["pass_rate"]],
                           "fd": [rows[-1]["fd"], again["fd"]]})
    x, y = _mnist("train")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:args.num]
    data = row("MNIST training digits (the data)", x[pick], y[pick] if teacher.num_classes is not None else None,
               float("nan"), 0.0)
    return {"teacher": str(teacher.path), "teacher_step": teacher.step, "guidance": w,
            "autoguidance": guide["autoguidance"] if teacher.guide is not None else None,
            "guidance_interval": guide["guidance_interval"],
            "students": [str(s.path) for s in students], "rows": rows, "data": data, "spread": spread,
            "args": vars(args), "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    cond = "class_accuracy" in result["data"]
    head = ["sampler", "calls / image", "pass rate", "FD", "digit shares"]
    head += ["right class (mean / lowest)", "right and confident"] if cond else []
    head += [f"wall s / {result['data']['n']}"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in result["rows"] + [result["data"]]:
        cells = [r["name"], f"{r['calls']:g}" if r["calls"] else "-", f"{r['pass_rate']:.1%}", f"{r['fd']:.2f}",
                 f"{r['min_share']:.1%} - {r['max_share']:.1%}"]
        if cond:
            cells += [f"{r['class_accuracy']:.1%} / {r['min_class_accuracy']:.0%}",
                      f"{r['confident_class_accuracy']:.1%}"]
        cells.append("-" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    se = max(r["pass_se"] for r in result["rows"])
    spread = "; ".join(f"{s['name']}: pass {s['pass_rate'][0]:.1%} / {s['pass_rate'][1]:.1%}, FD "
                       f"{s['fd'][0]:.2f} / {s['fd'][1]:.2f}" for s in result["spread"])
    how = [f"guidance {result['guidance']:g}"] if result["guidance"] != 1 else []
    how += [f"autoguidance {result['autoguidance']:g}"] if result.get("autoguidance") not in (None, 1) else []
    how = ", ".join(how) + (" for t in [{}, {}]".format(*result["guidance_interval"]) if how else "")
    lines += ["", f"Teacher {result['teacher']} (step {result['teacher_step']}{'; ' + how if how else ''}); "
              f"seeds ({result['args']['seed']}, i), "
              f"i < {result['data']['n']}, for every row; {result['threads']} threads, batch "
              f"{result['args']['batch_size']}. Binomial standard error of a pass rate: at most {se:.1%}. "
              f"Seed {result['args']['seed']} / {result['args']['seed'] + 1}: {spread}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", help="the teacher run (ddpm train)")
    p.add_argument("students", nargs="*", help="distilled runs of it (ddpm distill)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the measurements as JSON here")
    args = p.parse_args()
    if args.num < 10:
        raise UserError("--num must be >= 10")
    result = measure(args.teacher, args.students, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"distill_table: error: {exc}") from None
