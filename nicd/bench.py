"""Rate–distortion benchmark: nicd at each quality against Pillow's JPEG, WebP and AVIF, measured
side by side in one run, with Bjøntegaard-delta rates.

BD-rate follows Bjøntegaard (VCEG-M33) with the piecewise cubic (PCHIP) interpolation of its later
revision (VCEG-AL22): log-rate as a function of PSNR, integrated over the overlapping PSNR range.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import baselines
from .codec import metrics

BASELINE_QUALITIES = {
    "jpeg": (10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "webp": (10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "avif": (10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
}
SSIM_TARGET = 0.97
REFINED = "nicd-refine"  # nicd measured with `--refine-steps` (`run`)


@dataclass
class Row:
    codec: str
    setting: int
    image: str
    width: int
    height: int
    bytes: int
    bpp: float
    psnr: float
    ssim: float
    ms_ssim: float | None
    encode_seconds: float
    decode_seconds: float


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]],
            quality_range: tuple[float, float] | None = None) -> float | None:
    """Average bit-rate difference (fraction; negative = fewer bits) of `test` against `anchor` at
    equal quality; each curve is a list of (bpp, quality) points. None without an overlap.
    `quality_range`: integrate over only this part of the overlap (to compare two models over the
    range they share, where one reaches higher)."""
    from scipy.interpolate import PchipInterpolator

    def prep(curve):
        pts = sorted((q, np.log(r)) for r, q in curve if r > 0)
        if not pts:  # e.g. no MS-SSIM on images smaller than its 161-pixel minimum
            return np.array([]), np.array([])
        q = np.array([p[0] for p in pts])
        lr = np.array([p[1] for p in pts])
        keep = np.concatenate([[True], np.diff(q) > 1e-9])  # PCHIP needs strictly increasing x
        return q[keep], lr[keep]

    qa, ra = prep(anchor)
    qt, rt = prep(test)
    if len(qa) < 2 or len(qt) < 2:
        return None
    lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    if quality_range is not None:
        lo, hi = max(lo, quality_range[0]), min(hi, quality_range[1])
    if hi <= lo:
        return None
    fa, ft = PchipInterpolator(qa, ra), PchipInterpolator(qt, rt)
    avg = (ft.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo)
    return float(np.exp(avg) - 1)


def rate_ratios(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> list[float | None]:
    """For every point of `test`, its bits over the bits `anchor` needs for the same quality (log rate
    interpolated along the anchor as in `bd_rate`), minus one; None outside the anchor's range.
    Where `bd_rate` gives one average, this shows where along the curve a codec gains or loses."""
    from scipy.interpolate import PchipInterpolator

    pts = sorted((q, np.log(r)) for r, q in anchor if r > 0)
    q = np.array([p[0] for p in pts])
    keep = np.concatenate([[True], np.diff(q) > 1e-9]) if len(q) else np.array([], dtype=bool)
    q, lr = q[keep], np.array([p[1] for p in pts])[keep]
    if len(q) < 2:
        return [None] * len(test)
    f = PchipInterpolator(q, lr)
    return [float(r / np.exp(f(v)) - 1) if q[0] <= v <= q[-1] and r > 0 else None for r, v in test]


def codec_order(codec: str) -> tuple:
    """nicd first, then nicd with refinement, then the baselines by name."""
    return (codec != "nicd", codec != REFINED, codec)


def mean_curve(rows: Iterable[Row], codec: str, key: str = "psnr") -> list[tuple[float, float]]:
    by_setting: dict[int, list[Row]] = {}
    for r in rows:
        if r.codec == codec:
            by_setting.setdefault(r.setting, []).append(r)
    return [(float(np.mean([r.bpp for r in rs])), float(np.mean([getattr(r, key) for r in rs])))
            for _, rs in sorted(by_setting.items())]


def run(images: list[tuple[str, np.ndarray]], codec, qualities: Iterable[int], baseline_codecs: Iterable[str],
        on_row: Callable[[Row], None] | None = None, refine_steps: int = 0) -> list[Row]:
    """Measure every image at every setting. `codec` is a `nicd.codec.api.Codec`. With `refine_steps`,
    nicd is measured twice: as it encodes by default ("nicd") and with that many steps of latent
    refinement (`REFINED`), so that what refinement buys is a ratio from one run."""
    from .codec.imageio import load_image

    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    for name, rgb in images:
        h, w = rgb.shape[:2]
        prepared = load_image_from_array(rgb, load_image)
        for label, steps in [("nicd", 0)] + ([(REFINED, refine_steps)] if refine_steps else []):
            for res in codec.encode_levels(prepared, list(qualities), refine_steps=steps):
                # decode_seconds: the encoder's own verifying decode of the written bytes (parse, entropy
                # decoding, synthesis on the CPU), which is exactly what `nicd decode` does before saving
                add(Row(label, res.quality, name, w, h, len(res.data), res.bpp, res.psnr, res.ssim, res.ms_ssim,
                        res.encode_seconds, res.decode_seconds))
        for name_b in baseline_codecs:
            for q in BASELINE_QUALITIES[name_b]:
                t0 = time.perf_counter()
                data = baselines.encode(rgb, name_b, q)
                t1 = time.perf_counter()
                dec_rgb = baselines.decode(data)
                t2 = time.perf_counter()
                f = metrics.quality(rgb, dec_rgb)
                add(Row(name_b, q, name, w, h, len(data), 8 * len(data) / (w * h), f["psnr"], f["ssim"], f["ms_ssim"], t1 - t0, t2 - t1))
    return rows


def load_image_from_array(rgb: np.ndarray, load_image):
    from PIL import Image

    return load_image(Image.fromarray(rgb))


def bytes_to_reach(rows: list[Row], codec: str, target: float = SSIM_TARGET) -> tuple[int, int]:
    """Sum over images of the smallest file reaching SSIM ≥ target, and how many images never do."""
    total, missing = 0, 0
    for image in sorted({r.image for r in rows}):
        ok = [r.bytes for r in rows if r.codec == codec and r.image == image and r.ssim >= target]
        if ok:
            total += min(ok)
        else:
            missing += 1
    return total, missing


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on the decibel scale −10·log10(1 − MS-SSIM), on which BD-rates of MS-SSIM are taken
    (as in Ballé et al. 2018 and Minnen et al. 2018: the linear scale crowds every codec near 1)."""
    return float(-10 * np.log10(max(1 - value, 1e-12)))


def summary(rows: list[Row]) -> dict:
    codecs = sorted({r.codec for r in rows}, key=codec_order)
    curves = {c: mean_curve(rows, c) for c in codecs}
    ms_curves = {c: mean_curve([r for r in rows if r.ms_ssim is not None], c, "ms_ssim") for c in codecs}
    ms_db = {c: [(b, ms_ssim_db(m)) for b, m in ms_curves[c]] for c in codecs}
    out = {"codecs": {}}
    for c in codecs:
        rs = [r for r in rows if r.codec == c]
        mp = sum(r.width * r.height for r in rs) / 1e6
        reach, missing = bytes_to_reach(rows, c)
        out["codecs"][c] = {
            "curve": [{"bpp": b, "psnr": p} for b, p in curves[c]],
            "curve_ms_ssim": [{"bpp": b, "ms_ssim": m} for b, m in ms_curves[c]],
            "bd_rate_vs_jpeg": bd_rate(curves["jpeg"], curves[c]) if "jpeg" in curves else None,
            "bd_rate_vs_avif": bd_rate(curves["avif"], curves[c]) if "avif" in curves else None,
            "rate_vs_jpeg": rate_ratios(curves["jpeg"], curves[c]) if "jpeg" in curves else [None] * len(curves[c]),
            "bd_rate_ms_ssim_vs_jpeg": bd_rate(ms_db["jpeg"], ms_db[c]) if "jpeg" in ms_db else None,
            "bd_rate_ms_ssim_vs_avif": bd_rate(ms_db["avif"], ms_db[c]) if "avif" in ms_db else None,
            "bytes_to_ssim_0.97": reach,
            "images_never_reaching_ssim_0.97": missing,
            "encode_mpix_per_s": mp / max(sum(r.encode_seconds for r in rs), 1e-9),
            "decode_mpix_per_s": mp / max(sum(r.decode_seconds for r in rs), 1e-9),
        }
    return out


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(Row.__dataclass_fields__))
        for r in rows:
            writer.writerow([getattr(r, k) for k in Row.__dataclass_fields__])


def plot(rows: list[Row], path: Path, title: str = "Kodak") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for c in sorted({r.codec for r in rows}, key=codec_order):
        psnr_curve = mean_curve(rows, c)
        ms_curve = mean_curve([r for r in rows if r.ms_ssim is not None], c, "ms_ssim")
        style = dict(marker="o", lw=2.5 if c == "nicd" else 1.5, label=c)
        axes[0].plot([b for b, _ in psnr_curve], [p for _, p in psnr_curve], **style)
        axes[1].plot([b for b, _ in ms_curve], [m for _, m in ms_curve], **style)
    axes[0].set(xlabel="bpp", ylabel="PSNR (dB, RGB)", title=f"{title}: PSNR")
    axes[1].set(xlabel="bpp", ylabel="MS-SSIM", title=f"{title}: MS-SSIM")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 2.5)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
