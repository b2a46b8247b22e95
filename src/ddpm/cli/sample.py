"""``ddpm sample``: its options and the command over ``ddpm.sampling.batches.sample_batches``.

Draws samples (EMA weights by default) of a run, checkpoint, weights file or diffusers pipeline
into a PNG grid (or a scatter plot for 2-D runs) or an npz, optionally with the predicted x0
along t of the first samples (``--trajectory``, DDPM Figure 6).
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import apply_variance, load_run, sampling_conditioning
from .options import add_sampling_args, positive
from ..errors import UserError
from ..io.files import atomic_write_npz

EXAMPLES = """examples:
  ddpm sample runs/mnist-20250101-120000 --num 64 --out digits.png
  ddpm sample runs/c10 --num 50000 --sampler ddim --steps 100 --batch-size 500 --out samples.npz
  ddpm sample runs/c10/ckpt-0800000 --sampler ddpm --num 8 --out x.png --trajectory fig6.png
  ddpm sample ddpm-cifar10-32 --sampler dpm++2m --steps 20 --out x.png   # a downloaded diffusers pipeline
  ddpm analytic runs/mnist-20250101-120000     # once: RUN/analytic.json, then --variance analytic
  ddpm sample runs/mnist-20250101-120000 --sampler ddpm --steps 25 --variance analytic --out x.png
  ddpm sample runs/mnist-cond --class 7 --guidance 3 --num 16 --out sevens.png
  ddpm sample runs/mnist-cond --class all --per-class 10 --out digits.png   # one row per class
"""


def add_parser(subparsers, formatter_class) -> None:
    s = subparsers.add_parser("sample", help="draw samples from a trained run or checkpoint",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Draw samples (EMA weights by default) into a PNG grid or an npz.")
    s.set_defaults(func=cmd_sample)
    s.add_argument("path", help="run directory, ckpt-NNNNNNN folder, .safetensors file or diffusers pipeline directory")
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images: uint8 (N, H, W, C); "
                   "labels (N,) for class-conditional runs)")
    s.add_argument("--trajectory", help="FILE.png: predicted x0 along t for the first 8 samples (Figure 6)")
    add_sampling_args(s, num_default=64, num_help="number of samples")
    s.add_argument("--per-class", type=positive, default=None,
                   help="with --class all: samples per class, one row each (default: --num / K, at least 1)")


def cmd_sample(args) -> int:
    import torch

    from ..evaluation import viz
    from ..sampling.batches import sample_batches, sampler_settings

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out.name!r}")
    run, device = load_run(args.path, args)
    settings = sampler_settings(run, args.sampler, args.steps, args.eta)
    apply_variance(run, args.variance, used=settings.sampler == "ddpm")
    cond = sampling_conditioning(run, args, args.num)  # --class all: num = K x per class
    started = time.perf_counter()
    result = sample_batches(run, cond.num, settings, seed=args.seed, batch_size=args.batch_size, device=device,
                            progress=args.progress, return_trajectory=bool(args.trajectory), labels=cond.labels,
                            guidance=cond.guidance, autoguidance=cond.autoguidance,
                            guidance_interval=cond.guidance_interval or (0, run.schedule.num_timesteps - 1))
    seconds = time.perf_counter() - started
    x0, trajectory = result if args.trajectory else (result, None)
    shape = run.shape
    if out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        images = viz.to_uint8(x0) if len(shape) == 3 else None
        arrays = {"images": images} if images is not None else {"points": x0.numpy()}
        if cond.labels is not None:
            arrays["labels"] = cond.labels.numpy()  # label i of sample i
        atomic_write_npz(out, **arrays)  # as the PNG grids: whole or not at all, never through a link
    elif len(shape) == 3:
        viz.save_grid(x0, out, nrow=cond.per_class)  # --class all: one row per class
    else:
        viz.save_scatter(x0, out)
    if args.trajectory and len(shape) == 3:
        ts, x0s = trajectory["timesteps"], trajectory["x0"][:, :8].float().cpu()
        cols = torch.linspace(0, len(ts) - 1, min(10, len(ts))).round().long()
        viz.save_trajectory_strip(x0s[cols], args.trajectory, timesteps=[int(ts[i]) for i in cols])
    guided = f", autoguidance {cond.autoguidance:g} by step {run.guide_step}" if cond.autoguidance != 1 else ""
    if guided and cond.guidance_interval is not None and cond.labels is None:
        guided += " for t in [{}, {}]".format(*cond.guidance_interval)
    # the ancestral sampler's sigma_t^2 (the run's, or --variance), which changes what it draws
    variance = f", variance {run.sample_kwargs.get('variance')}" if settings.sampler == "ddpm" else ""
    d = run.config.distill
    if d is not None:  # what a distilled run's one call per step carries: its teacher's guidance
        baked = [f"guidance {d.teacher_guidance:g}"] if d.teacher_guidance != 1 else []
        baked += [f"autoguidance {d.teacher_autoguidance:g}"] if d.teacher_autoguidance != 1 else []
        if baked and d.teacher_guidance_interval is not None:
            baked[-1] += " for t in [{}, {}]".format(*d.teacher_guidance_interval)
        guided += f", the teacher's {' and '.join(baked)} distilled in" if baked else ""
    print(f"ddpm: wrote {cond.num} samples ({settings.sampler}, {settings.steps} step{'s' * (settings.steps != 1)}"
          f"{variance}{cond.describe()}{guided}, "
          f"{run.path}) to {out} in {seconds:.1f} s")
    return 0
