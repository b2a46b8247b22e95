"""Counter-based per-sample Gaussian noise: splitmix64 (Steele et al. 2014) hashed, then Box-Muller.

Every random number a sampler uses comes from a per-sample seed: sample i of a call gets seed s_i,
and its noise for draw k (k = 0 is x_T, k = j + 1 the noise added at step j) is a hash of
(s_i, k, element index). Sample i is therefore the same whatever the batch size or the other
samples, on CPU or CUDA, and the draw for step j does not depend on which earlier steps drew noise
(so DDIM eta=1 and DDPM see the same z).

A seed source (``Generator``) is a ``torch.Generator`` (one base seed is drawn from it and s_i =
``per_sample_seeds(base, B)[i]``), an int base seed, or explicit per-sample seeds (a sequence of B
ints or a LongTensor (B,)); None draws the base seed from torch's global generator. To split a large
run into batches without changing any sample, pass ``per_sample_seeds(seed, n, offset)`` per batch.

Arithmetic is on int64 tensors, whose multiplications wrap modulo 2^64 as splitmix64's do.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

Generator = torch.Generator | int | Sequence[int] | torch.Tensor | None


def signed64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = signed64(0x9E3779B97F4A7C15)  # splitmix64's increment, 2^64 / golden ratio
_MIX1 = signed64(0xBF58476D1CE4E5B9)
_MIX2 = signed64(0x94D049BB133111EB)
_LOW32 = (1 << 32) - 1


def logical_shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """z >> k on int64 as unsigned bits (torch's >> is arithmetic, so mask off the sign extension)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele et al. 2014) on int64 tensors."""
    z = (z ^ logical_shift_right(z, 30)) * _MIX1
    z = (z ^ logical_shift_right(z, 27)) * _MIX2
    return z ^ logical_shift_right(z, 31)


def _seeds_from_base(base: torch.Tensor, n: int, offset: int, device) -> torch.Tensor:
    idx = torch.arange(offset + 1, offset + n + 1, dtype=torch.int64, device=device)
    return mix64(mix64(base.to(device)) + idx * GOLDEN)


def per_sample_seeds(seed: int, n: int, offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeds of samples offset..offset+n-1 of a run with base ``seed``: LongTensor (n,).

    ``sample(..., generator=seed)`` uses ``per_sample_seeds(seed, B)``; calling it batch by batch
    with ``generator=per_sample_seeds(seed, b, offset)`` reproduces the same images.
    """
    base = torch.tensor([signed64(int(seed) % (1 << 64))], dtype=torch.int64)
    return _seeds_from_base(base, n, offset, device)


def gaussian_noise(seeds: torch.Tensor, draw: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) for draw ``draw`` of each per-sample seed (B,).

    Element j of sample i is Box-Muller applied to the two 32-bit halves of
    mix64(mix64(s_i + (draw + 1) G) + (j + 1) G), G the golden-ratio constant of splitmix64.
    """
    n = math.prod(shape[1:])
    key = mix64(seeds + signed64((draw + 1) * GOLDEN % (1 << 64)))
    j = torch.arange(1, n + 1, dtype=torch.int64, device=seeds.device)
    h = mix64(key[:, None] + j[None, :] * GOLDEN)
    u1 = (logical_shift_right(h, 32).double() + 0.5) * 2.0**-32  # in (0, 1): log is finite
    u2 = ((h & _LOW32).double() + 0.5) * 2.0**-32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).reshape(tuple(shape))


def resolve_seeds(generator: Generator, B: int, device: torch.device) -> torch.Tensor:
    """The per-sample seeds (B,) on ``device`` of a seed source (see the module docstring)."""
    if isinstance(generator, torch.Generator) or generator is None:
        g_device = generator.device if generator is not None else torch.device("cpu")
        base = torch.randint(-(2**63), 2**63 - 1, (1,), generator=generator, device=g_device, dtype=torch.int64)
        return _seeds_from_base(base, B, 0, device)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return per_sample_seeds(int(generator), B, device=device)
    seeds = torch.as_tensor(generator, dtype=torch.int64).to(device)
    if seeds.shape != (B,):
        raise ValueError(f"per-sample seeds must have shape (B,) = ({B},), got {tuple(seeds.shape)}")
    return seeds
