"""Where the time of one step goes: ours in its best CPU mode, by kind of operator.

    python bench/profile_step.py [--threads 1] [--batch 8] [--reps 5]

Profiles (torch.profiler, self CPU time of each operator) one ancestral sampling step and one
training step of the paper's CIFAR-10 U-Net (bench/models.py), bf16 autocast + channels_last
as bench/run.py's ``ours-best``, and sorts the operators into kinds: convolutions, normalisation,
attention, linear layers, elementwise (activations, adds, the sampler's update), copies and
casts, and the rest. Both libraries run the same convolutions (oneDNN), so the convolutions'
share bounds how far ahead of diffusers ours can be at equal FLOPs: with every other operator
free, at most ``1 / share``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
from cases import Mode  # noqa: E402
from models import model_pair  # noqa: E402

# operator name fragments -> kind; the first match wins (so "convolution_backward" is a convolution)
KINDS = [
    ("convolution", ("conv", "mkldnn_convolution")),
    ("normalisation (GroupNorm)", ("group_norm", "native_group_norm", "batch_norm")),
    ("attention (SDPA, bmm)", ("scaled_dot_product", "flash_attention", "bmm", "baddbmm", "softmax")),
    ("linear (time embedding, attention projections)", ("addmm", "aten::mm", "linear")),
    ("elementwise (SiLU, adds, sampler update)", ("silu", "add", "mul", "sub", "div", "sqrt", "where", "clamp",
                                                   "lerp", "exp", "sin", "cos", "neg", "pow", "randn", "normal",
                                                   "bernoulli", "dropout", "_foreach", "adam", "fused", "sum",
                                                   "mean", "norm")),
    ("copies, casts, layout", ("copy", "to", "contiguous", "cat", "clone", "empty", "_to_copy", "reshape", "view",
                               "permute", "transpose", "stack", "fill", "zero")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile(fn, reps: int) -> dict[str, float]:
    for _ in range(2):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        totals[kind_of(e.key)] = totals.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / reps / 1e3  # ms
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, mode = torch.device("cpu"), Mode(amp="bf16", channels_last=True, fused=True)
    ours, _ = model_pair()
    steps = {"one sampling step": cases.sample_step("ours", copy.deepcopy(ours), mode, args.batch, device),
             "training step": cases.train_step("ours", copy.deepcopy(ours), mode, args.batch, device)}
    tables = {name: profile(fn, args.reps) for name, fn in steps.items()}
    kinds = [k for k, _ in KINDS] + ["other"]
    print(f"ours-best (bf16 autocast, channels_last), batch {args.batch}, {args.threads} thread(s), "
          f"self CPU time per step (torch.profiler, mean of {args.reps})\n")
    print("| kind | " + " | ".join(tables) + " |")
    print("| --- |" + " ---: |" * len(tables))
    for k in kinds:
        cells = [f"{t.get(k, 0.0):.1f} ms ({100 * t.get(k, 0.0) / sum(t.values()):.0f}%)" for t in tables.values()]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{sum(t.values()):.1f} ms" for t in tables.values()) + " |")
    bounds = [f"{name}: {sum(t.values()) / t.get('convolution', 1e-9):.2f}x" for name, t in tables.items()]
    print("\nUpper bound on ours / diffusers at equal convolution time (every other operator free): "
          + ", ".join(bounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
