"""Training data: photographs held in memory as uint8 arrays, random crops and flips.

A pack (`pack_folder`) is one `.npz` of centre-preserving downscaled or cropped images, small enough
to carry to a lent GPU machine.
"""

from __future__ import annotations

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
            images = [pack[k] for k in sorted(pack.files)]
    else:
        images = []
        for path in image_files(source):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
    images = [im for im in images if min(im.shape[:2]) >= min_side]
    if not images:
        raise InputError(f"no image in {source} is at least {min_side} px on its short side")
    return images


def pack_folder(source: Path, target: Path, max_bytes: int = 50_000_000, side: int = 384, seed: int = 0) -> dict:
    """Write a compact training set: from each image, random side×side crops until the budget is spent.

    Crops are stored losslessly (npz, deflate); the budget counts the compressed file."""
    rng = np.random.default_rng(seed)
    files = image_files(source)
    arrays: dict[str, np.ndarray] = {}
    for i, path in enumerate(files):
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        h, w = a.shape[:2]
        if min(h, w) < side:
            continue
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        arrays[f"img{i:05d}"] = np.ascontiguousarray(a[y:y + side, x:x + side])
    # Drop crops until the compressed file fits the budget.
    tmp = Path(str(target) + ".tmp.npz")
    while True:
        np.savez_compressed(tmp, **arrays)
        size = tmp.stat().st_size
        if size <= max_bytes or len(arrays) <= 1:
            break
        keep = int(len(arrays) * max_bytes / size * 0.97)
        arrays = dict(list(arrays.items())[: max(1, keep)])
    tmp.replace(target)
    return {"images": len(arrays), "bytes": size, "side": side}


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
