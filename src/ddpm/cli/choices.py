"""The fixed choices that ``ddpm``'s options offer, spelled out without importing the library.

The library's own tuples sit in modules that import torch (``ddpm.core.device``, ``ddpm.presets``,
...), and building the parser from them made ``ddpm --help`` and every argument error wait ~2 s
for torch to load. These copies keep the parser light; tests/cli/test_startup.py holds each equal
to the tuple of the module that implements it, so a new sampler or preset cannot be left out here.
"""

from __future__ import annotations

SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # ddpm.sampling.samplers.SAMPLERS
SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")  # ddpm.core.schedules.SCHEDULES
PRESETS = ("mnist", "cifar10", "toy2d", "tiny", "mnist-learned", "mnist-cond")  # ddpm.presets.PRESETS
AMP_MODES = ("off", "bf16", "fp16")  # ddpm.core.device.AMP_MODES
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "analytic")  # ddpm.core.diffusion.VARIANCES
PREDICTIONS = ("eps", "x0", "v")  # ddpm.core.diffusion.PREDICTIONS
