"""How recognisable are a run's MNIST samples? A bench tool, not a shipped metric.

A small CNN is trained once on the bundled MNIST training set (weights cached in
~/.cache/ddpm-bench/mnist_cnn.pt; about 99% test accuracy) and then classifies N samples drawn
from a run (or read from an npz written by ``ddpm sample``). Reported: the fraction of samples
classified with confidence > 0.9 ("pass rate"), the histogram of predicted digits among
the passing samples, which must show all ten digits in fair shares, and the Frechet distance
("fd") between the samples and the 10,000 MNIST test digits in the classifier's 128 penultimate
features (FID's formula in a feature space that knows digits): a sampler that makes every digit
sharp but alike passes more and scores a worse distance. Beside it, "fd_real": the distance that
as many real digits (MNIST training digits) score, the floor at that count.

    python bench/mnist_quality.py runs/mnist-20250101-120000                 # 1000 samples, run's preview sampler
    python bench/mnist_quality.py runs/mnist-... --sampler ddpm --num 1000
    python bench/mnist_quality.py --npz samples.npz

What was measured with it to tune the ``mnist`` preset: docs/mnist-recipe.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = Path.home() / ".cache" / "ddpm-bench" / "mnist_cnn.pt"


class Classifier(nn.Module):
    """conv-conv-pool-conv-conv-pool-fc on (B, 1, 28, 28) in [-1, 1] -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _mnist(split: str):
    from ddpm.data.sources import load_mnist

    images, labels = load_mnist(split)
    return images.float() / 127.5 - 1.0, labels


def get_classifier(epochs: int = 2, retrain: bool = False, device: str = "cpu") -> nn.Module:
    """The cached classifier, training it first (a couple of minutes on CPU) if needed."""
    model = Classifier().to(device)
    if CACHE.is_file() and not retrain:
        model.load_state_dict(torch.load(CACHE, weights_only=True, map_location=device))
        return model.eval()
    x, y = (v.to(device) for v in _mnist("train"))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g).to(device)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            # Mild shifts so that slightly off-centre samples are not penalised.
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    xt, yt = (v.to(device) for v in _mnist("test"))
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"classifier test accuracy {acc:.4f}")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    return model


def features(model: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, 128) in float64, class probabilities (N, 10)) of images in [-1, 1]."""
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            f = model.head[:-1](model.features(images[i:i + 500].float()))
            feats.append(f.double())
            probs.append(F.softmax(model.head[-1](f), 1))
    return torch.cat(feats), torch.cat(probs)


_REFERENCE: dict[str, torch.Tensor] = {}
_REAL_FD: dict[tuple[int, int], float] = {}


def reference_features(model: Classifier) -> torch.Tensor:
    """The classifier's features of the 10,000 MNIST test digits (computed once per process)."""
    if "test" not in _REFERENCE:
        _REFERENCE["test"] = features(model, _mnist("test")[0])[0]
    return _REFERENCE["test"]


def real_fd(n: int, seed: int = 0) -> float:
    """The Frechet distance that real digits score at this count: ``n`` MNIST training digits (drawn
    with ``seed``) against the 10,000 test digits. With 1,000 samples the statistic has a floor well
    above 0 (estimation bias of a 128-dimensional covariance); a sample's fd is read against it."""
    if (n, seed) not in _REAL_FD:
        from ddpm.evaluation.fid import frechet_distance_from_features

        x, _ = _mnist("train")
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        model = get_classifier()
        _REAL_FD[n, seed] = frechet_distance_from_features(features(model, x[pick])[0], reference_features(model))
    return _REAL_FD[n, seed]


def score(images: torch.Tensor, threshold: float = 0.9, labels: torch.Tensor | None = None) -> dict:
    """Pass rate, digit histogram and Frechet distance to MNIST test of (N, 1, 28, 28) images in
    [-1, 1]; with the ``labels`` (N,) they were drawn for, the share classified as their label
    (``class_accuracy``), overall and per class."""
    from ddpm.evaluation.fid import frechet_distance_from_features

    model = get_classifier(device=str(images.device))
    feats, probs = features(model, images)
    conf, digit = probs.max(1)
    passed = conf > threshold
    hist = torch.bincount(digit[passed], minlength=10).tolist()
    n_pass = int(passed.sum())
    return {
        "num": len(images),
        "pass_rate": n_pass / len(images),
        "histogram_passing": hist,
        "min_share": min(hist) / max(n_pass, 1),
        "max_share": max(hist) / max(n_pass, 1),
        "mean_confidence": conf.mean().item(),
        "fd": frechet_distance_from_features(feats, reference_features(model)),
        "fd_real": real_fd(len(images)),  # real digits, same count: the floor of "fd"
        **({} if labels is None else class_accuracy(digit, conf, labels, threshold)),
    }


def class_accuracy(digit: torch.Tensor, conf: torch.Tensor, labels: torch.Tensor, threshold: float = 0.9) -> dict:
    """The share of samples the CNN classifies as the label they were drawn for, overall and per
    class; and the stricter share with confidence > ``threshold`` too (bench/guidance_table.py's)."""
    digit, conf, labels = digit.cpu(), conf.cpu(), labels.cpu()
    right = (digit == labels).float()
    per_class = [right[labels == k].mean().item() for k in range(10)]
    return {"class_accuracy": right.mean().item(), "min_class_accuracy": min(per_class),
            "per_class_accuracy": per_class,
            "confident_class_accuracy": (right * (conf > threshold)).mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run directory or checkpoint")
    p.add_argument("--npz", help="score images from an npz written by ddpm sample instead")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--autoguidance", type=float, default=None,
                   help="autoguidance scale of a run that kept a guide (default: the run's, as ddpm sample)")
    p.add_argument("--retrain", action="store_true", help="retrain the cached classifier")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--grid", help="also save the first 100 samples as a PNG grid here")
    args = p.parse_args()
    if args.retrain:
        get_classifier(retrain=True, device=args.device)
    if args.npz:
        array = np.load(args.npz)["images"]  # (N, H, W, C) uint8
        images = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        label = args.npz
    else:
        import ddpm
        from ddpm.core import device as accel
        from ddpm.sampling.samplers import per_sample_seeds

        run = ddpm.load(args.run, device=args.device)
        kw, shape, guide = run.sample_kwargs, run.shape, run.guide_kwargs(args.autoguidance)
        sampler = args.sampler or run.config.sample.sampler
        steps = args.steps if args.steps is not None else (run.config.sample.steps if sampler == run.config.sample.sampler else None)
        chunks, t0 = [], time.time()
        with torch.no_grad(), accel.autocast(args.device, args.amp):
            for start in range(0, args.num, args.batch_size):
                n = min(args.batch_size, args.num - start)
                seeds = per_sample_seeds(args.seed, n, offset=start, device=args.device)
                chunks.append(ddpm.sample(run.model, run.schedule, (n, *shape), sampler=sampler, steps=steps,
                                          generator=seeds, device=args.device, **kw, **guide).float())
        images = torch.cat(chunks).clamp(-1, 1)
        auto = f" autoguidance={guide['autoguidance']:g} (guide: step {run.guide_step})" if guide else ""
        label = f"{run.path} sampler={sampler} steps={steps}{auto} ({time.time() - t0:.0f}s)"
    if args.grid:
        from ddpm.evaluation.viz import save_grid

        save_grid(images[:100].cpu(), args.grid, nrow=10)
    result = score(images)
    print(label)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": label, **result}) + "\n")


if __name__ == "__main__":
    main()
