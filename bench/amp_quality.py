"""Does the default sampling mode (``--amp auto``: bf16 autocast on this CPU) make MNIST samples worse?

Draws ``--num`` samples of a run three times, as ``ddpm sample`` does (``batch_sampling``, the
run's preview sampler unless told): in float32 and in the default mode with the same per-sample
seeds, and in float32 with a second, disjoint set of seeds. Each set is scored with
bench/mnist_quality.py's classifier (``score``: share of samples classified with confidence > 0.9).

The run-to-run noise is what the pass rate moves by with other seeds alone: measured (float32,
seeds A vs seeds B) and as the binomial standard error of the difference of two independent rates,
sqrt(2 p (1 - p) / n). The default mode passes when its difference from float32 on the same seeds
is within twice that standard error (about a 95% band). Same seeds make the comparison paired, so
it also prints how many samples flip between pass and fail.

    python bench/amp_quality.py runs/mnist-20250101-120000                   # 1,000 samples x 3
    python bench/amp_quality.py runs/mnist-... --num 20 --steps 10           # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mnist_quality import get_classifier, score


def _draw(run, args, amp: str | None, seed: int) -> tuple[torch.Tensor, float]:
    from ddpm.sampling.batches import sample_batches, sampler_settings

    settings = sampler_settings(run, args.sampler, args.steps)
    t0 = time.perf_counter()
    x = sample_batches(run, args.num, settings, seed=seed, batch_size=args.batch_size, device=args.device, amp=amp)
    return x.clamp(-1, 1), time.perf_counter() - t0


def _passed(images: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Per-sample pass flags with ``score``'s classifier and threshold (for the paired count)."""
    model = get_classifier(device=str(images.device))
    with torch.no_grad():
        conf = torch.cat([torch.softmax(model(images[i:i + 500]), 1).amax(1) for i in range(0, len(images), 500)])
    return conf > threshold


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory or checkpoint of an MNIST run")
    p.add_argument("--num", type=int, default=1000, help="samples per set")
    p.add_argument("--seed", type=int, default=1, help="seed set A; set B is seed + 1 (disjoint per-sample seeds)")
    p.add_argument("--sampler", default=None, help="default: the run's preview sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's preview steps")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    args = p.parse_args()

    import ddpm
    from ddpm.core.device import describe_amp
    from ddpm.sampling.batches import sampler_settings

    run = ddpm.load(args.run, device=args.device)  # prepared as `ddpm sample` prepares it
    settings = sampler_settings(run, args.sampler, args.steps)
    print(f"{run.path}: {args.num} samples per set, {settings.sampler} {settings.steps} steps; "
          f"default mode: {describe_amp(run.amp)}", flush=True)
    sets = {"fp32_A": ("off", args.seed), "default_A": (None, args.seed), "fp32_B": ("off", args.seed + 1)}
    images, seconds, scores = {}, {}, {}
    for name, (amp, seed) in sets.items():
        images[name], seconds[name] = _draw(run, args, amp, seed)
        scores[name] = score(images[name])
        s = scores[name]
        print(f"  {name:10s} pass {100 * s['pass_rate']:5.1f}%  digits {s['histogram_passing']}  "
              f"({seconds[name]:.0f} s sampling)", flush=True)

    n = args.num
    diff = scores["default_A"]["pass_rate"] - scores["fp32_A"]["pass_rate"]
    noise = scores["fp32_B"]["pass_rate"] - scores["fp32_A"]["pass_rate"]
    p_mean = sum(s["pass_rate"] for s in scores.values()) / len(scores)
    se = math.sqrt(2 * p_mean * (1 - p_mean) / n)  # SE of a difference of two independent rates
    a, b = _passed(images["fp32_A"]), _passed(images["default_A"])
    only_fp32, only_default = int((a & ~b).sum()), int((b & ~a).sum())
    within = abs(diff) <= 2 * se
    print(f"default - fp32, same seeds: {100 * diff:+.1f} points ({only_fp32} samples pass only in fp32, "
          f"{only_default} only in the default mode; paired SE {100 * math.sqrt(only_fp32 + only_default) / n:.1f})")
    print(f"run-to-run noise: fp32 seeds B - seeds A {100 * noise:+.1f} points; binomial SE of a difference "
          f"{100 * se:.1f} points (2 SE = {200 * se:.1f})")
    print(f"default mode {'within' if within else 'OUTSIDE'} the run-to-run noise; sampling speed-up "
          f"{seconds['fp32_A'] / seconds['default_A']:.2f}x")
    if args.json:
        record = {"run": str(run.path), "num": n, "sampler": settings.sampler, "steps": settings.steps,
                  "default_amp": run.amp, "pass_rate": {k: s["pass_rate"] for k, s in scores.items()},
                  "seconds": seconds, "difference": diff, "noise_seed_sets": noise, "binomial_se": se,
                  "flips": {"only_fp32": only_fp32, "only_default": only_default}, "within_noise": within}
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
