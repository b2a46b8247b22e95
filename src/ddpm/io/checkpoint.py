"""Run directories and atomic verified checkpoints: listing, saving, reading and resuming from them.

Layout of a run directory::

    RUN/config.json                 resolved TrainConfig
    RUN/log.jsonl                   one JSON object per log interval
    RUN/.lock                       held (flock) by the training process writing the run
    RUN/samples/step-0001000.png    previews from the EMA model
    RUN/analytic.json               Gamma_t of one checkpoint's weights for variance "analytic" (``ddpm analytic``)
    RUN/ckpt-0001000/               one complete checkpoint per saved step (keep-last-K)
        model.safetensors           online weights   } config JSON in the safetensors metadata,
        ema.safetensors             EMA weights      } so either file alone rebuilds its network
        state.pt                    optimizer, step, RNG and data-order state (torch.load(weights_only=True))
        manifest.json               size and SHA-256 of the three files above

A checkpoint is serialised in memory, hashed, written into a hidden temporary folder in RUN with
every file fsync'ed and the manifest last, then the folder is renamed into place with
``os.replace`` (atomic on POSIX) and RUN is fsync'ed. A kill at any moment leaves either the
previous checkpoints or the new one, never half a one; leftover temporaries are swept at the
next save. Loading verifies the manifest: a run directory falls back to its newest checkpoint
that verifies (saying so on stderr), an explicitly named checkpoint or file is refused when
damaged. Weights with NaN/Inf are neither saved nor loaded. Loading a run for sampling
(``load``, ``LoadedRun``) is ``ddpm.io.run``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..config import TrainConfig, build_model
from ..core.analytic import AnalyticVariance
from ..errors import UserError, first_line
from .files import (
    LOCK,
    MANIFEST,
    RESOURCE_ERRNOS,
    atomic_folder,
    atomic_write_text,
    is_temporary,
    manifest_text,
    retire,
    sweep_temporaries,
    verify,
)
from .state import check_state, load_tensors

__all__ = ["atomic_write_text", "list_checkpoints", "latest_checkpoint", "latest_verified_checkpoint", "check_run_dir",
           "save_checkpoint", "restore_training_state"]

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
FILES = ("model.safetensors", "ema.safetensors", "state.pt")
GUIDE_NAME = "guide"  # ckpt-*/guide.safetensors: the autoguidance guide, when the run keeps one
GUIDE_FILE = f"{GUIDE_NAME}.safetensors"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder); not yet verified."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (unverified; see ``latest_verified_checkpoint``)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def check_run_dir(run_dir: Path) -> None:
    """Refuse to train into ``run_dir`` when it exists and holds something other than a ddpm run,
    before anything is written there (a one-line UserError): a config.json that is not a run
    config, or, with neither a config.json nor a checkpoint, any file but the lock and temporaries
    a run that failed to start leaves. Training there would overwrite that config.json, or mix a
    run's files (log.jsonl, samples/, report.html) into someone else's folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return  # new (the lock creates it), or not a folder (the lock says so)
    config = run_dir / "config.json"
    if os.path.lexists(config):
        try:
            TrainConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError, UserError, RecursionError) as exc:
            raise UserError(f"{run_dir} is not a ddpm run: its config.json is not a run config ({first_line(exc)}); "
                            f"choose a new or empty --out") from None
        return
    if list_checkpoints(run_dir):
        return  # a run whose config.json went missing: its checkpoints carry the config
    others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK and not is_temporary(p.name))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(f"{run_dir} is not a ddpm run and not empty (it holds {others[0]}{more}); choose a new or "
                        f"empty --out")


def latest_verified_checkpoint(run_dir: Path, names=FILES) -> Path | None:
    """The newest checkpoint whose ``names`` (and autoguidance guide, where it has one) match its
    manifest; None if the run has none.

    Damaged newer ones are skipped with one line on stderr; if every one is damaged that is a
    UserError listing them (never a silent fresh start).
    """
    damaged = []
    for _, folder in reversed(list_checkpoints(run_dir)):
        problem = verify(folder, names, optional=(GUIDE_FILE,))
        if problem is None:
            if damaged:
                print(f"ddpm: {'; '.join(damaged)}; using {folder}", file=sys.stderr)
            return folder
        damaged.append(f"checkpoint {folder} is damaged ({problem})")
    if damaged:
        raise UserError(f"no checkpoint in {run_dir} is intact: {'; '.join(damaged)}")
    return None


# -- saving -----------------------------------------------------------------------------------

def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; channels_last weights are non-contiguous.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def nonfinite_key(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first floating-point tensor holding NaN or Inf, or None."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, state: dict, config: TrainConfig,
    keep_last: int = 3, guide: tuple[int, torch.nn.Module] | None = None,
) -> Path:
    """Atomically write ``RUN/ckpt-{step:07d}`` (replacing one of that step) with its manifest,
    then delete all but the newest ``keep_last`` up to this step (newer ones are left alone: a
    run resumed from an earlier checkpoint replaces them when it gets there).

    ``guide`` (step, module): the autoguidance guide kept at that step (``train.guide_at``), saved
    as ``guide.safetensors`` beside the weights. Refuses non-finite weights. A full disk, read-only
    or otherwise unwritable directory is a one-line UserError; the checkpoints already there are
    left intact.
    """

    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:07d}"
    meta = {"ddpm_config": config.to_json(), "step": str(step)}
    blobs = {}
    modules = [("model", model, meta), ("ema", ema, meta)]
    if guide is not None:
        modules.append((GUIDE_NAME, guide[1], {**meta, "step": str(guide[0])}))
    for name, module, metadata in modules:
        tensors = _state_dict_cpu(module)
        bad = nonfinite_key(tensors)
        if bad is not None:
            raise UserError(f"refusing to save checkpoint {final}: the {name} weights hold NaN/Inf ({bad})")
        blobs[f"{name}.safetensors"] = safetensors_bytes(tensors, metadata={**metadata, "weights": name})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blobs["state.pt"] = buffer.getvalue()
    need = sum(map(len, blobs.values()))
    try:
        _sweep(run_dir, step)
        free = shutil.disk_usage(run_dir).free
        if free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _publish(run_dir, final, step, blobs)
    except OSError as exc:
        if exc.errno not in RESOURCE_ERRNOS:
            raise
        space = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            space = f" ({_megabytes(need)} needed, {_megabytes(shutil.disk_usage(run_dir).free)} free)"
        raise UserError(f"cannot save checkpoint {final}: {exc.strerror}{space}; the earlier checkpoints are "
                        f"intact") from None
    older = [p for s, p in list_checkpoints(run_dir) if s < step]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        retire(old)
    return final


def _publish(run_dir: Path, final: Path, step: int, blobs: dict[str, bytes]) -> None:
    # A damaged or incomplete folder of this step is replaced; the manifest is written last.
    digests = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in blobs.items()}
    atomic_folder(final, {**blobs, MANIFEST: manifest_text(step, digests).encode()})


def _sweep(run_dir: Path, step: int) -> None:
    """Leftovers of killed processes, and ``ckpt-*`` folders before ``step`` that lack a file
    (a folder deleted file by file by another tool, or by hand, is not a checkpoint)."""
    sweep_temporaries(run_dir)
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and int(m.group(1)) < step and p.is_dir() and not all((p / f).is_file() for f in FILES):
            shutil.rmtree(p, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------

def read_state(ckpt_dir: Path) -> dict:
    """The training state of a checkpoint (torch.load with weights_only=True)."""
    return load_tensors(Path(ckpt_dir) / "state.pt")


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """(metadata, {name: shape}) of a safetensors file, without reading its tensors."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"corrupt or truncated checkpoint {path}: {first_line(exc)}") from None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a UserError naming it if it is damaged."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"corrupt or truncated checkpoint {path}: {first_line(exc)}") from None
    return tensors, meta


def check_architecture(own: dict[str, tuple], found: dict[str, tuple], path: Path) -> None:
    """A one-line UserError when the shapes ``found`` in ``path`` are not the network's own."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    wrong = sorted(k for k in set(own) & set(found) if tuple(own[k]) != tuple(found[k]))
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors"
                  f" (e.g. {(missing + unexpected + wrong)[0]})")
        raise UserError(f"checkpoint {path} is for another architecture than its config describes: {detail}")


def load_weights_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that reports a different architecture or NaN/Inf weights as a one-line UserError."""
    check_architecture({k: v.shape for k, v in module.state_dict().items()},
                        {k: v.shape for k, v in tensors.items()}, path)
    bad = nonfinite_key(tensors)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds NaN/Inf weights ({bad}): the run diverged before it was saved; "
                        f"use an earlier checkpoint")
    module.load_state_dict(tensors, strict=True)


def restore_training_state(ckpt: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer, *, rank: int = 0,
                           world: int = 1, timestep_sampler=None, grad_scaler=None, time_budget=None,
                           log_window=None) -> int:
    """Load weights, EMA, optimizer and this rank's RNG state from a checkpoint folder; return its step.

    ``timestep_sampler`` (a ``LossAwareTimestepSampler``, objective "vlb") gets the saved loss
    history when the checkpoint has one (a run switched to "vlb" starts with an empty one);
    likewise an enabled ``grad_scaler`` (fp16) gets the saved loss scale, and ``time_budget`` (a
    ``ddpm.training.budget.TimeBudget``) the training time used so far (none in older checkpoints: 0),
    and ``log_window`` (a ``ddpm.training.runlog.LogWindow``) the open log window (older
    checkpoints: a new window from the checkpoint's step).

    The state is validated before use (``training_state.check_state``), so a damaged or crafted
    ``state.pt`` is a one-line UserError rather than a crash in the optimizer's kernels.
    """

    ckpt = Path(ckpt)
    for module, name in ((model, "model.safetensors"), (ema, "ema.safetensors")):
        tensors, _ = read_weights(ckpt / name)
        load_weights_into(module, tensors, ckpt / name)
    m = CKPT_RE.match(ckpt.name)
    state = check_state(read_state(ckpt), optimizer, ckpt / "state.pt", step=int(m.group(1)) if m else None)
    optimizer.load_state_dict(state["optimizer"])
    ranks = state["rng"]["ranks"]
    if len(ranks) == world:
        torch.set_rng_state(ranks[rank]["cpu"])
        if "cuda" in ranks[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[rank]["cuda"])
    else:  # a different world size: per-rank dropout streams cannot be carried over
        torch.manual_seed(state["step"] * 7919 + rank)
    if grad_scaler is not None and grad_scaler.is_enabled() and state.get("grad_scaler"):
        grad_scaler.load_state_dict(state["grad_scaler"])
    if time_budget is not None and "time_budget" in state:
        time_budget.load_state_dict(state["time_budget"], ckpt / "state.pt")
    if log_window is not None:
        log_window.since = state["step"]
        if "log_window" in state:
            log_window.load_state_dict(state["log_window"], ckpt / "state.pt", state["step"])
    if timestep_sampler is not None and "timestep_sampler" in state:
        _restore_timestep_sampler(timestep_sampler, state["timestep_sampler"], ckpt / "state.pt")
    return state["step"]


def _restore_timestep_sampler(sampler, saved, path: Path) -> None:
    # Checked like the rest of state.pt: a crafted history (counts past the history length, NaN
    # losses) would otherwise fail later inside update() or skew p_t silently.
    losses, counts = (saved.get(k) if isinstance(saved, dict) else None for k in ("losses", "counts"))
    ok = (torch.is_tensor(losses) and torch.is_tensor(counts) and losses.is_floating_point()
          and not counts.is_floating_point() and bool(torch.isfinite(losses).all())
          and bool(((counts >= 0) & (counts <= sampler.history)).all()))
    try:
        if ok:
            sampler.load_state_dict(saved)  # checks the shapes against T and the history length
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"checkpoint {path} is not a usable training state: its timestep sampler history is damaged "
                        f"or of another T")


ANALYTIC_FILE = "analytic.json"


def guide_path(weights_path: Path) -> Path:
    """Where the autoguidance guide of the weights ``weights_path`` lives: beside them."""
    return Path(weights_path).parent / GUIDE_FILE


def read_guide(weights_path: Path, model_config) -> tuple[torch.nn.Module, int] | None:
    """(the guide network, the step it was kept at) from ``guide.safetensors`` beside the weights
    ``weights_path`` (a ``ckpt-*`` folder's), or None when there is none. Verified like the weights:
    a checkpoint's manifest lists it."""

    path = guide_path(weights_path)
    folder = path.parent
    if not path.is_file():
        return None
    problem = verify(folder, [path.name]) if CKPT_RE.match(folder.name) else None
    if problem is not None:
        raise UserError(f"checkpoint {folder} is damaged ({problem})")
    tensors, meta = read_weights(path)
    guide = build_model(model_config)
    load_weights_into(guide, tensors, path)
    return guide, int(meta["step"]) if meta.get("step", "").isdigit() else 0


def _analytic_location(weights_path: Path) -> tuple[Path | None, str]:
    # (RUN/analytic.json, the weights' name in RUN) for weights inside a run's checkpoint folder
    folder = Path(weights_path).parent
    if not CKPT_RE.match(folder.name):
        return None, ""
    return folder.parent / ANALYTIC_FILE, f"{folder.name}/{Path(weights_path).name}"


def write_analytic_variance(weights_path: Path, analytic) -> Path:
    """Save an ``AnalyticVariance`` estimated for the weights ``weights_path`` (in RUN/ckpt-*/) as
    RUN/analytic.json, atomically, naming those weights: it is used with them alone."""

    path, name = _analytic_location(weights_path)
    if path is None:
        raise UserError(f"{weights_path} is not inside a run's checkpoint folder (RUN/ckpt-NNNNNNN/); "
                        f"analytic variances are saved in the run directory")
    with tempfile.TemporaryDirectory() as tmp:
        analytic.save(Path(tmp) / ANALYTIC_FILE)
        doc = json.loads((Path(tmp) / ANALYTIC_FILE).read_text())
    atomic_write_text(path, json.dumps({**doc, "weights": name}) + "\n")
    return path


def read_analytic_variance(weights_path: Path, timesteps: int):
    """(AnalyticVariance, "") from RUN/analytic.json when it was estimated for exactly these weights
    and T, else (None, why not)."""

    path, name = _analytic_location(weights_path)
    if path is None or not path.is_file():
        return None, f"no {ANALYTIC_FILE} in the run of {weights_path}"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        analytic = AnalyticVariance.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{path} is unreadable ({first_line(exc)})"
    if doc.get("weights") != name or analytic.num_timesteps != timesteps:
        return None, f"{path} was estimated for {doc.get('weights')} (T={analytic.num_timesteps}), not {name}"
    return analytic, ""
