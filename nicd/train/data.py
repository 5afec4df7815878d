"""Training data: photographs held in memory as uint8 arrays, random crops and flips.

A pack (`pack_folder`) is one `.npz` of crops of the photographs, each stored as a lossless WebP
file (about 11 bits per pixel on the training set, against 14 for PNG and 18.6 for the deflated raw
pixels of the first packs, which `load_images` still reads), small enough to carry to a lent GPU
machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise InputError(f"no images under {folder}")
    return files


def load_images(source: Path, min_side: int) -> list[np.ndarray]:
    """Every image of a folder or of a pack, as HxWx3 uint8, skipping those smaller than a patch."""
    source = Path(source)
    if source.is_file() and source.suffix == ".npz":
        with np.load(source) as pack:
            images = [_unpack(pack[k]) for k in sorted(pack.files)]
    else:
        images = []
        for path in image_files(source):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    images = [im for im in images if min(im.shape[:2]) >= min_side]
    if not images:
        raise InputError(f"no image in {source} is at least {min_side} px on its short side")
    return images


def _unpack(entry: np.ndarray) -> np.ndarray:
    """A pack entry: the bytes of a lossless WebP file, or (older packs) the raw HxWx3 pixels."""
    if entry.ndim == 3:
        return entry
    with Image.open(io.BytesIO(entry.tobytes())) as im:
        return np.asarray(im.convert("RGB"))


def pack_folder(source: Path, target: Path, max_bytes: int = 40_000_000, side: int = 320, seed: int = 0,
                centre: bool = False, count: int | None = None) -> dict:
    """Write a compact training set: one crop of at most side×side of every image (random, or the centre), lossless.

    The default budget leaves room for the repository (~15 MB) and a start checkpoint (~8 MB) under
    the device tool's 64 MiB carry limit. Crops over the budget are dropped at random, not from the
    end of the (name-sorted) list, so that every source of the training set keeps its share. `count`
    takes only the first images by name (validation measures the first 12)."""
    rng = np.random.default_rng(seed)
    files = image_files(source)[:count]
    entries: dict[str, bytes] = {}
    for i, path in enumerate(files):
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        h, w = a.shape[:2]
        ch, cw = min(side, h), min(side, w)  # a narrower image gives a narrower crop, not none
        if centre:  # the same pixels as `Trainer.validate`'s centre crop of the full image
            y, x = (h - ch) // 2, (w - cw) // 2
        else:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a[y:y + ch, x:x + cw])).save(buf, "WEBP", lossless=True, quality=100, method=4)
        entries[f"img{i:05d}"] = buf.getvalue()
    # Drop crops at random until the file fits: stored, not deflated (WebP is already compressed).
    order = iter(rng.permutation(list(entries)))
    tmp = Path(str(target) + ".tmp.npz")
    while True:
        np.savez(tmp, **{k: np.frombuffer(b, dtype=np.uint8) for k, b in entries.items()})
        size = tmp.stat().st_size
        if size <= max_bytes:
            break
        if len(entries) == 1:
            tmp.unlink()
            raise InputError(f"a pack of one {side}px crop is {size} bytes, over the budget of {max_bytes}")
        excess = size - max_bytes
        while excess > 0 and len(entries) > 1:
            excess -= len(entries.pop(str(next(order))))
    tmp.replace(target)
    return {"images": len(entries), "bytes": size, "side": side}


class PatchSampler:
    """Random crops with random horizontal flips, from a seeded generator whose state is saved."""

    def __init__(self, images: list[np.ndarray], patch: int, batch: int, seed: int):
        self.images = images
        self.patch = patch
        self.batch = batch
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def sample(self) -> np.ndarray:
        out = np.empty((self.batch, 3, self.patch, self.patch), dtype=np.uint8)
        for b in range(self.batch):
            im = self.images[int(self.rng.integers(len(self.images)))]
            h, w = im.shape[:2]
            y = int(self.rng.integers(0, h - self.patch + 1))
            x = int(self.rng.integers(0, w - self.patch + 1))
            crop = im[y:y + self.patch, x:x + self.patch]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[b] = crop.transpose(2, 0, 1)
        return out
