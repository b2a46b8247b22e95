#!/usr/bin/env bash
# The no-argument `ddpm train` measured as a user meets it: 15 minutes of wall clock including
# start-up, on an idle machine and on one where a second busy process (another `ddpm train`)
# shares the CPU; then the classifier-pass share of 1,000 samples from each run (the same
# sampling seeds 1..1000, bf16 autocast, the run's ancestral-100 sampler and autoguidance), and
# the same samples' share without autoguidance (--autoguidance 1), for comparison.
#
#   bash bench/budget_quality.sh OUT_DIR [idle|busy|both]   # both: about 40 minutes on a 2-core CPU
#
# Prints one line per run (wall time, steps reached, pass rate) and keeps the runs in OUT_DIR.
set -euo pipefail
out=${1:?usage: bench/budget_quality.sh OUT_DIR [idle|busy|both]}
which=${2:-both}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

train() {  # train DIR LOG: the default run, timed from process start to exit
  local start=$(date +%s.%N)
  ddpm train --out "$1" --no-progress > "$2" 2>&1
  echo "$(date +%s.%N) - $start" | bc > "$1.wall_s"
}

runs=()
if [[ $which != busy ]]; then
  train "$out/idle" "$out/idle.log"
  runs+=(idle)
fi
if [[ $which != idle ]]; then
  train "$out/busy-a" "$out/busy-a.log" & a=$!
  train "$out/busy-b" "$out/busy-b.log" & b=$!  # the second busy process: the same job, at the same time
  wait $a $b
  runs+=(busy-a busy-b)
fi

for run in "${runs[@]}"; do
  python "$here/mnist_quality.py" "$out/$run" --num 1000 --amp bf16 --seed 1 --json "$out/quality.jsonl" \
    > "$out/$run.quality.txt"
  python "$here/mnist_quality.py" "$out/$run" --num 1000 --amp bf16 --seed 1 --autoguidance 1 \
    --json "$out/quality-unguided.jsonl" > "$out/$run.quality-unguided.txt"
  steps=$(tail -n 1 "$out/$run/log.jsonl" | python -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["step"], r["progress"])')
  echo "$run: wall $(cat "$out/$run.wall_s") s, step and progress at the end: $steps, $(tail -n 1 "$out/$run.quality.txt"); without autoguidance: $(tail -n 1 "$out/$run.quality-unguided.txt")"
done
