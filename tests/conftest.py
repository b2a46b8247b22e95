"""Suite-wide settings and shared fixtures.

The tests run many small tensor operations; on a 2-core machine two intra-op threads spend more
time waiting on each other than computing (a 60 s test ran in 0.6 s on one thread), so the suite
runs single-threaded. The environment variable is set before torch is imported so that CLI and
torchrun subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

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
