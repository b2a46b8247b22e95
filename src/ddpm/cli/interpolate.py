"""``ddpm interpolate``: a strip of images between two images, through the model
(``ddpm.sampling.interpolation.interpolate``): slerp of DDIM-inverted latents, or both images
noised to one timestep, mixed and denoised (DDPM Figure 8).
"""

from __future__ import annotations

from .common import editing_conditioning, following_load, label_text, model_options, open_image_run, read_run_image
from .options import add_class_args, add_model_args, frames, positive
from ..errors import UserError

EXAMPLES = """examples:
  ddpm interpolate runs/mnist a.png b.png --frames 8 --out strip.png
  ddpm interpolate runs/mnist a.png b.png --frames 8 --method noised --t 500 --out strip.png   # DDPM Fig. 8
"""


def add_parser(subparsers, formatter_class) -> None:
    p = subparsers.add_parser("interpolate", help="a strip of images between two images",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Interpolate between images A and B through the "
                              "model: slerp (default) of their DDIM-inverted latents x_T, decoded with DDIM (Song et al. "
                              "2021); or noised: both noised to timestep t with the same noise, mixed linearly and "
                              "decoded by the reverse process (Ho et al. 2020, Figure 8). Writes one row of --frames "
                              "images, A's end first.")
    p.set_defaults(func=cmd_interpolate)
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


def cmd_interpolate(args) -> int:
    from ..evaluation.viz import save_grid
    from ..sampling.interpolation import interpolate

    out, run, device = open_image_run(args, "interpolate")
    x_a = read_run_image(args.a, run, "image A").to(device)
    x_b = read_run_image(args.b, run, "image B").to(device)
    label, guidance = editing_conditioning(run, args)
    if args.method == "slerp" and args.t is not None:
        raise UserError("--t is the noising timestep of --method noised; slerp inverts to x_T")
    with following_load(run, device):
        strip = interpolate(run.model, run.schedule, x_a, x_b, frames=args.frames, method=args.method, t=args.t,
                            steps=args.steps, labels=label, guidance=guidance, generator=args.seed,
                            progress=bool(args.progress), **model_options(run))
    save_grid(strip.float().cpu(), out, nrow=args.frames)
    how = "DDIM-inverted latents, slerp" if args.method == "slerp" else \
        f"noised to t={run.schedule.num_timesteps // 2 if args.t is None else args.t}, Fig. 8"
    print(f"ddpm: wrote {args.frames} frames ({how}{label_text(run, label, guidance)}) to {out}")
    return 0
