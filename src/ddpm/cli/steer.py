"""Steering on the command line: class labels and guidance for ``ddpm sample`` and ``ddpm eval``,
and the ``ddpm inpaint`` and ``ddpm interpolate`` commands over ``ddpm.inpaint`` and
``ddpm.interpolate``.

Their options are defined in ``ddpm.cli.main`` with every other command's (one parser). Conventions:

- ``--class`` takes a class index 0..K-1 or a class name of the run (``run.class_names``; a name
  wins over an index when both match), and for ``sample``/``eval`` also ``all``: one row per class.
  Without it, ``sample`` and ``eval`` draw each sample's label uniformly from its own seed
  (``batch_sampling.uniform_labels``), while ``inpaint`` and ``interpolate`` use the null label
  (unconditional: the given pixels are the condition).
- ``--guidance`` defaults to the run's ``sample.guidance`` (its previews' scale).
- Images for ``inpaint``/``interpolate`` are PNG/JPEG files of exactly the run's size and number of
  channels (1 grey, 3 RGB, 4 RGBA); anything else is a one-line error rather than a silent resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


# -- class labels and guidance ----------------------------------------------------------------

@dataclass(frozen=True)
class Conditioning:
    """The labels (num,) of a sampling request (None: unconditional model), the guidance scale, the
    samples per class of a ``--class all`` grid (None otherwise) and the request's sample count."""

    labels: torch.Tensor | None
    guidance: float
    per_class: int | None
    num: int
    autoguidance: float = 1.0  # 1 = off (``_autoguidance``)

    def describe(self) -> str:
        """", class 7, guidance 3" and the like for the CLI's summary line ("" when unconditional)."""
        if self.labels is None:
            return ""
        if self.per_class is not None:
            what = f"class all x{self.per_class}"
        elif bool((self.labels == self.labels[0]).all()):
            what = f"class {int(self.labels[0])}"
        else:
            what = "classes uniform"
        return f", {what}, guidance {self.guidance:g}"


_DESTS = {"--class": "cls", "--guidance": "guidance", "--per-class": "per_class"}


def _refuse_unconditional(run, args, flags: tuple[str, ...]) -> None:
    for flag in flags:
        if getattr(args, _DESTS[flag], None) is not None:
            raise UserError(f"{flag} needs a class-conditional run (trained with --classes); {run.path} is unconditional")


def class_label(run, text: str) -> int:
    """The label of ``--class TEXT`` for a conditional run: a class name of the run, else an index."""
    names = list(run.class_names)
    if text in names:
        return names.index(text)
    try:
        label = int(text)
    except ValueError:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise UserError(f"--class {text!r} is neither a class name ({shown}) nor an index 0..{len(names) - 1}") from None
    if not 0 <= label < len(names):
        raise UserError(f"--class {label} out of range: this run has classes 0..{len(names) - 1}")
    return label


def _guidance(run, args) -> float:
    from ..sampling.guidance import check_guidance

    return check_guidance(run.config.sample.guidance if args.guidance is None else args.guidance)


def _autoguidance(run, args) -> float:
    """The autoguidance scale of ``ddpm sample``/``ddpm eval``: --autoguidance, else the run's
    ``sample.autoguidance``; 1 (off) for a run that kept no guide, which --autoguidance refuses."""
    given = getattr(args, "autoguidance", None)
    if getattr(run, "guide", None) is None:
        if given not in (None, 1.0):
            why = "--no-ema loads the online weights, which have no guide" if getattr(args, "no_ema", False) else \
                "it kept none (train.guide_at unset, or the run stopped before reaching it)"
            raise UserError(f"--autoguidance {given:g} needs the run's guide network; {run.path}: {why}")
        return 1.0
    return run.config.sample.autoguidance if given is None else given


def sampling_conditioning(run, args, num: int) -> Conditioning:
    """Labels, guidance and autoguidance of ``ddpm sample``/``ddpm eval`` from --class, --guidance,
    --per-class and --autoguidance: label i is a function of (seed, i) alone, so sample i depends
    only on its seed and label."""
    from ..sampling.batches import uniform_labels

    per_class, auto = getattr(args, "per_class", None), _autoguidance(run, args)
    if run.num_classes is None:
        _refuse_unconditional(run, args, ("--class", "--guidance", "--per-class"))
        return Conditioning(None, 1.0, None, num, auto)
    K, guidance = run.num_classes, _guidance(run, args)
    if per_class is not None and args.cls != "all":
        raise UserError("--per-class goes with --class all (one row of PER_CLASS samples per class)")
    if args.cls == "all":
        per_class = per_class or max(1, num // K)
        return Conditioning(torch.arange(K).repeat_interleave(per_class), guidance, per_class, K * per_class, auto)
    if args.cls is None:
        return Conditioning(uniform_labels(args.seed, num, K), guidance, None, num, auto)
    label = class_label(run, args.cls)
    return Conditioning(torch.full((num,), label, dtype=torch.long), guidance, None, num, auto)


def editing_conditioning(run, args) -> tuple[int | None, float]:
    """(label, guidance) of ``inpaint``/``interpolate``: the null label (None) without --class."""
    if run.num_classes is None:
        _refuse_unconditional(run, args, ("--class", "--guidance"))
        return None, 1.0
    if args.cls is None:
        if args.guidance is not None:
            raise UserError("--guidance needs --class (without it the run's null label is used: no guidance)")
        return None, 1.0
    return class_label(run, args.cls), _guidance(run, args)


# -- images of the run's shape ----------------------------------------------------------------

_BANDS = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}


def read_run_image(path: str, run, flag: str) -> torch.Tensor:
    """The image at ``path`` as (C, H, W) in [-1, 1] (x / 127.5 - 1, inverted exactly by
    ``viz.to_uint8``), refusing any size or channel count other than the run's."""
    from ..data.sources import _to_unit_range, read_image

    image = read_image(Path(path))  # a missing or unreadable file is a one-line UserError
    if image.mode == "P":  # palette PNGs: their colours (and transparency) are what they show
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("1", "I", "I;16", "F"):
        image = image.convert("L")
    C, H, W = run.shape
    bands = len(image.getbands())
    if bands != C:
        raise UserError(f"{flag} {path} has {bands} channel{'s' * (bands > 1)} ({_BANDS.get(bands, image.mode)}) "
                        f"but the run makes {C}-channel ({_BANDS[C]}) images")
    if image.size != (W, H):
        raise UserError(f"{flag} {path} is {image.size[0]}x{image.size[1]} (WxH) but the run makes {W}x{H} images")
    pixels = np.asarray(image, dtype=np.uint8).reshape(H, W, C).transpose(2, 0, 1)
    return _to_unit_range(torch.from_numpy(pixels.copy()))


def read_mask(path: str, size_hw: tuple[int, int]) -> torch.Tensor:
    """The mask at ``path`` as a bool (1, H, W), True where pixels are to be generated (white:
    grey level >= 128 in any mode)."""
    from ..data.sources import read_image

    image = read_image(Path(path))
    if image.size != (size_hw[1], size_hw[0]):
        raise UserError(f"--mask {path} is {image.size[0]}x{image.size[1]} (WxH) but the image is "
                        f"{size_hw[1]}x{size_hw[0]}: mask size differs from image")
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    return torch.from_numpy(grey >= 128)[None]


def _model_options(run) -> dict:
    """The run's prediction, clipping and ancestral variance, as its previews use them (an analytic
    variance needs a table per grid that these commands do not build: fixed_small instead)."""
    from ..training.previews import preview_kwargs

    return preview_kwargs(run.config)


# -- the commands -----------------------------------------------------------------------------

def _open_image_run(args, command: str):
    """(out path, LoadedRun, device) for a command that writes a PNG from an image run."""
    from .commands import load_run

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {out.name!r}")
    run, device = load_run(args.path, args)
    if len(run.shape) != 3:
        raise UserError(f"ddpm {command} needs an image run; {run.path} makes points of shape {run.shape}")
    return out, run, device


def cmd_inpaint(args) -> int:
    from ..sampling.batches import sampler_settings
    from ..sampling.inpainting import inpaint
    from ..sampling.samplers import per_sample_seeds
    from ..evaluation.viz import save_grid

    out, run, device = _open_image_run(args, "inpaint")
    known = read_run_image(args.image, run, "--image")
    generate = read_mask(args.mask, known.shape[1:])
    label, guidance = editing_conditioning(run, args)
    # Ancestral steps: the run's preview steps when it previews with ddpm, else all T.
    steps = sampler_settings(run, "ddpm", args.steps).steps
    batch = known.expand(args.num, *known.shape).to(device)
    x = inpaint(run.model, run.schedule, batch, (~generate).to(device), resample=args.resample, jump=args.jump,
                steps=steps, labels=label, guidance=guidance, generator=per_sample_seeds(args.seed, args.num, device=device),
                progress=bool(args.progress), **_model_options(run))
    # One completion is written as an image of the input's size (no border), several side by side.
    save_grid(x.float().cpu(), out, nrow=args.num, padding=0 if args.num == 1 else 2)
    kept = int((~generate).sum())
    print(f"ddpm: wrote {args.num} inpainting{'s' * (args.num > 1)} ({kept} of {generate.numel()} pixels kept, "
          f"{steps} steps, resample {args.resample}, jump {args.jump}{_label_text(run, label, guidance)}) to {out}")
    return 0


def cmd_interpolate(args) -> int:
    from ..sampling.interpolation import interpolate
    from ..evaluation.viz import save_grid

    out, run, device = _open_image_run(args, "interpolate")
    x_a = read_run_image(args.a, run, "image A").to(device)
    x_b = read_run_image(args.b, run, "image B").to(device)
    label, guidance = editing_conditioning(run, args)
    if args.method == "slerp" and args.t is not None:
        raise UserError("--t is the noising timestep of --method noised; slerp inverts to x_T")
    frames = interpolate(run.model, run.schedule, x_a, x_b, frames=args.frames, method=args.method, t=args.t,
                         steps=args.steps, labels=label, guidance=guidance, generator=args.seed,
                         progress=bool(args.progress), **_model_options(run))
    save_grid(frames.float().cpu(), out, nrow=args.frames)
    how = "DDIM-inverted latents, slerp" if args.method == "slerp" else \
        f"noised to t={run.schedule.num_timesteps // 2 if args.t is None else args.t}, Fig. 8"
    print(f"ddpm: wrote {args.frames} frames ({how}{_label_text(run, label, guidance)}) to {out}")
    return 0


def _label_text(run, label: int | None, guidance: float) -> str:
    if label is None:
        return ""
    name = run.class_names[label]
    return f", class {label}{'' if name == str(label) else f' ({name})'}, guidance {guidance:g}"
