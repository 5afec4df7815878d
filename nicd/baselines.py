"""Classical codecs through Pillow, with the settings of the measurement protocol: JPEG
(libjpeg-turbo, optimize=True, default 4:2:0), WebP (method=6), AVIF (speed=6)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, features

from .codec import metrics

CODECS = ("jpeg", "webp", "avif")


def available(codec: str) -> bool:
    return {"jpeg": features.check("jpg"), "webp": features.check("webp"), "avif": features.check("avif")}.get(codec, False)


def encode(rgb: np.ndarray, codec: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(rgb)
    if codec == "jpeg":
        im.save(buf, "JPEG", quality=quality, optimize=True)
    elif codec == "webp":
        im.save(buf, "WEBP", quality=quality, method=6)
    elif codec == "avif":
        im.save(buf, "AVIF", quality=quality, speed=6)
    else:
        raise ValueError(f"unknown baseline codec {codec!r}")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def bytes_at_ssim(rgb: np.ndarray, target_ssim: float, codec: str = "jpeg") -> int | None:
    """The smallest file of `codec` (over its quality setting) whose SSIM reaches the target, or None.

    Binary search over quality 1..100 (SSIM grows with the quality setting)."""
    lo, hi = 1, 100
    best = None
    while lo <= hi:
        q = (lo + hi) // 2
        data = encode(rgb, codec, q)
        s = metrics.quality(rgb, decode(data), with_ms_ssim=False)["ssim"]
        if s >= target_ssim:
            best = len(data) if best is None else min(best, len(data))
            hi = q - 1
        else:
            lo = q + 1
    return best


def jpeg_bytes_at_ssim(rgb: np.ndarray, target_ssim: float) -> int | None:
    return bytes_at_ssim(rgb, target_ssim, "jpeg")
