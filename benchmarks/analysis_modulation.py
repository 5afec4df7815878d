"""What a per-quality analysis transform could buy the variable-rate default: for one quality level,
train either per-channel affine maps of g_a's hidden outputs at that level (`mod`: the encoder side of
the conditional convolutions of Choi, El-Khamy, Lee, "Variable rate deep image compression with a
conditional autoencoder", ICCV 2019) or a whole copy of g_a (`full`), on random 256² crops of the
training photographs, with everything else frozen. Reports the float model's estimated bpp, PSNR and
R + λ·255²·MSE on every third Kodak image every 100 steps, against the shared g_a.

    python benchmarks/analysis_modulation.py --quality 8 --arm mod --steps 400 --lr 1e-3

The decoder is untouched either way, so whatever this gains would need no change of the format.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from nicd.codec import registry
from nicd.codec.models import LAMBDAS_MSE
from nicd.train.data import PatchSampler, load_images
from nicd.train.loop import rd_loss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Affine(nn.Module):
    """x·exp(a) + b per channel, starting at identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(self.a) + self.b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=int, required=True)
    parser.add_argument("--arm", choices=("mod", "full"), required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = registry.load_float_model(args.model).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g_a = copy.deepcopy(model.g_a)
    if args.arm == "full":
        params = list(g_a.parameters())
        for p in params:
            p.requires_grad_(True)
    else:
        layers = []
        for layer in g_a:  # an affine map after each hidden convolution, before its GDN
            layers.append(layer)
            if isinstance(layer, nn.Conv2d) and layer.out_channels == model.n:
                layers.append(Affine(model.n))
        g_a = nn.Sequential(*layers)
        params = [p for m in g_a if isinstance(m, Affine) for p in m.parameters()]
    model.g_a = g_a
    kodak = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((SHARED / "kodak").glob("*.png"))[::3]]
    lam = LAMBDAS_MSE[args.quality - 1]
    q_eval = torch.tensor([args.quality - 1])

    @torch.no_grad()
    def evaluate() -> np.ndarray:
        model.eval()
        rows = []
        for rgb in kodak:
            x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].float() / 255
            out = model(x, q_eval)
            bpp = sum(float(-torch.log2(lk).sum()) for lk in out["likelihoods"].values()) / (x.shape[2] * x.shape[3])
            mse = float((((out["x_hat"].clamp(0, 1) * 255).round() / 255 - x) ** 2).mean())
            rows.append((bpp, 10 * math.log10(1 / mse), bpp + lam * 255**2 * mse))
        return np.mean(rows, axis=0)

    base = evaluate()
    print(f"shared g_a: {base[0]:.4f} bpp / {base[1]:.2f} dB, cost {base[2]:.4f}", flush=True)
    sampler = PatchSampler(load_images(SHARED / "train", 256), 256, 2, 1)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    started = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        x = torch.from_numpy(sampler.sample()).float() / 255
        q = torch.full((2,), args.quality - 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, q)
        out = {"x_hat": out["x_hat"].float(), "likelihoods": {k: v.float() for k, v in out["likelihoods"].items()}}
        loss = rd_loss(out, x, q, "mse")["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            e = evaluate()
            print(f"step {step} ({time.time() - started:.0f} s): {e[0]:.4f} bpp / {e[1]:.2f} dB, "
                  f"cost {100 * (e[2] / base[2] - 1):+.2f} %", flush=True)


if __name__ == "__main__":
    main()
