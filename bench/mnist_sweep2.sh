#!/usr/bin/env bash
# Second sweep: quality against steps for the two best recipes of mnist_sweep.sh.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/sweep}; mkdir -p "$OUT"; W=/tmp/sweep2; rm -rf $W; mkdir -p $W
python3 -c "import sys; sys.path.insert(0,'bench'); import mnist_quality as m; m.get_classifier(device='cuda')" &
common="--preset mnist --device cuda --amp bf16 --no-progress --max-minutes 3.2 --sample-every 0 --keep-last 5 --set diffusion.weighting=min_snr --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
python3 -m ddpm train $common --out $W/P1 --steps 3600 --ckpt-every 1200 > $W/P1.log 2>&1 &
python3 -m ddpm train $common --out $W/P2 --steps 2400 --batch-size 128 --ckpt-every 800 > $W/P2.log 2>&1 &
wait
cp ~/.cache/ddpm-bench/mnist_cnn.pt $OUT/
for r in P1 P2; do tail -n1 $W/$r/log.jsonl; for c in $W/$r/ckpt-*; do
  python3 bench/mnist_quality.py $c --device cuda --num 1000 --sampler ddim --steps 50 --json $OUT/results.jsonl 2>&1 | tail -2; done; done
for r in P1 P2; do c=$(ls -d $W/$r/ckpt-* | tail -1); cp $c/ema.safetensors $OUT/$r-ema.safetensors
  python3 bench/mnist_quality.py $c --device cuda --num 1000 --sampler ddpm --json $OUT/results.jsonl 2>&1 | tail -2; done
