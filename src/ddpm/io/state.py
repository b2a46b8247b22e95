"""Validation of a checkpoint's ``state.pt`` before any of it reaches the optimizer or the RNG.

``torch.load(weights_only=True)`` only guarantees that unpickling runs no code; what it returns
can still be any nesting of dicts, lists, numbers and tensors. ``Optimizer.load_state_dict``
checks little (group and parameter counts), and the fused Adam kernel trusts every moment to
have its parameter's shape: one of the wrong shape corrupts the heap (a segfault, not an
exception). So every field is checked here and any mismatch is a one-line UserError.

Every pickle file this package reads goes through ``load_tensors`` (``torch.load`` with
``weights_only=True``), whose refusals name the file and what it holds, and never pass on torch's
advice to load the file again with the check turned off: a file that needs that holds code.

Expected layout (written by ``ddpm.training.loop``)::

    {"step": int, "optimizer": {"state": {i: {"step": 0-d float tensor, "exp_avg": T_i,
     "exp_avg_sq": T_i}}, "param_groups": [{..., "params": [i, ...]}]},
     "rng": {"ranks": [{"cpu": uint8 tensor, "cuda": uint8 tensor (optional)}, ...]},
     "data_position": int, "world_size": int, "grad_scaler": GradScaler.state_dict() (fp16 runs),
     "time_budget": {"elapsed_s": float} (training time so far; checked by ddpm.training.budget),
     "log_window": {"sums": [3 floats], "since": int} (the open log.jsonl window; checked by
     ddpm.training.runlog),
     "timestep_sampler": LossAwareTimestepSampler.state_dict() (objective "vlb"; checked by
     ddpm.io.checkpoint when restored)}
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch

from ..errors import UserError

_MOMENTS = {"exp_avg", "exp_avg_sq"}  # Adam/AdamW; "max_exp_avg_sq" as well with amsgrad


class _Invalid(Exception):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Invalid(what)


# torch names the first global the restricted unpickler refused ("Unsupported global: GLOBAL
# __main__.Evil was not an allowed global", "unsupported GLOBAL posix.system whose module posix is
# blocked"); the name comes from the file, so only a plain dotted name is shown.
_GLOBAL_RE = re.compile(r"\bGLOBAL ([A-Za-z_][\w.]{0,80})\b")


def load_tensors(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU: nothing but tensors, numbers and plain
    containers is unpickled. A refusal is a one-line UserError naming the file: one that holds
    other objects (pickled classes or functions: code, which no ``what`` ever holds), or a damaged
    or foreign file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the restricted unpickler refused it
        found = _GLOBAL_RE.search(str(exc))
        if found:
            raise UserError(f"refusing {what} {path}: it holds a pickled reference to {found.group(1)}, code or an "
                            f"object that a {what} never holds; it was not loaded") from None
        raise UserError(f"refusing {what} {path}: it is damaged, or holds pickled data other than tensors; it was "
                        f"not loaded") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception:  # a damaged zip archive or tensor record (torch's text may say anything)
        raise UserError(f"cannot read {what} {path}: it is damaged or truncated, or not a file torch.save "
                        f"wrote") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_state(state, optimizer: torch.optim.Optimizer, path: Path, *, step: int | None = None) -> dict:
    """``state`` ready to restore, or a UserError naming ``path`` unless it is a training state that
    fits ``optimizer`` (and, if given, was saved at ``step``). In the returned copy the optimizer's
    kernel flags are those of ``optimizer``, not of the file."""
    try:
        _require(isinstance(state, dict), f"a {type(state).__name__}, not a dict")
        missing = [k for k in ("step", "optimizer", "rng") if k not in state]
        _require(not missing, f"no {', '.join(missing)}")
        _require(_is_int(state["step"]) and 0 <= state["step"] < 2**62, f"step {state['step']!r} is not a step count")
        _require(step is None or state["step"] == step, f"step {state['step']} but the folder is of step {step}")
        for key in ("data_position", "world_size"):
            _require(key not in state or (_is_int(state[key]) and state[key] >= 0), f"{key} is not a count")
        optimizer_state = _check_optimizer(state["optimizer"], optimizer)
        _check_rng(state["rng"], state.get("world_size"))
        _check_grad_scaler(state.get("grad_scaler"))
    except _Invalid as exc:
        raise UserError(f"checkpoint {path} is not a usable training state: {exc}") from None
    return {**state, "optimizer": optimizer_state}


def _check_optimizer(saved, optimizer: torch.optim.Optimizer) -> dict:
    _require(isinstance(saved, dict) and isinstance(saved.get("state"), dict)
             and isinstance(saved.get("param_groups"), list), "optimizer state is not a state_dict")
    groups = optimizer.param_groups
    _require(len(saved["param_groups"]) == len(groups),
             f"{len(saved['param_groups'])} optimizer parameter groups, expected {len(groups)}")
    params = {}  # saved parameter id -> the parameter it is loaded into (load_state_dict's order)
    clean_groups = []
    for saved_group, group in zip(saved["param_groups"], groups):
        _require(isinstance(saved_group, dict), "an optimizer parameter group is not a dict")
        ids = saved_group.get("params")
        _require(isinstance(ids, list) and all(map(_is_int, ids)) and len(ids) == len(group["params"]),
                 f"{len(ids) if isinstance(ids, list) else 'no'} parameters in an optimizer group, "
                 f"expected {len(group['params'])}")
        params.update(zip(ids, group["params"]))
        # Flags (fused, foreach, capturable, amsgrad, ...) choose kernels: they stay this
        # optimizer's. Numeric settings (lr, betas, eps, weight_decay) come from the checkpoint,
        # as load_state_dict would take them, once they are known to be finite numbers.
        clean = {k: v for k, v in group.items() if k != "params"}
        for key, value in group.items():
            if key == "params" or key not in saved_group or isinstance(value, bool) or value is None:
                continue
            numbers = saved_group[key] if isinstance(saved_group[key], (tuple, list)) else (saved_group[key],)
            _require(all(isinstance(n, (int, float, torch.Tensor)) and not isinstance(n, bool)
                         and (not torch.is_tensor(n) or n.numel() == 1) and math.isfinite(float(n)) for n in numbers),
                     f"optimizer setting {key} is not a finite number")
            clean[key] = saved_group[key]
        clean_groups.append({**clean, "params": ids})
    _require(len(params) == sum(len(g["params"]) for g in groups), "repeated parameter ids in the optimizer state")
    for pid, entry in saved["state"].items():
        _require(pid in params and isinstance(entry, dict), f"optimizer state for unknown parameter {pid!r}")
        p = params[pid]
        moments = _MOMENTS | ({"max_exp_avg_sq"} if optimizer.defaults.get("amsgrad") else set())
        _require(set(entry) == moments | {"step"}, f"optimizer state of parameter {pid} holds {sorted(entry)}")
        count = entry["step"]
        _require(torch.is_tensor(count) and count.numel() == 1 and count.dim() == 0 and count.is_floating_point()
                 and bool(torch.isfinite(count)) and float(count) >= 0, f"parameter {pid}: step is not a count")
        for key in moments:
            v = entry[key]
            _require(torch.is_tensor(v), f"parameter {pid}: {key} is not a tensor")
            _require(v.shape == p.shape and v.dtype == p.dtype,
                     f"parameter {pid}: {key} is {v.dtype} {tuple(v.shape)}, the parameter {p.dtype} {tuple(p.shape)}")
            _require(bool(torch.isfinite(v).all()), f"parameter {pid}: {key} holds NaN/Inf")
    return {"state": saved["state"], "param_groups": clean_groups}


def _check_rng(rng, world_size) -> None:
    _require(isinstance(rng, dict) and isinstance(rng.get("ranks"), list) and rng["ranks"], "no RNG states")
    ranks = rng["ranks"]
    _require(world_size is None or world_size == len(ranks), f"{len(ranks)} RNG states for world size {world_size}")
    sizes = {"cpu": torch.get_rng_state().numel()}
    if torch.cuda.is_available():
        sizes["cuda"] = torch.cuda.get_rng_state().numel()
    for i, states in enumerate(ranks):
        _require(isinstance(states, dict) and "cpu" in states and set(states) <= {"cpu", "cuda"},
                 f"RNG state of rank {i} is not a dict of cpu/cuda states")
        for device, s in states.items():
            _require(torch.is_tensor(s) and s.dtype == torch.uint8 and s.dim() == 1,
                     f"rank {i}: {device} RNG state is not a byte tensor")
            _require(device not in sizes or s.numel() == sizes[device],
                     f"rank {i}: {device} RNG state has {s.numel()} bytes, expected {sizes[device]}")


def _check_grad_scaler(saved) -> None:
    if not saved:  # absent, or {} from a disabled scaler
        return
    _require(isinstance(saved, dict), "grad_scaler state is not a dict")

    def number(key, ok):
        value = saved.get(key)
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and ok(value))

    _require(number("scale", lambda v: v > 0), "grad_scaler scale is not a finite number > 0")
    _require(number("growth_factor", lambda v: v > 1) and number("backoff_factor", lambda v: 0 < v < 1),
             "grad_scaler growth/backoff factors are not numbers > 1 and in (0, 1)")
    _require(_is_int(saved.get("growth_interval")) and saved["growth_interval"] >= 1
             and _is_int(saved.get("_growth_tracker")) and saved["_growth_tracker"] >= 0,
             "grad_scaler growth_interval/_growth_tracker are not counts")
