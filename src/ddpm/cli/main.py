"""``ddpm`` command line: the top-level parser, the commands it offers and ``main``.

Each command is a module of this package holding its options (``add_parser``), its examples and
its handler: ``train``, ``sample``, ``distill``, ``schedules``, ``eval`` (fid, nll, toy), ``export``, ``report``,
``analytic``, ``inpaint`` and ``interpolate``; they share option groups (``ddpm.cli.options``) and
run loading, variances and conditioning (``ddpm.cli.common``). The library is imported when a
command runs.

User mistakes (UserError, ValueError from config validation, missing files) print
``ddpm: error: <one line>`` on stderr and exit with code 2, as do exhausted memory or disk and a
diverged training run; Ctrl-C, SIGTERM or SIGHUP during training saves a checkpoint and exits
with code 128 + the signal number (130, 143, 129).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from importlib import metadata

from . import analytic, distill, eval, export, inpaint, interpolate, report, sample, schedules, train
from .options import show_help
from ..core import threads
from ..errors import UserError, first_line

# The commands, in the order `ddpm --help` lists them.
COMMANDS = (train, sample, distill, schedules, eval, export, report, analytic, inpaint, interpolate)

QUICKSTART = """examples:
  ddpm train                                   # about 15 minutes on a laptop CPU: digits in runs/mnist-DATE/samples
  ddpm sample runs/mnist-DATE --num 64 --out digits.png
  ddpm schedules --plot schedules.png
  ddpm eval toy runs/moons
run `ddpm COMMAND --help` for each command's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """One-line errors that name the command (``sample: ...``), and no prefix abbreviations: an
    abbreviation (``--nu`` for ``--num``) would change meaning silently the day an option is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2, like every other user error
        command = self.prog.partition(" ")[2]  # "sample", "eval fid"; "" for ddpm itself
        raise UserError(f"{command}: {message}" if command else message)


def _version() -> str:
    try:
        return metadata.version("ddpm")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020).",
                     formatter_class=fmt, epilog=QUICKSTART)
    parser.set_defaults(func=None)
    parser.add_argument("--version", action="version", version=f"ddpm {_version()}")
    names = ",".join(command.__name__.rpartition(".")[2] for command in COMMANDS)
    sub = parser.add_subparsers(dest="command", metavar="{" + names + "}")
    for command in COMMANDS:
        command.add_parser(sub, fmt)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    threads.quiet_waits()  # before anything imports torch: idle OpenMP threads give their core back
    # PIL warns about an image past Image.MAX_IMAGE_PIXELS (up to twice that) and decodes it anyway:
    # as an error, ddpm.data.images refuses it in one line, as it does one past twice the limit.
    warnings.filterwarnings("error", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        parser = build_parser()
        args = _parse(parser, argv)
        if args.func is None:
            # A bare `ddpm` shows what there is rather than starting a 15-minute training run;
            # `ddpm train` with no options is the quick start.
            return show_help(parser)
        return args.func(args)
    except KeyboardInterrupt as exc:
        from ..training.loop import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"ddpm: {exc} (continue with: ddpm train --resume --out {exc.run_dir})", file=sys.stderr)
            return exc.exit_code  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        print(f"ddpm: error: {first_line(exc)}", file=sys.stderr)
        return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` with messages that help: a misspelled command or option is named with
    the closest one (``did you mean --num?``), and by the (sub)command it was given to."""
    here, path = parser, []
    for token in argv:  # the (sub)command the arguments go to: ddpm, ddpm sample, ddpm eval fid
        commands = _subcommands(here)
        if commands is None:  # a command's own arguments from here on
            break
        if token.startswith("-"):  # an option of ddpm (or of eval) itself: --help, --version
            continue
        if token not in commands:
            close = difflib.get_close_matches(token, list(commands), n=1)
            where = " ".join(path)
            raise UserError(f"{where + ': ' if where else ''}invalid choice: {token!r} (choose from "
                            f"{', '.join(commands)})" + (f"; did you mean {close[0]}?" if close else ""))
        here, path = commands[token], path + [token]
    args, extras = parser.parse_known_args(argv)
    if extras:
        options = [o for action in here._actions for o in action.option_strings]
        close = difflib.get_close_matches(extras[0].partition("=")[0], options, n=1) if extras[0].startswith("-") \
            else []
        where = " ".join(path)
        raise UserError(f"{where + ': ' if where else ''}unrecognized arguments: {' '.join(extras)}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    return args


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


if __name__ == "__main__":
    raise SystemExit(main())
