"""``ddpm`` command line: train, sample, schedules, eval (thin parsing over the library).

User mistakes (UserError, ValueError from config validation, missing files) print
``ddpm: error: <one line>`` on stderr and exit with code 2, as do exhausted memory or disk and a
diverged training run; Ctrl-C, SIGTERM or SIGHUP during training saves a checkpoint and exits
with code 128 + the signal number (130, 143, 129).
"""

from __future__ import annotations

import argparse
import json
import os
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
  ddpm train --preset tiny --data folder:~/icons --image-size 24x40 --channels 4   # RGBA, non-square
  ddpm train --preset cifar10 --data hf:~/my-saved-dataset:train --image-column img
  ddpm train --preset mnist-learned            # learned variances, L_hybrid (same as: --learn-sigma)
  ddpm train --preset tiny --learn-sigma --objective vlb   # L_vlb alone, t importance-sampled
  ddpm train --preset mnist-cond --out runs/mnist-cond     # class-conditional, classifier-free guidance
  ddpm train --preset tiny --data folder:~/pets --classes auto   # one class per sub-folder of ~/pets
  ddpm report runs/c10                         # RUN/report.html: loss, lr, previews, metrics, config
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
  ddpm sample ddpm-cifar10-32 --sampler dpm++2m --steps 20 --out x.png   # a downloaded diffusers pipeline
  ddpm analytic runs/mnist-20250101-120000     # once: RUN/analytic.json, then --variance analytic
  ddpm sample runs/mnist-20250101-120000 --sampler ddpm --steps 25 --variance analytic --out x.png
  ddpm sample runs/mnist-cond --class 7 --guidance 3 --num 16 --out sevens.png
  ddpm sample runs/mnist-cond --class all --per-class 10 --out digits.png   # one row per class
"""
INPAINT_EXAMPLES = """examples:
  ddpm inpaint runs/mnist-cond --image digit.png --mask mask.png --out filled.png
  ddpm inpaint runs/mnist-cond --image digit.png --mask mask.png --class 3 --guidance 3 --num 4 --out threes.png
  ddpm inpaint runs/mnist --image digit.png --mask mask.png --resample 1 --out replaced.png   # no resampling
"""
INTERPOLATE_EXAMPLES = """examples:
  ddpm interpolate runs/mnist a.png b.png --frames 8 --out strip.png
  ddpm interpolate runs/mnist a.png b.png --frames 8 --method noised --t 500 --out strip.png   # DDPM Fig. 8
"""
ANALYTIC_EXAMPLES = """examples:
  ddpm analytic runs/mnist-20250101-120000 --num 1024
  ddpm sample runs/mnist-20250101-120000 --sampler ddpm --steps 25 --variance analytic --out x.png
  ddpm eval nll runs/mnist-20250101-120000 --variance analytic --timesteps 100
"""
EXPORT_EXAMPLES = """examples:
  ddpm export runs/c10 --format diffusers c10-diffusers   # then DDPMPipeline.from_pretrained("c10-diffusers")
  ddpm sample c10-diffusers --num 16 --out x.png          # a diffusers pipeline directory samples like a run
"""
SCHEDULE_EXAMPLES = """examples:
  ddpm schedules --table
  ddpm schedules --plot docs/schedules.png --T 1000
"""
# example lines of the eval commands, shown by each command and all together by `ddpm eval --help`
FID_EXAMPLES = """\
  ddpm eval fid runs/c10 --ref cifar10-train --ref-data ~/data/cifar10 --num 50000 --sampler ddpm
  ddpm eval fid samples.npz --ref stats.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
"""
NLL_EXAMPLES = """\
  ddpm eval nll runs/c10 --data cifar10:~/data/cifar10 --split test                  # all T terms
  ddpm eval nll runs/c10 --data cifar10:~/data/cifar10 --split test --timesteps 100  # stratified, ~10x cheaper
"""
TOY_EXAMPLES = """\
  ddpm eval toy runs/moons --num 2000
  ddpm eval toy runs/moons --sampler ddpm                                             # all T steps
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise UserError(f"{self.prog}: {message}")


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as sqrt_linear


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _classes(text: str):
    """--classes: 'auto' or a positive number of classes."""
    return text if text == "auto" else _positive(text)


def _frames(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 frames (the two ends), got {text!r}")
    return value


def _image_size(text: str):
    """--image-size: S (square) or HxW (height x width), positive integers."""
    parts = text.lower().replace(",", "x").split("x")
    values = [int(p) for p in parts if p.strip().isdigit()]
    if len(values) != len(parts) or len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive integers), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Which weights of a run to load, where to run them: every command that loads a run."""
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--progress", action="store_const", const=True, default=None,
                   help="progress bars (sampling: on by default when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")


def _add_sampling_args(p: argparse.ArgumentParser, *, num_default: int | None, num_help: str) -> None:
    """The sampling options of ``ddpm sample``, ``ddpm eval fid`` and ``ddpm eval toy``: one
    definition, so the same flags mean the same thing with the same defaults everywhere (only the
    sample count differs: a grid, a toy metric and FID want different numbers)."""
    from .accel import AMP_MODES
    from .samplers import SAMPLERS

    p.add_argument("--num", type=_positive, default=num_default, help=num_help)
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's preview sampler (config sample.sampler)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the run's preview steps for its "
                   "preview sampler, else the sampler's default: ddpm T, ddim 50, dpm++2m 20)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's preview eta for ddim, else 0)")
    p.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i), not on batch size")
    p.add_argument("--batch-size", type=_positive, default=256, help="samples per network batch")
    _add_class_args(p, "class-conditional runs: a class index 0..K-1 or name, or 'all' (one row per class); "
                    "default: each sample's label drawn uniformly from its own seed")
    _add_variance_arg(p)
    p.add_argument("--amp", choices=("auto", *AMP_MODES), default="auto",
                   help="autocast of the network: auto (default: bf16 on CUDA and on CPUs with AMX or AVX-512 "
                   "BF16, fp16 on older GPUs, else float32), off (float32), bf16, fp16")
    _add_model_args(p)


def _add_class_args(p: argparse.ArgumentParser, class_help: str) -> None:
    """--class and --guidance: one definition for sample, eval, inpaint and interpolate."""
    p.add_argument("--class", dest="cls", metavar="CLASS", default=None, help=class_help)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w: eps_null + "
                   "w (eps_class - eps_null); 1 plain conditional, 0 unconditional (default: the run's sample.guidance)")


def _add_variance_arg(p: argparse.ArgumentParser) -> None:
    from .diffusion import VARIANCES

    p.add_argument("--variance", choices=VARIANCES, default=None,
                   help="reverse variance sigma_t^2 of ancestral sampling and the bound (default: the run's): "
                   "fixed_small (beta~), fixed_large (beta), learned_range (a --learn-sigma run), analytic "
                   "(after `ddpm analytic RUN`)")


def _eval_command(name: str):
    # cli_eval (numpy, the metrics) is imported only when an eval command runs.
    def run(args) -> int:
        from . import cli_eval

        return getattr(cli_eval, f"cmd_{name}")(args)

    return run


def _add_eval_parsers(e: argparse.ArgumentParser, fmt) -> None:
    """``ddpm eval fid|nll|toy``: nested subcommands of the one parser."""
    sub = e.add_subparsers(dest="metric", metavar="{fid,nll,toy}")
    report = "report path (.json); default: RUN/eval/... or next to the samples"

    p = sub.add_parser("fid", help="FID (+ IS, KID) against a reference set", formatter_class=fmt,
                       epilog="examples:\n" + FID_EXAMPLES,
                       description="FID, Inception Score and KID of samples drawn from a run, an npz or an image folder.")
    p.set_defaults(func=_eval_command("fid"))
    p.add_argument("source", help="RUN_DIR or checkpoint (samples are drawn), samples .npz (images uint8 NHWC), or image DIR")
    p.add_argument("--ref", required=True, help="cifar10-train, cifar10-test, stats .npz (mu, sigma), images .npz, or image DIR")
    p.add_argument("--ref-data", default=None, help="CIFAR-10 folder for --ref cifar10-* (default: $DDPM_CIFAR10_DIR)")
    p.add_argument("--ref-num", type=_positive, default=None, help="use the first N reference images (default: all)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DDPM_INCEPTION_WEIGHTS, torch.hub cache, or download)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default: $DDPM_CACHE_DIR/fid or ~/.cache/ddpm/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--no-save-samples", action="store_true", help="do not keep drawn samples as RUN_DIR/eval/*.npz")
    p.add_argument("--out", default=None, help=report)
    _add_sampling_args(p, num_default=None, num_help="samples to draw from a run (default: 50,000) "
                       "or to take from an npz/folder (default: all)")
    # --batch-size sets both networks' batch (the one definition above); these set one each.
    # (Before the one parser, --batch-size meant Inception's and --sample-batch-size the sampler's.)
    p.add_argument("--sample-batch-size", type=_positive, default=None,
                   help="sampling batch alone (default: --batch-size)")
    p.add_argument("--inception-batch-size", type=_positive, default=None,
                   help="Inception batch alone (default: --batch-size)")

    p = sub.add_parser("nll", help="variational bound in bits/dim (eq. 5)", formatter_class=fmt,
                       epilog="examples:\n" + NLL_EXAMPLES,
                       description="The variational bound L (eq. 5) of data under a run, in bits/dim.")
    p.set_defaults(func=_eval_command("nll"))
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="data source spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="MNIST/CIFAR-10 split (default: test, as the paper)")
    p.add_argument("--num", type=_positive, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--timesteps", default="all", help="'all' (T model calls per item) or K stratified timesteps")
    p.add_argument("--batch-size", type=_positive, default=128, help="data items per network batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and timesteps of the estimate")
    _add_variance_arg(p)
    p.add_argument("--clip-denoised", action="store_true", help="clip x0 predictions to [-1, 1] in the model mean")
    p.add_argument("--out", default=None, help=report)
    _add_model_args(p)

    p = sub.add_parser("toy", help="energy distance / MMD / log-likelihood for 2-D toy runs", formatter_class=fmt,
                       epilog="examples:\n" + TOY_EXAMPLES,
                       description="Two-sample statistics of a 2-D toy run's samples against its data.")
    p.set_defaults(func=_eval_command("toy"))
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="toy:NAME (default: the run's training data)")
    p.add_argument("--out", default=None, help=report)
    _add_sampling_args(p, num_default=2000, num_help="samples to draw")
    p.add_argument("--sample-batch-size", dest="batch_size", type=_positive, default=argparse.SUPPRESS,
                   help="older spelling of --batch-size")


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS
    from .schedules import SCHEDULES

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020).",
                     formatter_class=fmt, epilog=QUICKSTART)
    parser.set_defaults(func=None)
    sub = parser.add_subparsers(dest="command",
                                metavar="{train,sample,schedules,eval,export,report,analytic,inpaint,interpolate}")

    t = sub.add_parser("train", help="train a model (default: mnist preset on bundled MNIST)", formatter_class=fmt,
                       epilog=TRAIN_EXAMPLES, description="Train a DDPM. Flags override the config file, which overrides the preset.")
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
        ("--prediction", "diffusion.prediction", str, "network target: eps, x0, v"),
        ("--variance", "diffusion.variance", str, "reverse variance: fixed_small, fixed_large, learned_range "
         "(sets --learn-sigma), analytic (estimated after training: ddpm analytic RUN)"),
        ("--objective", "diffusion.objective", str, "simple (L_simple; L_hybrid with learned variances) or vlb "
         "(L_vlb alone, t importance-sampled)"),
        ("--sample-every", "train.sample_every", int, "preview grid every N steps (0 = only at the end)"),
        ("--ckpt-every", "train.ckpt_every", int, "checkpoint every N steps (0 = only at the end)"),
        ("--keep-last", "train.keep_last", int, "checkpoints to keep"),
        ("--log-every", "train.log_every", int, "log (JSONL, progress bar) every N steps"),
        ("--max-minutes", "train.max_minutes", float, "stop and save after this many minutes"),
        ("--amp", "train.amp", str, "autocast: auto (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, "
         "else float32), off, bf16, fp16 (default: the preset's)"),
        ("--device", "train.device", str, "auto, cpu, cuda"),
        ("--image-size", "data.image_size", _image_size, "S or HxW: resize and centre-crop the data's images; "
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
    t.add_argument("--classes", type=_classes, default=None, metavar="K|auto",
                   help="train a class-conditional model of K classes (model.num_classes); auto: the data's "
                   "labels (mnist, cifar10, folder:DIR with one sub-folder per class, npz with labels, hf)")
    t.add_argument("--learn-sigma", dest="ov:model.learn_sigma", action="store_const", const=True,
                   help="the network also outputs its variances (2C channels), read by --variance learned_range")
    t.add_argument("--compile", dest="ov:train.compile", action="store_const", const=True, help="torch.compile the model")
    t.add_argument("--channels-last", dest="ov:train.channels_last", action="store_const", const=True, help="NHWC layout")
    t.add_argument("--hflip", dest="ov:data.hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips")
    t.add_argument("--no-progress", dest="ov:train.progress", action="store_const", const=False, help="no progress bar")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.ch=64 --set train.ema_warmup=10")

    s = sub.add_parser("sample", help="draw samples from a trained run or checkpoint", formatter_class=fmt,
                       epilog=SAMPLE_EXAMPLES, description="Draw samples (EMA weights by default) into a PNG grid or an npz.")
    s.set_defaults(func=cmd_sample)
    s.add_argument("path", help="run directory, ckpt-NNNNNNN folder, .safetensors file or diffusers pipeline directory")
    s.add_argument("--out", required=True, help="FILE.png (grid) or FILE.npz (images: uint8 (N, H, W, C); "
                   "labels (N,) for class-conditional runs)")
    s.add_argument("--trajectory", help="FILE.png: predicted x0 along t for the first 8 samples (Figure 6)")
    _add_sampling_args(s, num_default=64, num_help="number of samples")
    s.add_argument("--per-class", type=_positive, default=None,
                   help="with --class all: samples per class, one row each (default: --num / K, at least 1)")

    c = sub.add_parser("schedules", help="plot or tabulate the four seed beta schedules", formatter_class=fmt,
                       epilog=SCHEDULE_EXAMPLES, description="beta_t, abar_t and log-SNR of linear, cosine, sqrt_linear, sqrt.")
    c.set_defaults(func=cmd_schedules)
    c.add_argument("--plot", help="write a PNG with the schedules side by side")
    c.add_argument("--table", action="store_true", help="print a table (default when --plot is not given)")
    c.add_argument("--T", type=int, default=1000, help="number of timesteps")
    c.add_argument("--every", type=int, default=100, help="table row spacing")

    e = sub.add_parser("eval", help="FID, NLL in bits/dim, toy metrics", formatter_class=fmt,
                       epilog="examples:\n" + FID_EXAMPLES + NLL_EXAMPLES + TOY_EXAMPLES,
                       description="Evaluate runs and samples; each command prints a summary and writes a JSON report.")
    e.set_defaults(func=lambda args: _usage(e))
    _add_eval_parsers(e, fmt)

    x = sub.add_parser("export", help="write a run as a diffusers pipeline directory", formatter_class=fmt,
                       epilog=EXPORT_EXAMPLES, description="Write a run's EMA weights and schedule in another "
                       "library's format (diffusers: DDPMPipeline.from_pretrained(OUT) loads it).")
    x.set_defaults(func=cmd_export)
    x.add_argument("path", help="run directory, ckpt-NNNNNNN folder or .safetensors file")
    x.add_argument("--format", choices=("diffusers",), default="diffusers", help="output format (default: diffusers)")
    x.add_argument("out", help="output directory (must not exist, or be empty)")
    x.add_argument("--no-ema", action="store_true", help="export the online weights instead of the EMA")

    r = sub.add_parser("report", help="write RUN/report.html: loss, lr, previews, metrics, config",
                       formatter_class=fmt, epilog="examples:\n  ddpm report runs/mnist-20250101-120000\n",
                       description="Write a self-contained HTML page (plots as SVG, images embedded) of a run: "
                       "training loss and learning rate, preview grids over time, periodic evaluation, config. "
                       "`ddpm train` writes it at the end of every run.")
    r.set_defaults(func=cmd_report)
    r.add_argument("run", help="run directory")
    r.add_argument("--out", help="HTML file (default: RUN/report.html)")

    a = sub.add_parser("analytic", help="estimate a run's analytic reverse variances into RUN/analytic.json",
                       formatter_class=fmt, epilog=ANALYTIC_EXAMPLES,
                       description="Analytic-DPM (Bao et al. 2022): estimate Gamma_t = E||eps_theta(x_t, t)||^2 / d "
                       "at every timestep on the run's training data and save it as RUN/analytic.json for these "
                       "weights; --variance analytic then samples and evaluates with the optimal reverse variance.")
    a.set_defaults(func=_eval_command("analytic"))
    a.add_argument("run", help="run directory or ckpt-NNNNNNN folder")
    a.add_argument("--data", default=None, help="data source spec (default: the run's training data)")
    a.add_argument("--num", type=_positive, default=256, help="training examples averaged (default: 256); "
                   "cost: T * num / batch-size network calls")
    a.add_argument("--batch-size", type=_positive, default=128, help="examples per network batch")
    a.add_argument("--seed", type=int, default=0, help="seed of the examples drawn and their noise")
    _add_model_args(a)
    _add_steer_parsers(sub, fmt)
    return parser


def _steer_command(name: str):
    def run(args) -> int:
        from . import cli_steer

        return getattr(cli_steer, f"cmd_{name}")(args)

    return run


def _add_steer_parsers(sub, fmt) -> None:
    """``ddpm inpaint`` and ``ddpm interpolate`` (commands in ``ddpm.cli_steer``)."""
    p = sub.add_parser("inpaint", help="fill the masked pixels of an image (RePaint)", formatter_class=fmt,
                       epilog=INPAINT_EXAMPLES, description="Generate the pixels of --image where --mask is white and "
                       "keep the others exactly (RePaint, Lugmayr et al. 2022: ancestral sampling with the kept "
                       "region replaced by a noised copy of the image at every step, and resampling to harmonise). "
                       "Image and mask are PNG/JPEG files of the run's size; the image has the run's channels.")
    p.set_defaults(func=_steer_command("inpaint"))
    p.add_argument("path", help="run directory, ckpt-NNNNNNN folder or .safetensors file")
    p.add_argument("--image", required=True, help="the image (PNG/JPEG of the run's size and channels)")
    p.add_argument("--mask", required=True, help="the mask, same size: WHITE where pixels are to be GENERATED, black "
                   "where the image is kept (grey >= 128 counts as white)")
    p.add_argument("--out", required=True, help="FILE.png: the completion (several side by side with --num)")
    p.add_argument("--num", type=_positive, default=1, help="completions, completion i seeded by (seed, i)")
    p.add_argument("--resample", type=_positive, default=10, help="RePaint's R: rounds per jump (1 = plain replacement, "
                   "no resampling; default 10, the paper's); cost about R x steps network calls")
    p.add_argument("--jump", type=_positive, default=10, help="RePaint's jump length J (default 10, the paper's)")
    p.add_argument("--steps", type=_positive, default=None,
                   help="ancestral steps (default: the run's preview steps if it previews with ddpm, else T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    _add_class_args(p, "class-conditional runs: the class to fill in (index or name); default: the null label "
                    "(unconditional)")
    _add_model_args(p)

    p = sub.add_parser("interpolate", help="a strip of images between two images", formatter_class=fmt,
                       epilog=INTERPOLATE_EXAMPLES, description="Interpolate between images A and B through the "
                       "model: slerp (default) of their DDIM-inverted latents x_T, decoded with DDIM (Song et al. "
                       "2021); or noised: both noised to timestep t with the same noise, mixed linearly and "
                       "decoded by the reverse process (Ho et al. 2020, Figure 8). Writes one row of --frames "
                       "images, A's end first.")
    p.set_defaults(func=_steer_command("interpolate"))
    p.add_argument("path", help="run directory, ckpt-NNNNNNN folder or .safetensors file")
    p.add_argument("a", help="image A (PNG/JPEG of the run's size and channels)")
    p.add_argument("b", help="image B")
    p.add_argument("--out", required=True, help="FILE.png: one row of FRAMES images")
    p.add_argument("--frames", type=_frames, default=8, help="images in the strip, ends included (default 8)")
    p.add_argument("--method", choices=("slerp", "noised"), default="slerp", help="default: slerp")
    p.add_argument("--t", type=int, default=None, help="noised: the timestep both images are noised to "
                   "(default T/2; small t stays near the cross-fade)")
    p.add_argument("--steps", type=_positive, default=None,
                   help="slerp: DDIM steps of inversion and decoding (default 50); noised: reverse steps from t "
                   "(default all t + 1)")
    p.add_argument("--seed", type=int, default=0, help="noised: the seed all frames share")
    _add_class_args(p, "class-conditional runs: the class of every frame (index or name); default: the null label")
    _add_model_args(p)


def _usage(parser: argparse.ArgumentParser) -> int:
    # A command without its subcommand (bare `ddpm`, `ddpm eval`) shows what there is.
    parser.print_help()
    return 2


def resolve_device(name: str) -> str:
    """--device: auto -> cuda when available, else cpu; CUDA asked for but absent is a user error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but CUDA is not available")
    return name


def load_run(path: str, args):
    """(LoadedRun, device) for the run, checkpoint or weights file ``path`` and the --device/--no-ema
    options. Commands with --amp get the run prepared for it (``ddpm.load``'s fast defaults), say
    which mode they sample in (stdout, with the other status lines; stderr keeps errors one line),
    and find the resolved mode in ``args.amp`` (reports record it)."""
    from .accel import describe_amp
    from .checkpoint import load

    device = resolve_device(args.device)
    requested = getattr(args, "amp", None)
    run = load(path, ema=not args.no_ema, device=device, amp=requested or "off")
    if requested is not None:
        args.amp = run.amp
        print(f"ddpm: sampling on {device} in {describe_amp(run.amp, requested)}", flush=True)
    return run, device


def _classes_in_data(config) -> int:
    """--classes auto: the number of classes of the run's data (a one-line error if it has no labels)."""
    from .data import require_labels
    from .training import _open_data  # the data exactly as the run will open it

    return require_labels(_open_data(config), "--classes auto")


def _size_model_to_data(config, overrides: dict):
    """--image-size and --channels size a U-Net to the data (attention kept at the same levels,
    out_channels following in_channels), unless model.image_size/model.in_channels are set too."""
    from .config import model_type
    from .unet import attn_at_same_levels

    m, sized = config.model, {}
    if model_type(m) != "unet":
        return config
    if "data.image_size" in overrides and "model.image_size" not in overrides:
        size = config.data.image_size
        sized.update({"model.image_size": size, "model.attn_resolutions": attn_at_same_levels(m, size)})
    if "data.channels" in overrides and "model.in_channels" not in overrides:
        c = config.data.channels
        # A learned variance doubles the output channels (ddpm.diffusion: eps and v).
        sized.update({"model.in_channels": c, "model.out_channels": c * (m.out_channels // m.in_channels)})
    return config.override(**sized) if sized else config


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
    # The variance channels and the variance that reads them go together: either flag sets both.
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
        config = TrainConfig.from_dict(read_config_file(saved)).override(**overrides)
    else:
        config = resolve_config(args.preset, args.config, **overrides)
    config = _size_model_to_data(config, overrides)
    if args.classes == "auto":
        config = config.override(**{"model.num_classes": _classes_in_data(config), **late})
    if os.environ.get("RANK", "0") == "0":
        print(f"ddpm: training {config.name} {_training_mode(config)}", flush=True)
    run_dir = train(config, out=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes the run's files
        _write_run_report(run_dir)
    print(f"ddpm: run finished: {run_dir}  (samples in {run_dir / 'samples'}; "
          f"draw more with: ddpm sample {run_dir} --num 64 --out samples.png)")
    return 0


def _training_mode(config) -> str:
    """"on cpu in bf16 autocast (auto; ...)": the device and autocast mode the loop will choose
    (ddpm.training resolves them the same way; a preset's explicit train.amp is kept)."""
    import torch

    from .accel import describe_amp, resolve_amp

    want = config.train.device
    device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    requested = config.train.amp
    # an explicit mode may come from the preset or the config file rather than a flag
    mode = describe_amp(resolve_amp(requested, device), requested,
                        source=f"train.amp={requested}; --amp auto to choose per device")
    return f"on {device} in {mode}"


def _write_run_report(run_dir: Path) -> None:
    """RUN/report.html at the end of a run; a failure here must not turn a finished run into an error."""
    from .report import write_report

    try:
        print(f"ddpm: report: {write_report(run_dir)}")
    except Exception as exc:  # the weights and logs are saved; the report can be redone with `ddpm report`
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"ddpm: warning: could not write the report ({lines[0]}); retry with: ddpm report {run_dir}",
              file=sys.stderr)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import viz
    from .batch_sampling import sample_batches, sampler_settings
    from .cli_eval import apply_variance
    from .cli_steer import sampling_conditioning

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out.name!r}")
    run, device = load_run(args.path, args)
    settings = sampler_settings(run, args.sampler, args.steps, args.eta)
    apply_variance(run, args.variance, used=settings.sampler == "ddpm")
    cond = sampling_conditioning(run, args, args.num)  # --class all: num = K x per class
    result = sample_batches(run, cond.num, settings, seed=args.seed, batch_size=args.batch_size, device=device,
                            progress=args.progress, return_trajectory=bool(args.trajectory), labels=cond.labels,
                            guidance=cond.guidance)
    x0, trajectory = result if args.trajectory else (result, None)
    shape = run.shape
    if out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        images = viz.to_uint8(x0) if len(shape) == 3 else None
        arrays = {"images": images} if images is not None else {"points": x0.numpy()}
        if cond.labels is not None:
            arrays["labels"] = cond.labels.numpy()  # label i of sample i
        np.savez_compressed(out, **arrays)
    elif len(shape) == 3:
        viz.save_grid(x0, out, nrow=cond.per_class)  # --class all: one row per class
    else:
        viz.save_scatter(x0, out)
    if args.trajectory and len(shape) == 3:
        ts, x0s = trajectory["timesteps"], trajectory["x0"][:, :8].float().cpu()
        cols = torch.linspace(0, len(ts) - 1, min(10, len(ts))).round().long()
        viz.save_trajectory_strip(x0s[cols], args.trajectory, timesteps=[int(ts[i]) for i in cols])
    print(f"ddpm: wrote {cond.num} samples ({settings.sampler}, {settings.steps} steps{cond.describe()}, "
          f"{run.path}) to {out}")
    return 0


def cmd_export(args) -> int:
    from .diffusers_io import export_diffusers

    out = export_diffusers(args.path, args.out, ema=not args.no_ema)
    print(f"ddpm: wrote a diffusers DDPMPipeline to {out} (DDPMPipeline.from_pretrained({str(out)!r}) loads it; "
          f"ddpm sample {out} samples it)")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(f"ddpm: wrote {write_report(args.run, args.out)}")
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
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.func is None:
            # A bare `ddpm` shows what there is rather than starting a 15-minute training run;
            # `ddpm train` with no options is the quick start.
            return _usage(parser)
        return args.func(args)
    except KeyboardInterrupt as exc:
        from .training import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"ddpm: {exc} (continue with: ddpm train --resume --out {exc.run_dir})", file=sys.stderr)
            return exc.exit_code  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"ddpm: error: {lines[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
