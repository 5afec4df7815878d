"""What a channel-context checkpoint's context networks are worth: the same weights coded with and
without their correction (the context networks' last layers set to zero), on Kodak images, from the
float model (estimated bits of y and z, PSNR of the rounded output), per quality level.

    python benchmarks/context_gain.py runs/msh-96-144-cc/checkpoint.pt --raw
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nicd.codec.models import ChannelContextHyperprior, build_model

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--raw", action="store_true", help="the last step's weights, not the average")
    parser.add_argument("--images", default="1,5,12,19,23", help="Kodak image numbers")
    parser.add_argument("--qualities", default="1,4,8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = build_model(ckpt["config"])
    if not isinstance(model, ChannelContextHyperprior):
        parser.error(f"{args.checkpoint} is a {model.kind} model, not mean-scale-cc")
    model.load_state_dict(ckpt["model"] if args.raw or ckpt.get("ema") is None else ckpt["ema"])
    model.eval()
    without = copy.deepcopy(model)
    with torch.no_grad():
        for net in without.ctx:
            net[-1].weight.zero_()
            net[-1].bias.zero_()
    images = [np.asarray(Image.open(KODAK / f"kodim{int(n):02d}.png").convert("RGB")) for n in args.images.split(",")]
    print(f"step {ckpt['step']} ({'last step' if args.raw else 'average'}), {len(images)} Kodak images: with context against without")
    for q in (int(v) for v in args.qualities.split(",")):
        bits, psnr = {"with": 0.0, "without": 0.0}, {"with": 0.0, "without": 0.0}
        for rgb in images:
            x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].float() / 255
            for name, m in (("with", model), ("without", without)):
                with torch.no_grad():
                    out = m(x, torch.tensor([q - 1]))
                bits[name] += float(sum(-torch.log2(v).sum() for v in out["likelihoods"].values()))
                psnr[name] += float(10 * torch.log10(1 / ((out["x_hat"].clamp(0, 1) - x) ** 2).mean())) / len(images)
        print(f"q{q}: bits {100 * (bits['with'] / bits['without'] - 1):+.2f} %, PSNR {psnr['with'] - psnr['without']:+.3f} dB")


if __name__ == "__main__":
    main()
