#!/usr/bin/env bash
# The whole GPU comparison (ours vs diffusers, bench/run.py --device cuda) in one go, about
# 6 minutes at most. Run from the repository root on a machine with a CUDA GPU, torch and
# diffusers:
#
#     bash bench/gpu.sh                      # measures this checkout
#     CODE=DIR bash bench/gpu.sh             # measures the tree in DIR (e.g. a `git archive` of a commit)
#     WHEELS=DIR bash bench/gpu.sh           # first installs the wheels in DIR (offline machines:
#                                            # `pip download diffusers` elsewhere) into a temporary dir
#
# Writes under $OUT (default runs/bench-cuda): bench_cuda.json (every row), benchmarks_cuda.md
# (the section for docs/benchmarks.md), log.txt, gpu.txt (nvidia-smi) and pytest.txt (the CUDA
# tests of test_fastpaths.py, test_samplers.py and test_loader.py).
set -uo pipefail
OUT=${OUT:-runs/bench-cuda}
CODE=${CODE:-.}
BUDGET=${BUDGET:-290}  # bench/run.py starts no workload after this many seconds
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site"
fi
export PYTHONPATH="$(cd "$CODE" && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
python3 -c "import torch, diffusers, ddpm; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(), ddpm.__file__)" || exit 1
# Numerical agreement of the CUDA-graph wrapper (seconds).
(cd "$CODE" && timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fastpaths.py tests/test_samplers.py tests/test_loader.py -k cuda 2>&1 | tail -3) | tee "$OUT/pytest.txt"
timeout $((BUDGET + 90)) python3 "$CODE/bench/run.py" --device cuda --budget-s "$BUDGET" \
    --json "$OUT/bench_cuda.json" --doc "$OUT/benchmarks_cuda.md" 2>&1 | tee "$OUT/log.txt"
