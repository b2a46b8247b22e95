"""Run directories, atomic checkpoints and loading a trained model back.

Layout of a run directory::

    RUN/config.json                 resolved TrainConfig
    RUN/log.jsonl                   one JSON object per log interval
    RUN/samples/step-0001000.png    previews from the EMA model
    RUN/ckpt-0001000/               one complete checkpoint per saved step (keep-last-K)
        model.safetensors           online weights   } config JSON in the safetensors metadata,
        ema.safetensors             EMA weights      } so either file alone rebuilds its network
        state.pt                    optimizer, step, RNG and data-order state (torch.load(weights_only=True))

A checkpoint is written into a hidden temporary folder in RUN, every file flushed and fsync'ed,
then the folder is renamed into place with ``os.replace`` (atomic on POSIX) and RUN is fsync'ed.
A kill at any moment leaves either the previous checkpoints or the new one, never half a one;
leftover temporary folders are ignored and swept at the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .config import TrainConfig, build_model

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")
FILES = ("model.safetensors", "ema.safetensors", "state.pt")
_TMP_PREFIX = ".tmp-ckpt-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
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
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; channels_last weights are non-contiguous.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, state: dict, config: TrainConfig,
    keep_last: int = 3,
) -> Path:
    """Atomically write ``RUN/ckpt-{step:07d}`` and delete all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:07d}"
    if final.is_dir() and all((final / f).is_file() for f in FILES):
        return final  # this exact step is already saved (e.g. Ctrl-C right after a periodic save)
    for stale in run_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=_TMP_PREFIX))
    try:
        meta = {"ddpm_config": config.to_json(), "step": str(step)}
        save_file(_state_dict_cpu(model), str(tmp / "model.safetensors"), metadata={**meta, "weights": "model"})
        save_file(_state_dict_cpu(ema), str(tmp / "ema.safetensors"), metadata={**meta, "weights": "ema"})
        torch.save(state, tmp / "state.pt")
        for name in FILES:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # an incomplete folder of the same name cannot be the latest complete one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt_dir: Path) -> dict:
    """The training state of a checkpoint (torch.load with weights_only=True)."""
    path = Path(ckpt_dir) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with a UserError naming it if it is damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"corrupt or truncated checkpoint {path}: {_first_line(exc)}") from None
    return tensors, meta


def load_weights_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that reports a different architecture as a one-line UserError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors"
                  f" (e.g. {(missing + unexpected + wrong)[0]})")
        raise UserError(f"checkpoint {path} is for another architecture than its config describes: {detail}")
    module.load_state_dict(tensors, strict=True)


def restore_training_state(ckpt: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer, *, rank: int = 0,
                           world: int = 1) -> int:
    """Load weights, EMA, optimizer and this rank's RNG state from a checkpoint folder; return its step."""
    for module, name in ((model, "model.safetensors"), (ema, "ema.safetensors")):
        tensors, _ = read_weights(ckpt / name)
        load_weights_into(module, tensors, ckpt / name)
    state = read_state(ckpt)
    try:
        optimizer.load_state_dict(state["optimizer"])
        ranks = state["rng"]["ranks"]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"checkpoint {ckpt / 'state.pt'} does not match this model/optimizer: {exc}") from None
    if len(ranks) == world:
        torch.set_rng_state(ranks[rank]["cpu"])
        if "cuda" in ranks[rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ranks[rank]["cuda"])
    else:  # a different world size: per-rank dropout streams cannot be carried over
        torch.manual_seed(int(state["step"]) * 7919 + rank)
    return int(state["step"])


@dataclass
class LoadedRun:
    """What ``ddpm.sample`` needs: ``ddpm.sample(run.model, run.schedule, (n, *run.shape), **run.sample_kwargs)``.

    ``shape`` is one item's shape, (C, H, W) or (dim,); ``sample_kwargs`` holds the run's
    prediction, variance and clipping, which every sampler accepts.
    """

    model: torch.nn.Module
    schedule: Any  # NoiseSchedule
    config: TrainConfig
    shape: tuple
    sample_kwargs: dict
    path: Path
    step: int | None


def resolve_weights_path(path: str | Path, *, ema: bool = True) -> Path:
    """A run dir -> its latest checkpoint's weights; a ckpt dir -> its weights; a file -> itself."""
    path = Path(path)
    name = "ema.safetensors" if ema else "model.safetensors"
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"no such run directory or checkpoint: {path}")
    if CKPT_RE.match(path.name):
        return path / name
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"no complete checkpoint (ckpt-NNNNNNN/ with {', '.join(FILES)}) in {path}")
    return latest / name


def load(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a trained model from a run directory, a ``ckpt-*`` folder or a ``.safetensors`` file.

    The network is rebuilt from the config stored in the weights' metadata (falling back to the
    run's ``config.json``), so a checkpoint alone is enough. ``ema`` picks the EMA weights.
    A diffusers pipeline (or UNet2DModel) directory is converted (``ddpm.diffusers_io``).
    """
    from .diffusers_io import is_diffusers_dir, load_diffusers

    if is_diffusers_dir(path):
        return load_diffusers(path, device=device)
    weights_path = resolve_weights_path(path, ema=ema)
    tensors, meta = read_weights(weights_path)
    config_json = meta.get("ddpm_config")
    if config_json is None:
        candidate = weights_path.parent.parent / "config.json"
        if not candidate.is_file():
            raise UserError(f"{weights_path} carries no ddpm config and no config.json was found beside its run")
        config_json = candidate.read_text(encoding="utf-8")
    try:
        config = TrainConfig.from_dict(json.loads(config_json))
    except (ValueError, UserError) as exc:
        raise UserError(f"{weights_path}: stored config is invalid: {_first_line(exc)}") from None
    model = build_model(config.model)
    load_weights_into(model, tensors, weights_path)
    model.to(device).eval().requires_grad_(False)
    schedule = config.diffusion.make_schedule().to(device)
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    return LoadedRun(model=model, schedule=schedule, config=config, shape=item_shape(config),
                     sample_kwargs=sample_kwargs(config),
                     path=weights_path, step=step)


def item_shape(config: TrainConfig) -> tuple[int, ...]:
    m = config.model
    if hasattr(m, "image_size"):
        return (m.in_channels, *m.hw)  # (C, H, W); hw is (S, S) for an int image_size
    return (m.dim,)


def sample_kwargs(config: TrainConfig) -> dict:
    d = config.diffusion
    return {"prediction": d.prediction, "variance": d.variance, "clip_denoised": d.clip_denoised}
