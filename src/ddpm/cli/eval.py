"""``ddpm eval fid|nll|toy``: their options and the commands over ``ddpm.evaluation.evaluate``
and ``ddpm.core.nll``.

The sampling options of ``fid`` and ``toy`` are ``ddpm sample``'s (``options.add_sampling_args``).
Every eval command prints a summary line and writes a JSON report (path printed) next to the run
or the sample file.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .common import apply_variance, data_spec, load_run, resolve_device, sampling_conditioning
from .options import add_amp_arg, add_model_args, add_sampling_args, add_variance_arg, positive, show_help
from ..errors import UserError
from ..io.files import atomic_write_npz, own_dir

# the example lines of each command, shown by it and all together by `ddpm eval --help`
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


def add_parser(subparsers, formatter_class) -> None:
    """``ddpm eval`` and its subcommands fid, nll and toy."""
    fmt = formatter_class
    e = subparsers.add_parser("eval", help="FID, NLL in bits/dim, toy metrics", formatter_class=fmt,
                              epilog="examples:\n" + FID_EXAMPLES + NLL_EXAMPLES + TOY_EXAMPLES,
                              description="Evaluate runs and samples; each command prints a summary and writes a "
                              "JSON report.")
    e.set_defaults(func=lambda args: show_help(e))
    sub = e.add_subparsers(dest="metric", metavar="{fid,nll,toy}")
    report = "report path (.json); default: RUN/eval/... or next to the samples"

    p = sub.add_parser("fid", help="FID (+ IS, KID) against a reference set", formatter_class=fmt,
                       epilog="examples:\n" + FID_EXAMPLES,
                       description="FID, Inception Score and KID of samples drawn from a run, an npz or an image folder.")
    p.set_defaults(func=cmd_fid)
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
    # --batch-size (of the shared sampling options) sets the batch of both networks; these set one each.
    p.add_argument("--sample-batch-size", type=positive, default=None,
                   help="sampling batch alone (default: --batch-size)")
    p.add_argument("--inception-batch-size", type=positive, default=None,
                   help="Inception batch alone (default: --batch-size)")

    p = sub.add_parser("nll", help="variational bound in bits/dim (eq. 5)", formatter_class=fmt,
                       epilog="examples:\n" + NLL_EXAMPLES,
                       description="The variational bound L (eq. 5) of data under a run, in bits/dim.")
    p.set_defaults(func=cmd_nll)
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
    add_amp_arg(p)
    add_model_args(p)

    p = sub.add_parser("toy", help="energy distance / MMD / log-likelihood for 2-D toy runs", formatter_class=fmt,
                       epilog="examples:\n" + TOY_EXAMPLES,
                       description="Two-sample statistics of a 2-D toy run's samples against its data.")
    p.set_defaults(func=cmd_toy)
    p.add_argument("run", help="RUN_DIR or checkpoint")
    p.add_argument("--data", default=None, help="toy:NAME (default: the run's training data)")
    p.add_argument("--out", default=None, help=report)
    add_sampling_args(p, num_default=2000, num_help="samples to draw")
    p.add_argument("--sample-batch-size", dest="batch_size", type=positive, default=argparse.SUPPRESS,
                   help="older spelling of --batch-size")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name or str(text)).strip("_")[:60] or "ref"


def _eval_dir(run_dir: Path) -> Path:
    """RUN/eval, where reports and kept samples go by default; a symbolic link there is refused
    (``ddpm.io.files.own_dir``) rather than written through."""
    return own_dir(Path(run_dir) / "eval")


def _print_report(path: Path, summary: str) -> None:
    print(summary)
    print(f"report: {path}")


def _draw(run, device, num: int, args, batch_size: int):
    """Samples of a run with the shared sampling options, and the settings and conditioning (labels
    and guidance of a class-conditional run: uniform labels unless --class) a report records."""
    from ..sampling.batches import sample_batches, sampler_settings

    settings = sampler_settings(run, args.sampler, args.steps, args.eta)
    apply_variance(run, args.variance, used=settings.sampler == "ddpm")
    cond = sampling_conditioning(run, args, num)
    x0 = sample_batches(run, cond.num, settings, seed=args.seed, batch_size=batch_size, device=device, amp=args.amp,
                        progress=args.progress, labels=cond.labels, guidance=cond.guidance,
                        autoguidance=cond.autoguidance,
                        guidance_interval=cond.guidance_interval or (0, run.schedule.num_timesteps - 1))
    return x0, settings, cond


def _recorded_interval(cond) -> tuple[int, int] | None:
    """The guidance interval where some guidance is on (it changes nothing otherwise)."""
    guided = cond.autoguidance != 1 or (cond.labels is not None and cond.guidance != 1)
    return cond.guidance_interval if guided else None


def _cond_tag(args, cond) -> str:
    # unconditional runs sampled without autoguidance: no tag in the report's name
    auto = f"-ag{cond.autoguidance:g}" if cond.autoguidance != 1 else ""
    auto += "-t{}-{}".format(*_recorded_interval(cond)) if _recorded_interval(cond) else ""
    return auto if cond.labels is None else f"-class{args.cls or 'uniform'}-w{cond.guidance:g}{auto}"


def _cond_fields(args, cond) -> dict:
    auto = {"autoguidance": cond.autoguidance} if cond.autoguidance != 1 else {}
    if _recorded_interval(cond):
        auto["guidance_interval"] = list(_recorded_interval(cond))
    if cond.labels is None:
        return auto
    return {"class": args.cls or "uniform", "guidance": cond.guidance, **auto}


def _variance_tag(args) -> str:
    # a tag in the report's name only when --variance chose the variance
    return f"-{args.variance}" if args.variance else ""


def _run_fields(args, path: str, run, settings) -> dict:
    return {"run": str(Path(path).resolve()), "checkpoint": str(run.path), "step": run.step,
            "sampler": settings.sampler, "steps": settings.steps, "eta": settings.eta,
            "variance": run.sample_kwargs["variance"], "seed": args.seed,
            "amp": args.amp, "ema": not args.no_ema}


def cmd_fid(args) -> int:
    import numpy as np

    from ..evaluation import fid as _fid
    from ..evaluation.evaluate import check_reference, compute_fid, is_run, run_dir_of, write_eval_report
    from ..evaluation.viz import to_uint8

    src = Path(args.source)
    extra: dict = {}
    # Fail before drawing 50,000 samples: the reference and the weights must be usable.
    check_reference(args.ref, args.ref_data)
    _fid.resolve_inception_weights(args.inception_weights)
    device = resolve_device(args.device)
    if is_run(src):
        run, device = load_run(args.source, args)
        # before drawing 50,000 samples: a link planted at RUN/eval is refused now, not after
        eval_dir = _eval_dir(run_dir_of(run)) if not (args.out and args.no_save_samples) else None
        num = args.num or 50_000
        samples, settings, cond = _draw(run, device, num, args, args.sample_batch_size or args.batch_size)
        images = to_uint8(samples)
        tag = f"{settings.sampler}-{settings.steps}{_variance_tag(args)}{_cond_tag(args, cond)}-n{cond.num}-seed{args.seed}"
        extra = {**_run_fields(args, args.source, run, settings), **_cond_fields(args, cond)}
        if not args.no_save_samples:
            samples_path = eval_dir / f"samples-{tag}.npz"
            atomic_write_npz(samples_path, compressed=False, images=images)  # replaces a link there, never through it
            extra["samples_file"] = str(samples_path)
        default_out = None if eval_dir is None else eval_dir / f"fid-{tag}-{_slug(args.ref)}.json"
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
                         batch_size=args.inception_batch_size or args.batch_size, device=device, cache=args.cache_dir,
                         use_cache=not args.no_cache, isc=not args.no_is, kid=not args.no_kid, progress=args.progress)
    report.update(extra)
    path = write_eval_report(args.out or default_out, report)
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


def cmd_nll(args) -> int:
    import torch

    from ..core.nll import nll_bpd
    from ..data.sources import check_toy, open_source, toy_sample
    from ..evaluation.evaluate import run_dir_of, write_eval_report

    if args.timesteps != "all" and not args.timesteps.isdigit():
        raise UserError(f"--timesteps must be 'all' or a positive integer, got {args.timesteps!r}")
    run, device = load_run(args.run, args, "evaluating")
    eval_dir = None if args.out else _eval_dir(run_dir_of(run))  # checked before the evaluation
    apply_variance(run, args.variance)
    spec = data_spec(args, run)
    shape = tuple(run.shape)
    if spec.startswith("toy:"):
        check_toy(spec[4:])
        data = toy_sample(spec[4:], args.num or 10_000, torch.Generator().manual_seed(args.seed))
        decoder = "continuous"
    else:
        # Open the data as the trainer did; fall back to the model's item shape for another source.
        cfg = run.config.data
        columns = dict(image_column=cfg.image_column, label_column=cfg.label_column) if spec == cfg.source else {}
        data = open_source(spec, image_size=cfg.image_size, channels=cfg.channels, split=args.split, **columns)
        if tuple(data.shape) != shape:  # (C, H, W): H and W apart, for non-square models
            data = open_source(spec, image_size=tuple(shape[1:]), channels=shape[0], split=args.split, **columns)
        decoder = "discretized"
    K = None if args.timesteps == "all" else int(args.timesteps)
    variance = run.sample_kwargs["variance"]
    out = nll_bpd(run.model, run.schedule, data, num_timesteps=K, batch_size=args.batch_size, num=args.num,
                  generator=torch.Generator(device).manual_seed(args.seed),
                  prediction=run.sample_kwargs.get("prediction", "eps"), variance=variance,
                  analytic=run.sample_kwargs.get("analytic"),
                  clip_denoised=args.clip_denoised, decoder=decoder, device=device, progress=args.progress,
                  amp=run.amp)
    out.pop("bpd_per_example")
    report = {"metric": "nll", **out, "data": spec, "split": args.split if decoder == "discretized" else None,
              "decoder": decoder, "variance": variance, "clip_denoised": args.clip_denoised, "amp": run.amp,
              "seed": args.seed,
              "run": str(Path(args.run).resolve()), "checkpoint": str(run.path), "step": run.step, "ema": not args.no_ema}
    name = f"nll-{_slug(spec)}-{out['estimate']}-n{out['num_examples']}{_variance_tag(args)}.json"
    path = write_eval_report(args.out or eval_dir / name, report)
    _print_report(path, f"NLL <= {out['bpd']:.4f} +- {out['stderr']:.4f} bits/dim ({out['estimate']}, "
                        f"{out['num_examples']} items; prior {out['prior_bpd']:.5f}, decoder {out['decoder_bpd']:.4f})")
    return 0


def cmd_toy(args) -> int:
    from ..data.sources import check_toy
    from ..evaluation.evaluate import run_dir_of, toy_metrics, write_eval_report

    run, device = load_run(args.run, args)
    eval_dir = None if args.out else _eval_dir(run_dir_of(run))  # checked before sampling
    spec = data_spec(args, run)
    if not spec.startswith("toy:"):
        raise UserError(f"ddpm eval toy needs a toy run or --data toy:NAME; this run's data is {spec!r}")
    check_toy(spec[4:])
    samples, settings, cond = _draw(run, device, args.num, args, args.batch_size)
    report = toy_metrics(samples, spec[4:], seed=args.seed + 1)
    report.update({**_run_fields(args, args.run, run, settings), **_cond_fields(args, cond)})
    name = f"toy-{settings.sampler}-{settings.steps}{_variance_tag(args)}{_cond_tag(args, cond)}-n{cond.num}.json"
    path = write_eval_report(args.out or eval_dir / name, report)
    base = report["baseline_truth_vs_truth"]
    line = (f"energy distance {report['energy_distance']:.5f} (truth vs truth {base['energy_distance']:.5f}), "
            f"MMD^2 {report['mmd_rbf']:.5f} (truth vs truth {base['mmd_rbf']:.5f})")
    if "log_likelihood" in report:
        line += f", mean log p {report['log_likelihood']['mean']:.3f} (truth {base['log_likelihood']['mean']:.3f})"
    if min(report["energy_distance"], report["mmd_rbf"]) < 0:  # a reader would take it for a bug
        line += ("; both are unbiased estimates of a distance that is 0 for a perfect model, so they scatter around 0 "
                 "and can fall below it")
    _print_report(path, line)
    return 0
