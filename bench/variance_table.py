"""Fixed, learned and analytic reverse variances on MNIST in one markdown table (issue 10).

Rows: a fixed-variance run sampled with ``fixed_small`` (the ``mnist`` preset), a learned-variance
run with ``learned_range`` (the ``mnist-learned`` preset: L_hybrid, same network and budget), and
the fixed run with its analytic variances (Bao et al. 2022; RUN/analytic.json, which
``ddpm analytic RUN`` writes and ``ddpm.load`` attaches). Columns:

- the NLL bound in bits/dim on the MNIST test set (``ddpm.nll_bpd``, the decoder exact and the
  T - 1 KL terms from K stratified timesteps per image, with the standard error over images; the
  same images, timesteps and noise for every row, so differences between rows are paired);
- the classifier-pass share (bench/mnist_quality.py ``score``: confidence > 0.9) of N samples
  drawn by ancestral sampling on uniformly respaced grids of 25, 50 and 100 steps, the same seeds
  for every row, with its binomial standard error.

    ddpm train --out runs/mnist-fixed
    ddpm train --preset mnist-learned --out runs/mnist-learned
    ddpm analytic runs/mnist-fixed --num 1024
    python bench/variance_table.py runs/mnist-fixed runs/mnist-learned --nll-num 1000 --nll-timesteps 50 --num 1000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import ddpm
from ddpm.sampling.batches import SamplerSettings, sample_batches
from ddpm.cli.eval import apply_variance
from ddpm.data.sources import open_source
from ddpm.errors import UserError
from ddpm.core.nll import nll_bpd
from mnist_quality import score

ROWS = (("fixed", "fixed_small"), ("learned", "learned_range"), ("fixed + analytic", "analytic"))


def measure(run_path: str, variance: str, args, test_data) -> dict:
    """NLL bound and pass shares of one (run, variance) row."""
    run = ddpm.load(run_path, device=args.device)
    apply_variance(run, variance)  # one-line errors: no variance channels, no analytic.json for these weights
    kw = run.sample_kwargs
    t0 = time.time()
    nll = nll_bpd(run.model, run.schedule, test_data, num_timesteps=args.nll_timesteps, batch_size=args.batch_size,
                  num=args.nll_num, generator=torch.Generator(args.device).manual_seed(args.seed),
                  prediction=kw["prediction"], variance=variance, analytic=kw.get("analytic"),
                  decoder="discretized", device=args.device)
    row = {"run": str(run.path), "step": run.step, "variance": variance, "nll_bpd": nll["bpd"],
           "nll_stderr": nll["stderr"], "nll_estimate": nll["estimate"], "nll_images": nll["num_examples"]}
    print(f"{run.path} {variance}: NLL {nll['bpd']:.4f} +- {nll['stderr']:.4f} ({time.time() - t0:.0f}s)",
          file=sys.stderr)
    for steps in args.steps:
        t0 = time.time()
        images = sample_batches(run, args.num, SamplerSettings("ddpm", steps), seed=args.sample_seed,
                                batch_size=args.batch_size, device=args.device, amp=args.amp, progress=False)
        result = score(images.clamp(-1, 1).to(args.device))
        row[f"pass_{steps}"] = result["pass_rate"]
        print(f"  ddpm-{steps}: pass {result['pass_rate']:.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    return row


def _share(p: float, n: int) -> str:
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / n):.3f}"  # binomial standard error


def table(rows: list[dict], args) -> str:
    head = ["model", "variance", "NLL bound (bits/dim)", *(f"pass, ancestral {s} steps" for s in args.steps)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |"]
    for name, row in rows:
        cells = [f"{name} (step {row['step']})", f"`{row['variance']}`",
                 f"{row['nll_bpd']:.3f} ± {row['nll_stderr']:.3f}",
                 *(_share(row[f"pass_{s}"], args.num) for s in args.steps)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"NLL: the first {rows[0][1]['nll_images']} MNIST test images, decoder exact and KL terms from "
                 f"{args.nll_timesteps} stratified timesteps per image ({rows[0][1]['nll_estimate']}), seed "
                 f"{args.seed}, ± one standard error over images. Pass: share of {args.num} samples (seed "
                 f"{args.sample_seed}, the same for every row) classified with confidence > 0.9 by "
                 f"bench/mnist_quality.py's CNN, ancestral sampling (ddpm) on uniformly respaced grids, autocast "
                 f"{args.amp}; ± binomial standard error.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixed", help="run trained with a fixed variance (its analytic.json gives the third row)")
    p.add_argument("learned", help="run trained with learned variances (--learn-sigma)")
    p.add_argument("--nll-num", type=int, default=1000, help="MNIST test images for the bound (default 1000)")
    p.add_argument("--nll-timesteps", type=int, default=50, help="stratified KL timesteps per image (default 50)")
    p.add_argument("--num", type=int, default=1000, help="samples per sampler setting (default 1000)")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100], help="ancestral steps (default 25 50 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bound's timesteps and noise")
    p.add_argument("--sample-seed", type=int, default=1, help="seed of the samples")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="autocast while sampling (default off)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()
    test_data = open_source("mnist", split="test")
    rows = [(name, measure(args.fixed if variance != "learned_range" else args.learned, variance, args, test_data))
            for name, variance in ROWS]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [{"name": n, **r} for n, r in rows]}, f, indent=1)
    print(table(rows, args))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"variance_table: error: {exc}") from None
