"""Rate-aware rounding (nicd.codec.rounding) against plain rounding: real bytes and decoded PSNR of one
model on a set of photographs, per quality, for several weight scales, in one run.

    python benchmarks/rate_aware_rounding.py --images ../shared/data/val --count 8 --qualities 1,4,8 --scales 120,170,240
    python benchmarks/rate_aware_rounding.py --images ../shared/data/kodak --every 3 --scales 170

Prints, per quality, each setting's mean bpp and PSNR and its change of the coded cost
bpp + λ·255²·MSE summed over the images; with four or more qualities also each setting's BD-rate
(PSNR) against plain rounding. The weight is scale·λ^exponent (the shipped rule: 170·λ^0.3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from nicd.bench import bd_rate
from nicd.codec import rounding
from nicd.codec.api import load_codec
from nicd.codec.imageio import load_image
from nicd.codec.models import ladder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/val"))
    parser.add_argument("--count", type=int, default=None, help="the first N images (sorted by name)")
    parser.add_argument("--every", type=int, default=1, help="every k-th image")
    parser.add_argument("--max-side", type=int, default=896, help="crop larger images to this (top left)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--qualities", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--scales", default="170", help="weight scales to try beside plain rounding")
    parser.add_argument("--exponent", type=float, default=rounding.WEIGHT_EXPONENT)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    codec = load_codec(args.model, "cpu")
    lams = ladder(codec.info.config)
    qualities = [int(q) for q in args.qualities.split(",")]
    settings: list[float | None] = [None] + [float(s) for s in args.scales.split(",")]
    paths = sorted(args.images.glob("*.png"))[:: args.every][: args.count]
    rows: dict[tuple[int, float | None], list[tuple[float, float, float]]] = {}
    for path in paths:
        image = load_image(path)
        if max(image.width, image.height) > args.max_side:
            from PIL import Image

            image = load_image(Image.fromarray(np.ascontiguousarray(image.rgb[: args.max_side, : args.max_side])))
        source = image.rgb.astype(np.float64)
        for scale in settings:
            rounding_weight = (lambda config, q, s=scale: None if s is None else s * lams[q - 1] ** args.exponent)
            rounding.weight_for = rounding_weight  # what every plain encode asks
            for q, res in zip(qualities, codec.encode_levels(image, qualities)):
                mse = float(np.mean((codec.decode_rgb(res.data) - source) ** 2))
                bpp = len(res.data) * 8 / (image.width * image.height)
                rows.setdefault((q, scale), []).append((bpp, 10 * np.log10(255**2 / mse), bpp + lams[q - 1] * mse))
        print(f"{path.name}: done", flush=True)

    name = lambda s: "plain" if s is None else f"{s:g}·λ^{args.exponent:g}"  # noqa: E731
    print(f"{codec.model_id}, {len(paths)} images from {args.images}")
    for q in qualities:
        base = np.array(rows[(q, None)])
        for scale in settings:
            a = np.array(rows[(q, scale)])
            print(f"q{q} {name(scale):>14}: {a[:, 0].mean():.4f} bpp {a[:, 1].mean():.3f} dB, "
                  f"cost {100 * (a[:, 2].sum() / base[:, 2].sum() - 1):+.2f} %")
    if len(qualities) >= 4:
        curve = lambda s: [tuple(np.array(rows[(q, s)])[:, :2].mean(axis=0)) for q in qualities]  # noqa: E731
        for scale in settings[1:]:
            print(f"BD-rate (PSNR) of {name(scale)} against plain rounding: {100 * bd_rate(curve(None), curve(scale)):+.2f} %")


if __name__ == "__main__":
    main()
