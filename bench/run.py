"""Ours vs diffusers on the paper's CIFAR-10 U-Net, same weights, same process, same inputs.

    python bench/run.py --device cpu [--quick]
    python bench/run.py --device cuda --json OUT.json --budget-s 330

Prints a table and rewrites this device's section of docs/benchmarks.md (``--doc``). Contestants
of one workload are timed in alternation (A B A B ...) and report medians; see bench/timing.py.
``--quick`` shrinks the CPU workloads (batch 2, DDIM-3, one or two repetitions) to smoke-test the harness
in a couple of minutes; its numbers are not the ones to quote.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import timing  # noqa: E402
from cases import Mode  # noqa: E402
from models import model_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Workload:
    name: str  # train | step | ddim | ancestral
    batch: int
    steps: int = 1  # model calls per unit of work
    reps: int = 3
    warmup: int = 1
    diffusers_steps: int | None = None  # time fewer diffusers steps and extrapolate
    contestants: list[tuple[str, str, Mode]] = field(default_factory=list)  # (key, side, mode)

    @property
    def title(self) -> str:
        return {
            "train": f"training step, batch {self.batch}",
            "step": f"one sampling step, batch {self.batch}",
            "ddim": f"DDIM-{self.steps} run, batch {self.batch}",
            "ancestral": f"{self.steps}-step ancestral run, batch {self.batch}",
        }[self.name]


def plan(device: torch.device, quick: bool, compile: bool = False) -> list[Workload]:
    if device.type == "cpu":
        # Each side as a user gets it by default: ours trains with accel.make_optimizer (fused
        # Adam) and accel.ema_update, diffusers with torch's default Adam and EMAModel.
        d32, o32 = ("diffusers", "diffusers", Mode()), ("ours", "ours", Mode(fused=True))
        # Best eager modes: bf16 autocast (AMX/AVX-512 BF16) with channels_last, which oneDNN
        # convolves about 18% faster than NCHW in bf16 (forward, batch 8).
        obf = ("ours-best", "ours", Mode(amp="bf16", channels_last=True, fused=True))
        dbf = ("diffusers-best", "diffusers", Mode(amp="bf16", channels_last=True))
        base = [d32, o32, obf] if quick else [d32, o32, obf, dbf]
        # --compile, for information: both sides' best mode under torch.compile (inductor's C++
        # kernels; minutes of compilation per side on a small CPU).
        compiled = [("ours-compiled", "ours", Mode(amp="bf16", channels_last=True, compile=True, fused=True)),
                    ("diffusers-compiled", "diffusers", Mode(amp="bf16", channels_last=True, compile=True))]
        b = 2 if quick else 8
        return [
            Workload("train", b, reps=1 if quick else 3, contestants=base),
            Workload("step", b, reps=2 if quick else 5, contestants=base + (compiled if compile else [])),
            Workload("ddim", b, steps=3 if quick else 50, reps=1, warmup=0, contestants=base),
        ]
    # CUDA: both sides in their best mode (compile, bf16, channels_last, fused optimizer/EMA),
    # and eager bf16 beside them: no compilation to pay for, and a result even if compile fails.
    dbest = ("diffusers-best", "diffusers", Mode("bf16", True, True, False, True))
    obest = ("ours-best", "ours", Mode("bf16", True, True, True, True))
    oeager = ("ours-eager", "ours", Mode("bf16", True, False, True, True))
    deager = ("diffusers-eager-bf16", "diffusers", Mode("bf16"))
    # Most important first (the budget may cut the tail): the two targets, then the rest.
    # Each (model, mode) is compiled once per batch size; compilation dominates the run time.
    return [
        Workload("train", 512, reps=5, warmup=3, contestants=[dbest, obest, deager, oeager]),
        Workload("ancestral", 256, steps=1000, reps=1, warmup=1, diffusers_steps=100,
                 contestants=[obest, deager, oeager]),
        Workload("train", 128, reps=5, warmup=3, contestants=[dbest, obest, deager, oeager]),
        Workload("ddim", 256, steps=50, reps=3, warmup=1, contestants=[dbest, obest, deager, oeager]),
        Workload("step", 256, reps=5, warmup=3, contestants=[dbest, obest, deager, oeager]),
    ]


def build(w: Workload, side: str, mode: Mode, models: dict, device: torch.device):
    model = models[side]
    if w.name == "train":
        return cases.train_step(side, model, mode, w.batch, device)
    if w.name == "step":
        return cases.sample_step(side, model, mode, w.batch, device)
    sampler = "ddim" if w.name == "ddim" else "ddpm"
    model_steps = w.diffusers_steps if side == "diffusers" else None
    return cases.sample_run(side, model, mode, w.batch, device, sampler=sampler, steps=w.steps, model_steps=model_steps)


def measure(w: Workload, models: dict, device: torch.device, flops: dict, peak_tflops: float | None) -> list[dict]:
    fns, rows = {}, []
    wid = f"{w.title} #{id(w)}"  # groups the rows of this workload for the speed-up table
    for key, side, mode in w.contestants:
        row = {"workload": w.title, "wid": wid, "kind": w.name, "batch": w.batch, "steps": w.steps, "key": key, "side": side,
               "mode": mode.label(training=w.name == "train")}
        try:
            fns[key] = build(w, side, mode, models, device)
        except Exception as e:  # a mode this torch/device cannot do: report it, keep the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    if not fns:
        return rows
    seconds, errors = timing.interleaved(fns, device, reps=w.reps, warmup=w.warmup)
    for row in rows:
        if row["key"] in errors:
            row["error"] = errors[row["key"]]
    for row in rows:
        if row["key"] not in seconds:
            continue
        m = seconds[row["key"]]
        s, cpu = m["wall"], m["cpu"]
        if w.diffusers_steps and row["side"] == "diffusers":
            row["extrapolated_from_steps"] = w.diffusers_steps
            s, cpu = s * w.steps / w.diffusers_steps, cpu * w.steps / w.diffusers_steps
        row["seconds"], row["wall_samples"] = s, m["wall_samples"]
        row["images_per_s"] = w.batch / s
        if device.type == "cpu":
            row["cpu_seconds"] = cpu
            if torch.get_num_threads() == 1:  # the work's own time, whatever else the CPU runs
                row["images_per_s"] = w.batch / cpu
        if w.name in ("train", "step"):  # a sampling loop's peak is one step's: not re-run for it
            mem, what = timing.peak_memory(fns[row["key"]], device)
            row["peak_mem_mib"] = None if mem is None else mem / 2**20
            row["mem_kind"] = what
        per_image = flops["train"] if w.name == "train" else flops["forward"] * w.steps
        if peak_tflops:
            row["mfu"] = row["images_per_s"] * per_image / (peak_tflops * 1e12)
    return rows


def count_model_flops(models: dict, device: torch.device) -> dict:
    model = models["ours"].to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.full((2,), 500, dtype=torch.long, device=device)
    forward = timing.count_flops(lambda: model(x, t)) / 2
    train = timing.count_flops(lambda: model(x, t).square().mean().backward()) / 2
    model.zero_grad(set_to_none=True)
    models["ours"] = model.cpu()
    return {"forward": forward, "train": train}


def same_function(models: dict, device: torch.device) -> str:
    """Evidence that both sides hold the same network: their outputs on one batch (eval mode)."""
    from ddpm.nets.unet_config import UNET_PRESETS

    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.tensor([10, 900], device=device)
    with torch.no_grad():
        out = {k: m.to(device).eval()(x, t).float() for k, m in models.items()}
    for m in models.values():
        m.cpu().train()
    err = ((out["ours"] - out["diffusers"]).norm() / out["diffusers"].norm()).item()
    preset = models["ours"].config == UNET_PRESETS["cifar10"]
    return f"relative difference of the outputs {err:.1e} (float32); ours equals UNet.from_preset('cifar10'): {preset}"


def ratios(rows: list[dict]) -> list[str]:
    """One line per workload: each 'ours' contestant's speed over each diffusers contestant's."""
    out = []
    by_workload: dict[str, list[dict]] = {}
    for r in rows:
        if "seconds" in r:
            by_workload.setdefault(r.get("wid", r["workload"]), []).append(r)
    for rs in by_workload.values():
        name = rs[0]["workload"]
        for o in (r for r in rs if r["side"] == "ours"):
            for d in (r for r in rs if r["side"] == "diffusers"):
                cpu = f" | {d['cpu_seconds'] / o['cpu_seconds']:.2f}x" if "cpu_seconds" in o and "cpu_seconds" in d else ""
                out.append(f"| {name} | {o['key']} ({o['mode']}) | {d['key']} ({d['mode']}) | "
                           f"**{d['seconds'] / o['seconds']:.2f}x**{cpu} |")
    return out


def fmt_row(r: dict) -> str:
    if "error" in r and "seconds" not in r:
        return f"| {r['workload']} | {r['key']} | {r['mode']} | failed: {r['error']} | | | |"
    mem = "as one step" if "mem_kind" not in r else "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f} MiB"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
    s = f"{r['seconds']:.3f} s" if r["seconds"] >= 0.1 else f"{1e3 * r['seconds']:.2f} ms"
    if "cpu_seconds" in r:
        s += f" (CPU {r['cpu_seconds']:.2f} s)"
    if "extrapolated_from_steps" in r:
        s += f" ({r['extrapolated_from_steps']} of {r['steps']} steps timed, scaled)"
    return f"| {r['workload']} | {r['key']} | {r['mode']} | {r['images_per_s']:.1f} | {s} | {mem} | {mfu} |"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"#### {meta['device_name']} ({meta['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("date",)]
    if any("cpu_seconds" in r for r in rows) and torch.get_num_threads() == 1:
        lines += ["", "images/s from the median process CPU time (one thread: the cycles the work itself got)."]
    lines += ["", "| workload | contestant | mode | images/s | median time per call | peak memory | MFU |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [fmt_row(r) for r in rows]
    cpu = any("cpu_seconds" in r for r in rows)
    lines += ["", "Speed-up (diffusers time / ours time; above 1 means ours is faster"
              + ("; by median wall-clock time, then by median process CPU time" if cpu else "") + "):", "",
              "| workload | ours | diffusers | speed-up |" + (" by CPU time |" if cpu else ""),
              "| --- | --- | --- | ---: |" + (" ---: |" if cpu else "")]
    lines += ratios(rows)
    return "\n".join(lines) + "\n"


def write_doc(path: Path, device_type: str, section: str) -> None:
    begin, end = f"<!-- bench:{device_type}:begin -->", f"<!-- bench:{device_type}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small CPU smoke run (not the numbers to quote)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file to update")
    p.add_argument("--json", type=Path, default=None, help="also write every row as JSON here")
    p.add_argument("--budget-s", type=float, default=None, help="skip workloads once this much time has passed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 steadies timings on an oversubscribed CPU")
    p.add_argument("--only", default=None, help="comma-separated workload kinds to run (train,step,ddim,ancestral)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: add both sides under torch.compile to the sampling-step workload (for information)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            device_name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device_name += f", {torch.get_num_threads()} torch thread(s)"
    import diffusers

    ours, theirs = model_pair()
    models = {"ours": ours, "diffusers": theirs}
    flops = count_model_flops(models, device)
    same = same_function(models, device)
    if device.type == "cuda":  # after the float32 comparison above
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # One static compilation per batch size (not a dynamic-batch graph after the second).
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    peak = timing.matmul_peak_tflops(device) if device.type == "cuda" else None
    meta = {
        "device_name": device_name + (" (--quick)" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "model": "DDPM CIFAR-10 U-Net (35.7M parameters), identical weights on both sides",
        "same function": same,
        "FLOPs per image": f"forward {flops['forward'] / 1e9:.2f} GFLOP, training step {flops['train'] / 1e9:.2f} GFLOP "
                           "(torch.utils.flop_counter)",
    }
    if peak:
        meta["bf16 matmul peak (8192^3, measured)"] = f"{peak:.0f} TFLOP/s"
    if device.type == "cuda":
        # TF32 is allowed for the float32 parts on both sides.
        meta["cuda"] = f"{torch.version.cuda}, cudnn.benchmark on, TF32 allowed"
    only = set(args.only.split(",")) if args.only else None
    rows: list[dict] = []
    for w in plan(device, args.quick, args.compile):
        if only and w.name not in only:
            continue
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            rows.append({"workload": w.title, "key": "-", "mode": "-", "side": "-",
                         "error": f"skipped: time budget spent ({elapsed:.0f} s)"})
            continue
        new = measure(w, models, device, flops, peak)
        print(f"# {w.title}: {time.perf_counter() - start - elapsed:.0f} s, done at {time.perf_counter() - start:.0f} s",
              flush=True)
        for r in new:
            print(fmt_row(r), flush=True)
        rows += new
        save(args, device, meta, rows, start)  # after every workload: a killed run keeps its results
    print(save(args, device, meta, rows, start))
    return 0


def save(args, device: torch.device, meta: dict, rows: list[dict], start: float) -> str:
    meta["wall time of this benchmark"] = f"{time.perf_counter() - start:.0f} s"
    section = markdown(meta, rows)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.doc:
        write_doc(args.doc, device.type, section)
    return section


if __name__ == "__main__":
    raise SystemExit(main())
