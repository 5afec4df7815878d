"""Bounded memory: peak RSS of encoding grows far slower than the image (tiles of 1024² pixels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import resource, sys
import numpy as np
from PIL import Image
from nicd.codec.api import load_codec
from nicd.codec.imageio import load_image
h, w = int(sys.argv[1]), int(sys.argv[2])
src = np.asarray(Image.open(sys.argv[3]).convert('RGB'))
rgb = np.tile(src, (h // src.shape[0] + 1, w // src.shape[1] + 1, 1))[:h, :w]
res = load_codec('default', 'cpu').encode(load_image(Image.fromarray(rgb)), quality=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

KODIM = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak" / "kodim05.png"


def peak_rss(h: int, w: int) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(h), str(w), str(KODIM)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_is_bounded_for_huge_images():
    small = peak_rss(2048, 2048)  # 4 MP
    large = peak_rss(5800, 8700)  # 50 MP
    # The image itself (RGB + decoded copy + a few per-image arrays) grows with the pixels; the
    # transforms must not: 46 extra megapixels may cost at most ~20 bytes each.
    assert large - small < 46e6 * 20, (small, large)
    assert large < 6 * 2**30, large
