"""``ddpm`` command line: train, sample, schedules, eval (thin parsing over the library).

User mistakes (UserError, ValueError from config validation, missing files) print
``ddpm: error: <one line>`` on stderr and exit with code 2; Ctrl-C during training saves a
checkpoint and exits with code 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

TRAIN_EXAMPLES = """examples:
  ddpm train                                   # mnist preset on the bundled MNIST, fresh runs/mnist-DATE dir
  ddpm train --preset toy2d --data toy:two_moons --out runs/moons
  ddpm train --preset cifar10 --data cifar10:~/data/cifar10 --out runs/cifar10
  ddpm train --out runs/cifar10 --resume       # continue from the latest checkpoint
  ddpm train --config my.toml --lr 1e-4 --set train.ema_decay=0.999
  torchrun --nproc_per_node 8 -m ddpm train --preset cifar10 --data cifar10:~/data/cifar10 --out runs/c10
"""
QUICKSTART = """examples:
  ddpm train                                   # about 15 minutes on a laptop CPU: digits in runs/mnist-DATE/samples
  ddpm sample runs/mnist-DATE --num 64 --out digits.png
  ddpm schedules --plot schedules.png
  ddpm eval toy runs/moons
run `ddpm COMMAND --help` for each command's options and examples.
"""
SAMPLE_EXAMPLES = """examples:
  ddpm sample runs/mnist-20250101-120000 --num 64 --out digits.png
  ddpm sample runs/c10 --num 50000 --sampler ddim --steps 100 --batch-size 500 --out samples.npz
  ddpm sample runs/c10/ckpt-0800000 --sampler ddpm --num 8 --out x.png --trajectory fig6.png
"""
SCHEDULE_EXAMPLES = """examples:
  ddpm schedules --table
  ddpm schedules --plot docs/schedules.png --T 1000
"""
EVAL_EXAMPLES = """examples:
  ddpm eval fid runs/c10 --ref cifar10-train --ref-data ~/data/cifar10 --num 50000
  ddpm eval nll runs/c10 --data cifar10:~/data/cifar10 --split test
  ddpm eval toy runs/moons --num 2000
(see `ddpm eval --help`)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(f"{self.prog}: {message}")


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as sqrt_linear


def build_parser() -> argparse.ArgumentParser:
    from .config import SAMPLER_NAMES
    from .presets import PRESETS
    from .schedules import SCHEDULES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020).",
                     formatter_class=fmt, epilog=QUICKSTART)
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,schedules,eval}")

    t = sub.add_parser("train", help="train a model (default: mnist preset on bundled MNIST)", formatter_class=fmt,
                       epilog=TRAIN_EXAMPLES, description="Train a DDPM. Flags override the config file, which overrides the preset.")
    t.add_argument("--preset", choices=PRESETS, help="base configuration (default: mnist, or the run's own when resuming)")
    t.add_argument("--config", help="TOML/YAML/JSON file with sections model, diffusion, optim, train, data, sample")
    t.add_argument("--data", help="data source: mnist, cifar10:DIR, folder:DIR, npz:FILE, toy:NAME")
    t.add_argument("--out", help="run directory (default: runs/PRESET-YYYYMMDD-HHMMSS)")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    flags = [  # (flag, dotted config key, type, help)
        ("--steps", "train.steps", int, "optimizer steps"),
        ("--batch-size", "train.batch_size", int, "global batch size (all ranks)"),
        ("--grad-accum", "train.grad_accum", int, "gradient accumulation micro-steps"),
        ("--seed", "train.seed", int, "seed for weights, data order and noise"),
        ("--lr", "optim.lr", float, "Adam learning rate"),
        ("--warmup", "optim.warmup", int, "linear lr warm-up steps"),
        ("--grad-clip", "optim.grad_clip", float, "max gradient norm (0 = off)"),
        ("--ema-decay", "train.ema_decay", float, "EMA decay"),
        ("--schedule", "diffusion.schedule", str, f"beta schedule: {', '.join(SCHEDULES)} (seed names)"),
        ("--timesteps", "diffusion.timesteps", int, "T"),
        ("--prediction", "diffusion.prediction", str, "network target: eps, x0, v"),
        ("--sample-every", "train.sample_every", int, "preview grid every N steps (0 = only at the end)"),
        ("--ckpt-every", "train.ckpt_every", int, "checkpoint every N steps (0 = only at the end)"),
        ("--keep-last", "train.keep_last", int, "checkpoints to keep"),
        ("--log-every", "train.log_every", int, "log (JSONL, progress bar) every N steps"),
        ("--max-minutes", "train.max_minutes", float, "stop and save after this many minutes"),
        ("--amp", "train.amp", str, "mixed precision: auto (bf16 on CUDA), off, bf16"),
        ("--device", "train.device", str, "auto, cpu, cuda"),
        ("--image-size", "data.image_size", int, "resize images of the data source"),
        ("--num-workers", "train.num_workers", int, "threads fetching batches ahead (0 = in the training thread)"),
        ("--eval-every", "eval.every", int, "evaluate the EMA model every N steps (0 = off; see eval.* keys)"),
    ]
    for flag, key, typ, help_ in flags:
        t.add_argument(flag, dest="ov:" + key, type=typ, default=None, help=help_,
                       metavar=flag.lstrip("-").replace("-", "_").upper())
    t.add_argument("--compile", dest="ov:train.compile", action="store_const", const=True, help="torch.compile the model")
    t.add_argument("--channels-last", dest="ov:train.channels_last", action="store_const", const=True, help="NHWC layout")
    t.add_argument("--hflip", dest="ov:data.hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips")
    t.add_argument("--no-progress", dest="ov:train.progress", action="store_const", const=False, help="no progress bar")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.ch=64 --set train.ema_warmup=10")

    s = sub.add_parser("sample", help="draw samples from a trained run or checkpoint", formatter_class=fmt,
                       epilog=SAMPLE_EXAMPLES, description="Draw samples (EMA weights by default) into a PNG grid or an npz.")
    s.add_argument("path", help="run directory, ckpt-NNNNNNN folder or .safetensors file")
    s.add_argument("--num", type=int, default=64, help="number of samples")
    s.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the run's preview sampler")
    s.add_argument("--steps", type=int, help="sampling steps (default: the run's preview setting)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta")
    s.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i), not on batch size")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images: uint8 (N, H, W, C))")
    s.add_argument("--trajectory", help="FILE.png: predicted x0 along t for the first 8 samples (Figure 6)")
    s.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda")
    s.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast for the network")
    s.add_argument("--progress", action="store_true", help="progress bar over sampling steps")

    c = sub.add_parser("schedules", help="plot or tabulate the four seed beta schedules", formatter_class=fmt,
                       epilog=SCHEDULE_EXAMPLES, description="beta_t, abar_t and log-SNR of linear, cosine, sqrt_linear, sqrt.")
    c.add_argument("--plot", help="write a PNG with the schedules side by side")
    c.add_argument("--table", action="store_true", help="print a table (default when --plot is not given)")
    c.add_argument("--T", type=int, default=1000, help="number of timesteps")
    c.add_argument("--every", type=int, default=100, help="table row spacing")

    sub.add_parser("eval", help="FID, NLL in bits/dim, toy metrics (see ddpm eval --help)", formatter_class=fmt,
                   epilog=EVAL_EXAMPLES, add_help=False)
    return parser


def cmd_train(args) -> int:
    from .config import TrainConfig, read_config_file
    from .presets import resolve_config
    from .training import train

    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("ov:") and v is not None}
    if args.data is not None:
        overrides["data.source"] = args.data
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _json_value(value)
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and saved is not None and saved.is_file() and not args.preset and not args.config:
        config = TrainConfig.from_dict(read_config_file(saved)).override(**overrides)
    else:
        config = resolve_config(args.preset, args.config, **overrides)
    run_dir = train(config, out=args.out, resume=args.resume)
    print(f"ddpm: run finished: {run_dir}  (samples in {run_dir / 'samples'}; "
          f"draw more with: ddpm sample {run_dir} --num 64 --out samples.png)")
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import accel, viz
    from .checkpoint import load
    from .samplers import per_sample_seeds, sample

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out.name!r}")
    if args.num < 1 or args.batch_size < 1:
        raise UserError("--num and --batch-size must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    run = load(args.path, ema=not args.no_ema, device=device)
    kw, shape = run.sample_kwargs, run.shape
    preview = run.config.sample
    sampler = args.sampler or preview.sampler
    steps = args.steps if args.steps is not None else (preview.steps if sampler == preview.sampler else None)
    eta = args.eta if args.eta is not None else (preview.eta if sampler == "ddim" else 0.0)
    chunks, trajectory = [], None
    with torch.no_grad(), accel.autocast(device, args.amp):
        for start in range(0, args.num, args.batch_size):
            n = min(args.batch_size, args.num - start)
            seeds = per_sample_seeds(args.seed, n, offset=start, device=device)
            result = sample(run.model, run.schedule, (n, *shape), sampler=sampler, steps=steps, eta=eta,
                            generator=seeds, device=device, progress=args.progress,
                            return_trajectory=bool(args.trajectory) and start == 0, **kw)
            if isinstance(result, tuple):
                result, trajectory = result
            chunks.append(result.float().cpu())
    x0 = torch.cat(chunks)
    if out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        images = viz.to_uint8(x0) if len(shape) == 3 else None
        np.savez_compressed(out, **({"images": images} if images is not None else {"points": x0.numpy()}))
    elif len(shape) == 3:
        viz.save_grid(x0, out)
    else:
        viz.save_scatter(x0, out)
    if trajectory is not None and len(shape) == 3:
        ts, x0s = trajectory["timesteps"], trajectory["x0"][:, :8].float().cpu()
        cols = torch.linspace(0, len(ts) - 1, min(10, len(ts))).round().long()
        viz.save_trajectory_strip(x0s[cols], args.trajectory, timesteps=[int(ts[i]) for i in cols])
    print(f"ddpm: wrote {args.num} samples ({sampler}, {run.path}) to {out}")
    return 0


def cmd_schedules(args) -> int:
    from . import viz

    if args.plot:
        print(f"ddpm: wrote {viz.plot_schedules(args.plot, T=args.T)}")
    if args.table or not args.plot:
        print(viz.schedule_table(T=args.T, every=args.every))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["eval"]:
            from . import cli_eval

            return cli_eval.main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            # A bare `ddpm` shows what there is rather than starting a 15-minute training run;
            # `ddpm train` with no options is the quick start.
            parser.print_help()
            return 2
        return {"train": cmd_train, "sample": cmd_sample, "schedules": cmd_schedules}[args.command](args)
    except KeyboardInterrupt as exc:
        from .training import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"ddpm: {exc} (continue with: ddpm train --resume --out {exc.run_dir})", file=sys.stderr)
        else:
            print("ddpm: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"ddpm: error: {lines[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
