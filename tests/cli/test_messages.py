"""What the command line says when a person mistypes, asks for its version, or asks for what is done."""

from __future__ import annotations

import pytest

from ddpm.cli.main import main
from ddpm.io.checkpoint import list_checkpoints


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: ") and "Traceback" not in err, err
    return lines[0].removeprefix("ddpm: error: ")


@pytest.mark.parametrize("argv, said", [
    (["sample", "RUN", "--nmu", "4", "--out", "x.png"], "sample: unrecognized arguments: --nmu 4; did you mean --num?"),
    (["train", "--stpes", "3"], "train: unrecognized arguments: --stpes 3; did you mean --steps?"),
    (["smaple", "RUN"], "invalid choice: 'smaple' (choose from train, sample, distill, "),
    (["eval", "fdi", "RUN"], "eval: invalid choice: 'fdi' (choose from fid, nll, toy); did you mean fid?"),
    (["eval", "fid"], "eval fid: the following arguments are required: source, --ref"),
    (["sample", "RUN", "--sampler", "euler", "--out", "x.png"], "sample: argument --sampler: invalid choice: 'euler'"),
])
def test_a_mistyped_command_line_names_the_command_and_the_closest_option(capsys, argv, said):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and one_error_line(err).startswith(said), err
    if argv[0] == "smaple":
        assert one_error_line(err).endswith("; did you mean sample?")
    assert "ddpm: error: ddpm" not in err  # "ddpm" once


def test_abbreviated_options_are_refused_not_expanded(capsys):
    # --nu would silently become --num today and something else the day an option --nu... is added
    code, _, err = run_cli(capsys, "sample", "RUN", "--nu", "4", "--out", "x.png")
    assert code == 2 and one_error_line(err) == "sample: unrecognized arguments: --nu 4; did you mean --num?"


def test_version(capsys):
    from ddpm import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ddpm {__version__}"


def test_a_hub_name_is_not_downloaded_and_the_message_says_how(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sample", "google/ddpm-cifar10-32", "--out", "x.png")
    assert code == 2
    assert one_error_line(err) == (
        "no such run directory or checkpoint: google/ddpm-cifar10-32; if it is a Hugging Face Hub name: those are not "
        "downloaded, fetch it first with `huggingface-cli download google/ddpm-cifar10-32 --local-dir "
        "ddpm-cifar10-32`, then use the folder ddpm-cifar10-32")
    code, _, err = run_cli(capsys, "sample", "nothere", "--out", "x.png")  # not a Hub-like name: no advice
    assert one_error_line(err) == "no such run directory or checkpoint: nothere"


def test_one_step_and_a_finished_run_resumed(tmp_path, capsys):
    out = tmp_path / "r"
    code, said, _ = run_cli(capsys, "train", "--preset", "tiny", "--steps", "1", "--no-progress", "--out", out)
    assert code == 0 and ", 1 step\n" in said and "1 steps" not in said
    code, said, err = run_cli(capsys, "train", "--resume", "--steps", "1", "--no-progress", "--out", out)
    assert code == 0 and said.strip() == f"ddpm: {out} is already at step 1 of 1; raise --steps (or --max-minutes) " \
                                         f"to continue", said + err
    assert [s for s, _ in list_checkpoints(out)] == [1]
    # the ancestral sampler names the variance it drew with
    code, said, _ = run_cli(capsys, "sample", out, "--num", "2", "--steps", "1", "--sampler", "ddpm",
                            "--out", tmp_path / "x.png")
    assert code == 0 and "(ddpm, 1 step, variance fixed_small," in said, said
