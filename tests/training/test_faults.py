"""What a hostile or unlucky user does to a run (issue 14): divergence, stop signals, two writers,
flipped bits, crafted state files, a missing run, full disks and memory, bad integers, umask.
Every test here failed before the fix it names."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm.io import checkpoint, run as loading, files as rundir
from ddpm.io.checkpoint import list_checkpoints
from ddpm.io.run import load
from ddpm.cli.main import main
from ddpm.config import TrainConfig
from ddpm.errors import UserError
from ddpm.training.loop import TrainingDiverged, train
from ddpm.nets.unet import UNet

TINY = ["--preset", "tiny", "--no-progress"]


def cli_process(*argv, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ddpm", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def strict_records(run_dir) -> list[dict]:
    """log.jsonl parsed as strict JSON: a bare NaN/Infinity fails."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def last_line(err: str) -> str:
    """The CLI's last stderr line (an opening line may say what is being trained)."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def wait_for_log(proc, log, timeout=120) -> int:
    """Wait until the training subprocess has logged a record (its loop runs); return that step."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"no log record within {timeout} s"
        time.sleep(0.05)
    return json.loads(log.read_text().splitlines()[-1])["step"]


@contextlib.contextmanager
def nan_output_at(call: int):
    """Make the U-Net's ``call``-th training forward (0-based) return NaN."""
    count = [0]

    def hook(module, args, output):
        if isinstance(module, UNet) and torch.is_grad_enabled():
            count[0] += 1
            if count[0] - 1 == call:
                return output * float("nan")
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ckpt_tensors(run_dir, step, name):
    return load_file(str(run_dir / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def rewrite_manifest(folder):
    """What a forger would do: make the manifest match the edited files."""
    if not (folder / "manifest.json").is_file():  # (a checkpoint written before manifests)
        return
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_bytes(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny):
    """A tiny run of 4 steps with checkpoints at 2 and 4 (copy it before damaging it)."""
    return train(tiny(), out=tmp_path_factory.mktemp("faults") / "r")


def copy_run(run4, tmp_path):
    shutil.copytree(run4, tmp_path / "copy")
    return tmp_path / "copy"


# -- 1. divergence --------------------------------------------------------------------------------

def test_a_nonfinite_step_changes_neither_weights_nor_ema_nor_adam(tmp_path, tiny):
    clean = train(tiny(**{"train.steps": 3}), out=tmp_path / "clean")
    with nan_output_at(3):  # the 4th and last step's loss is NaN
        poisoned = train(tiny(**{"train.steps": 4}), out=tmp_path / "poisoned")
    for name in ("model", "ema"):
        a, b = ckpt_tensors(clean, 3, name), ckpt_tensors(poisoned, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = torch.load(poisoned / "ckpt-0000004" / "state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}  # Adam's count: 3 updates
    last = strict_records(poisoned)[-1]
    assert last["step"] == 4 and last["skipped_nonfinite"] == 1 and last["loss"] > 0  # the mean of step 3 alone


def test_divergence_stops_the_run_and_keeps_finite_checkpoints(tmp_path, tiny):
    config = tiny(**{"optim.lr": 1e3, "optim.warmup": 0, "train.steps": 60, "train.log_every": 1,
                     "train.ckpt_every": 2, "train.keep_last": 3, "train.max_nonfinite": 3})
    with pytest.raises(TrainingDiverged, match=r"diverged: the last 3 steps .* latest checkpoint") as info:
        train(config, out=tmp_path / "div")
    assert "\n" not in str(info.value)
    run = tmp_path / "div"
    records = strict_records(run)  # valid JSON: NaN written as null
    assert records[-1]["step"] < 60 and records[-1]["loss"] is None and records[-1]["skipped_nonfinite"] == 1
    ckpts = list_checkpoints(run)
    assert ckpts and all(s < records[-1]["step"] for s, _ in ckpts)
    for step, _ in ckpts:
        for name in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in ckpt_tensors(run, step, name).values())
    assert load(run).step == ckpts[-1][0]


@pytest.mark.parametrize("lr", ["inf", "nan"])
def test_a_nonfinite_learning_rate_is_refused(lr, tiny, capsys):
    with pytest.raises((ValueError, UserError), match="lr"):
        tiny(**{"optim.lr": float(lr)})
    assert main(["train", *TINY, "--lr", lr, "--out", "never-created"]) == 2
    assert "finite" in capsys.readouterr().err and not os.path.exists("never-created")


def test_nonfinite_weights_are_refused_on_load_naming_the_file(run4, tmp_path):
    path = run4 / "ckpt-0000004" / "ema.safetensors"
    tensors, meta = checkpoint.read_weights(path)
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    bad = tmp_path / "diverged.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(UserError, match=f"{re.escape(str(bad))} holds NaN/Inf weights"):
        load(bad)


# -- 2. stop signals ------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_save_a_checkpoint_and_exit_128_plus_the_signal(tmp_path, sig, code):
    out = tmp_path / "r"
    proc = cli_process("train", *TINY, "--steps", "100000", "--ckpt-every", "0", "--out", str(out))
    try:
        logged = wait_for_log(proc, out / "log.jsonl")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    stopped = re.fullmatch(rf"ddpm: interrupted by {sig.name} at step (\d+); checkpoint saved in \S+ \(continue "
                           rf"with: ddpm train --resume --out \S+\)", last_line(err))
    assert stopped, err
    step = int(stopped.group(1))
    assert step >= logged and [s for s, _ in list_checkpoints(out)] == [step]


# -- 3. one writer per run directory --------------------------------------------------------------

def test_a_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path, tiny):
    out = tmp_path / "r"
    proc = cli_process("train", *TINY, "--steps", "100000", "--ckpt-every", "0", "--out", str(out))
    try:
        wait_for_log(proc, out / "log.jsonl")
        before = (out / "config.json").read_text()
        with pytest.raises(UserError, match=rf"{re.escape(str(out))} is in use by process {proc.pid}"):
            train(tiny(**{"train.seed": 9}), out=out, resume=True)
        assert (out / "config.json").read_text() == before  # the second writer wrote nothing
    finally:
        proc.kill()  # SIGKILL: no clean-up, the lock file stays behind
        proc.wait()
    assert (out / ".lock").is_file() and not list_checkpoints(out)
    # leftovers: one of a dead process (swept), one of a live other process (not ours to sweep)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".tmp-{dead.pid}-0a0a0a0a-ckpt-0000009").mkdir()
    live = out / f".tmp-{os.getppid()}-0b0b0b0b-ckpt-0000009"
    live.mkdir()
    run = train(tiny(**{"train.steps": 2}), out=out, resume=True)  # the stale lock blocks nothing
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == [live.name]


# -- 4. checksums ---------------------------------------------------------------------------------

def test_flipped_weights_are_caught_and_a_run_falls_back_to_an_intact_checkpoint(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    flip_bytes(run / "ckpt-0000004" / "ema.safetensors")
    for named in (run / "ckpt-0000004", run / "ckpt-0000004" / "ema.safetensors"):
        with pytest.raises(UserError, match="ckpt-0000004 is damaged .*ema.safetensors: SHA-256 mismatch"):
            load(named)
    assert load(run).step == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'ckpt-0000004'} is damaged" in err and f"using {run / 'ckpt-0000002'}" in err
    assert main(["sample", str(run), "--num", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    assert "ckpt-0000002" in capsys.readouterr().err
    flip_bytes(run / "ckpt-0000002" / "ema.safetensors")
    with pytest.raises(UserError, match="no checkpoint .* is intact"):
        load(run)


def test_resume_falls_back_and_rotation_keeps_the_newest_intact_checkpoint(run4, tmp_path, tiny, capsys):
    run = copy_run(run4, tmp_path)
    flip_bytes(run / "ckpt-0000004" / "state.pt")
    # keep_last 1, a save every step: the damaged step-4 checkpoint must not survive the good ones
    config = tiny(**{"train.steps": 3, "train.ckpt_every": 1, "train.keep_last": 1})
    train(config, out=run, resume=True)
    assert "ckpt-0000004 is damaged (state.pt: SHA-256 mismatch); using" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]  # 2 rotated out; 3 kept (the newest intact)
    assert checkpoint.latest_verified_checkpoint(run).name == "ckpt-0000003"
    capsys.readouterr()
    train(config.override(**{"train.steps": 4}), out=run, resume=True)  # step 4 is redone and replaces it
    assert [s for s, _ in list_checkpoints(run)] == [4]
    assert rundir.verify(run / "ckpt-0000004", checkpoint.FILES) is None
    for name in ("model", "ema"):  # and equals the uninterrupted run's step 4
        a, b = ckpt_tensors(run4, 4, name), ckpt_tensors(run, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_without_a_manifest_still_load(run4, tmp_path):
    run = copy_run(run4, tmp_path)
    for _, folder in list_checkpoints(run):
        (folder / "manifest.json").unlink()
    assert load(run).step == 4


# -- 5. crafted training state --------------------------------------------------------------------

def test_an_adam_moment_of_the_wrong_shape_is_refused_not_a_segfault(run4, tmp_path):
    run = copy_run(run4, tmp_path)
    folder = run / "ckpt-0000004"
    state = torch.load(folder / "state.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1)
    torch.save(state, folder / "state.pt")
    rewrite_manifest(folder)
    proc = cli_process("train", *TINY, "--out", str(run), "--resume", "--steps", "6")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (proc.returncode, err)
    assert re.fullmatch(r"ddpm: error: checkpoint \S+state\.pt is not a usable training state: parameter 0: "
                        r"exp_avg is torch.float32 \(1,\).*", last_line(err)), err


@pytest.fixture(scope="module")
def good_state(run4):
    from ddpm.training import optim
    from ddpm.config import build_model

    optimizer = optim.make_optimizer(build_model(load(run4).config.model).parameters(), lr=1e-3)
    return torch.load(run4 / "ckpt-0000004" / "state.pt", weights_only=True), optimizer


def _set(path, value):
    def edit(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, needle", [
    (lambda s: [1, 2], "a list, not a dict"),
    (lambda s: s.pop("rng"), "no rng"),
    (_set(["step"], 4.0), "step 4.0 is not a step count"),
    (_set(["step"], 3), "step 3 but the folder is of step 4"),
    (_set(["optimizer", "state", 0, "exp_avg_sq"], torch.zeros(64, 16, dtype=torch.float64)), "exp_avg_sq is torch.float64"),
    (_set(["optimizer", "state", 0, "step"], torch.zeros(3)), "step is not a count"),
    (_set(["optimizer", "state", 9999], {}), "unknown parameter 9999"),
    (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "parameters in an optimizer group"),
    (_set(["optimizer", "param_groups", 0, "betas"], (float("nan"), 0.9)), "betas is not a finite number"),
    (_set(["rng", "ranks", 0, "cpu"], torch.zeros(7, dtype=torch.uint8)), "cpu RNG state has 7 bytes"),
    (_set(["world_size"], 2), "1 RNG states for world size 2"),
])
def test_a_malformed_state_is_a_one_line_error(good_state, edit, needle):
    import copy

    from ddpm.io.state import check_state

    state, optimizer = copy.deepcopy(good_state[0]), good_state[1]
    replaced = edit(state)
    state = replaced if isinstance(replaced, list) else state
    with pytest.raises(UserError, match=re.escape(needle)):
        check_state(state, optimizer, "ckpt-0000004/state.pt", step=4)
    check_state(copy.deepcopy(good_state[0]), optimizer, "ckpt-0000004/state.pt", step=4)  # the original passes


def test_a_header_claiming_a_huge_network_fails_before_allocating_it(run4, tmp_path, monkeypatch):
    tensors, meta = checkpoint.read_weights(run4 / "ckpt-0000004" / "ema.safetensors")
    config = json.loads(meta["ddpm_config"])
    config["model"]["ch"] = 2048  # about 10 GB of float32 weights
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={**meta, "ddpm_config": json.dumps(config)})
    real_build = loading.build_model

    def build_only_on_meta(model_config):
        assert torch.empty(0).device.type == "meta", "a real model was allocated before the shapes were checked"
        return real_build(model_config)

    monkeypatch.setattr(loading, "build_model", build_only_on_meta)
    with pytest.raises(UserError, match="another architecture"):
        load(forged)


# -- 6. --resume without a run --------------------------------------------------------------------

def test_resume_into_a_directory_without_a_run_is_an_error(tmp_path, tiny, capsys):
    with pytest.raises(UserError, match="holds no run"):
        train(tiny(), out=tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()
    assert main(["train", *TINY, "--out", str(tmp_path / "typo"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_a_killed_runs_temporary_config_is_swept(run4, tmp_path, tiny):
    run = copy_run(run4, tmp_path)
    (run / ".config.json.k3j4h5").write_text('{"name": "half')  # mkstemp name of earlier versions
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".tmp-{dead.pid}-0c0c0c0c-config.json").write_text("{")
    train(tiny(**{"train.steps": 5}), out=run, resume=True)
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp", ".config"))]


# -- 7. resources, integers, rotation leftovers, the log ------------------------------------------

def test_a_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(run4, tmp_path, tiny, monkeypatch):
    run = copy_run(run4, tmp_path)
    before = (run / "ckpt-0000004" / "model.safetensors").read_bytes()
    real_write = rundir._write_fd

    def disk_fills_up(fd, data):  # once config.json (2 kB) is written, in the first checkpoint file
        if len(data) < 10_000:
            return real_write(fd, data)
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "_write_fd", disk_fills_up)
    with pytest.raises(UserError, match=r"cannot save checkpoint \S+ckpt-0000006: No space left on device "
                                        r"\([\d.]+ MB needed, [\d.]+ MB free\); the earlier checkpoints are intact"):
        train(tiny(**{"train.steps": 6}), out=run, resume=True)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert (run / "ckpt-0000004" / "model.safetensors").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith((".tmp", ".del"))]
    # too little free space is said before a byte is written
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"No space left on device \([\d.]+ MB needed, 0.0 MB free\)"):
        train(tiny(**{"train.steps": 6}), out=run, resume=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2.5 MB file system (tmpfs; needs root, as CI runs): room for about three tiny checkpoints."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes_once_freed(small_tmpfs):
    out = small_tmpfs / "r"
    proc = cli_process("train", *TINY, "--steps", "40", "--ckpt-every", "2", "--set", "train.keep_last=10",
                       "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and re.fullmatch(r"ddpm: error: cannot save checkpoint \S+: No space left on device "
                                                 r"\([\d.]+ MB needed, [\d.]+ MB free\); the earlier checkpoints are "
                                                 r"intact", last_line(err)), err
    kept = [s for s, _ in list_checkpoints(out)]
    assert kept and load(out).step == kept[-1]  # every checkpoint written is whole and verifies
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp", ".del"))]
    for step in kept[:-1]:  # free space: the run goes on from its newest checkpoint
        shutil.rmtree(out / f"ckpt-{step:07d}")
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    train(config.override(**{"train.steps": kept[-1] + 2, "train.keep_last": 1}), out=out, resume=True)
    assert load(out).step == kept[-1] + 2


def test_a_file_size_limit_is_one_line_with_exit_2(run4, tmp_path):
    import resource

    run = copy_run(run4, tmp_path)

    def limit_file_size():  # writes past 300 kB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = cli_process("train", *TINY, "--out", str(run), "--resume", "--steps", "6", preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and re.fullmatch(r"ddpm: error: cannot save checkpoint \S+ckpt-0000006: File too "
                                                 r"large; the earlier checkpoints are intact", last_line(err)), err
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and load(run).step == 4


def test_a_read_only_run_directory_is_one_line(run4, tmp_path, tiny, monkeypatch):
    run = copy_run(run4, tmp_path)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match=rf"training: {re.escape(str(run))}/\.lock: Read-only file system"):
        train(tiny(**{"train.steps": 6}), out=run, resume=True)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    (tmp_path / "file").write_text("")  # an --out under a file
    assert main(["train", *TINY, "--out", str(tmp_path / "file" / "run")]) == 2


def test_absurd_sizes_are_one_line_errors_not_allocations(tmp_path):
    # Under an 8 GB address-space limit, so that a regression fails instead of filling the machine.
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
from ddpm.cli.main import main
for extra in (["--batch-size", "1000000000"], ["--set", "data.image_size=1e6"], ["--set", "model.ch=100000"]):
    print(main(["train", "--preset", "tiny", "--no-progress", "--out", {str(tmp_path / "r")!r}, *extra]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert [line for line in proc.stdout.splitlines() if line.isdigit()] == ["2", "2", "2"], proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ddpm: error:")]
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "GB for one batch of noise alone" in lines[0] and "GB for one batch of noise alone" in lines[1]
    assert "ran out of memory" in lines[2]
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_integer_options_are_exact_or_refused(tmp_path, tiny, capsys):
    assert main(["train", *TINY, "--set", "train.steps=2.5", "--out", str(tmp_path / "a")]) == 2
    assert "train.steps must be an integer, got 2.5" in capsys.readouterr().err
    config_file = tmp_path / "c.toml"
    config_file.write_text("[train]\nsteps = 3.0\nckpt_every = 3e0\n")
    assert main(["train", *TINY, "--config", str(config_file), "--out", str(tmp_path / "b")]) == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]  # the final checkpoint of an exact 3
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["steps"] == 3
    with pytest.raises(UserError, match="model.ch must be an integer"):
        tiny(**{"model.ch": 31.5})


def test_a_half_deleted_checkpoint_folder_is_swept_at_the_next_save(run4, tmp_path, tiny):
    run = copy_run(run4, tmp_path)
    half = run / "ckpt-0000001"  # a kill while an earlier version deleted it file by file
    half.mkdir()
    shutil.copy(run / "ckpt-0000002" / "model.safetensors", half)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(run / "ckpt-0000002", run / f".del-{dead.pid}-0d0d0d0d-ckpt-0000002")  # a kill during rotation
    train(tiny(**{"train.steps": 6}), out=run, resume=True)
    assert sorted(p.name for p in run.iterdir() if "ckpt" in p.name) == ["ckpt-0000004", "ckpt-0000006"]


def test_a_damaged_log_window_in_state_pt_is_one_line(tmp_path, tiny, capsys):
    config = tiny(**{"train.steps": 3, "train.log_every": 2})
    run = train(config, out=tmp_path / "r")
    state_path = run / "ckpt-0000003" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["log_window"]["since"] == 2  # the window of steps 3-4 is open at the stop
    state["log_window"] = {"sums": [float("nan"), 0.0, 0.0], "since": 2}
    torch.save(state, state_path)
    rewrite_manifest(run / "ckpt-0000003")
    with pytest.raises(UserError, match="log_window"):
        train(config.override(**{"train.steps": 4}), out=run, resume=True)


def test_the_log_does_not_repeat_steps_after_a_resume(tmp_path, tiny):
    config = tiny(**{"train.steps": 4, "train.log_every": 1})
    run = train(config, out=tmp_path / "r")
    shutil.rmtree(run / "ckpt-0000004")  # killed after logging step 4, before saving it
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and in the middle of a line
    train(config, out=run, resume=True)
    assert [r["step"] for r in strict_records(run)] == [1, 2, 3, 4]


def test_run_files_follow_the_umask(tmp_path, tiny):
    old = os.umask(0o022)
    try:
        run = train(tiny(**{"train.steps": 2}), out=tmp_path / "r")
    finally:
        os.umask(old)
    assert (run / "ckpt-0000002").stat().st_mode & 0o777 == 0o755
    for path in (run / "config.json", run / "log.jsonl", *(run / "ckpt-0000002").iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path
