"""``ddpm schedules``: plot or tabulate the seed beta schedules (``ddpm.evaluation.viz``)."""

from __future__ import annotations

EXAMPLES = """examples:
  ddpm schedules --table
  ddpm schedules --plot docs/schedules.png --T 1000
"""


def add_parser(subparsers, formatter_class) -> None:
    c = subparsers.add_parser("schedules", help="plot or tabulate the four seed beta schedules",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="beta_t, abar_t and log-SNR of linear, cosine, sqrt_linear, sqrt.")
    c.set_defaults(func=cmd_schedules)
    c.add_argument("--plot", help="write a PNG with the schedules side by side")
    c.add_argument("--table", action="store_true", help="print a table (default when --plot is not given)")
    c.add_argument("--T", type=int, default=1000, help="number of timesteps")
    c.add_argument("--every", type=int, default=100, help="table row spacing")


def cmd_schedules(args) -> int:
    from ..evaluation import viz

    if args.plot:
        print(f"ddpm: wrote {viz.plot_schedules(args.plot, T=args.T)}")
    if args.table or not args.plot:
        print(viz.schedule_table(T=args.T, every=args.every))
    return 0
