"""``ddpm --help``, ``--version`` and a mistyped command line answer without importing torch.

Importing torch costs about 2 s of a 2 s ``ddpm --help`` (more on a busy machine), so the parser
must be built from torch-free modules: the command-line tuples of ``ddpm.cli.choices``, held equal
here to the tuples of the modules that implement them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddpm.cli import choices
from ddpm.cli.main import COMMANDS, _subcommands, build_parser
from ddpm.core.device import AMP_MODES
from ddpm.core.diffusion import PREDICTIONS, VARIANCES
from ddpm.core.schedules import SCHEDULES
from ddpm.presets import PRESETS
from ddpm.sampling.samplers import SAMPLERS

# Runs `python -m ddpm ARGS` with an import hook that refuses torch: any import of it, however
# indirect, fails loudly (and a test below checks that the hook does refuse it).
NO_TORCH = """
import runpy, sys

class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported at start-up")
        return None

sys.meta_path.insert(0, RefuseTorch())
sys.argv = ["ddpm", *sys.argv[1:]]
try:
    runpy.run_module("ddpm", run_name="__main__", alter_sys=True)
finally:
    assert "torch" not in sys.modules
"""


def ddpm_without_torch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=120)


def _help_command_lines() -> list[list[str]]:
    lines = [["--help"]]
    for command in COMMANDS:
        name = command.__name__.rpartition(".")[2]
        lines.append([name, "--help"])
        sub = _subcommands(_subcommands(build_parser())[name])
        lines += [[name, s, "--help"] for s in sub or ()]
    return lines


@pytest.mark.parametrize("argv", _help_command_lines(), ids=" ".join)
def test_help_answers_without_torch(argv):
    done = ddpm_without_torch(*argv)
    assert done.returncode == 0 and "usage: ddpm" in done.stdout, done.stderr


def test_version_answers_without_torch():
    done = ddpm_without_torch("--version")
    assert done.returncode == 0 and done.stdout.startswith("ddpm "), done.stderr


@pytest.mark.parametrize("argv, said", [
    (["sample", "RUN", "--nmu", "4"], "ddpm: error: sample: "),
    (["sample", "RUN", "--out", "x.png", "--nmu", "4"], "ddpm: error: sample: unrecognized arguments: --nmu 4"),
    (["sample", "RUN", "--out", "x.png", "--sampler", "euler"], "ddpm: error: sample: argument --sampler: invalid"),
    (["train", "--preset", "huge"], "ddpm: error: train: argument --preset: invalid choice: 'huge'"),
    (["smaple"], "ddpm: error: invalid choice: 'smaple'"),
])
def test_an_argument_error_is_one_line_without_torch(argv, said):
    done = ddpm_without_torch(*argv)
    assert done.returncode == 2 and done.stderr.startswith(said) and len(done.stderr.splitlines()) == 1, done.stderr


def test_the_hook_does_refuse_torch():
    # negative control: a command that needs torch fails under the hook, so the passes above mean something
    done = ddpm_without_torch("schedules")
    assert done.returncode != 0 and "torch imported at start-up" in done.stderr


def test_the_command_line_choices_are_the_library_s():
    assert choices.SAMPLERS == SAMPLERS
    assert choices.SCHEDULES == SCHEDULES
    assert choices.PRESETS == PRESETS
    assert choices.AMP_MODES == AMP_MODES
    assert choices.VARIANCES == VARIANCES
    assert choices.PREDICTIONS == PREDICTIONS
