"""``ddpm train``, ``sample``, ``export``, ``report`` and ``schedules``: the commands over the library,
and loading a run for a command (``load_run``, ``resolve_device``; the eval and steering commands
in ``ddpm.cli.eval`` and ``ddpm.cli.steer`` load runs the same way).

Their options are defined in ``ddpm.cli.main`` (one parser). User mistakes raise ``UserError``; the
CLI prints ``ddpm: error: <one line>`` and exits with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UserError, first_line


def _json_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as sqrt_linear


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
    from ..core.device import describe_amp
    from ..io.run import load

    device = resolve_device(args.device)
    requested = getattr(args, "amp", None)
    run = load(path, ema=not args.no_ema, device=device, amp=requested or "off")
    if requested is not None:
        args.amp = run.amp
        print(f"ddpm: sampling on {device} in {describe_amp(run.amp, requested)}", flush=True)
    return run, device


def _classes_in_data(config) -> int:
    """--classes auto: the number of classes of the run's data (a one-line error if it has no labels)."""
    from ..data.sources import require_labels
    from ..training.data import open_data  # the data exactly as the run will open it

    return require_labels(open_data(config), "--classes auto")


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
        nulls = {k: None for k, v in overrides.items() if v is None}
        if nulls:  # resolve_config skips None (an option not given); --set KEY=null is given: it clears KEY
            config = config.override(**nulls)
    config = _size_model_to_data(config, overrides)
    if args.classes == "auto":
        config = config.override(**{"model.num_classes": _classes_in_data(config), **late})
    if os.environ.get("RANK", "0") == "0":
        print(f"ddpm: training {config.name} {_training_mode(config)}", flush=True)
    run_dir = train(config, out=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes the run's files
        _say_how_it_ended(run_dir, config)
        _write_run_report(run_dir)
    print(f"ddpm: run finished: {run_dir}  (samples in {run_dir / 'samples'}; "
          f"draw more with: ddpm sample {run_dir} --num 64 --out samples.png)")
    return 0


def _training_mode(config) -> str:
    """"on cpu in bf16 autocast (auto; ...)": the device and autocast mode the loop will choose
    (ddpm.training.loop resolves them the same way; a preset's explicit train.amp is kept)."""
    import torch

    from ..core.device import describe_amp, resolve_amp

    want = config.train.device
    device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    requested = config.train.amp
    # an explicit mode may come from the preset or the config file rather than a flag
    mode = describe_amp(resolve_amp(requested, device), requested,
                        source=f"train.amp={requested}; --amp auto to choose per device")
    budget = config.train.max_minutes
    length = (f"{config.train.steps} steps or {budget:g} minutes, whichever ends first (the learning rate "
              f"decays over both)" if budget else f"{config.train.steps} steps")
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


def _write_run_report(run_dir: Path) -> None:
    """RUN/report.html at the end of a run; a failure here must not turn a finished run into an error."""
    from ..evaluation.report import write_report

    try:
        print(f"ddpm: report: {write_report(run_dir)}")
    except Exception as exc:  # the weights and logs are saved; the report can be redone with `ddpm report`
        print(f"ddpm: warning: could not write the report ({first_line(exc)}); retry with: ddpm report {run_dir}",
              file=sys.stderr)


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from ..evaluation import viz
    from ..sampling.batches import sample_batches, sampler_settings
    from .eval import apply_variance
    from .steer import sampling_conditioning

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out.name!r}")
    run, device = load_run(args.path, args)
    settings = sampler_settings(run, args.sampler, args.steps, args.eta)
    apply_variance(run, args.variance, used=settings.sampler == "ddpm")
    cond = sampling_conditioning(run, args, args.num)  # --class all: num = K x per class
    result = sample_batches(run, cond.num, settings, seed=args.seed, batch_size=args.batch_size, device=device,
                            progress=args.progress, return_trajectory=bool(args.trajectory), labels=cond.labels,
                            guidance=cond.guidance, autoguidance=cond.autoguidance)
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
    guided = f", autoguidance {cond.autoguidance:g} by step {run.guide_step}" if cond.autoguidance != 1 else ""
    print(f"ddpm: wrote {cond.num} samples ({settings.sampler}, {settings.steps} steps{cond.describe()}{guided}, "
          f"{run.path}) to {out}")
    return 0


def cmd_export(args) -> int:
    from ..io.diffusers import export_diffusers

    out = export_diffusers(args.path, args.out, ema=not args.no_ema)
    print(f"ddpm: wrote a diffusers DDPMPipeline to {out} (DDPMPipeline.from_pretrained({str(out)!r}) loads it; "
          f"ddpm sample {out} samples it)")
    if not args.no_ema and _has_guide(args.path):
        print("ddpm: note: the run's autoguidance guide is not exported (DDPMPipeline has no autoguidance): "
              "samples drawn there are unguided, as `ddpm sample RUN --autoguidance 1`")
    return 0


def _has_guide(path: str) -> bool:
    """Whether the EMA weights ``ddpm.load(path)`` reads have an autoguidance guide beside them."""
    from ..io.checkpoint import guide_path
    from ..io.diffusers import is_diffusers_dir
    from ..io.run import resolve_weights_path

    return not is_diffusers_dir(path) and guide_path(resolve_weights_path(path)).is_file()


def cmd_report(args) -> int:
    from ..evaluation.report import write_report

    print(f"ddpm: wrote {write_report(args.run, args.out)}")
    return 0


def cmd_schedules(args) -> int:
    from ..evaluation import viz

    if args.plot:
        print(f"ddpm: wrote {viz.plot_schedules(args.plot, T=args.T)}")
    if args.table or not args.plot:
        print(viz.schedule_table(T=args.T, every=args.every))
    return 0
