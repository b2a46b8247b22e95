"""Classifier-free guidance on a class-conditional MNIST run: accuracy and diversity per scale (issue 9).

For every class c and guidance scale w (default 0, 1, 2, 3, 5), N samples (default 100) are asked
for class c. The samples are exactly those of

    ddpm sample RUN --class all --per-class N --seed SEED --guidance W --amp AMP

(sample i = c N + j has label c and per-sample seed (SEED, i)), so every scale sees the same seeds:
the comparison between columns is paired. Each sample is classified by bench/mnist_quality.py's
CNN (``get_classifier``, cached in ~/.cache/ddpm-bench/mnist_cnn.pt). Reported:

- accuracy: the share of the N samples asked for c that the CNN labels c with confidence > 0.9,
  per class, their mean, and the lowest class (issue 9's target: mean >= 95% and every class
  >= 90% at the best scale);
- diversity: the mean pairwise Euclidean distance between the CNN's penultimate features (the
  128 ReLU units before its last layer) of the N samples of a class, averaged over the classes,
  beside the same number for N MNIST test digits per class (the data's own diversity).

Sampler: the run's preview sampler and steps (``mnist-cond``: ancestral, 100 respaced steps) unless
--sampler/--steps say otherwise.

    ddpm train --preset mnist-cond --out runs/mnist-cond
    python bench/guidance_table.py runs/mnist-cond                        # 5 x 1,000 samples
    python bench/guidance_table.py runs/mnist-cond --guidance 0 1 3 --num 20 --json g.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import ddpm
from ddpm.sampling.batches import sample_batches, sampler_settings
from ddpm.errors import UserError
from mnist_quality import _mnist, get_classifier

THRESHOLD = 0.9


@torch.no_grad()
def classify(images: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidence (N,), predicted digit (N,), penultimate features (N, 128)) of (N, 1, 28, 28) images."""
    model = get_classifier(device=device)
    feats, logits = [], []
    for i in range(0, len(images), 500):
        h = model.head[:-1](model.features(images[i:i + 500].to(device)))  # flatten, dropout (off), fc, relu
        feats.append(h)
        logits.append(model.head[-1](h))
    conf, digit = F.softmax(torch.cat(logits), 1).max(1)
    return conf.cpu(), digit.cpu(), torch.cat(feats).cpu()


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over the N (N - 1) / 2 pairs of rows of (N, D) features."""
    n = len(features)
    d = torch.cdist(features.double(), features.double())
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


def measure(run, w: float, args) -> dict:
    """Accuracy and diversity per class at guidance ``w``."""
    K = run.num_classes
    settings = sampler_settings(run, args.sampler, args.steps)
    labels = torch.arange(K).repeat_interleave(args.num)
    t0 = time.time()
    images = sample_batches(run, K * args.num, settings, seed=args.seed, batch_size=args.batch_size,
                            device=args.device, amp=args.amp, progress=False, labels=labels, guidance=w)
    conf, digit, feats = classify(images.clamp(-1, 1), args.device)
    hit = (digit == labels) & (conf > THRESHOLD)
    accuracy = [float(hit[labels == c].float().mean()) for c in range(K)]
    diversity = [mean_pairwise_distance(feats[labels == c]) for c in range(K)]
    print(f"guidance {w:g}: mean accuracy {sum(accuracy) / K:.3f}, diversity {sum(diversity) / K:.2f} "
          f"({settings.sampler}-{settings.steps}, {time.time() - t0:.0f}s)", file=sys.stderr)
    return {"guidance": w, "sampler": settings.sampler, "steps": settings.steps, "accuracy": accuracy,
            "diversity": diversity}


def data_diversity(num: int, device: str) -> float:
    """The same diversity for the first ``num`` MNIST test digits of each class."""
    x, y = _mnist("test")
    _, _, feats = classify(x, device)
    return sum(mean_pairwise_distance(feats[y == c][:num]) for c in range(10)) / 10


def tables(run, rows: list[dict], data_div: float, args) -> str:
    K, ws = run.num_classes, [f"w = {r['guidance']:g}" for r in rows]
    lines = ["| class | " + " | ".join(ws) + " |", "| --- | " + " | ".join("---:" for _ in rows) + " |"]
    for c in range(K):
        lines.append(f"| {run.class_names[c]} | " + " | ".join(f"{r['accuracy'][c]:.0%}" for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{sum(r['accuracy']) / K:.1%}**" for r in rows) + " |")
    lines.append("| lowest class | " + " | ".join(f"{min(r['accuracy']):.0%}" for r in rows) + " |")
    lines.append(f"| diversity (data: {data_div:.2f}) | "
                 + " | ".join(f"{sum(r['diversity']) / K:.2f}" for r in rows) + " |")
    best = max(rows, key=lambda r: sum(r["accuracy"]))
    s = rows[0]
    lines += ["", f"{args.num} samples per class and scale w (eps_null + w (eps_c - eps_null)), {s['sampler']} "
              f"sampler, {s['steps']} steps, per-sample seeds ({args.seed}, i) for sample i = class x {args.num} + j "
              f"(the same for every w), autocast {args.amp or 'the run default'}; run {run.path} (step {run.step}). "
              f"Accuracy: share labelled with the asked class at confidence > {THRESHOLD} by bench/mnist_quality.py's "
              f"CNN. Diversity: mean pairwise distance of the CNN's penultimate features within a class, averaged "
              f"over classes (data: {args.num} MNIST test digits per class). Best scale: w = {best['guidance']:g} "
              f"(mean {sum(best['accuracy']) / K:.1%}, lowest class {min(best['accuracy']):.0%})."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="class-conditional MNIST run (ddpm train --preset mnist-cond)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--num", type=int, default=100, help="samples per class and scale (default 100)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds (default 0)")
    p.add_argument("--sampler", default=None, help="default: the run's preview sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's preview steps")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--amp", default=None, help="autocast while sampling (default: ddpm.load's choice for the device)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the measurements as JSON here")
    args = p.parse_args()
    run = ddpm.load(args.run, device=args.device)
    if run.num_classes is None or run.shape != (1, 28, 28):
        raise UserError(f"{run.path} is not a class-conditional MNIST run (num_classes {run.num_classes}, "
                        f"items {run.shape}); train one with: ddpm train --preset mnist-cond")
    if args.num < 2:
        raise UserError("--num must be >= 2 (diversity compares pairs)")
    rows = [measure(run, w, args) for w in args.guidance]
    data_div = data_diversity(args.num, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "run": str(run.path), "step": run.step, "data_diversity": data_div,
                       "rows": rows}, f, indent=1)
    print(tables(run, rows, data_div, args))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        raise SystemExit(f"guidance_table: error: {exc}") from None
