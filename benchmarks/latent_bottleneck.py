"""What M latent channels can hold at best: PSNR of block PCA keeping M of the 768 dimensions of
every 16×16×3 block (the footprint of one latent position in a 4-layer stride-2 transform).

A linear, non-overlapping stand-in for g_a / g_s, fitted on the test images themselves (so
optimistic for a linear code): when a trained model's unquantized PSNR, g_s(g_a(x)), sits near
this figure for its M (`checkpoints_on_kodak.py --floor`), its latent width, not its training,
caps the top of its rate–distortion curve.

    python benchmarks/latent_bottleneck.py --m 96,144,192,256,320
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

BLOCK = 16


def blocks(rgb: np.ndarray) -> np.ndarray:
    h, w = (s - s % BLOCK for s in rgb.shape[:2])
    x = rgb[:h, :w].astype(np.float64) / 255
    return x.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, 3).transpose(0, 2, 1, 3, 4).reshape(-1, BLOCK * BLOCK * 3)


def pca_psnr(x: np.ndarray, ms: list[int]) -> dict[int, float]:
    mean = x.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((x - mean).T))
    vectors = vectors[:, ::-1]  # largest variance first
    out = {}
    for m in ms:
        basis = vectors[:, :m]
        err = (x - mean) - (x - mean) @ basis @ basis.T
        out[m] = float(10 * np.log10(1 / np.mean(err**2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/kodak"))
    parser.add_argument("--m", default="96,144,192,256,320", help="latent widths to measure")
    args = parser.parse_args()
    paths = sorted(args.images.glob("*.png"))
    if not paths:
        parser.error(f"no .png image in {args.images}")
    x = np.concatenate([blocks(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    for m, psnr in pca_psnr(x, [int(v) for v in args.m.split(",")]).items():
        print(f"M={m:4d}: block-PCA PSNR {psnr:.2f} dB ({len(paths)} images, {len(x):,} blocks of {BLOCK}×{BLOCK})")


if __name__ == "__main__":
    main()
