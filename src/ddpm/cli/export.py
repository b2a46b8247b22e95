"""``ddpm export``: write a run's EMA weights and schedule as a diffusers pipeline directory
(``ddpm.io.diffusers.export_diffusers``)."""

from __future__ import annotations

import json

EXAMPLES = """examples:
  ddpm export runs/c10 --format diffusers c10-diffusers   # then DDPMPipeline.from_pretrained("c10-diffusers")
  ddpm sample c10-diffusers --num 16 --out x.png          # a diffusers pipeline directory samples like a run
  ddpm export runs/mnist-4 mnist-4-diffusers              # a distilled run: a DDIMPipeline, num_inference_steps=4
"""


def add_parser(subparsers, formatter_class) -> None:
    x = subparsers.add_parser("export", help="write a run as a diffusers pipeline directory",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Write a run's EMA weights and schedule in another "
                              "library's format (diffusers: DDPMPipeline.from_pretrained(OUT) loads it).")
    x.set_defaults(func=cmd_export)
    x.add_argument("path", help="run directory, ckpt-NNNNNNN folder or .safetensors file")
    x.add_argument("--format", choices=("diffusers",), default="diffusers", help="output format (default: diffusers)")
    x.add_argument("out", help="output directory (must not exist, or be empty)")
    x.add_argument("--no-ema", action="store_true", help="export the online weights instead of the EMA")


def cmd_export(args) -> int:
    from ..io.run import export_diffusers

    out = export_diffusers(args.path, args.out, ema=not args.no_ema)
    index = json.loads((out / "model_index.json").read_text(encoding="utf-8"))
    pipeline, steps = index["_class_name"], _distilled_steps(args.path, not args.no_ema)
    call = "" if steps is None else f", then pipe(num_inference_steps={steps}, eta=0.0) takes the distilled steps"
    print(f"ddpm: wrote a diffusers {pipeline} to {out} ({pipeline}.from_pretrained({str(out)!r}) loads it{call}; "
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


def _distilled_steps(path: str, ema: bool) -> int | None:
    """The step count of a distilled run, None for any other."""
    from ..io.diffusers import is_diffusers_dir
    from ..io.run import read_config

    if is_diffusers_dir(path):
        return None
    distilled = read_config(path, ema=ema).distill
    return None if distilled is None else distilled.steps
