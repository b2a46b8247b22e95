"""``ddpm report``: write RUN/report.html (``ddpm.evaluation.report.write_report``)."""

from __future__ import annotations

EXAMPLES = "examples:\n  ddpm report runs/mnist-20250101-120000\n"


def add_parser(subparsers, formatter_class) -> None:
    r = subparsers.add_parser("report", help="write RUN/report.html: loss, lr, previews, metrics, config",
                              formatter_class=formatter_class, epilog=EXAMPLES,
                              description="Write a self-contained HTML page (plots as SVG, images embedded) of a run: "
                              "training loss and learning rate, preview grids over time, periodic evaluation, config. "
                              "`ddpm train` writes it at the end of every run.")
    r.set_defaults(func=cmd_report)
    r.add_argument("run", help="run directory")
    r.add_argument("--out", help="HTML file (default: RUN/report.html)")


def cmd_report(args) -> int:
    from ..evaluation.report import write_report

    print(f"ddpm: wrote {write_report(args.run, args.out)}")
    return 0
