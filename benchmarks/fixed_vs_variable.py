"""What variable rate costs: a fixed-rate run against the variable-rate run it was forked from.

Both runs start from the same checkpoint and see the same patches for the same number of steps
(`nicd train --fixed-quality Q` on a copy of the run folder, `--steps` equal); the only difference is
that the fixed-rate run spends every sample on quality Q, the variable-rate run one in eight.
Both are exported to a scratch folder and measured on the same images in one run: the variable
model at Q−1, Q, Q+1 (to interpolate its curve), the fixed model at Q. Printed: bpp and PSNR of each,
and the variable model's extra bits at the fixed model's PSNR (log-rate interpolated, as BD-rate
does) and its PSNR deficit at the fixed model's rate.

    python benchmarks/fixed_vs_variable.py --variable runs/var/checkpoint.pt \\
        --fixed runs/fixed-q4/checkpoint.pt --quality 4 --images ../shared/data/kodak
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from nicd import bench
from nicd.codec.api import load_codec
from nicd.train.data import image_files
from nicd.train.export import export_checkpoint


def measure(checkpoint: Path, name: str, qualities: list[int], images, scratch: Path) -> list[tuple[float, float]]:
    info = export_checkpoint(checkpoint, name, scratch)
    rows = bench.run(images, load_codec(str(info.path), "cpu"), qualities, [])
    return bench.mean_curve(rows, "nicd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variable", type=Path, required=True, help="checkpoint.pt of the variable-rate run")
    parser.add_argument("--fixed", type=Path, required=True, help="checkpoint.pt of the fixed-rate run")
    parser.add_argument("--quality", type=int, default=4)
    parser.add_argument("--images", type=Path, default=Path("../shared/data/kodak"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    images = []
    for f in image_files(args.images)[: args.limit]:
        with Image.open(f) as im:
            images.append((f.name, np.asarray(im.convert("RGB"))))
    q = args.quality
    with tempfile.TemporaryDirectory() as scratch:
        variable = measure(args.variable, "variable", [q - 1, q, q + 1], images, Path(scratch))
        (fixed_bpp, fixed_psnr), = measure(args.fixed, "fixed", [q], images, Path(scratch))
    bpps, psnrs = np.array([p[0] for p in variable]), np.array([p[1] for p in variable])
    # Interpolate log-rate against PSNR (both monotone across the three levels), as BD-rate does.
    rate_at_fixed_psnr = float(np.exp(np.interp(fixed_psnr, psnrs, np.log(bpps))))
    psnr_at_fixed_rate = float(np.interp(np.log(fixed_bpp), np.log(bpps), psnrs))
    result = {
        "images": len(images),
        "quality": q,
        "variable_curve": [{"quality": qq, "bpp": b, "psnr": p} for qq, (b, p) in zip((q - 1, q, q + 1), variable)],
        "fixed": {"bpp": fixed_bpp, "psnr": fixed_psnr},
        "variable_extra_rate_at_equal_psnr": rate_at_fixed_psnr / fixed_bpp - 1,
        "variable_psnr_deficit_at_equal_rate_db": fixed_psnr - psnr_at_fixed_rate,
        "extrapolated": not (psnrs.min() <= fixed_psnr <= psnrs.max()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
