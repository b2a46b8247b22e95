"""``ddpm train``: its options and the command over ``ddpm.training.loop.train``.

Flags override the config file, which overrides the preset; ``--set KEY=VALUE`` reaches any config
field. Rank 0 (the only process without torchrun) prints how the run will train, and at the end
how it ended, and writes RUN/report.html.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .choices import PREDICTIONS, PRESETS, SCHEDULES
from .common import write_run_report
from .options import classes, image_size, threads_option
from ..errors import UserError, first_line

EXAMPLES = """examples:
  ddpm train                                   # mnist preset on the bundled MNIST, fresh runs/mnist-DATE dir
  ddpm train --preset toy2d --data toy:two_moons --out runs/moons
  ddpm train --preset cifar10 --data cifar10:~/data/cifar10 --out runs/cifar10
  ddpm train --out runs/cifar10 --resume       # continue from the latest checkpoint
  ddpm train --config my.toml --lr 1e-4 --set train.ema_decay=0.999
  torchrun --nproc_per_node 8 -m ddpm train --preset cifar10 --data cifar10:~/data/cifar10 --out runs/c10
  ddpm train --preset tiny --data folder:~/icons --image-size 24x40 --channels 4   # RGBA, non-square
  ddpm train --preset cifar10 --data hf:~/my-saved-dataset:train --image-column img
  ddpm train --preset mnist-learned            # learned variances, L_hybrid (same as: --learn-sigma)
  ddpm train --preset tiny --learn-sigma --objective vlb   # L_vlb alone, t importance-sampled
  ddpm train --preset mnist-cond --out runs/mnist-cond     # class-conditional, classifier-free guidance
  ddpm train --preset tiny --data folder:~/pets --classes auto   # one class per sub-folder of ~/pets
  ddpm report runs/c10                         # RUN/report.html: loss, lr, previews, metrics, config
"""


def add_parser(subparsers, formatter_class) -> None:
    t = subparsers.add_parser("train", help="train a model (default: mnist preset on bundled MNIST)",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Train a DDPM. Flags override the config file, which overrides the preset.")
    t.set_defaults(func=cmd_train)
    t.add_argument("--preset", choices=PRESETS, help="base configuration (default: mnist, or the run's own when resuming)")
    t.add_argument("--config", help="TOML/YAML/JSON file with sections model, diffusion, optim, train, data, sample")
    t.add_argument("--data", help="data source: mnist, cifar10:DIR, folder:DIR, npz:FILE, hf:PATH_OR_NAME[:SPLIT], toy:NAME")
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
        ("--prediction", "diffusion.prediction", str, f"network target: {', '.join(PREDICTIONS)}"),
        ("--variance", "diffusion.variance", str, "reverse variance: fixed_small, fixed_large, learned_range "
         "(sets --learn-sigma), analytic (estimated after training: ddpm analytic RUN)"),
        ("--objective", "diffusion.objective", str, "simple (L_simple; L_hybrid with learned variances) or vlb "
         "(L_vlb alone, t importance-sampled)"),
        ("--sample-every", "train.sample_every", int, "preview grid every N steps (0 = only at the end)"),
        ("--ckpt-every", "train.ckpt_every", int, "checkpoint every N steps (0 = only at the end)"),
        ("--keep-last", "train.keep_last", int, "checkpoints to keep"),
        ("--log-every", "train.log_every", int, "log (JSONL, progress bar) every N steps"),
        ("--max-minutes", "train.max_minutes", float,
         "time budget: stop and save after this many minutes of training; the learning rate decays over it"),
        ("--amp", "train.amp", str, "autocast: auto (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, "
         "else float32), off, bf16, fp16 (default: the preset's)"),
        ("--device", "train.device", str, "auto, cpu, cuda"),
        ("--image-size", "data.image_size", image_size, "S or HxW: resize and centre-crop the data's images; "
         "the U-Net is sized to match"),
        ("--channels", "data.channels", int, "1, 3 or 4 (RGBA): convert the data's images; the U-Net is sized to match"),
        ("--image-column", "data.image_column", str, "hf: sources: the image column (default: the first Image feature)"),
        ("--label-column", "data.label_column", str, "hf: sources: the label column (default: detected)"),
        ("--num-workers", "train.num_workers", int, "threads fetching batches ahead (0 = in the training thread)"),
        ("--eval-every", "eval.every", int, "evaluate the EMA model every N steps (0 = off; see eval.* keys)"),
        ("--cond-drop-prob", "train.cond_drop_prob", float, "class-conditional runs: share of labels dropped to the "
         "null label, for classifier-free guidance (default 0.1)"),
        ("--guidance", "sample.guidance", float, "class-conditional runs: guidance scale of the previews (one row "
         "per class) and the default of ddpm sample (default: the preset's, else 1)"),
    ]
    for flag, key, typ, help_ in flags:
        t.add_argument(flag, dest="ov:" + key, type=typ, default=None, help=help_,
                       metavar=flag.lstrip("-").replace("-", "_").upper())
    t.add_argument("--classes", type=classes, default=None, metavar="K|auto",
                   help="train a class-conditional model of K classes (model.num_classes); auto: the data's "
                   "labels (mnist, cifar10, folder:DIR with one sub-folder per class, npz with labels, hf)")
    t.add_argument("--learn-sigma", dest="ov:model.learn_sigma", action="store_const", const=True,
                   help="the network also outputs its variances (2C channels), read by --variance learned_range")
    t.add_argument("--compile", dest="ov:train.compile", action="store_const", const=True, help="torch.compile the model")
    t.add_argument("--channels-last", dest="ov:train.channels_last", action="store_const", const=True, help="NHWC layout")
    t.add_argument("--hflip", dest="ov:data.hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips")
    t.add_argument("--threads", type=threads_option, default=None, metavar="auto|N",
                   help="CPU threads: auto follows the load of other processes (a budgeted run does by "
                   "default; a step-counted run keeps its count so --resume is bit-exact), N fixes the count")
    t.add_argument("--no-progress", dest="ov:train.progress", action="store_const", const=False, help="no progress bar")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.ch=64 --set train.ema_warmup=10")


def cmd_train(args) -> int:
    from ..config import TrainConfig, read_config_file
    from ..presets import resolve_config
    from ..training.loop import train

    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("ov:") and v is not None}
    if args.data is not None:
        overrides["data.source"] = args.data
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _json_value(value)
    # In training the variance channels and learned_range go together (core.diffusion.variance_channels_problem):
    # either flag sets both.
    variance = overrides.get("diffusion.variance")
    if variance is None and overrides.get("model.learn_sigma") is True:
        overrides["diffusion.variance"] = "learned_range"
    elif variance is not None and "model.learn_sigma" not in overrides:
        overrides["model.learn_sigma"] = variance == "learned_range"
    # --classes K sets model.num_classes; auto reads K from the data, once the rest is resolved (so
    # options that need a conditional model, such as --guidance, wait for it).
    late = {}
    if args.classes == "auto":
        late = {k: overrides.pop(k) for k in ("sample.guidance",) if k in overrides}
    elif args.classes is not None:
        overrides["model.num_classes"] = args.classes
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and saved is not None and saved.is_file() and not args.preset and not args.config:
        try:
            stored = TrainConfig.from_dict(read_config_file(saved))
        except (UserError, ValueError) as exc:  # name the file: it may be another program's config.json
            text = first_line(exc)
            raise UserError(text if str(saved) in text else f"{saved}: {text}") from None
        config = stored.override(**overrides)
    else:
        config = resolve_config(args.preset, args.config, **overrides)
        nulls = {k: None for k, v in overrides.items() if v is None}
        if nulls:  # resolve_config skips None (an option not given); --set KEY=null is given: it clears KEY
            config = config.override(**nulls)
    config = _size_model_to_data(config, overrides)
    if args.classes == "auto":
        config = config.override(**{"model.num_classes": _classes_in_data(config), **late})
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks and writes the run's files
    if args.resume and _already_done(Path(args.out), config, rank0):
        return 0
    if rank0:
        print(f"ddpm: training {config.name} {_training_mode(config)}", flush=True)
    run_dir = train(config, out=args.out, resume=args.resume, threads=args.threads)
    if rank0:
        _say_how_it_ended(run_dir, config)
        write_run_report(run_dir)
        print(f"ddpm: run finished: {run_dir}  (samples in {run_dir / 'samples'}; "
              f"draw more with: ddpm sample {run_dir} --num 64 --out samples.png)")
    return 0


def _already_done(out: Path, config, rank0: bool) -> bool:
    """A resumed run whose newest checkpoint has reached train.steps: say so (and how to go on)."""
    from ..io.checkpoint import list_checkpoints

    done = list_checkpoints(out)
    if not done or done[-1][0] < config.train.steps:
        return False
    if rank0:
        step = done[-1][0]
        print(f"ddpm: {out} is already at step {step} of {config.train.steps}; raise --steps (or --max-minutes) "
              f"to continue")
    return True


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as sqrt_linear


def _classes_in_data(config) -> int:
    """--classes auto: the number of classes of the run's data (a one-line error if it has no labels)."""
    from ..data.sources import require_labels
    from ..training.data import open_training_data  # the data exactly as the run will open it

    return require_labels(open_training_data(config), "--classes auto")


def _size_model_to_data(config, overrides: dict):
    """--image-size and --channels size a U-Net to the data (attention kept at the same levels,
    out_channels following in_channels), unless model.image_size/model.in_channels are set too."""
    from ..config import model_type
    from ..nets.unet_config import attn_at_same_levels

    m, sized = config.model, {}
    if model_type(m) != "unet":
        return config
    if "data.image_size" in overrides and "model.image_size" not in overrides:
        size = config.data.image_size
        sized.update({"model.image_size": size, "model.attn_resolutions": attn_at_same_levels(m, size)})
    if "data.channels" in overrides and "model.in_channels" not in overrides:
        c = config.data.channels
        # A learned variance doubles the output channels (ddpm.core.diffusion: eps and v).
        sized.update({"model.in_channels": c, "model.out_channels": c * (m.out_channels // m.in_channels)})
    return config.override(**sized) if sized else config


def _training_mode(config) -> str:
    """"on cpu in bf16 autocast (auto; ...)": the device and autocast mode the loop will choose
    (ddpm.training.loop resolves them the same way; a preset's explicit train.amp is kept)."""
    from ..core.device import describe_amp, pick_device, resolve_amp

    device = pick_device(config.train.device).type
    requested = config.train.amp
    # an explicit mode may come from the preset or the config file rather than a flag
    mode = describe_amp(resolve_amp(requested, device), requested,
                        source=f"train.amp={requested}; --amp auto to choose per device")
    budget = config.train.max_minutes
    steps = f"{config.train.steps} step{'s' * (config.train.steps != 1)}"
    length = (f"{steps} or {budget:g} minutes, whichever ends first (the learning rate decays over both)"
              if budget else steps)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # the backend init_distributed picks: NCCL where the ranks have GPUs
        length += f", {world} processes ({'nccl' if device == 'cuda' else 'gloo'})"
    return f"on {device} in {mode}, {length}"


def _say_how_it_ended(run_dir: Path, config) -> None:
    """One line when the clock, not the step count, ended the run (from log.jsonl's last record)."""
    try:
        last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return
    if (last.get("time_fraction") or 0) >= 1 and last.get("step", 0) < config.train.steps:
        print(f"ddpm: the {config.train.max_minutes:g}-minute budget (train.max_minutes) ended the run at step "
              f"{last['step']} of at most {config.train.steps}, with its learning-rate decay finished")
