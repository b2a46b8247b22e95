"""``ddpm distill``: a trained run into a few-step run (progressive distillation, ``ddpm.training.distill_run``)."""

from __future__ import annotations

from .options import finite, interval, positive
from .common import write_run_report

EXAMPLES = """examples:
  ddpm distill runs/mnist-20250101-120000 --steps 4 --out runs/mnist-4   # 64 -> 32 -> 16 -> 8 -> 4 steps
  ddpm sample runs/mnist-4 --num 64 --out digits.png                     # 4 DDIM steps, the distilled grid
  ddpm distill runs/mnist-4 --steps 1 --out runs/mnist-1                 # on from a distilled run: 4 -> 2 -> 1
  ddpm distill runs/mnist-20250101-120000 --steps 4 --out runs/mnist-4 --resume   # after Ctrl-C or a kill

grid rule: the N-step grid is t_i = round(T - i*T/N) - 1, i = 0..N-1 ("trailing" spacing), then x0;
every other point of the 2N grid is the N grid. --steps must be the teacher grid halved k >= 1 times:
the teacher grid is --teacher-steps (default: --steps * 2^k, the largest <= max(64, 2 * --steps), at
most T) or, for a distilled teacher, its own step count. The student predicts v and samples only with
ddim, --steps steps, eta 0.
"""


def add_parser(subparsers, formatter_class) -> None:
    d = subparsers.add_parser("distill", help="distil a trained run into a few-step sampler (progressive distillation)",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Progressive distillation (Salimans & Ho 2022): each round halves the "
                                          "DDIM steps, with the run's default guidance (or the one chosen here) "
                                          "baked in.")
    d.set_defaults(func=cmd_distill)
    d.add_argument("run", help="a finished run directory (of `ddpm train` or `ddpm distill`)")
    d.add_argument("--steps", type=positive, required=True, help="sampling steps of the student (see the grid rule)")
    d.add_argument("--out", help="run directory of the student (default: runs/NAME-distillSTEPS)")
    d.add_argument("--teacher-steps", type=positive, help="the first teacher grid (default: see the grid rule)")
    d.add_argument("--iters-per-round", type=positive, default=500, help="optimizer steps per round (default 500: "
                   "the default mnist run distils to 4 steps in about 12 minutes on 2 CPU cores, docs/distillation.md)")
    d.add_argument("--batch-size", type=positive, help="default: the teacher run's")
    d.add_argument("--lr", type=float, help="Adam learning rate, decayed linearly to 0 in each round (default: the "
                   "teacher run's)")
    d.add_argument("--max-minutes", type=float, help="time budget shared equally by the rounds (resume is then not "
                   "bit for bit)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (default: each round's end)")
    d.add_argument("--match-round", action="store_true", help="a first round on the teacher's own grid in which "
                   "one student step learns one guided teacher step (Meng et al. 2023, stage one); measured on the "
                   "mnist run it cost a round and did not help (docs/distillation.md)")
    d.add_argument("--guidance", type=finite, default=None, help="class-conditional teachers: the classifier-free "
                   "guidance scale baked into the student (default: the run's sample.guidance)")
    d.add_argument("--autoguidance", type=finite, default=None, metavar="W", help="teachers that kept a guide: the "
                   "autoguidance scale baked in, 1 = off (default: the run's sample.autoguidance)")
    d.add_argument("--guidance-interval", type=interval, default=None, metavar="LO,HI", help="guide the teacher "
                   "only at model timesteps in [LO, HI]; 'all' = every step (default: the run's "
                   "sample.guidance_interval)")
    d.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cmd_distill(args) -> int:
    from ..errors import UserError
    from ..training.distill_run import distill_run

    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UserError(f"--max-minutes must be > 0, got {args.max_minutes}")
    out = distill_run(args.run, steps=args.steps, out=args.out, teacher_steps=args.teacher_steps,
                      iters_per_round=args.iters_per_round, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_minutes=args.max_minutes, resume=args.resume, progress=args.progress,
                      ckpt_every=args.ckpt_every, device=args.device, match_round=args.match_round,
                      guidance=args.guidance, autoguidance=args.autoguidance,
                      guidance_interval=args.guidance_interval)
    print(f"ddpm: distilled {args.run} into {args.steps} steps in {out}; sample it with `ddpm sample {out} --out x.png`")
    write_run_report(out)
    return 0
