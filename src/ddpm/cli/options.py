"""Option types and option groups that several ``ddpm`` commands share, defined once so that the
same flag means the same thing with the same default wherever it appears (each command's
``add_parser`` builds its options from them), and ``show_help`` for a command given without its
subcommand.
"""

from __future__ import annotations

import argparse
import math

from .choices import AMP_MODES, SAMPLERS, VARIANCES


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def classes(text: str):
    """--classes: 'auto' or a positive number of classes."""
    return text if text == "auto" else positive(text)


def threads_option(text: str):
    """--threads: 'auto' (follow the load of other processes) or a positive thread count."""
    return text if text == "auto" else positive(text)


def frames(text: str) -> int:
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 frames (the two ends), got {text!r}")
    return value


def image_size(text: str):
    """--image-size: S (square) or HxW (height x width), positive integers."""
    parts = text.lower().replace(",", "x").split("x")
    values = [int(p) for p in parts if p.strip().isdigit()]
    if len(values) != len(parts) or len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW (positive integers), got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which weights of a run to load, where to run them: every command that loads a run."""
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--progress", action="store_const", const=True, default=None,
                   help="progress bars (sampling, eval nll, analytic: on by default when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")


def add_sampling_args(p: argparse.ArgumentParser, *, num_default: int | None, num_help: str) -> None:
    """The sampling options of ``ddpm sample``, ``ddpm eval fid`` and ``ddpm eval toy``: one
    definition, so the same flags mean the same thing with the same defaults everywhere (only the
    sample count differs: a grid, a toy metric and FID want different numbers)."""
    p.add_argument("--num", type=positive, default=num_default, help=num_help)
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's preview sampler (config sample.sampler)")
    p.add_argument("--steps", type=positive, help="sampling steps (default: the run's preview steps for its "
                   "preview sampler, else the sampler's default: ddpm T, ddim 50, dpm++2m 20)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's preview eta for ddim, else 0)")
    p.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i), not on batch size")
    p.add_argument("--batch-size", type=positive, default=256, help="samples per network batch")
    add_class_args(p, "class-conditional runs: a class index 0..K-1 or name, or 'all' (one row per class); "
                    "default: each sample's label drawn uniformly from its own seed")
    add_variance_arg(p)
    p.add_argument("--autoguidance", type=finite, default=None, metavar="W",
                   help="runs that kept a guide (train.guide_at): guide + W (model - guide), autoguidance by the "
                   "network earlier in its training; 1 = off (default: the run's sample.autoguidance)")
    p.add_argument("--guidance-interval", type=interval, default=None, metavar="LO,HI",
                   help="apply --guidance and --autoguidance only at steps whose model timestep t (0 = the first "
                   "noising step, T-1 = pure noise) lies in [LO, HI], one network call elsewhere (Kynkaanniemi et "
                   "al. 2024); 'all' = every step (default: the run's sample.guidance_interval)")
    add_amp_arg(p)
    add_model_args(p)


def add_amp_arg(p: argparse.ArgumentParser) -> None:
    """--amp: sampling, ``eval nll`` and ``analytic`` run their network in the same mode by default."""
    p.add_argument("--amp", choices=("auto", *AMP_MODES), default="auto",
                   help="autocast of the network: auto (default: bf16 on CUDA and on CPUs with AMX or AVX-512 "
                   "BF16, fp16 on older GPUs, else float32), off (float32), bf16, fp16")


def add_class_args(p: argparse.ArgumentParser, class_help: str) -> None:
    """--class and --guidance: one definition for sample, eval, inpaint and interpolate."""
    p.add_argument("--class", dest="cls", metavar="CLASS", default=None, help=class_help)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w: eps_null + "
                   "w (eps_class - eps_null); 1 plain conditional, 0 unconditional (default: the run's sample.guidance)")


def add_variance_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variance", choices=VARIANCES, default=None,
                   help="reverse variance sigma_t^2 of ancestral sampling and the bound (default: the run's): "
                   "fixed_small (beta~), fixed_large (beta), learned_range (a --learn-sigma run), analytic "
                   "(after `ddpm analytic RUN`)")


def show_help(parser: argparse.ArgumentParser) -> int:
    """A command without its subcommand (bare ``ddpm``, ``ddpm eval``) shows what there is: exit 2."""
    parser.print_help()
    return 2


def interval(text: str) -> tuple[int, int] | str:
    """``--guidance-interval LO,HI`` (two integers) or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    parts = text.split(",")
    try:
        lo, hi = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two timesteps, e.g. 100,800) or all, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi
