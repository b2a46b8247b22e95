"""Suite-wide settings and shared fixtures.

tests/ mirrors the package (tests/core, tests/sampling, ...; tests/integration for what crosses
layers). Test modules share helpers by module name (``from test_unet import randomized``,
``from gmm import GaussianMixture``), so every folder of the suite is put on the import path.

The tests run many small tensor operations; on a 2-core machine two intra-op threads spend more
time waiting on each other than computing (a 60 s test ran in 0.6 s on one thread), so the suite
runs single-threaded. The environment variable is set before torch is imported so that CLI and
torchrun subprocesses inherit it.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE)] + sorted(str(d) for d in _HERE.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(**overrides)``: a fresh config of the seconds-long ``tiny`` preset with dotted overrides."""
    from ddpm.presets import get_preset

    def make(**overrides):
        return get_preset("tiny").override(**overrides)

    return make
