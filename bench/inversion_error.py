"""DDIM inversion round trip on a trained MNIST run: invert test digits to x_T on an S-step grid,
sample them back with DDIM eta = 0 on the same grid, and report the error against S (issue 9).

    python bench/inversion_error.py runs/mnist-20250101-120000 --num 64 --steps 10 50 200

The first ``--num`` digits of the MNIST test set, float32, no autocast (the round trip is a
numerical property); the error is the root-mean-square pixel difference in [-1, 1] units and the
largest per-image RMS. The Gaussian-mixture version of this check is tests/sampling/test_invert.py.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="an MNIST run directory or checkpoint")
    p.add_argument("--num", type=int, default=64, help="test digits (default 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--refine", type=int, default=0, help="fixed-point iterations per inversion step")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()

    import ddpm
    from ddpm.data.sources import open_source

    run = ddpm.load(args.run, fast=False)  # float32: no autocast in a numerical round trip
    x0 = open_source("mnist", split="test").get_batch(torch.arange(args.num))
    kw = {k: v for k, v in run.sample_kwargs.items() if k in ("prediction", "clip_denoised")}
    rows = []
    with torch.no_grad():
        for steps in args.steps:
            x_T = ddpm.invert(run.model, run.schedule, x0, steps=steps, refine=args.refine, **kw)
            back = ddpm.sample(run.model, run.schedule, tuple(x0.shape), sampler="ddim", steps=steps, eta=0.0,
                               x_T=x_T, **kw)
            per_image = (back - x0).pow(2).flatten(1).mean(1).sqrt()
            rows.append({"steps": steps, "rms": float((back - x0).pow(2).mean().sqrt()),
                         "max_image_rms": float(per_image.max())})
            print(f"S={steps:4d}  RMS error {rows[-1]['rms']:.4f}  worst image {rows[-1]['max_image_rms']:.4f}", flush=True)
    print("| DDIM steps S | RMS error | worst image |\n|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['rms']:.4f} | {r['max_image_rms']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": str(run.path), "num": args.num, "refine": args.refine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
