#!/usr/bin/env bash
# The whole GPU comparison (ours vs diffusers, bench/run.py --device cuda) in one device call,
# about 6 minutes at most. Run from the repository root on the GPU machine:
#
#     bash bench/gpu.sh                 # the working tree
#     CODE=.snap bash bench/gpu.sh      # a copy of the committed tree (git archive HEAD | tar -x -C .snap)
#
# diffusers travels as wheels in .whl/ (see /work/.library/device/README.md): diffusers and
# importlib_metadata; its other needs are on the machine's image. Writes under $OUT:
# bench_cuda.json (every row), benchmarks_cuda.md (the section for docs/benchmarks.md),
# log.txt, gpu.txt (nvidia-smi) and pytest.txt (the CUDA tests of test_fastpaths.py, test_samplers.py and test_loader.py).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
CODE=${CODE:-.}
BUDGET=${BUDGET:-290}  # bench/run.py starts no workload after this many seconds
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$(cd "$CODE" && pwd)/src:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
python3 -c "import torch, diffusers, ddpm; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(), ddpm.__file__)" || exit 1
# Numerical agreement of the CUDA-graph wrapper (seconds).
(cd "$CODE" && timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fastpaths.py tests/test_samplers.py tests/test_loader.py -k cuda 2>&1 | tail -3) | tee "$OUT/pytest.txt"
timeout $((BUDGET + 90)) python3 "$CODE/bench/run.py" --device cuda --budget-s "$BUDGET" \
    --json "$OUT/bench_cuda.json" --doc "$OUT/benchmarks_cuda.md" 2>&1 | tee "$OUT/log.txt"
