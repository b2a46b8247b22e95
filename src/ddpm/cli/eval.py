"""``ddpm eval fid|nll|toy`` and ``ddpm analytic``: the commands over ``ddpm.evaluation.evaluate``,
``ddpm.core.nll`` and ``ddpm.core.analytic``, and ``--variance`` (``apply_variance``, also ``ddpm sample``'s).

Their options are defined in ``ddpm.cli.main`` with every other command's (one parser; the sampling
options are shared with ``ddpm sample``). User mistakes raise ``UserError`` (the CLI prints
``ddpm: error: ...`` and exits 2); every eval command prints a summary line and writes a JSON
report (path printed) next to the run or the sample file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch

from .commands import load_run, resolve_device
from ..errors import UserError


class PredictionChannels(torch.nn.Module):
    """The prediction (the first C of 2C output channels, ../shared/DESIGN.md) of a network with
    learned variances: its mean alone, to sample or bound with a fixed or analytic variance."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)  # conditional networks stay conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor, *labels) -> torch.Tensor:
        return self.net(x, t, *labels)[:, : x.shape[1]]


def apply_variance(run, variance: str | None, *, used: bool = True) -> None:
    """--variance: sample and bound ``run`` with this reverse variance (None: the run's own), set in
    ``run.sample_kwargs``. ``used``: whether the sampler reads it (ddim and dpm++2m do not, and need
    no analytic table). A one-line UserError when the run cannot provide the variance."""
    from ..io.checkpoint import read_analytic_variance
    from ..evaluation.evaluate import run_dir_of

    kwargs = run.sample_kwargs
    variance = variance or kwargs["variance"]
    learned = bool(getattr(run.config.model, "learn_sigma", False))
    if variance == "learned_range" and not learned:
        raise UserError("variance 'learned_range' needs a network that outputs variances (ddpm train --learn-sigma); "
                        "this run's does not: use fixed_small, fixed_large or analytic")
    if learned and variance != "learned_range" and not isinstance(run.model, PredictionChannels):
        run.model = PredictionChannels(run.model)
    if variance == "analytic" and used and "analytic" not in kwargs:
        _, why = read_analytic_variance(run.path, run.schedule.num_timesteps)
        raise UserError(f"variance 'analytic' needs Gamma_t estimated for these weights ({why}); make it with: "
                        f"ddpm analytic {run_dir_of(run)}")
    kwargs["variance"] = variance


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name or str(text)).strip("_")[:60] or "ref"


def _print_report(path: Path, summary: str) -> None:
    print(summary)
    print(f"report: {path}")


def _draw(run, device, num: int, args, batch_size: int):
    """Samples of a run with the shared sampling options, and the settings and conditioning (labels
    and guidance of a class-conditional run: uniform labels unless --class) a report records."""
    from ..sampling.batches import sample_batches, sampler_settings
    from .steer import sampling_conditioning

    settings = sampler_settings(run, args.sampler, args.steps, args.eta)
    apply_variance(run, args.variance, used=settings.sampler == "ddpm")
    cond = sampling_conditioning(run, args, num)
    x0 = sample_batches(run, cond.num, settings, seed=args.seed, batch_size=batch_size, device=device, amp=args.amp,
                        progress=args.progress, labels=cond.labels, guidance=cond.guidance,
                        autoguidance=cond.autoguidance)
    return x0, settings, cond


def _cond_tag(args, cond) -> str:
    # report names of unconditional, unguided runs stay as they were
    auto = f"-ag{cond.autoguidance:g}" if cond.autoguidance != 1 else ""
    return auto if cond.labels is None else f"-class{args.cls or 'uniform'}-w{cond.guidance:g}{auto}"


def _cond_fields(args, cond) -> dict:
    auto = {"autoguidance": cond.autoguidance} if cond.autoguidance != 1 else {}
    if cond.labels is None:
        return auto
    return {"class": args.cls or "uniform", "guidance": cond.guidance, **auto}


def _variance_tag(args) -> str:
    # report names stay as they were unless --variance chose another than the run's
    return f"-{args.variance}" if args.variance else ""


def _run_fields(args, path: str, run, settings) -> dict:
    return {"run": str(Path(path).resolve()), "checkpoint": str(run.path), "step": run.step,
            "sampler": settings.sampler, "steps": settings.steps, "eta": settings.eta,
            "variance": run.sample_kwargs["variance"], "seed": args.seed,
            "amp": args.amp, "ema": not args.no_ema}


def cmd_fid(args) -> int:
    from ..evaluation import fid as _fid
    from ..evaluation.evaluate import check_reference, compute_fid, is_run, run_dir_of, write_report
    from ..evaluation.viz import to_uint8

    src = Path(args.source)
    extra: dict = {}
    # Fail before drawing 50,000 samples: the reference and the weights must be usable.
    check_reference(args.ref, args.ref_data)
    _fid.resolve_inception_weights(args.inception_weights)
    device = resolve_device(args.device)
    if is_run(src):
        run, device = load_run(args.source, args)
        num = args.num or 50_000
        samples, settings, cond = _draw(run, device, num, args, args.sample_batch_size or args.batch_size)
        images = to_uint8(samples)
        run_dir = run_dir_of(run)
        tag = f"{settings.sampler}-{settings.steps}{_variance_tag(args)}{_cond_tag(args, cond)}-n{cond.num}-seed{args.seed}"
        extra = {**_run_fields(args, args.source, run, settings), **_cond_fields(args, cond)}
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
                         batch_size=args.inception_batch_size or args.batch_size, device=device, cache=args.cache_dir,
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
    from ..evaluation.evaluate import run_data_spec

    spec = args.data or run_data_spec(run)
    if not spec:
        raise UserError("the run does not name its data; pass --data SOURCE")
    return spec


def cmd_nll(args) -> int:
    import torch

    from ..data.sources import open_source
    from ..evaluation.evaluate import run_dir_of, write_report
    from ..core.nll import nll_bpd

    if args.timesteps != "all" and not args.timesteps.isdigit():
        raise UserError(f"--timesteps must be 'all' or a positive integer, got {args.timesteps!r}")
    run, device = load_run(args.run, args)
    apply_variance(run, args.variance)
    spec = _data_spec(args, run)
    shape = tuple(run.shape)
    if spec.startswith("toy:"):
        from ..data.sources import check_toy, toy_sample

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
                  clip_denoised=args.clip_denoised, decoder=decoder, device=device, progress=args.progress)
    out.pop("bpd_per_example")
    report = {"metric": "nll", **out, "data": spec, "split": args.split if decoder == "discretized" else None,
              "decoder": decoder, "variance": variance, "clip_denoised": args.clip_denoised, "seed": args.seed,
              "run": str(Path(args.run).resolve()), "checkpoint": str(run.path), "step": run.step, "ema": not args.no_ema}
    name = f"nll-{_slug(spec)}-{out['estimate']}-n{out['num_examples']}{_variance_tag(args)}.json"
    path = write_report(args.out or run_dir_of(run) / "eval" / name, report)
    _print_report(path, f"NLL <= {out['bpd']:.4f} +- {out['stderr']:.4f} bits/dim ({out['estimate']}, "
                        f"{out['num_examples']} items; prior {out['prior_bpd']:.5f}, decoder {out['decoder_bpd']:.4f})")
    return 0


def cmd_toy(args) -> int:
    from ..data.sources import check_toy
    from ..evaluation.evaluate import run_dir_of, toy_metrics, write_report

    run, device = load_run(args.run, args)
    spec = _data_spec(args, run)
    if not spec.startswith("toy:"):
        raise UserError(f"ddpm eval toy needs a toy run or --data toy:NAME; this run's data is {spec!r}")
    check_toy(spec[4:])
    samples, settings, cond = _draw(run, device, args.num, args, args.batch_size)
    report = toy_metrics(samples, spec[4:], seed=args.seed + 1)
    report.update({**_run_fields(args, args.run, run, settings), **_cond_fields(args, cond)})
    name = f"toy-{settings.sampler}-{settings.steps}{_variance_tag(args)}{_cond_tag(args, cond)}-n{cond.num}.json"
    path = write_report(args.out or run_dir_of(run) / "eval" / name, report)
    base = report["baseline_truth_vs_truth"]
    line = (f"energy distance {report['energy_distance']:.5f} (truth vs truth {base['energy_distance']:.5f}), "
            f"MMD^2 {report['mmd_rbf']:.5f} (truth vs truth {base['mmd_rbf']:.5f})")
    if "log_likelihood" in report:
        line += f", mean log p {report['log_likelihood']['mean']:.3f} (truth {base['log_likelihood']['mean']:.3f})"
    _print_report(path, line)
    return 0


def cmd_analytic(args) -> int:
    """Estimate Gamma_t (Bao et al. 2022, Theorem 1) for a run's weights on its training data and
    save RUN/analytic.json, which ``ddpm.load`` attaches to those weights (``variance="analytic"``)."""
    from ..core.analytic import analytic_variance
    from ..io.checkpoint import CKPT_RE, write_analytic_variance
    from ..data.sources import open_source

    run, device = load_run(args.run, args)
    if not CKPT_RE.match(Path(run.path).parent.name):  # before minutes of network calls
        raise UserError(f"{args.run}: analytic variances are saved in a run directory (RUN/ckpt-NNNNNNN/); "
                        f"{run.path} is not in one")
    spec = _data_spec(args, run)
    cfg = run.config.data
    # Gamma_t is an expectation over q(x0): the training data, on the scale the model was trained on.
    data = open_source(spec, image_size=cfg.image_size, channels=cfg.channels)
    if tuple(data.shape) != tuple(run.shape):
        raise UserError(f"data {spec!r} has items of shape {tuple(data.shape)}, the model takes {tuple(run.shape)}")
    learned = bool(getattr(run.config.model, "learn_sigma", False))
    analytic = analytic_variance(PredictionChannels(run.model) if learned else run.model, run.schedule, data,
                                 num=args.num, batch_size=args.batch_size, prediction=run.sample_kwargs["prediction"],
                                 data_range=None if spec.startswith("toy:") else (-1.0, 1.0),
                                 generator=torch.Generator().manual_seed(args.seed), device=device,
                                 progress=sys.stderr.isatty() if args.progress is None else args.progress)
    path = write_analytic_variance(run.path, analytic)
    print(f"ddpm: wrote {path}: Gamma_t at all {analytic.num_timesteps} timesteps for {run.path}, from "
          f"{analytic.num_examples} examples of {spec}; use it with --variance analytic (ddpm sample, ddpm eval nll)")
    return 0
