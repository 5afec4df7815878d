"""What a context model would save on a trained model's latents, fitted after the fact.

The model stays frozen; a small network per channel slice predicts a correction of the hyperprior's
mean of `y` from the slices before it (channel-conditional means, Minnen & Singh, "Channel-wise
autoregressive entropy models for learned image compression", ICIP 2020), optionally a scale
factor too. Only the means: then the entropy decoder still needs nothing but the integer h_s's
scale tables, and the means follow slice by slice after all symbols are decoded. It trains on
latents of random 256² crops of the training photographs (each at a random quality) and prints
the change in the bits of `y` on Kodak images (rounded latents) at q1, q4, q8.

    python benchmarks/post_hoc_context.py --model default --images 333 --crops 3 --steps 3000 --lr 3e-4
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from nicd.codec import registry
from nicd.codec.density import gaussian_likelihood

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class SliceMeans(nn.Module):
    """Slice k's mean (and, with `scales`, log-scale) correction from the hyperprior's mean and
    scale of slice k and the decoded slices before it; zero at the start."""

    def __init__(self, m: int, slices: int, scales: bool):
        super().__init__()
        self.c, self.slices, self.scales = m // slices, slices, scales
        c = self.c
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * c + k * c + 1, 128, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(128, 128, 3, padding=1),
                          nn.LeakyReLU(), nn.Conv2d(128, 2 * c, 3, padding=1))
            for k in range(1, slices))
        for net in self.nets:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, y, scale, mean, qmap, quantize):
        c = self.c
        means, scales = [mean[:, :c]], [scale[:, :c]]
        decoded = [quantize(y[:, :c] - mean[:, :c]) + mean[:, :c]]
        for k in range(1, self.slices):
            part = slice(k * c, (k + 1) * c)
            d_mean, d_log_scale = self.nets[k - 1](torch.cat([mean[:, part], scale[:, part], *decoded, qmap], 1)).chunk(2, 1)
            mu = mean[:, part] + d_mean
            means.append(mu)
            scales.append(scale[:, part] * torch.exp(d_log_scale) if self.scales else scale[:, part])
            decoded.append(quantize(y[:, part] - mu) + mu)
        return torch.cat(means, 1), torch.cat(scales, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--images", type=int, default=333, help="training photographs to crop")
    parser.add_argument("--crops", type=int, default=3, help="random 256² crops per photograph")
    parser.add_argument("--kodak", type=int, default=8, help="Kodak images to measure on")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--scales", action="store_true", help="also predict a scale factor")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    model = registry.load_float_model(args.model).eval()

    @torch.no_grad()
    def latents(rgb: np.ndarray, q: int):
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255
        y = model.g_a(x) * model.gain.gain(torch.tensor([q]))
        scale, mean = model.h_s(torch.round(model.h_a(y))).chunk(2, 1)
        return y, scale, mean, torch.full_like(y[:, :1], q / 7)

    data = []
    for path in sorted((SHARED / "train").glob("*.png"))[: args.images]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for _ in range(args.crops):
            r, c = random.randrange(rgb.shape[0] - 255), random.randrange(rgb.shape[1] - 255)
            data.append(latents(rgb[r : r + 256, c : c + 256], random.randrange(8)))
    kodak = []
    for path in sorted((SHARED / "kodak").glob("*.png"))[: args.kodak]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        kodak += [(q, latents(rgb, q)) for q in (0, 3, 7)]
    ctx = SliceMeans(model.m, args.slices, args.scales)
    opt = torch.optim.Adam(ctx.parameters(), lr=args.lr)
    noisy = lambda r: r + torch.empty_like(r).uniform_(-0.5, 0.5)  # noqa: E731

    def bits(y, mean, scale, quantize):
        return -torch.log2(gaussian_likelihood(quantize(y - mean) + mean, mean, scale)).sum()

    @torch.no_grad()
    def measure() -> str:
        base, new = {}, {}
        for q, (y, scale, mean, qmap) in kodak:
            base[q] = base.get(q, 0.0) + float(bits(y, mean, scale, torch.round))
            m2, s2 = ctx(y, scale, mean, qmap, torch.round)
            new[q] = new.get(q, 0.0) + float(bits(y, m2, s2, torch.round))
        return "  ".join(f"q{q + 1} {100 * (new[q] / base[q] - 1):+.2f} %" for q in sorted(base))

    print(f"{len(data)} training crops; bits of y on {args.kodak} Kodak images against the hyperprior alone:")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = 0.0
        for y, scale, mean, qmap in random.sample(data, 4):
            m2, s2 = ctx(y, scale, mean, qmap, noisy)
            loss = loss + bits(y, m2, s2, noisy) / y.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0:
            print(f"step {step} ({time.perf_counter() - started:.0f} s): {measure()}", flush=True)


if __name__ == "__main__":
    main()
