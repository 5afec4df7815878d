"""Kodak figures of training checkpoints or shipped models, straight from the float model: estimated
bpp (−log2 of the rounded latents' likelihoods) and PSNR of the rounded output, per quality level.
No entropy coding and no export, so it is quick enough to compare snapshots before choosing one to
export; `nicd bench` measures the real bitstreams of the one that ships.

`--floor` adds, per quality, the PSNR of the transforms without quantization, g_s(g_a(x)): what that
level could reach with infinitely fine steps. Where it sits close to the real PSNR, the transforms
(not the quantization step) limit that level, and only more training of g_a / g_s raises it.

    python benchmarks/checkpoints_on_kodak.py --qualities 1,4,8 default runs/msh-96-144-mse/checkpoint.pt
    python benchmarks/checkpoints_on_kodak.py --ms-ssim ms-ssim runs/msh-96-144-msssim/checkpoint.pt

With more than one source, each line after the first ends with its BD-rate against the first
(over the qualities given: models on different quality ladders are compared along their curves).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nicd.bench import bd_rate, ms_ssim_db
from nicd.codec import registry
from nicd.codec.models import build_model


def load(source: str, raw: bool) -> torch.nn.Module:
    if source.endswith(".pt"):
        ckpt = torch.load(source, map_location="cpu", weights_only=False)
        model = build_model(ckpt["config"])
        use_ema = ckpt.get("ema") is not None and not raw
        model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
        return model
    return registry.load_float_model(source).float()


@torch.no_grad()
def figures(model: torch.nn.Module, images: list[np.ndarray], quality: int, floor: bool = False,
            ms_ssim: bool = False) -> tuple:
    """Mean (bpp, PSNR or MS-SSIM) at one quality level, and the mean unquantized PSNR when ``floor``."""
    bpps, psnrs, floors = [], [], []
    q = torch.tensor([quality - 1])
    for rgb in images:
        x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].float() / 255
        out = model(x, q)
        bits = sum(float(-torch.log2(lk).sum()) for lk in out["likelihoods"].values())
        bpps.append(bits / (x.shape[2] * x.shape[3]))
        psnrs.append(_ms_ssim(out["x_hat"], x) if ms_ssim else _psnr(out["x_hat"], x))
        if floor:
            floors.append(_psnr(model.g_s(model.g_a(x) * model.gain.gain(q) * model.gain.inverse(q)), x))
    return float(np.mean(bpps)), float(np.mean(psnrs)), float(np.mean(floors)) if floors else None


def _ms_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    from pytorch_msssim import ms_ssim

    return float(ms_ssim((x_hat.clamp(0, 1) * 255).round(), x * 255, data_range=255))


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x_hat = (x_hat.clamp(0, 1) * 255).round() / 255
    return 10 * math.log10(1 / float(((x_hat - x) ** 2).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="checkpoint.pt files, model names or .npz paths")
    parser.add_argument("--qualities", default="1,4,8")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/kodak"))
    parser.add_argument("--raw", action="store_true", help="a checkpoint's last-step weights, not its average")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="also the PSNR without quantization (see above)")
    parser.add_argument("--ms-ssim", action="store_true", help="MS-SSIM instead of PSNR (for MS-SSIM models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(args.images.glob("*.png"))]
    if not images:
        parser.error(f"no .png image in {args.images}")
    qualities = [int(q) for q in args.qualities.split(",")]
    metric = "MS-SSIM" if args.ms_ssim else "PSNR (dB)"
    print(f"{len(images)} images; bpp / {metric}{' (unquantized PSNR)' if args.floor else ''} per quality")
    first = None
    for source in args.sources:
        model = load(source, args.raw).eval()
        points = [figures(model, images, q, args.floor, args.ms_ssim) for q in qualities]
        cells = [f"q{q} {b:.3f}/{p:{'.4f' if args.ms_ssim else '.2f'}}" + (f" ({f:.2f})" if f is not None else "")
                 for q, (b, p, f) in zip(qualities, points)]
        curve = [(b, ms_ssim_db(p) if args.ms_ssim else p) for b, p, _ in points]
        first = first or curve
        bd = bd_rate(first, curve) if curve is not first and len(qualities) > 1 else None
        print(f"{source}: " + "  ".join(cells) + (f"  BD-rate vs the first {100 * bd:+.2f} %" if bd is not None else ""), flush=True)


if __name__ == "__main__":
    main()
