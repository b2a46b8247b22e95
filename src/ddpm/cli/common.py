"""What the ``ddpm`` commands share once they run: loading a run (``load_run``, ``resolve_device``),
its reverse variance (``apply_variance``), class labels and guidance (``sampling_conditioning``,
``editing_conditioning``) and images of the run's shape (``read_run_image``, ``open_image_run``).

The library and torch are imported inside the functions, so that building the parser stays light.
Conventions of the steering options:

- ``--class`` takes a class index 0..K-1 or a class name of the run (``run.class_names``; a name
  wins over an index when both match), and for ``sample``/``eval`` also ``all``: one row per class.
  Without it, ``sample`` and ``eval`` draw each sample's label uniformly from its own seed
  (``ddpm.sampling.batches.uniform_labels``), while ``inpaint`` and ``interpolate`` use the null
  label (unconditional: the given pixels are the condition).
- ``--guidance`` defaults to the run's ``sample.guidance`` (its previews' scale).
- Images for ``inpaint``/``interpolate`` are PNG/JPEG files of exactly the run's size and number of
  channels (1 grey, 3 RGB, 4 RGBA); anything else is a one-line error rather than a silent resize.

User mistakes raise ``UserError``; ``ddpm.cli.main`` prints ``ddpm: error: <one line>`` and exits 2.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, first_line

if TYPE_CHECKING:
    import torch


# -- loading a run ----------------------------------------------------------------------------

def resolve_device(name: str) -> str:
    """--device as a string for ``ddpm.load`` (see ``ddpm.core.device.pick_device``)."""
    from ..core.device import pick_device  # torch: imported when a command runs, not for --help

    return str(pick_device(name))


def load_run(path: str, args, doing: str = "sampling"):
    """(LoadedRun, device) for the run, checkpoint or weights file ``path`` and the --device/--no-ema
    options. Commands with --amp get the run prepared for it (``ddpm.load``'s fast defaults), say
    which mode they run the network in (``ddpm: DOING on cpu in ...``: stdout, with the other status
    lines; stderr keeps errors one line), and find the resolved mode in ``args.amp`` (reports record it)."""
    from ..core.device import describe_amp
    from ..io.run import load

    device = resolve_device(args.device)
    requested = getattr(args, "amp", None)
    run = load(path, ema=not args.no_ema, device=device, amp=requested or "off")
    if requested is not None:
        args.amp = run.amp
        print(f"ddpm: {doing} on {device} in {describe_amp(run.amp, requested)}", flush=True)
    return run, device


def data_spec(args, run) -> str:
    """--data, else the data source the run was trained on (a one-line error if it names none)."""
    from ..evaluation.evaluate import run_data_spec

    spec = args.data or run_data_spec(run)
    if not spec:
        raise UserError("the run does not name its data; pass --data SOURCE")
    return spec


def apply_variance(run, variance: str | None, *, used: bool = True) -> None:
    """--variance: sample and bound ``run`` with this reverse variance (None: the run's own), set in
    ``run.sample_kwargs``. ``used``: whether the sampler reads it (ddim and dpm++2m do not, and need
    no analytic table). A one-line UserError when the run cannot provide the variance."""
    from ..core.diffusion import variance_channels_problem
    from ..evaluation.evaluate import run_dir_of
    from ..io.checkpoint import read_analytic_variance
    from ..nets.wrappers import PredictionChannels

    kwargs = run.sample_kwargs
    variance = variance or kwargs["variance"]
    learned = run.config.model.learn_sigma
    problem = variance_channels_problem(learned, variance, training=False)
    if problem is not None:
        raise UserError(f"{problem}; this run's network has none: use fixed_small, fixed_large or analytic")
    if learned and variance != "learned_range" and not isinstance(run.model, PredictionChannels):
        run.model = PredictionChannels(run.model)
    if variance == "analytic" and used and "analytic" not in kwargs:
        _, why = read_analytic_variance(run.path, run.schedule.num_timesteps)
        raise UserError(f"variance 'analytic' needs Gamma_t estimated for these weights ({why}); make it with: "
                        f"ddpm analytic {run_dir_of(run)}")
    kwargs["variance"] = variance


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
    guidance_interval: tuple[int, int] | None = None  # (t_lo, t_hi); None: every step (``_interval``)

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
        where = "" if self.guidance_interval is None else " for t in [{}, {}]".format(*self.guidance_interval)
        return f", {what}, guidance {self.guidance:g}{where}"


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
    import torch

    from ..sampling.batches import uniform_labels

    per_class, auto, iv = getattr(args, "per_class", None), _autoguidance(run, args), _interval(run, args)
    if run.num_classes is None:
        _refuse_unconditional(run, args, ("--class", "--guidance", "--per-class"))
        return Conditioning(None, 1.0, None, num, auto, iv)
    K, guidance = run.num_classes, _guidance(run, args)
    if per_class is not None and args.cls != "all":
        raise UserError("--per-class goes with --class all (one row of PER_CLASS samples per class)")
    if args.cls == "all":
        per_class = per_class or max(1, num // K)
        return Conditioning(torch.arange(K).repeat_interleave(per_class), guidance, per_class, K * per_class, auto, iv)
    if args.cls is None:
        return Conditioning(uniform_labels(args.seed, num, K), guidance, None, num, auto, iv)
    label = class_label(run, args.cls)
    return Conditioning(torch.full((num,), label, dtype=torch.long), guidance, None, num, auto, iv)


def _interval(run, args) -> tuple[int, int] | None:
    """--guidance-interval (``all``: every step), else the run's ``sample.guidance_interval``."""
    from ..sampling.guidance import resolve_interval

    return resolve_interval(getattr(args, "guidance_interval", None), run.config.sample.guidance_interval,
                            run.schedule.num_timesteps)


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


def label_text(run, label: int | None, guidance: float) -> str:
    """", class 3 (cat), guidance 2" for the summary line of an edit ("" with the null label)."""
    if label is None:
        return ""
    name = run.class_names[label]
    return f", class {label}{'' if name == str(label) else f' ({name})'}, guidance {guidance:g}"


# -- images of the run's shape ----------------------------------------------------------------

_BANDS = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}


def open_image_run(args, command: str):
    """(out path, LoadedRun, device) for a command that writes a PNG from an image run."""
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must end in .png, got {out.name!r}")
    run, device = load_run(args.path, args)
    if len(run.shape) != 3:
        raise UserError(f"ddpm {command} needs an image run; {run.path} makes points of shape {run.shape}")
    return out, run, device


def read_run_image(path: str, run, flag: str):
    """The image at ``path`` as a (C, H, W) tensor in [-1, 1] (x / 127.5 - 1, inverted exactly by
    ``viz.to_uint8``), refusing any size or channel count other than the run's."""
    import numpy as np
    import torch

    from ..data.images import read_image, to_unit_range

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
    return to_unit_range(torch.from_numpy(pixels.copy()))


@contextlib.contextmanager
def following_load(run, device):
    """Inside the block the run's network follows the machine's load (``ddpm.core.threads``: the
    thread count is re-measured on its clock at each network call), as ``sample_batches`` does for
    sampling; for the editing commands, whose samplers call the network themselves (never the
    guide). A thread count changes no result (tests/core/test_threads.py)."""
    import torch

    from ..core import threads

    with threads.follow_load(device=device):
        hook = None
        if isinstance(run.model, torch.nn.Module):
            hook = run.model.register_forward_pre_hook(lambda module, args: threads.tick())
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()


def model_options(run) -> dict:
    """The run's prediction, clipping and ancestral variance, as its previews use them (an analytic
    variance needs a table per grid that the editing commands do not build: fixed_small instead)."""
    from ..training.previews import preview_kwargs

    return preview_kwargs(run.config)


def write_run_report(run_dir: Path) -> None:
    """RUN/report.html at the end of a run (ddpm train, ddpm distill); a failure here must not turn a finished run into an error."""
    from ..evaluation.report import write_report

    try:
        print(f"ddpm: report: {write_report(run_dir)}")
    except Exception as exc:  # the weights and logs are saved; the report can be redone with `ddpm report`
        print(f"ddpm: warning: could not write the report ({first_line(exc)}); retry with: ddpm report {run_dir}",
              file=sys.stderr)
