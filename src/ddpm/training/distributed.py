"""The torchrun side of training: the process group from torchrun's environment, and what every
rank must agree on, decided by rank 0 (the run directory, the checkpoint to resume) or gathered
to it (the RNG states a checkpoint saves). With one process (WORLD_SIZE unset or 1) nothing is
communicated.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..core.device import pick_device
from ..io.checkpoint import latest_verified_checkpoint


def init_distributed(config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_initialised) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pick_device(config.train.device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


def resume_from(run_dir: Path, rank: int, world: int) -> Path | None:
    """The newest checkpoint that verifies, chosen (and any fallback reported) by rank 0."""
    holder = [str(latest_verified_checkpoint(run_dir) or "") if rank == 0 else ""]
    if world > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0]) if holder[0] else None


def shared_run_dir(config: TrainConfig, out, world: int) -> Path:
    """``out``, else ``runs/NAME-DATE-TIME``; under DDP every rank takes the directory rank 0 named."""
    run_dir = Path(out) if out is not None else Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if world > 1:
        holder = [str(run_dir)]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    return run_dir


def rng_states(rank: int, world: int) -> dict:
    """Global torch RNG states (they drive dropout) of every rank, gathered to rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return {"ranks": [mine]}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}
