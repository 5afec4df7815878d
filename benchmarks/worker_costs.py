"""Where the daemon's time per image goes: encode (analysis + entropy coding), the verifying decode,
the quality figures, and the JPEG-at-equal-SSIM baseline that `nicd report` compares against; all
measured side by side on the same images in one run.

    python benchmarks/worker_costs.py --threads 1 --tile 2 ../shared/data/kodak/kodim05.png

`--tile N` repeats each image N×N times (a 768×512 Kodak image at N=2 is a 1.6 MP photo).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from nicd import baselines
from nicd.codec import metrics
from nicd.codec.api import load_codec
from nicd.codec.imageio import load_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tile", type=int, default=1)
    ap.add_argument("--quality", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    codec = load_codec("default", "cpu")
    codec.encode(load_image(Image.new("RGB", (64, 64))), quality=1)  # warm-up
    for path in args.images:
        with Image.open(path) as im:
            rgb = np.ascontiguousarray(np.tile(np.asarray(im.convert("RGB")), (args.tile, args.tile, 1)))
        prepared = load_image(Image.fromarray(rgb))
        t0 = time.perf_counter()
        res = codec.encode(prepared, quality=args.quality)
        t1 = time.perf_counter()
        decoded = codec.decode_rgb(res.data)
        t2 = time.perf_counter()
        metrics.quality(rgb, decoded)
        t3 = time.perf_counter()
        jpeg = baselines.jpeg_bytes_at_ssim(rgb, res.ssim)
        t4 = time.perf_counter()
        figures = t3 - t2
        parts = {"encode": res.encode_seconds, "verifying decode": res.decode_seconds, "figures": figures,
                 "JPEG at equal SSIM": t4 - t3}
        total = t1 - t0 + (t4 - t3)
        mp = rgb.shape[0] * rgb.shape[1] / 1e6
        print(f"{path} ×{args.tile}² ({mp:.2f} MP, q{args.quality}: {len(res.data)} B, JPEG {jpeg} B): "
              f"{total:.1f} s per image")
        for name, seconds in parts.items():
            print(f"  {name:20s} {seconds:6.2f} s  {100 * seconds / total:4.0f} %")


if __name__ == "__main__":
    main()
