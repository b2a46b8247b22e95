"""``ddpm eval fid|nll|toy``: argument parsing over ``ddpm.evaluate`` and ``ddpm.nll``.

``ddpm.cli`` forwards the argv after ``eval`` to ``main``. User mistakes raise ``UserError``
(the CLI prints ``ddpm: error: ...`` and exits 2); every command prints a summary line and
writes a JSON report (path printed) next to the run or the sample file.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from .errors import UserError

EXAMPLES = """examples:
  ddpm eval fid runs/cifar10 --ref cifar10-train --ref-data ~/data/cifar10 --num 50000 --sampler ddpm
  ddpm eval fid samples.npz --ref stats.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
  ddpm eval nll runs/cifar10 --data cifar10:~/data/cifar10 --split test --timesteps 100
  ddpm eval toy runs/moons --num 2000
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits on its own; route through the one error path instead
        raise UserError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _sampling_args(p: argparse.ArgumentParser, num_default: int | None) -> None:
    from .samplers import SAMPLERS

    p.add_argument("--num", type=_positive, default=num_default, help="number of samples to draw/use")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="sampler for runs (default: ddpm, 1000-step ancestral)")
    p.add_argument("--steps", type=_positive, default=None, help="sampling steps (default: the sampler's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-batch-size", type=_positive, default=256)
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast for the network while sampling")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="report path (.json); default next to the input")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights of a run instead of its EMA")
    p.add_argument("--progress", action="store_true", help="show progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm eval", description="Evaluate runs and samples.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("fid", help="FID (+ IS, KID) against a reference set")
    p.add_argument("source", help="RUN_DIR or checkpoint (samples are drawn), samples .npz (images uint8 NHWC), or image DIR")
    p.add_argument("--ref", required=True, help="cifar10-train, cifar10-test, stats .npz (mu, sigma), images .npz, or image DIR")
    p.add_argument("--ref-data", default=None, help="CIFAR-10 folder for --ref cifar10-* (default: $DDPM_CIFAR10_DIR)")
    p.add_argument("--ref-num", type=_positive, default=None, help="use the first N reference images (default: all)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DDPM_INCEPTION_WEIGHTS, torch.hub cache, or download)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default: $DDPM_CACHE_DIR/fid or ~/.cache/ddpm/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached reference statistics")
    p.add_argument("--batch-size", type=_positive, default=200, help="Inception batch size")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--no-kid", action="store_true", help="skip KID")
    p.add_argument("--no-save-samples", action="store_true", help="do not keep drawn samples as RUN_DIR/eval/*.npz")
    _sampling_args(p, None)
    _common_args(p)

    p = sub.add_parser("nll", help="variational bound in bits/dim (eq. 5)")
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="data source spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="MNIST/CIFAR-10 split (default: test, as the paper)")
    p.add_argument("--num", type=_positive, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--timesteps", default="all", help="'all' (T model calls per item) or K stratified timesteps")
    p.add_argument("--batch-size", type=_positive, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variance", default=None, choices=("fixed_small", "fixed_large"), help="default: the run's")
    p.add_argument("--clip-denoised", action="store_true", help="clip x0 predictions to [-1, 1] in the model mean")
    _common_args(p)

    p = sub.add_parser("toy", help="energy distance / MMD / log-likelihood for 2-D toy runs")
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="toy:NAME (default: the run's training data)")
    _sampling_args(p, 2000)
    _common_args(p)
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name or str(text)).strip("_")[:60] or "ref"


def _load(path: str, args):
    """(LoadedRun, device) for a run directory or checkpoint file."""
    import torch

    from .evaluate import default_device

    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but CUDA is not available")
    if not Path(path).exists():
        raise UserError(f"run not found: {path}")
    from .checkpoint import load

    return load(path, ema=not args.no_ema, device=device), device


def _effective_steps(sampler: str, steps: int | None, T: int) -> int:
    """The number of sampling steps ``ddpm.sample`` will take, for the report (FID depends on it)."""
    if steps is not None:
        return min(steps, T)
    from . import samplers

    # samplers keeps its defaults private (ddpm: T, ddim: 50, dpm++2m: 20).
    return min(getattr(samplers, "_DEFAULT_STEPS", {}).get(sampler, T), T)


def _print_report(path: Path, summary: str) -> None:
    print(summary)
    print(f"report: {path}")


def cmd_fid(args) -> int:
    from . import fid as _fid
    from .evaluate import check_reference, compute_fid, is_run, run_dir_of, sample_run, write_report

    src = Path(args.source)
    extra: dict = {}
    # Fail before drawing 50,000 samples: the reference and the weights must be usable.
    check_reference(args.ref, args.ref_data)
    _fid.resolve_inception_weights(args.inception_weights)
    if is_run(src):
        run, device = _load(args.source, args)
        num = args.num or 50_000
        images_f = sample_run(run, num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                              batch_size=args.sample_batch_size, device=device, amp=args.amp, progress=args.progress)
        from .viz import to_uint8

        images = to_uint8(images_f)
        run_dir = run_dir_of(run)
        steps = _effective_steps(args.sampler, args.steps, run.schedule.num_timesteps)
        tag = f"{args.sampler}-{steps}-n{num}-seed{args.seed}"
        extra = {"run": str(src.resolve()), "checkpoint": str(run.path), "step": run.step, "sampler": args.sampler,
                 "steps": steps, "eta": args.eta, "seed": args.seed, "amp": args.amp, "ema": not args.no_ema}
        if not args.no_save_samples:
            samples_path = run_dir / "eval" / f"samples-{tag}.npz"
            samples_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(samples_path, images=images)
            extra["samples_file"] = str(samples_path)
        default_out = run_dir / "eval" / f"fid-{tag}-{_slug(args.ref)}.json"
    elif src.is_file() and src.suffix == ".npz":
        images = _fid.load_npz_images(src)
        extra = {"samples_file": str(src.resolve())}
        default_out = src.with_name(f"{src.stem}.fid-{_slug(args.ref)}.json")
    elif src.is_dir():
        images = np.concatenate(list(_fid.iter_batches(_fid.list_images(src), 500, args.num)))
        extra = {"samples_dir": str(src.resolve())}
        default_out = src.parent / f"{src.name}.fid-{_slug(args.ref)}.json"
    else:
        raise UserError(f"{args.source} is neither a run, a samples .npz nor an image folder")
    if args.num is not None and len(images) > args.num:
        images = images[: args.num]
    report = compute_fid(images, args.ref, weights=args.inception_weights, ref_data=args.ref_data, ref_num=args.ref_num,
                         batch_size=args.batch_size, device=args.device, cache=args.cache_dir,
                         use_cache=not args.no_cache, isc=not args.no_is, kid=not args.no_kid, progress=args.progress)
    report.update(extra)
    path = write_report(args.out or default_out, report)
    parts = [f"FID {report['fid']:.3f}"]
    if "is_mean" in report:
        parts.append(f"IS {report['is_mean']:.2f} +- {report['is_std']:.2f}")
    if "kid_mean" in report:
        parts.append(f"KID {report['kid_mean']:.5f} +- {report['kid_std']:.5f}")
    parts.append(f"({report['num_samples']} samples vs {report['reference']['name']}, {report['reference']['count']} images)")
    _print_report(path, ", ".join(parts))
    if "warning" in report:
        print(f"warning: {report['warning']}")
    return 0


def _data_spec(args, run) -> str:
    from .evaluate import run_data_spec

    spec = args.data or run_data_spec(run)
    if not spec:
        raise UserError("the run does not name its data; pass --data SOURCE")
    return spec


def cmd_nll(args) -> int:
    import torch

    from .data import open_source
    from .evaluate import run_dir_of, write_report
    from .nll import nll_bpd

    if args.timesteps != "all" and not args.timesteps.isdigit():
        raise UserError(f"--timesteps must be 'all' or a positive integer, got {args.timesteps!r}")
    run, device = _load(args.run, args)
    spec = _data_spec(args, run)
    shape = tuple(run.shape)
    if spec.startswith("toy:"):
        from .data import check_toy, toy_sample

        check_toy(spec[4:])
        data = toy_sample(spec[4:], args.num or 10_000, torch.Generator().manual_seed(args.seed))
        decoder = "continuous"
    else:
        # Open the data as the trainer did; fall back to the model's item shape for another source.
        cfg = run.config.data
        data = open_source(spec, image_size=cfg.image_size, channels=cfg.channels, split=args.split)
        if tuple(data.shape) != shape:
            data = open_source(spec, image_size=shape[-1], channels=shape[0], split=args.split)
        decoder = "discretized"
    K = None if args.timesteps == "all" else int(args.timesteps)
    variance = args.variance or run.sample_kwargs.get("variance", "fixed_large")
    out = nll_bpd(run.model, run.schedule, data, num_timesteps=K, batch_size=args.batch_size, num=args.num,
                  generator=torch.Generator(device).manual_seed(args.seed),
                  prediction=run.sample_kwargs.get("prediction", "eps"), variance=variance,
                  clip_denoised=args.clip_denoised, decoder=decoder, device=device, progress=args.progress)
    out.pop("bpd_per_example")
    report = {"metric": "nll", **out, "data": spec, "split": args.split if decoder == "discretized" else None,
              "decoder": decoder, "variance": variance, "clip_denoised": args.clip_denoised, "seed": args.seed,
              "run": str(Path(args.run).resolve()), "checkpoint": str(run.path), "step": run.step, "ema": not args.no_ema}
    name = f"nll-{_slug(spec)}-{out['estimate']}-n{out['num_examples']}.json"
    path = write_report(args.out or run_dir_of(run) / "eval" / name, report)
    _print_report(path, f"NLL <= {out['bpd']:.4f} +- {out['stderr']:.4f} bits/dim ({out['estimate']}, "
                        f"{out['num_examples']} items; prior {out['prior_bpd']:.5f}, decoder {out['decoder_bpd']:.4f})")
    return 0


def cmd_toy(args) -> int:
    from .evaluate import run_dir_of, sample_run, toy_metrics, write_report

    run, device = _load(args.run, args)
    spec = _data_spec(args, run)
    if not spec.startswith("toy:"):
        raise UserError(f"ddpm eval toy needs a toy run or --data toy:NAME; this run's data is {spec!r}")
    from .data import check_toy

    check_toy(spec[4:])
    samples = sample_run(run, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                         batch_size=args.sample_batch_size, device=device, amp=args.amp, progress=args.progress)
    report = toy_metrics(samples, spec[4:], seed=args.seed + 1)
    steps = _effective_steps(args.sampler, args.steps, run.schedule.num_timesteps)
    report.update({"sampler": args.sampler, "steps": steps, "eta": args.eta, "seed": args.seed,
                   "run": str(Path(args.run).resolve()), "checkpoint": str(run.path), "step": run.step,
                   "ema": not args.no_ema})
    name = f"toy-{args.sampler}-{steps}-n{args.num}.json"
    path = write_report(args.out or run_dir_of(run) / "eval" / name, report)
    base = report["baseline_truth_vs_truth"]
    line = (f"energy distance {report['energy_distance']:.5f} (truth vs truth {base['energy_distance']:.5f}), "
            f"MMD^2 {report['mmd_rbf']:.5f} (truth vs truth {base['mmd_rbf']:.5f})")
    if "log_likelihood" in report:
        line += f", mean log p {report['log_likelihood']['mean']:.3f} (truth {base['log_likelihood']['mean']:.3f})"
    _print_report(path, line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``ddpm eval``; returns the exit code (errors raise UserError)."""
    import sys

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return {"fid": cmd_fid, "nll": cmd_nll, "toy": cmd_toy}[args.command](args)
