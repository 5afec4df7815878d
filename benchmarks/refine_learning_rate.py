"""How much each learning rate of the latent refinement (`nicd.codec.refine`, SGA of Yang et al. 2020)
lowers the coded rate–distortion cost R + λ·255²·MSE against the plain encoder, on Kodak images:
real bitstreams through `Codec.encode`, bpp from their length, PSNR of the decoded image.

    python benchmarks/refine_learning_rate.py --rates 0.02,0.04,0.06 --images 4,19 --qualities 1,5,8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nicd.codec import refine
from nicd.codec.api import load_codec
from nicd.codec.imageio import load_image

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.02,0.04,0.06")
    parser.add_argument("--images", default="4,19", help="Kodak image numbers")
    parser.add_argument("--qualities", default="1,5,8")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = [float(v) for v in args.rates.split(",")]
    codec = load_codec(args.model, "cpu")
    lambdas = refine.ladder(codec.info.config)
    if codec.info.config.get("metric") == "ms-ssim":
        parser.error("this measures R + λ·MSE: give an MSE model")

    def cost(result, q: int) -> float:
        return result.bpp + lambdas[q - 1] * 255**2 * 10 ** (-result.psnr / 10)

    changes: dict[float, list[float]] = {rate: [] for rate in rates}
    for number in args.images.split(","):
        image = load_image(KODAK / f"kodim{int(number):02d}.png")
        for q in (int(v) for v in args.qualities.split(",")):
            plain = codec.encode(image, quality=q)
            row = {"image": int(number), "quality": q, "plain": [round(plain.bpp, 4), round(plain.psnr, 3)]}
            for rate in rates:
                refine.LEARNING_RATE = rate
                refined = codec.encode(image, quality=q, refine_steps=args.steps)
                change = 100 * (cost(refined, q) / cost(plain, q) - 1)
                changes[rate].append(change)
                row[str(rate)] = [round(refined.bpp, 4), round(refined.psnr, 3), round(change, 2)]
            print(json.dumps(row), flush=True)
    for rate in rates:
        print(f"learning rate {rate}: R + λ·D {sum(changes[rate]) / len(changes[rate]):+.2f} % on average")


if __name__ == "__main__":
    main()
