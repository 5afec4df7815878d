"""What the channels a `--widen` fork added carry: on Kodak crops, per quality, the bits they cost, the
PSNR with them and with them set to their predicted means (as if they were never coded), and the
PSNR of the transforms without quantization, g_s(g_a(x)), the ceiling widening is meant to raise.

A widened run whose new channels only take over information from the old ones shows a large
"without new" drop but an unquantized PSNR no higher than its source's (docs/training.md).

    python benchmarks/widened_channels.py runs/msh-96-256-mse/checkpoint.pt runs/msh-96-144-mse/checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nicd.codec.models import build_model

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def crops(names: list[str], side: int) -> torch.Tensor:
    xs = []
    for name in names:
        rgb = np.asarray(Image.open(KODAK / f"{name}.png").convert("RGB"))[:side, :side]
        xs.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255)
    return torch.stack(xs)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    mse = float(((x_hat.clamp(0, 1) * 255).round() / 255 - x).pow(2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def report(checkpoint: str, x: torch.Tensor, qualities: list[int]) -> None:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    model.eval()
    old = ckpt["options"].get("extra", {}).get("init_from", {}).get("widened_from_m", model.m)
    print(f"{checkpoint}: step {ckpt['step']}, M = {model.m} ({model.m - old} added)")
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    for quality in qualities:
        q = torch.full((x.shape[0],), quality - 1)
        y = model.g_a(x) * model.gain.gain(q)
        scales, means = model.h_s(torch.round(model.h_a(y))).chunk(2, 1)
        out = model(x, q)
        bits_y = -torch.log2(out["likelihoods"]["y"])
        bpp = float(bits_y.sum() - torch.log2(out["likelihoods"]["z"]).sum()) / pixels
        y_hat = torch.round(y - means) + means
        y_hat[:, old:] = means[:, old:]
        line = (f"  q{quality}: {bpp:.4f} bpp (new channels {float(bits_y[:, old:].sum()) / pixels:.4f}), "
                f"{psnr(out['x_hat'], x):.2f} dB")
        if old < model.m:
            line += f", without new {psnr(model.g_s(y_hat * model.gain.inverse(q)), x):.2f} dB"
        print(line + f", unquantized {psnr(model.g_s(y * model.gain.inverse(q)), x):.2f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="run checkpoints (checkpoint.pt); their averaged weights")
    parser.add_argument("--images", default="kodim01,kodim05,kodim13,kodim20")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--qualities", default="1,4,8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = crops(args.images.split(","), args.side)
    for checkpoint in args.checkpoints:
        report(checkpoint, x, [int(q) for q in args.qualities.split(",")])


if __name__ == "__main__":
    main()
