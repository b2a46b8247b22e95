"""``ddpm inpaint``: fill the masked pixels of an image (RePaint, Lugmayr et al. 2022) with
``ddpm.sampling.inpainting.inpaint``.

The image and the mask are PNG/JPEG files of exactly the run's size (``common.read_run_image``);
without ``--class`` a conditional run fills in with its null label (the kept pixels are the
condition).
"""

from __future__ import annotations

from pathlib import Path

from .common import editing_conditioning, following_load, label_text, model_options, open_image_run, read_run_image
from .options import add_class_args, add_model_args, positive
from ..errors import UserError

EXAMPLES = """examples:
  ddpm inpaint runs/mnist-cond --image digit.png --mask mask.png --out filled.png
  ddpm inpaint runs/mnist-cond --image digit.png --mask mask.png --class 3 --guidance 3 --num 4 --out threes.png
  ddpm inpaint runs/mnist --image digit.png --mask mask.png --resample 1 --out replaced.png   # no resampling
"""


def add_parser(subparsers, formatter_class) -> None:
    p = subparsers.add_parser("inpaint", help="fill the masked pixels of an image (RePaint)",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Generate the pixels of --image where --mask is white and "
                              "keep the others exactly (RePaint, Lugmayr et al. 2022: ancestral sampling with the kept "
                              "region replaced by a noised copy of the image at every step, and resampling to harmonise). "
                              "Image and mask are PNG/JPEG files of the run's size; the image has the run's channels.")
    p.set_defaults(func=cmd_inpaint)
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


def cmd_inpaint(args) -> int:
    from ..evaluation.viz import save_grid
    from ..sampling.batches import sampler_settings
    from ..sampling.inpainting import inpaint
    from ..sampling.samplers import per_sample_seeds

    out, run, device = open_image_run(args, "inpaint")
    known = read_run_image(args.image, run, "--image")
    generate = read_mask(args.mask, known.shape[1:])
    label, guidance = editing_conditioning(run, args)
    # Ancestral steps: the run's preview steps when it previews with ddpm, else all T.
    steps = sampler_settings(run, "ddpm", args.steps).steps
    batch = known.expand(args.num, *known.shape).to(device)
    with following_load(run, device):
        x = inpaint(run.model, run.schedule, batch, (~generate).to(device), resample=args.resample, jump=args.jump,
                    steps=steps, labels=label, guidance=guidance,
                    generator=per_sample_seeds(args.seed, args.num, device=device), progress=bool(args.progress),
                    **model_options(run))
    # One completion is written as an image of the input's size (no border), several side by side.
    save_grid(x.float().cpu(), out, nrow=args.num, padding=0 if args.num == 1 else 2)
    kept = int((~generate).sum())
    print(f"ddpm: wrote {args.num} inpainting{'s' * (args.num > 1)} ({kept} of {generate.numel()} pixels kept, "
          f"{steps} steps, resample {args.resample}, jump {args.jump}{label_text(run, label, guidance)}) to {out}")
    return 0


def read_mask(path: str, size_hw: tuple[int, int]):
    """The mask at ``path`` as a bool (1, H, W) tensor, True where pixels are to be generated
    (white: grey level >= 128 in any mode)."""
    import numpy as np
    import torch

    from ..data.images import read_image

    image = read_image(Path(path))
    if image.size != (size_hw[1], size_hw[0]):
        raise UserError(f"--mask {path} is {image.size[0]}x{image.size[1]} (WxH) but the image is "
                        f"{size_hw[1]}x{size_hw[0]}: mask size differs from image")
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    return torch.from_numpy(grey >= 128)[None]
