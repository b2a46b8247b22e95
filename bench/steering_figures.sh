#!/usr/bin/env bash
# The README's steering figures from a class-conditional MNIST run (issue 9), made with the CLI
# commands the README prints:
#
#   OUT/mnist_cond_classes.png      ddpm sample RUN --class all --per-class 10 --seed 0 --out ...
#                                   (one row per digit, the run's guidance and preview sampler)
#   OUT/mnist_inpaint.png           ddpm inpaint RUN --image digit.png --mask mask.png --num 4 --out ...
#                                   shown as: input with its masked half grey | mask | 4 completions
#   OUT/mnist_interpolate.png       ddpm interpolate RUN a.png b.png --frames 8 --out ...
#
# digit.png is MNIST test digit 0 (a 7) and mask.png is white on its bottom half (the pixels to
# generate); a.png and b.png are test digits 0 and 1 (a 7 and a 2). They are written to OUT/inputs.
#
#   ddpm train --preset mnist-cond --out runs/mnist-cond
#   bash bench/steering_figures.sh runs/mnist-cond docs
#
# DDPM (default: ddpm on PATH) and PYTHON (default: python) name the programs to run.
set -euo pipefail

RUN=${1:?usage: bench/steering_figures.sh RUN [OUT_DIR]}
OUT=${2:-docs}
DDPM=${DDPM:-ddpm}
PYTHON=${PYTHON:-python}
IN="$OUT/inputs"
mkdir -p "$IN"

# The inputs: MNIST test digits as PNG files of the run's size, and the mask.
"$PYTHON" - "$IN" <<'EOF'
import sys

import numpy as np
from PIL import Image

from ddpm.data.sources import open_source
from ddpm.evaluation.viz import to_uint8

out = sys.argv[1]
digits = to_uint8(open_source("mnist", split="test").get_batch([0, 1]))[..., 0]  # (2, 28, 28) uint8
Image.fromarray(digits[0]).save(f"{out}/digit.png")
Image.fromarray(digits[0]).save(f"{out}/a.png")
Image.fromarray(digits[1]).save(f"{out}/b.png")
mask = np.zeros((28, 28), np.uint8)
mask[14:] = 255  # white: generate the bottom half
Image.fromarray(mask).save(f"{out}/mask.png")
EOF

# The commands as the README prints them.
"$DDPM" sample "$RUN" --class all --per-class 10 --seed 0 --out "$OUT/mnist_cond_classes.png"
"$DDPM" inpaint "$RUN" --image "$IN/digit.png" --mask "$IN/mask.png" --num 4 --out "$IN/filled.png"
"$DDPM" interpolate "$RUN" "$IN/a.png" "$IN/b.png" --frames 8 --out "$OUT/mnist_interpolate.png"

# Inpainting figure: input (masked half grey, as the model never sees it) | mask | completions.
"$PYTHON" - "$IN" "$OUT/mnist_inpaint.png" <<'EOF'
import sys

import numpy as np
from PIL import Image

inputs, target = sys.argv[1], sys.argv[2]
digit = np.asarray(Image.open(f"{inputs}/digit.png").convert("L"))
mask = np.asarray(Image.open(f"{inputs}/mask.png").convert("L"))
filled = np.asarray(Image.open(f"{inputs}/filled.png").convert("L"))  # 4 completions, 2 px apart
shown = np.where(mask >= 128, 128, digit).astype(np.uint8)
gap = np.full((28, 6), 255, np.uint8)
row = np.concatenate([shown, gap, mask, gap, filled[2:-2, 2:-2] if filled.shape[0] > 28 else filled], axis=1)
Image.fromarray(np.pad(row, 2, constant_values=255)).save(target)
print(f"wrote {target}")
EOF
