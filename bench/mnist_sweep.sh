#!/usr/bin/env bash
# Sweep of candidate `mnist` preset recipes, trained side by side on one GPU (same recipe, bf16
# autocast as on CPU; the CPU's cost per step was measured separately), each scored with
# bench/mnist_quality.py on 1000 samples. Usage: OUT=dir bash bench/mnist_sweep.sh
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sweep}; mkdir -p "$OUT"; W=/tmp/sweep-runs; rm -rf $W; mkdir -p $W
nvidia-smi -L
python3 -c "import sys; sys.path.insert(0,'bench'); import mnist_quality as m; m.get_classifier(device='cuda')"
common="--preset mnist --device cuda --amp bf16 --no-progress --max-minutes 5 --sample-every 0 --ckpt-every 0"
declare -A C
C[A]="--steps 2400"
C[B]="--steps 2400 --set diffusion.weighting=min_snr --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
C[C]="--steps 2400 --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
C[D]="--steps 1300 --batch-size 128 --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
C[E]="--steps 1550 --set model.num_res_blocks=2 --set model.attn_resolutions=[7] --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
C[F]="--steps 2400 --lr 2e-3 --set optim.decay=cosine --set optim.min_lr_ratio=0.1"
C[G]="--steps 2400 --set diffusion.weighting=min_snr"
for k in "${!C[@]}"; do
  python3 -m ddpm train $common --out $W/$k ${C[$k]} > $W/$k.log 2>&1 &
done
wait
for k in $(echo "${!C[@]}" | tr ' ' '\n' | sort); do
  echo "== $k: ${C[$k]}"; tail -n 2 $W/$k.log; tail -n 1 $W/$k/log.jsonl
  python3 bench/mnist_quality.py $W/$k --device cuda --num 1000 --sampler ddim --steps 50 --json $OUT/results.jsonl --grid $W/$k/grid.png 2>&1 | tail -2
done
for k in A B C; do
  python3 bench/mnist_quality.py $W/$k --device cuda --num 1000 --sampler dpm++2m --steps 20 --json $OUT/results.jsonl 2>&1 | tail -1
  python3 bench/mnist_quality.py $W/$k --device cuda --num 1000 --sampler ddpm --json $OUT/results.jsonl 2>&1 | tail -1
done
cp ~/.cache/ddpm-bench/mnist_cnn.pt $OUT/
tar czf $OUT/grids.tgz -C $W $(cd $W && ls -d */grid.png */log.jsonl *.log)
tar cf $OUT/ema.tar -C $W $(cd $W && ls */ckpt-*/ema.safetensors | head -3)
