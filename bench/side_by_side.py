"""Lay PNG grids side by side with a white gap, for figures that compare samplers on the same seeds.

    ddpm sample runs/mnist --num 100 --seed 0 --out teacher.png          # 200 network calls per image
    ddpm sample runs/mnist-4 --num 100 --seed 0 --out student.png       # 4
    python bench/side_by_side.py teacher.png student.png --out docs/mnist_distilled.png
"""

from __future__ import annotations

import argparse

from PIL import Image


def side_by_side(paths: list[str], gap: int = 16) -> Image.Image:
    images = [Image.open(p).convert("RGB") for p in paths]
    height = max(im.height for im in images)
    out = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), height), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--gap", type=int, default=16)
    args = p.parse_args()
    side_by_side(args.images, args.gap).save(args.out)


if __name__ == "__main__":
    main()
