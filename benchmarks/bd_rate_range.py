"""BD-rate of the codecs of a `nicd bench` CSV against one of them over a chosen PSNR range.

BD-rate integrates over the PSNR range two curves share, so a model that reaches higher adds a
stretch where the anchor may be hard to beat; this gives the figure over a fixed range, e.g. the
range an earlier model covered, so that two models' numbers compare like for like.

    python benchmarks/bd_rate_range.py bench-out/bench.csv --anchor jpeg --psnr 27.1 35.41
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nicd.bench import Row, bd_rate, codec_order, mean_curve  # noqa: E402


def read_rows(path: Path) -> list[Row]:
    with open(path, newline="") as f:
        return [Row(r["codec"], int(r["setting"]), r["image"], int(r["width"]), int(r["height"]), int(r["bytes"]),
                    float(r["bpp"]), float(r["psnr"]), float(r["ssim"]), float(r["ms_ssim"]) if r["ms_ssim"] else None,
                    float(r["encode_seconds"]), float(r["decode_seconds"])) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--anchor", default="jpeg")
    ap.add_argument("--psnr", type=float, nargs=2, metavar=("LO", "HI"), required=True)
    args = ap.parse_args(argv)
    rows = read_rows(args.csv)
    anchor = mean_curve(rows, args.anchor)
    for codec in sorted({r.codec for r in rows}, key=codec_order):
        if codec == args.anchor:
            continue
        v = bd_rate(anchor, mean_curve(rows, codec), tuple(args.psnr))
        print(f"{codec:12s} BD-rate vs {args.anchor} over {args.psnr[0]:g}–{args.psnr[1]:g} dB: "
              + ("n/a (no overlap)" if v is None else f"{100 * v:+.1f} %"))


if __name__ == "__main__":
    main()
