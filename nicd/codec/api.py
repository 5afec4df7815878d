"""The codec library's front door: images in, verified `.nicd` bytes out, and back.

    codec = load_codec("default")
    result = codec.encode(load_image("photo.png"), quality=6)
    image = codec.decode(result.data)

Images are cut into tiles of at most `TILE_SIZE`² pixels, coded independently, so memory stays
bounded for any image size. Tiles of equal shape from many images run through the analysis
transform as one device batch. Every encode decodes what it wrote (container parse, entropy decode,
symbol checksum, synthesis on the CPU) before it reports success, and measures the figures on that
decoded image.
"""

from __future__ import annotations

import math
import threading
import zlib
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from ..errors import FormatError, InputError, NicdError, VerificationError
from . import container, metrics, refine, registry, rounding
from .frozen import FrozenModel, latent_shape
from .imageio import DEFAULT_MAX_PIXELS, SUPPORTED_MODES, PreparedImage, restore_image
from .models import QUALITIES

TILE_SIZE = 1024
ANALYSIS_BATCH_PIXELS = 1024 * 1024  # float64 analysis: ~1 GB of activations per megapixel


@dataclass
class EncodeResult:
    data: bytes
    width: int
    height: int
    bpp: float
    psnr: float
    ssim: float
    ms_ssim: float | None
    quality: int
    model_id: str
    encode_seconds: float
    decode_seconds: float
    estimated_bits: float
    target_met: bool = True
    tried: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("data", "tried")}
        d["bytes"] = len(self.data)
        return d


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", code="E_DEVICE")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda", code="E_DEVICE")
    return torch.device(device)


def _tiles(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    return [(y, x, min(size, height - y), min(size, width - x)) for y in range(0, height, size) for x in range(0, width, size)]


def _pad(tile: np.ndarray, stride: int) -> np.ndarray:
    h, w = tile.shape[:2]
    ph, pw = math.ceil(h / stride) * stride - h, math.ceil(w / stride) * stride - w
    # Edge replication: a flat border costs fewer bits than zeros and leaves no dark seam.
    return np.pad(tile, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else tile


class Codec:
    """A loaded model bound to a device. Thread-safe for encode/decode calls (one at a time)."""

    def __init__(self, info: registry.ModelInfo, frozen: FrozenModel, device: torch.device):
        self.info = info
        self.frozen = frozen
        self.device = device
        self.model_id = info.model_id
        self.model_hash = bytes.fromhex(info.sha256)
        self._lock = threading.Lock()

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, image: PreparedImage, *, quality: int | None = None, target_ssim: float | None = None,
               target_psnr: float | None = None, refine_steps: int = 0) -> EncodeResult:
        result = self.encode_batch([image], quality=quality, target_ssim=target_ssim, target_psnr=target_psnr,
                                   refine_steps=refine_steps)[0]
        if isinstance(result, NicdError):
            raise result
        return result

    def encode_batch(self, images: list[PreparedImage], *, quality: int | None = None, target_ssim: float | None = None,
                     target_psnr: float | None = None, refine_steps: int = 0) -> list[EncodeResult | NicdError]:
        """Encode many images; tiles of equal shape share device batches. Errors are returned per image.

        `refine_steps`: steps of encoder-side latent refinement (`nicd.codec.refine`) per tile and
        quality tried; 0 codes the analysis transform's latents as they are. Costs ~0.3 s a step per
        0.4 MP on two CPU cores; the decoder is the same either way."""
        choose = _target_rule(quality, target_ssim, target_psnr)
        check_refine_steps(refine_steps)
        with self._lock, torch.no_grad():
            started = time.perf_counter()
            try:
                latents = self._analyse_all(images)
            except (RuntimeError, MemoryError):
                # The device batch did not fit: analyse image by image, so one image fails alone.
                latents = [self._analyse_alone(image) for image in images]
            shared = (time.perf_counter() - started) / max(len(images), 1)
            out: list[EncodeResult | NicdError] = []
            for image, tiles in zip(images, latents):
                if isinstance(tiles, NicdError):
                    out.append(tiles)
                    continue
                try:
                    out.append(self._encode_one(image, tiles, choose, shared, refine_steps))
                except NicdError as err:
                    out.append(err)
            return out

    def encode_levels(self, image: PreparedImage, qualities: list[int], refine_steps: int = 0) -> list[EncodeResult]:
        """One image at several quality levels, sharing one analysis transform (gain units apply after
        it). Each result's encode time still counts the whole analysis, as a single encode would."""
        check_refine_steps(refine_steps)
        with self._lock, torch.no_grad():
            started = time.perf_counter()
            tiles = self._analyse_all([image])[0]
            analysis = time.perf_counter() - started
            return [self._encode_one(image, tiles, _target_rule(q, None, None), analysis, refine_steps) for q in qualities]

    def _analyse_alone(self, image: PreparedImage):
        try:
            return self._analyse_all([image])[0]
        except (RuntimeError, MemoryError) as exc:
            return NicdError(f"the analysis transform failed on this image: {str(exc).splitlines()[0][:200]}",
                             code="E_RESOURCES")

    def _analyse_all(self, images: list[PreparedImage]) -> list[list[np.ndarray]]:
        stride = self.frozen.stride
        jobs = []  # (image index, tile index, padded array)
        for i, im in enumerate(images):
            for j, (y, x, h, w) in enumerate(_tiles(im.height, im.width, TILE_SIZE)):
                jobs.append((i, j, _pad(im.rgb[y : y + h, x : x + w], stride)))
        result: list[list] = [[None] * len(_tiles(im.height, im.width, TILE_SIZE)) for im in images]
        by_shape: dict[tuple, list] = {}
        for job in jobs:
            by_shape.setdefault(job[2].shape, []).append(job)
        for shape, group in by_shape.items():
            per_batch = max(1, ANALYSIS_BATCH_PIXELS // (shape[0] * shape[1]))
            for k in range(0, len(group), per_batch):
                chunk = group[k : k + per_batch]
                x = torch.from_numpy(np.stack([c[2] for c in chunk]).transpose(0, 3, 1, 2).copy())
                y = self.frozen.analyse(x.to(self.device).double() / 255.0)
                for (i, j, _), yi in zip(chunk, y):
                    result[i][j] = yi
        return result

    def _encode_at(self, image: PreparedImage, tiles_y: list[np.ndarray], q: int, refine_steps: int) -> tuple[bytes, float]:
        coded = []
        for (y0, x0, h, w), y in zip(_tiles(image.height, image.width, TILE_SIZE), tiles_y):
            z = None
            if refine_steps:
                pixels = image.rgb[y0 : y0 + h, x0 : x0 + w]
                y, z = refine.refine(self.frozen, pixels, y, q, refine_steps, self.info.config, self.device)
            # A refined latent (z set) lies on its symbols already: coded as the search left it.
            weight = rounding.weight_for(self.info.config, q) if z is None else None
            coded.append(self.frozen.code(y, q, z, rounding_weight=weight))
        c = container.Container(
            model_id=self.model_id,
            model_hash=self.model_hash,
            quality=q,
            width=image.width,
            height=image.height,
            mode=image.mode,
            tile_size=TILE_SIZE,
            tiles=tuple(container.Tile(streams=t.streams, symbol_crc=t.symbol_crc) for t in coded),
            metadata=tuple(sorted(image.side.items())),
        )
        return container.serialize(c), sum(t.estimated_bits for t in coded)

    def _encode_one(self, image: PreparedImage, tiles_y: list[np.ndarray], choose, shared_seconds: float,
                    refine_steps: int) -> EncodeResult:
        cache: dict[int, EncodeResult] = {}

        def attempt(q: int) -> EncodeResult:
            if q not in cache:
                t0 = time.perf_counter()
                data, bits = self._encode_at(image, tiles_y, q, refine_steps)
                t1 = time.perf_counter()
                decoded = self._decode_rgb(data, torch.device("cpu"), expect=(self.model_hash, q))
                t2 = time.perf_counter()
                figures = metrics.quality(image.rgb, decoded)
                cache[q] = EncodeResult(
                    data=data, width=image.width, height=image.height, bpp=8 * len(data) / (image.width * image.height),
                    psnr=figures["psnr"], ssim=figures["ssim"], ms_ssim=figures["ms_ssim"], quality=q,
                    model_id=self.model_id, encode_seconds=shared_seconds + t1 - t0, decode_seconds=t2 - t1,
                    estimated_bits=bits,
                )
            return cache[q]

        result = choose(attempt)
        result.tried = sorted(cache)
        return result

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, data: bytes) -> Image.Image:
        """A .nicd file's bytes → the image in its original size and mode, with ICC/EXIF in `.info`."""
        c = _parse(data)
        rgb = self._decode_rgb(data, self.device, parsed=c)
        try:
            return restore_image(rgb, c.mode, dict(c.metadata))
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError, zlib.error) as exc:
            raise FormatError(f"side data of the file is malformed ({type(exc).__name__})", code="E_FORMAT_SIDE") from None

    def decode_rgb(self, data: bytes) -> np.ndarray:
        return self._decode_rgb(data, self.device)

    def _decode_rgb(self, data: bytes, device: torch.device, parsed=None, expect=None) -> np.ndarray:
        c = parsed or _parse(data)
        frozen = self.frozen
        if c.model_hash != self.model_hash:
            _, frozen = registry.find_by_hash(c.model_hash)
        if expect and (c.model_hash, c.quality) != expect:
            raise VerificationError("the written header does not say what was encoded", code="E_VERIFY_HEADER")
        out = np.empty((c.height, c.width, 3), dtype=np.uint8)
        boxes = _tiles(c.height, c.width, c.tile_size)
        with torch.no_grad():
            for (y, x, h, w), tile in zip(boxes, c.tiles):
                y_hat = frozen.decode(tile.streams, latent_shape(h, w, frozen.stride), c.quality, tile.symbol_crc)
                x_hat = frozen.synthesize(y_hat[None], [c.quality], device)[0]
                pixels = (x_hat[:, :h, :w] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                out[y : y + h, x : x + w] = pixels
        return out


def _parse(data: bytes) -> container.Container:
    """Parse and check what this decoder supports before anything is allocated for the pixels."""
    c = container.parse(data, max_pixels=DEFAULT_MAX_PIXELS)
    if c.tile_size != TILE_SIZE:
        raise FormatError(f"tile size {c.tile_size} is not the {TILE_SIZE} of format version 1 models", code="E_FORMAT_FIELD")
    if c.mode not in SUPPORTED_MODES:
        raise FormatError(f"image mode {c.mode!r} is not one nicd writes", code="E_FORMAT_FIELD")
    return c


MAX_REFINE_STEPS = 1000


def check_refine_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_REFINE_STEPS:
        raise InputError(f"refine steps must be a whole number 0..{MAX_REFINE_STEPS}, not {steps!r}", code="E_ARGS")


def _target_rule(quality, target_ssim, target_psnr):
    """A function choosing the result from `attempt(q)`: a fixed quality, or the smallest quality
    (hence the smallest bitstream) whose decoded image reaches the target, by binary search."""
    given = [v is not None for v in (quality, target_ssim, target_psnr)]
    if sum(given) > 1:
        raise InputError("give one of quality, target SSIM or target PSNR", code="E_ARGS")
    if target_ssim is None and target_psnr is None:
        q = 6 if quality is None else int(quality)
        if not 1 <= q <= QUALITIES:
            raise InputError(f"quality must be 1..{QUALITIES}, not {quality}", code="E_ARGS")
        return lambda attempt: attempt(q)
    if target_ssim is not None and not 0 < target_ssim <= 1:
        raise InputError(f"target SSIM must be in (0, 1], not {target_ssim}", code="E_ARGS")
    if target_psnr is not None and not 0 < target_psnr < 100:
        raise InputError(f"target PSNR must be in (0, 100) dB, not {target_psnr}", code="E_ARGS")

    def reaches(r: EncodeResult) -> bool:
        return r.ssim >= target_ssim if target_ssim is not None else r.psnr >= target_psnr

    def choose(attempt):
        lo, hi, best = 1, QUALITIES, None
        while lo <= hi:
            mid = (lo + hi) // 2
            r = attempt(mid)
            if reaches(r):
                best, hi = r, mid - 1
            else:
                lo = mid + 1
        if best is None:
            best = attempt(QUALITIES)
            best.target_met = False
        return best

    return choose


@lru_cache(maxsize=8)
def load_codec(model: str = "default", device: str = "auto") -> Codec:
    info, frozen = registry.load(model)
    return Codec(info, frozen, pick_device(device))


def decoder_for(data: bytes, device: str = "auto", also: Iterable[Path] = ()) -> Codec:
    """The codec of the model a bitstream names in its header (found by its full hash among the installed
    models, then in the folders `also`)."""
    header = _parse(data)
    info, frozen = registry.find_by_hash(header.model_hash, also=also)
    return Codec(info, frozen, pick_device(device))


def codec_from_bytes(model_id: str, model_file: bytes, device: str = "auto") -> Codec:
    """The codec of a model that is not installed, from its file's bytes (as an archive keeps them)."""
    info, frozen = registry.load_bytes(model_id, model_file)
    return Codec(info, frozen, pick_device(device))
