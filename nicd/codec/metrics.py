"""Image quality figures, measured as the design protocol fixes them: PSNR on 8-bit RGB after the
decoder's rounding; SSIM and MS-SSIM as `pytorch-msssim` computes them on RGB with data range 255
(11×11 Gaussian window, σ = 1.5; Wang et al. 2004 and 2003).

Large images are measured tile by tile (area-weighted means), which bounds memory; MS-SSIM needs a
short side above 160 px and is None below that.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pytorch_msssim import ms_ssim, ssim

MSSSIM_MIN_SIDE = 161
TILE = 1024


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None]


@torch.no_grad()
def _ssims(a: np.ndarray, b: np.ndarray, with_ms_ssim: bool = True) -> tuple[float, float | None]:
    h, w = a.shape[:2]
    if min(h, w) < 11:
        # Too small for the 11×11 window: fall back to the exact-match test SSIM reduces to.
        return (1.0 if np.array_equal(a, b) else float(1 - np.mean(np.abs(a.astype(float) - b)) / 255)), None
    ta, tb = _to_tensor(a), _to_tensor(b)
    s = float(ssim(ta, tb, data_range=255, size_average=True))
    ms = float(ms_ssim(ta, tb, data_range=255, size_average=True)) if with_ms_ssim and min(h, w) >= MSSSIM_MIN_SIDE else None
    return s, ms


def quality(original: np.ndarray, decoded: np.ndarray, *, with_ms_ssim: bool = True) -> dict:
    """PSNR, SSIM and MS-SSIM of two H×W×3 uint8 images (MS-SSIM None when not asked for: it costs
    about as much again as SSIM)."""
    h, w = original.shape[:2]
    if h * w <= TILE * TILE * 2:
        s, ms = _ssims(original, decoded, with_ms_ssim)
        return {"psnr": psnr(original, decoded), "ssim": s, "ms_ssim": ms}
    total, s_sum, ms_sum, ms_area, se = 0, 0.0, 0.0, 0, 0.0
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            a = original[y : y + TILE, x : x + TILE]
            b = decoded[y : y + TILE, x : x + TILE]
            area = a.shape[0] * a.shape[1]
            s, ms = _ssims(a, b, with_ms_ssim)
            s_sum += s * area
            if ms is not None:
                ms_sum += ms * area
                ms_area += area
            se += float(np.sum((a.astype(np.float64) - b) ** 2))
            total += area
    mse = se / (total * 3)
    return {
        "psnr": float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "ssim": s_sum / total,
        "ms_ssim": ms_sum / ms_area if ms_area else None,
    }
