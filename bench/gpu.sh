#!/usr/bin/env bash
# The whole GPU comparison (ours vs diffusers, bench/run.py --device cuda) in one device call,
# at most about 6 minutes. Run from the repository root on the GPU machine:
#
#     bash bench/gpu.sh            # results under $OUT (or /tmp/bench-out)
#
# diffusers travels as wheels in .whl/ (see /work/.library/device/README.md): diffusers and
# importlib_metadata; its other needs are on the machine's image. Writes $OUT/bench_cuda.json
# (every row), $OUT/benchmarks_cuda.md (the section for docs/benchmarks.md), $OUT/log.txt,
# $OUT/gpu.txt (nvidia-smi) and $OUT/pytest.txt (the CUDA tests of tests/test_fastpaths.py).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" || exit 1
# Numerical agreement of the CUDA-graph wrapper (seconds).
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fastpaths.py -k cuda 2>&1 | tail -3 | tee "$OUT/pytest.txt"
# The comparison; it skips workloads once BUDGET seconds have passed and always writes what it has.
BUDGET=${BUDGET:-270}
timeout $((BUDGET + 60)) python3 bench/run.py --device cuda --budget-s "$BUDGET" \
    --json "$OUT/bench_cuda.json" --doc "$OUT/benchmarks_cuda.md" 2>&1 | tee "$OUT/log.txt"
