"""``ddpm`` command line: train, sample, schedules, eval (thin parsing over the library).

This module is the one parser and ``main``; the commands live in ``ddpm.cli.commands`` (train,
sample, export, report, schedules), ``ddpm.cli.eval`` (eval, analytic) and ``ddpm.cli.steer``
(inpaint, interpolate), the option types and groups they share in ``ddpm.cli.options``.

User mistakes (UserError, ValueError from config validation, missing files) print
``ddpm: error: <one line>`` on stderr and exit with code 2, as do exhausted memory or disk and a
diverged training run; Ctrl-C, SIGTERM or SIGHUP during training saves a checkpoint and exits
with code 128 + the signal number (130, 143, 129).
"""

from __future__ import annotations

import argparse
import sys

from .commands import cmd_export, cmd_report, cmd_sample, cmd_schedules, cmd_train
from .options import (add_class_args, add_model_args, add_sampling_args, add_variance_arg, classes, frames,
                          image_size, positive)
from ..errors import UserError, first_line

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


def _eval_command(name: str):
    # cli_eval (numpy, the metrics) is imported only when an eval command runs.
    def run(args) -> int:
        from . import eval as cli_eval

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
    p.add_argument("--ref-num", type=positive, default=None, help="use the first N reference images (default: all)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DDPM_INCEPTION_WEIGHTS, torch.hub cache, or download)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default: $DDPM_CACHE_DIR/fid or ~/.cache/ddpm/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--no-save-samples", action="store_true", help="do not keep drawn samples as RUN_DIR/eval/*.npz")
    p.add_argument("--out", default=None, help=report)
    add_sampling_args(p, num_default=None, num_help="samples to draw from a run (default: 50,000) "
                       "or to take from an npz/folder (default: all)")
    # --batch-size sets both networks' batch (the one definition above); these set one each.
    # (Before the one parser, --batch-size meant Inception's and --sample-batch-size the sampler's.)
    p.add_argument("--sample-batch-size", type=positive, default=None,
                   help="sampling batch alone (default: --batch-size)")
    p.add_argument("--inception-batch-size", type=positive, default=None,
                   help="Inception batch alone (default: --batch-size)")

    p = sub.add_parser("nll", help="variational bound in bits/dim (eq. 5)", formatter_class=fmt,
                       epilog="examples:\n" + NLL_EXAMPLES,
                       description="The variational bound L (eq. 5) of data under a run, in bits/dim.")
    p.set_defaults(func=_eval_command("nll"))
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="data source spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="MNIST/CIFAR-10 split (default: test, as the paper)")
    p.add_argument("--num", type=positive, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--timesteps", default="all", help="'all' (T model calls per item) or K stratified timesteps")
    p.add_argument("--batch-size", type=positive, default=128, help="data items per network batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and timesteps of the estimate")
    add_variance_arg(p)
    p.add_argument("--clip-denoised", action="store_true", help="clip x0 predictions to [-1, 1] in the model mean")
    p.add_argument("--out", default=None, help=report)
    add_model_args(p)

    p = sub.add_parser("toy", help="energy distance / MMD / log-likelihood for 2-D toy runs", formatter_class=fmt,
                       epilog="examples:\n" + TOY_EXAMPLES,
                       description="Two-sample statistics of a 2-D toy run's samples against its data.")
    p.set_defaults(func=_eval_command("toy"))
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="toy:NAME (default: the run's training data)")
    p.add_argument("--out", default=None, help=report)
    add_sampling_args(p, num_default=2000, num_help="samples to draw")
    p.add_argument("--sample-batch-size", dest="batch_size", type=positive, default=argparse.SUPPRESS,
                   help="older spelling of --batch-size")


def build_parser() -> argparse.ArgumentParser:
    from ..presets import PRESETS
    from ..core.schedules import SCHEDULES

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
    add_sampling_args(s, num_default=64, num_help="number of samples")
    s.add_argument("--per-class", type=positive, default=None,
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
    a.add_argument("--num", type=positive, default=256, help="training examples averaged (default: 256); "
                   "cost: T * num / batch-size network calls")
    a.add_argument("--batch-size", type=positive, default=128, help="examples per network batch")
    a.add_argument("--seed", type=int, default=0, help="seed of the examples drawn and their noise")
    add_model_args(a)
    _add_steer_parsers(sub, fmt)
    return parser


def _steer_command(name: str):
    def run(args) -> int:
        from . import steer as cli_steer

        return getattr(cli_steer, f"cmd_{name}")(args)

    return run


def _add_steer_parsers(sub, fmt) -> None:
    """``ddpm inpaint`` and ``ddpm interpolate`` (commands in ``ddpm.cli.steer``)."""
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
    p.add_argument("--num", type=positive, default=1, help="completions, completion i seeded by (seed, i)")
    p.add_argument("--resample", type=positive, default=10, help="RePaint's R: rounds per jump (1 = plain replacement, "
                   "no resampling; default 10, the paper's); cost about R x steps network calls")
    p.add_argument("--jump", type=positive, default=10, help="RePaint's jump length J (default 10, the paper's)")
    p.add_argument("--steps", type=positive, default=None,
                   help="ancestral steps (default: the run's preview steps if it previews with ddpm, else T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    add_class_args(p, "class-conditional runs: the class to fill in (index or name); default: the null label "
                    "(unconditional)")
    add_model_args(p)

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
    p.add_argument("--frames", type=frames, default=8, help="images in the strip, ends included (default 8)")
    p.add_argument("--method", choices=("slerp", "noised"), default="slerp", help="default: slerp")
    p.add_argument("--t", type=int, default=None, help="noised: the timestep both images are noised to "
                   "(default T/2; small t stays near the cross-fade)")
    p.add_argument("--steps", type=positive, default=None,
                   help="slerp: DDIM steps of inversion and decoding (default 50); noised: reverse steps from t "
                   "(default all t + 1)")
    p.add_argument("--seed", type=int, default=0, help="noised: the seed all frames share")
    add_class_args(p, "class-conditional runs: the class of every frame (index or name); default: the null label")
    add_model_args(p)


def _usage(parser: argparse.ArgumentParser) -> int:
    # A command without its subcommand (bare `ddpm`, `ddpm eval`) shows what there is.
    parser.print_help()
    return 2


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
        from ..training.loop import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"ddpm: {exc} (continue with: ddpm train --resume --out {exc.run_dir})", file=sys.stderr)
            return exc.exit_code  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"ddpm: error: {first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
