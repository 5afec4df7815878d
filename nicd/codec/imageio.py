"""Turn any image Pillow opens into the H×W×3 uint8 RGB array the codec codes, and back.

`load_image` returns a `PreparedImage`: the RGB array plus the side data (`side`, a dict of bytes
stored as metadata entries in the .nicd file) needed to give back the original's size and Pillow
mode exactly. `restore_image` rebuilds a Pillow image of the original mode from a decoded RGB array
and that side data; `save_image` writes an image atomically. This module never imports torch.

Side data keys (all values are bytes):

- ``alpha``: an 8-bit plane (alpha of RGBA/LA/PA/RGBa/La, the fourth band of RGBX when it is not all
  255, the per-pixel palette alpha of a P image with transparency), zlib level 9, H*W raw bytes
  in raster order, no header: the size comes from the decoded array given to `restore_image`.
- ``palette``: the palette of a P/PA image, raw bytes in the palette's own mode (``RGB`` or ``RGBA``,
  named in ``info``).
- ``icc``: ``im.info["icc_profile"]``; ``exif``: the EXIF bytes exactly as Pillow read them
  (``im.info["exif"]``, else ``im.getexif().tobytes()`` when not empty); ``xmp``: the XMP packet.
- ``info``: a small UTF-8 JSON object, present only when needed: ``bits`` and ``rawmode`` (the source
  sample depth when it is not 8, e.g. 16-bit PNGs), ``frames`` (frame count of a multi-frame file),
  ``palette_mode``, ``transparency`` (``int``, ``[r, g, b]`` or ``{"bytes": hex}``), ``gray``
  (``{"offset": o, "scale": s}`` for I/F images), ``dpi``.

Rules per mode (``mode`` is the mode Pillow reports for the first frame):

- ``RGB``: coded as is. ``RGBX``: RGB coded; X kept in ``alpha`` unless it is all 255.
  ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's ``convert("RGB")`` is coded; restore converts the
  decoded RGB back with ``convert(mode)`` (so a CMYK image comes back CMYK with Pillow's naive
  RGB→CMYK, K = 0; the ICC profile is kept).
- Grayscale kinds (``L``, ``1``, ``I;16``/``I;16L``/``I;16B``/``I;16N``, ``I``, ``F``): the gray
  plane is replicated to 3 channels; restore takes the mean of the decoded channels, rounded.
  ``1`` restores by thresholding at 128. **16-bit content is coded at 8-bit precision**: ``I;16*``
  codes ``round(v / 257)`` and restores ``g * 257`` (error at most 128 of 65535). ``I`` and ``F`` map
  their value range affinely onto 0..255 (``v = g * scale + offset``, recorded in ``info["gray"]``):
  for I, scale 1 when the values lie in 0..255 (exact), 257 in 0..65535, else the min..max range;
  for F, scale 1/255 when the values lie in 0..1, else the min..max range (NaN codes as the minimum).
- 16-bit colour PNGs: Pillow 13 opens 16-bit RGB as ``RGB`` and 16-bit RGBA as ``RGBA`` keeping only
  the high byte of each sample (``v >> 8``), and 16-bit gray+alpha (LA) as ``RGBA``; 16-bit gray
  opens as ``I;16`` with the full values. Pillow has no 16-bit RGB mode, so such images are coded and
  restored at 8 bits in the mode Pillow gave; ``info`` records ``bits: 16`` and the decoder
  ``rawmode`` (e.g. ``RGB;16B``) so a writer able to do more may use it.
- Alpha modes (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``): the alpha plane is stored losslessly in
  ``alpha`` and comes back byte for byte. The colour part is coded as is; the premultiplied modes
  ``RGBa``/``La`` are *not* un-premultiplied: their stored (premultiplied) values are coded like
  plain RGB/L, which keeps a perfect decode exact.
- ``P``: the RGB expansion is coded; the palette is stored; restore maps every decoded pixel onto the
  ORIGINAL palette (nearest colour by Pillow's quantizer, and exactly the palette entry whenever the
  decoded colour equals one, so a perfect decode gives back identical indices). Transparency
  (``info["transparency"]``) is kept, and when palette entries differ in alpha the per-pixel alpha
  is stored in ``alpha`` and each pixel is only mapped onto entries of its own alpha, so
  transparency comes back exactly even after lossy coding. ``PA``: P part as above, alpha band in
  ``alpha``.
- Multi-frame images (animated GIF/PNG/WebP, multi-page TIFF, MPO): **the first frame only is
  coded**; ``info["frames"]`` records the frame count. The restored image has one frame.
- EXIF orientation is not applied: pixels are never rotated; EXIF bytes travel as they are, so a
  restored and saved file keeps the same Orientation tag. (Exception made by Pillow, not by nicd:
  Pillow 13 applies a TIFF's own Orientation tag while decoding and drops the tag, so TIFF pixels
  arrive upright, the size is the rotated one, and no orientation travels. For TIFF sources the
  "EXIF" kept is the descriptive IFD0 tags plus the Exif/GPS sub-IFDs, not the image-structure tags.)

Errors are `nicd.errors.InputError` with a stable ``code``: ``E_NOT_FOUND``,
``E_NOT_REGULAR_FILE`` (directory, FIFO, device: checked with ``os.stat`` and opened with
``O_NONBLOCK`` so a FIFO never blocks), ``E_PERMISSION``, ``E_EMPTY``, ``E_NOT_IMAGE``,
``E_TRUNCATED`` (truncated or corrupt image data; Pillow's ``LOAD_TRUNCATED_IMAGES`` is kept False),
``E_TOO_LARGE`` (more than ``max_pixels`` pixels, checked from the header before any pixel is
decoded, or a Pillow decompression bomb), ``E_UNSUPPORTED_MODE``. `restore_image` raises
`nicd.errors.FormatError` for malformed side data. `save_image` raises ``InputError`` with
``E_UNSUPPORTED_FORMAT`` for an unknown output format and `nicd.errors.StorageError` when writing
fails.

Memory: pixels are converted in horizontal bands (about 8 MiB each), so loading a large image
needs the decoded Pillow image, the output array and one band; there are no whole-image float
copies and no Python loops over pixels.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import stat
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from .. import faults
from ..errors import FormatError, InputError, NicdError
from ..fsutil import TEMP_PREFIX, error_reason, fsync_dir, write_error

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PreparedImage",
    "SUPPORTED_MODES",
    "load_image",
    "restore_image",
    "save_image",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000

_RGB_MODES = frozenset({"RGB"})
_CONVERTED_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
_FOUR_BAND_MODES = frozenset({"RGBA", "RGBa", "RGBX"})
_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_GRAY_MODES = frozenset({"L", "1", "I", "F"}) | _GRAY16_MODES
_GRAY_ALPHA_MODES = frozenset({"LA", "La"})
_PALETTE_MODES = frozenset({"P", "PA"})
SUPPORTED_MODES = frozenset(
    _RGB_MODES | _CONVERTED_MODES | _FOUR_BAND_MODES | _GRAY_MODES | _GRAY_ALPHA_MODES | _PALETTE_MODES
)

# Pixels are converted in horizontal bands of about this many bytes (tests lower it).
_BAND_BYTES = 8 << 20

_GRAY16_DTYPES = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}


@dataclass
class PreparedImage:
    """What the codec codes (``rgb``) plus what it takes to give back the original exactly."""

    rgb: np.ndarray  # H×W×3 uint8, C-contiguous
    mode: str  # the original Pillow mode
    side: dict[str, bytes] = field(default_factory=dict)  # keys among alpha, palette, icc, exif, xmp, info
    format: str | None = None  # Pillow's name of the source format, None for in-memory images

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def info(self) -> dict[str, Any]:
        """``side["info"]`` parsed (an empty dict when absent)."""
        return _parse_info(self.side)


# --------------------------------------------------------------------------------------------- load


def load_image(
    source: str | os.PathLike | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreparedImage:
    """Open `source` (a path, the bytes of an image file, or a Pillow image) and prepare it for coding.

    Only the first frame of a multi-frame file is used. Raises `InputError` (see the module doc).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned it on: truncated files would pass silently
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; nicd turns it back off")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    if isinstance(source, Image.Image):
        return _prepare(source, max_pixels, None, getattr(source, "format", None))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("the image data is empty (0 bytes)", code="E_EMPTY")
        with io.BytesIO(data) as fp:
            im = _open(fp, None)
            with im:
                return _prepare(im, max_pixels, None, im.format)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image() takes a path, bytes or a PIL image, not {type(source).__name__}")
    path = os.fsdecode(os.fspath(source))
    with _open_regular_file(path) as fp:
        im = _open(fp, path)
        with im:
            return _prepare(im, max_pixels, path, im.format)


def _open_regular_file(path: str) -> io.BufferedReader:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"no such file: {path}", code="E_NOT_FOUND", path=path) from None
    except PermissionError:
        raise InputError(f"permission denied: {path}", code="E_PERMISSION", path=path) from None
    except (OSError, ValueError) as err:
        raise InputError(f"cannot access {path}: {error_reason(err)}", code="E_NOT_FOUND", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"not a regular file ({_file_kind(st.st_mode)}): {path}", code="E_NOT_REGULAR_FILE", path=path)
    if st.st_size == 0:
        raise InputError(f"the file is empty (0 bytes): {path}", code="E_EMPTY", path=path)
    # O_NONBLOCK: if the path was swapped for a FIFO after the stat, opening it must not hang.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", code="E_NOT_FOUND", path=path) from None
    except PermissionError:
        raise InputError(f"permission denied: {path}", code="E_PERMISSION", path=path) from None
    except OSError as err:
        raise InputError(f"cannot open {path}: {error_reason(err)}", code="E_NOT_REGULAR_FILE", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"not a regular file ({_file_kind(st.st_mode)}): {path}",
                code="E_NOT_REGULAR_FILE", path=path,
            )
        if st.st_size == 0:
            raise InputError(f"the file is empty (0 bytes): {path}", code="E_EMPTY", path=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(st_mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(st_mode):
            return name
    return "not a regular file"


def _open(fp: Any, path: str | None) -> Image.Image:
    what = path or "the image data"
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as err:
        raise InputError(
            f"image too large (decompression bomb check) in {what}: {error_reason(err)}",
            code="E_TOO_LARGE", path=path,
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"not an image Pillow can read: {what}", code="E_NOT_IMAGE", path=path) from None
    except PermissionError:
        raise InputError(f"permission denied: {what}", code="E_PERMISSION", path=path) from None
    except MemoryError:
        raise InputError(f"image too large to open: {what}", code="E_TOO_LARGE", path=path) from None
    except Exception as err:  # noqa: BLE001 - plugins raise anything on corrupt headers
        raise InputError(f"corrupt image header in {what}: {error_reason(err)}", code="E_TRUNCATED", path=path) from None


def _prepare(im: Image.Image, max_pixels: int, path: str | None, fmt: str | None) -> PreparedImage:
    what = path or "the image"
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has no pixels ({w}×{h}): {what}", code="E_NOT_IMAGE", path=path)
    if w * h > max_pixels:
        raise InputError(f"image too large: {w}×{h} = {w * h} pixels exceeds the limit of {max_pixels}: {what}",
                         code="E_TOO_LARGE", path=path)
    if im.mode not in SUPPORTED_MODES:
        raise InputError(f"unsupported image mode {im.mode!r}: {what}", code="E_UNSUPPORTED_MODE", path=path)

    info: dict[str, Any] = {}
    rawmode = _tile_rawmode(im)
    if rawmode:
        bits = _rawmode_bits(rawmode)
        if bits is not None and bits != 8:
            info["bits"] = bits
            info["rawmode"] = rawmode
    try:
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:
            im.seek(0)
    except Exception as err:  # noqa: BLE001 - a broken later frame: we only code the first
        log.debug("cannot count frames of %s: %s", what, err)
        frames = 1
    if frames > 1:
        info["frames"] = frames

    try:
        im.load()
    except Image.DecompressionBombError as err:
        raise InputError(
            f"image too large (decompression bomb check) in {what}: {error_reason(err)}",
            code="E_TOO_LARGE", path=path,
        ) from None
    except MemoryError:
        raise InputError(f"not enough memory to decode {what}", code="E_TOO_LARGE", path=path) from None
    except PermissionError:
        raise InputError(f"permission denied: {what}", code="E_PERMISSION", path=path) from None
    except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, ValueError, zlib.error, EOFError, struct.error...
        raise InputError(
            f"truncated or corrupt image data in {what}: {error_reason(err)}",
            code="E_TRUNCATED", path=path,
        ) from None
    if im.size != (w, h):  # a few plugins pick their final size while loading (ICNS, ICO)
        w, h = im.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise InputError(f"image too large or empty after decoding: {w}×{h} pixels: {what}",
                             code="E_TOO_LARGE", path=path)
    if im.mode not in SUPPORTED_MODES:
        raise InputError(f"unsupported image mode {im.mode!r}: {what}", code="E_UNSUPPORTED_MODE", path=path)

    side: dict[str, bytes] = {}
    try:
        rgb = _extract(im, side, info)
    except MemoryError:
        raise InputError(f"not enough memory to prepare {what}", code="E_TOO_LARGE", path=path) from None
    except NicdError:
        raise
    except Exception as err:  # noqa: BLE001 - conversion errors on odd data
        raise InputError(
            f"cannot convert {what} (mode {im.mode}): {error_reason(err)}",
            code="E_UNSUPPORTED_MODE", path=path,
        ) from None

    _collect_metadata(im, fmt, side, info)
    if info:
        side["info"] = json.dumps(info, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return PreparedImage(rgb=rgb, mode=im.mode, side=side, format=fmt)


def _tile_rawmode(im: Image.Image) -> str | None:
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, tuple):
            args = args[0] if args else None
        if isinstance(args, str):
            return args
    return None


def _rawmode_bits(rawmode: str) -> int | None:
    m = re.search(r";(\d+)", rawmode)
    return int(m.group(1)) if m else None


def _bands(height: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    rows = max(1, _BAND_BYTES // max(1, row_bytes))
    for y0 in range(0, height, rows):
        yield y0, min(height, y0 + rows)


def _band(im: Image.Image, y0: int, y1: int) -> np.ndarray:
    band = im if (y0 == 0 and y1 == im.height) else im.crop((0, y0, im.width, y1))
    return np.asarray(band)


def _extract(im: Image.Image, side: dict[str, bytes], info: dict[str, Any]) -> np.ndarray:
    mode = im.mode
    w, h = im.size
    rgb = np.empty((h, w, 3), np.uint8)
    row_bytes = w * 4
    plane: np.ndarray | None = None

    if mode == "RGB":
        for y0, y1 in _bands(h, row_bytes):
            rgb[y0:y1] = _band(im, y0, y1)
    elif mode in _FOUR_BAND_MODES:
        plane = np.empty((h, w), np.uint8)
        for y0, y1 in _bands(h, row_bytes):
            a = _band(im, y0, y1)
            rgb[y0:y1] = a[..., :3]
            plane[y0:y1] = a[..., 3]
        if mode == "RGBX" and bool((plane == 255).all()):
            plane = None
    elif mode in _CONVERTED_MODES:
        for y0, y1 in _bands(h, row_bytes):
            band = im.crop((0, y0, w, y1)) if (y0, y1) != (0, h) else im
            rgb[y0:y1] = np.asarray(band.convert("RGB"))
    elif mode in _GRAY_MODES or mode in _GRAY_ALPHA_MODES:
        if mode in _GRAY_ALPHA_MODES:
            plane = np.empty((h, w), np.uint8)
        to_gray = _gray_encoder(im, info)
        for y0, y1 in _bands(h, row_bytes):
            a = _band(im, y0, y1)
            if plane is not None:
                plane[y0:y1] = a[..., 1]
                a = a[..., 0]
            rgb[y0:y1] = to_gray(a)[..., None]
    elif mode in _PALETTE_MODES:
        pal_mode, pal_bytes = _get_palette(im)
        side["palette"] = pal_bytes
        info["palette_mode"] = pal_mode
        colors, entry_alpha = _palette_arrays(pal_bytes, pal_mode, im.info.get("transparency"))
        lut = np.zeros((256, 3), np.uint8)
        lut[: min(256, len(colors))] = colors[:256]
        alpha_lut = np.full(256, 255, np.uint8)
        alpha_lut[: min(256, len(entry_alpha))] = entry_alpha[:256]
        need_plane = mode == "PA" or len(np.unique(entry_alpha)) > 1
        if need_plane:
            plane = np.empty((h, w), np.uint8)
        for y0, y1 in _bands(h, row_bytes):
            a = _band(im, y0, y1)
            if mode == "PA":
                plane[y0:y1] = a[..., 1]
                a = a[..., 0]
            elif plane is not None:
                plane[y0:y1] = alpha_lut[a]
            rgb[y0:y1] = lut[a]
    else:  # pragma: no cover - guarded by SUPPORTED_MODES
        raise InputError(f"unsupported image mode {mode!r}", code="E_UNSUPPORTED_MODE")

    if "transparency" in im.info:
        encoded = _encode_transparency(im.info["transparency"])
        if encoded is not None:
            info["transparency"] = encoded
    if plane is not None:
        side["alpha"] = zlib.compress(memoryview(np.ascontiguousarray(plane)).cast("B"), 9)
    return rgb


def _gray_encoder(im: Image.Image, info: dict[str, Any]):
    """A function band -> uint8 gray band for the grayscale modes (records the I/F mapping in info)."""
    mode = im.mode
    if mode == "1":
        return lambda a: a.astype(np.uint8) * np.uint8(255)
    if mode in ("L", "LA", "La"):
        return lambda a: a
    if mode in _GRAY16_MODES:
        return lambda a: ((a.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    offset, scale = _gray_mapping(im)
    info["gray"] = {"offset": offset, "scale": scale}

    def encode(a: np.ndarray) -> np.ndarray:
        v = a.astype(np.float64)
        if mode == "F":
            v = np.nan_to_num(v, nan=offset, posinf=offset + 255 * scale, neginf=offset)
        v -= offset
        v /= scale
        np.rint(v, out=v)
        np.clip(v, 0, 255, out=v)
        return v.astype(np.uint8)

    return encode


def _gray_mapping(im: Image.Image) -> tuple[float, float]:
    """(offset, scale) so that v ≈ g * scale + offset maps an I or F image onto g in 0..255."""
    if im.mode == "I":
        lo, hi = im.getextrema()
    else:
        lo, hi = np.inf, -np.inf
        for y0, y1 in _bands(im.height, im.width * 4):
            a = _band(im, y0, y1)
            finite = a[np.isfinite(a)]
            if finite.size:
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        if lo > hi:  # nothing finite
            return 0.0, 1.0
    lo, hi = float(lo), float(hi)
    if im.mode == "F":  # normalised floats keep 0..1 exactly; anything else gets its own min..max
        if lo >= 0 and hi <= 1:
            return 0.0, 1.0 / 255.0
        return lo, ((hi - lo) / 255.0) or 1.0
    if lo >= 0 and hi <= 255:
        return 0.0, 1.0
    if lo >= 0 and hi <= 65535:
        return 0.0, 257.0
    return lo, ((hi - lo) / 255.0) or 1.0


def _get_palette(im: Image.Image) -> tuple[str, bytes]:
    pal_mode = getattr(im.palette, "mode", None) or "RGB"
    if pal_mode not in ("RGB", "RGBA"):
        pal_mode = "RGB"
    data = im.getpalette(pal_mode)
    if not data:
        data = [0, 0, 0] if pal_mode == "RGB" else [0, 0, 0, 255]
    return pal_mode, bytes(data)


def _palette_arrays(pal_bytes: bytes, pal_mode: str, transparency: Any) -> tuple[np.ndarray, np.ndarray]:
    """(colors n×3 uint8, alpha n uint8) of a palette, transparency folded into the alpha."""
    ch = len(pal_mode)
    pal = np.frombuffer(pal_bytes, np.uint8).reshape(-1, ch)
    colors = np.ascontiguousarray(pal[:, :3])
    alpha = pal[:, 3].copy() if ch == 4 else np.full(len(pal), 255, np.uint8)
    if isinstance(transparency, int) and not isinstance(transparency, bool):
        if 0 <= transparency < len(alpha):
            alpha[transparency] = 0
    elif isinstance(transparency, (bytes, bytearray)):
        t = np.frombuffer(bytes(transparency[: len(alpha)]), np.uint8)
        alpha[: len(t)] = t
    return colors, alpha


def _encode_transparency(t: Any) -> Any:
    if isinstance(t, bool):
        return None
    if isinstance(t, int):
        return t
    if isinstance(t, (bytes, bytearray)):
        return {"bytes": bytes(t).hex()}
    if isinstance(t, (tuple, list)) and all(isinstance(v, int) for v in t):
        return list(t)
    return None


def _decode_transparency(t: Any) -> Any:
    if isinstance(t, bool):
        return None
    if isinstance(t, int):
        return t
    if isinstance(t, dict) and isinstance(t.get("bytes"), str):
        try:
            return bytes.fromhex(t["bytes"])
        except ValueError:
            return None
    if isinstance(t, list) and all(isinstance(v, int) for v in t):
        return tuple(t)
    return None


_TIFF_EXIF_KEEP = (0x010E, 0x010F, 0x0110, 0x0112, 0x0131, 0x0132, 0x013B, 0x8298)  # description .. copyright


def _collect_metadata(im: Image.Image, fmt: str | None, side: dict[str, bytes], info: dict[str, Any]) -> None:
    icc = im.info.get("icc_profile")
    if isinstance(icc, (bytes, bytearray)) and icc:
        side["icc"] = bytes(icc)
    exif = _exif_bytes(im, fmt)
    if exif:
        side["exif"] = exif
    xmp = im.info.get("xmp", im.info.get("XML:com.adobe.xmp"))
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if isinstance(xmp, (bytes, bytearray)) and xmp:
        side["xmp"] = bytes(xmp)
    dpi = im.info.get("dpi")
    if isinstance(dpi, (tuple, list)) and len(dpi) == 2:
        try:
            xy = [float(dpi[0]), float(dpi[1])]
        except (TypeError, ValueError):
            xy = []
        if xy and all(1 < v < 1e6 for v in xy):  # Pillow reports (1, 1) for TIFFs without a resolution
            info["dpi"] = xy


def _exif_bytes(im: Image.Image, fmt: str | None) -> bytes | None:
    exif = im.info.get("exif")
    if isinstance(exif, Image.Exif):
        exif = exif.tobytes()
    if isinstance(exif, (bytes, bytearray)) and exif:
        return bytes(exif)
    try:
        ex = im.getexif()
        if not len(ex):
            return None
        if fmt in ("TIFF", "MIC"):  # a TIFF's "EXIF" is its own IFD0: keep the descriptive tags only
            kept = Image.Exif()
            for tag in _TIFF_EXIF_KEEP:
                if tag in ex:
                    kept[tag] = ex[tag]
            for ifd_tag in (0x8769, 0x8825):  # Exif and GPS sub-IFDs
                if ifd_tag in ex:
                    sub = ex.get_ifd(ifd_tag)
                    if sub:
                        kept[ifd_tag] = dict(sub)
            if not len(kept):
                return None
            ex = kept
        data = ex.tobytes()
    except Exception as err:  # noqa: BLE001 - broken EXIF must not make the image unusable
        log.debug("ignoring unreadable EXIF: %s", err)
        return None
    return data or None


# ------------------------------------------------------------------------------------------ restore


def restore_image(rgb: np.ndarray, mode: str, side: dict[str, bytes]) -> Image.Image:
    """Rebuild an image of the original `mode` from a decoded H×W×3 uint8 array and the side data.

    Alpha comes back exactly, a palette image is mapped back onto its original palette, and the ICC
    profile, EXIF and XMP land in ``.info["icc_profile"]``, ``.info["exif"]``, ``.info["xmp"]``.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("restore_image() needs an H×W×3 uint8 array")
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if h < 1 or w < 1:
        raise ValueError("restore_image() needs a non-empty array")
    if mode not in SUPPORTED_MODES:
        raise InputError(f"unsupported image mode {mode!r}", code="E_UNSUPPORTED_MODE")
    rgb = np.ascontiguousarray(rgb)
    side = dict(side or {})
    info = _parse_info(side)
    size = (w, h)

    plane = _unpack_plane(side["alpha"], w, h) if "alpha" in side else None
    transparency = _decode_transparency(info.get("transparency"))

    if mode == "RGB":
        out = Image.frombuffer("RGB", size, rgb, "raw", "RGB", 0, 1)
    elif mode in _FOUR_BAND_MODES:
        if plane is None and mode != "RGBX":
            raise FormatError(f"side data lacks the alpha plane of a {mode} image")
        arr = np.empty((h, w, 4), np.uint8)
        for y0, y1 in _bands(h, w * 4):
            arr[y0:y1, :, :3] = rgb[y0:y1]
            arr[y0:y1, :, 3] = 255 if plane is None else plane[y0:y1]
        out = Image.frombuffer(mode, size, arr, "raw", mode, 0, 1)
    elif mode in _CONVERTED_MODES:
        out = Image.frombuffer("RGB", size, rgb, "raw", "RGB", 0, 1).convert(mode)
    elif mode in _GRAY_MODES or mode in _GRAY_ALPHA_MODES:
        gray = _gray_from_rgb(rgb)
        out = _gray_image(gray, mode, info, plane)
    elif mode in _PALETTE_MODES:
        out = _palette_image(rgb, mode, side, info, plane, transparency)
    else:  # pragma: no cover - guarded above
        raise InputError(f"unsupported image mode {mode!r}", code="E_UNSUPPORTED_MODE")

    if out.mode != mode:  # pragma: no cover - defensive
        raise FormatError(f"could not rebuild a {mode} image (got {out.mode})")
    if transparency is not None:
        out.info["transparency"] = transparency
    if side.get("icc"):
        out.info["icc_profile"] = bytes(side["icc"])
    if side.get("exif"):
        out.info["exif"] = bytes(side["exif"])
    if side.get("xmp"):
        out.info["xmp"] = bytes(side["xmp"])
    dpi = info.get("dpi")
    if isinstance(dpi, list) and len(dpi) == 2 and all(isinstance(v, (int, float)) for v in dpi):
        out.info["dpi"] = (dpi[0], dpi[1])
    return out


def _parse_info(side: dict[str, bytes]) -> dict[str, Any]:
    raw = side.get("info")
    if not raw:
        return {}
    try:
        info = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError("side data 'info' is not valid JSON") from None
    if not isinstance(info, dict):
        raise FormatError("side data 'info' is not a JSON object")
    return info


def _unpack_plane(data: bytes, w: int, h: int) -> np.ndarray:
    d = zlib.decompressobj()
    try:
        raw = d.decompress(bytes(data), w * h + 1)
    except zlib.error:
        raise FormatError("side data 'alpha' is not a valid zlib stream") from None
    if len(raw) != w * h or d.unconsumed_tail or not d.eof:
        raise FormatError(f"side data 'alpha' does not hold a {w}×{h} plane")
    return np.frombuffer(raw, np.uint8).reshape(h, w)


def _gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Mean of the three channels, rounded (the sum is never x.5 thirds, so (s + 1) // 3 rounds)."""
    h, w = rgb.shape[:2]
    gray = np.empty((h, w), np.uint8)
    for y0, y1 in _bands(h, w * 8):
        s = rgb[y0:y1].sum(axis=2, dtype=np.uint16)
        s += 1
        s //= 3
        gray[y0:y1] = s
    return gray


def _gray_image(gray: np.ndarray, mode: str, info: dict[str, Any], plane: np.ndarray | None) -> Image.Image:
    h, w = gray.shape
    size = (w, h)
    if mode == "L":
        return Image.frombuffer("L", size, gray, "raw", "L", 0, 1)
    if mode == "1":
        packed = np.packbits(gray >= 128, axis=1)
        return Image.frombytes("1", size, packed.tobytes(), "raw", "1")
    if mode in _GRAY_ALPHA_MODES:
        if plane is None:
            raise FormatError(f"side data lacks the alpha plane of a {mode} image")
        arr = np.empty((h, w, 2), np.uint8)
        arr[..., 0] = gray
        arr[..., 1] = plane
        return Image.frombuffer(mode, size, arr, "raw", mode, 0, 1)
    if mode in _GRAY16_MODES:
        v = np.empty((h, w), _GRAY16_DTYPES[mode])
        for y0, y1 in _bands(h, w * 4):
            v[y0:y1] = gray[y0:y1].astype(np.uint16) * np.uint16(257)
        return Image.frombuffer(mode, size, v, "raw", mode, 0, 1)
    # I or F
    mapping = info.get("gray") if isinstance(info.get("gray"), dict) else {}
    offset = float(mapping.get("offset", 0.0))
    scale = float(mapping.get("scale", 1.0))
    dtype = np.int32 if mode == "I" else np.float32
    v = np.empty((h, w), dtype)
    for y0, y1 in _bands(h, w * 8):
        f = gray[y0:y1].astype(np.float64)
        f *= scale
        f += offset
        if mode == "I":
            np.rint(f, out=f)
            np.clip(f, -(2**31), 2**31 - 1, out=f)
        v[y0:y1] = f
    return Image.frombuffer(mode, size, v, "raw", mode, 0, 1)


def _palette_image(rgb: np.ndarray, mode: str, side: dict[str, bytes], info: dict[str, Any],
                   plane: np.ndarray | None, transparency: Any) -> Image.Image:
    pal_bytes = side.get("palette")
    pal_mode = info.get("palette_mode", "RGB")
    if pal_mode not in ("RGB", "RGBA"):
        raise FormatError(f"side data names an unknown palette mode {pal_mode!r}")
    if not pal_bytes or len(pal_bytes) % len(pal_mode) or len(pal_bytes) > 256 * len(pal_mode):
        raise FormatError(f"side data lacks a valid palette for a {mode} image")
    if mode == "PA" and plane is None:
        raise FormatError("side data lacks the alpha plane of a PA image")
    colors, entry_alpha = _palette_arrays(bytes(pal_bytes), pal_mode, transparency)
    h, w = rgb.shape[:2]
    if mode == "P" and plane is not None:
        idx = _map_to_palette_by_alpha(rgb, colors, entry_alpha, plane)
    else:
        idx = _map_to_palette(rgb, colors)
    if mode == "P":
        out = Image.frombytes("P", (w, h), idx.tobytes(), "raw", "P")
    else:
        arr = np.empty((h, w, 2), np.uint8)
        arr[..., 0] = idx
        arr[..., 1] = plane
        out = Image.frombuffer("PA", (w, h), arr, "raw", "PA", 0, 1)
    out.putpalette(bytes(pal_bytes), pal_mode)
    return out


class _PaletteMapper:
    """Maps RGB pixels onto the nearest entry of a palette; an exact colour always gets its own entry.

    The nearest entry comes from Pillow's quantizer, which searches a reduced colour cache and can
    miss an exact match by a little; exact matches are then fixed with a sorted-key lookup.
    """

    def __init__(self, colors: np.ndarray, entries: np.ndarray | None = None):
        n = len(colors)
        padded = np.empty((256, 3), np.uint8)
        padded[:] = colors[0]
        padded[:n] = colors
        self.palette = Image.new("P", (1, 1))
        self.palette.putpalette(padded.tobytes(), "RGB")
        # quantizer index -> output index (the padding copies entry 0)
        ids = np.arange(n) if entries is None else np.asarray(entries)
        self.lut = np.full(256, ids[0], np.uint8)
        self.lut[:n] = ids
        keys = (colors[:, 0].astype(np.uint32) << 16) | (colors[:, 1].astype(np.uint32) << 8) | colors[:, 2]
        order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[order]
        self.sorted_ids = self.lut[order]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 -> (h, w) uint8 palette indices."""
        h, w = rgb.shape[:2]
        rgb = np.ascontiguousarray(rgb)
        src = Image.frombuffer("RGB", (w, h), rgb, "raw", "RGB", 0, 1)
        q = src.quantize(palette=self.palette, dither=Image.Dither.NONE)
        idx = self.lut[np.asarray(q)]
        k = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
        pos = np.searchsorted(self.sorted_keys, k)
        np.minimum(pos, len(self.sorted_keys) - 1, out=pos)
        hit = self.sorted_keys[pos] == k
        idx[hit] = self.sorted_ids[pos[hit]]
        return idx


def _map_to_palette(rgb: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Nearest palette index for each pixel of an (h, w, 3) array, band by band."""
    h, w = rgb.shape[:2]
    mapper = _PaletteMapper(colors)
    idx = np.empty((h, w), np.uint8)
    for y0, y1 in _bands(h, w * 16):
        idx[y0:y1] = mapper(rgb[y0:y1])
    return idx


def _map_to_palette_by_alpha(rgb: np.ndarray, colors: np.ndarray, entry_alpha: np.ndarray,
                             plane: np.ndarray) -> np.ndarray:
    """Like _map_to_palette, but each pixel only maps onto entries whose alpha equals its stored alpha."""
    h, w = rgb.shape[:2]
    idx = np.empty((h, w), np.uint8)
    values = np.unique(entry_alpha)
    mappers: dict[int, _PaletteMapper] = {}

    def mapper_for(a: int) -> _PaletteMapper:
        if a not in mappers:
            entries = np.flatnonzero(entry_alpha == a)
            if not len(entries):  # no entry of that alpha (damaged side data): use the nearest alpha
                nearest = values[np.argmin(np.abs(values.astype(np.int32) - a))]
                entries = np.flatnonzero(entry_alpha == nearest)
            mappers[a] = _PaletteMapper(colors[entries], entries)
        return mappers[a]

    for y0, y1 in _bands(h, w * 16):
        band_plane = plane[y0:y1]
        present = np.flatnonzero(np.bincount(band_plane.reshape(-1), minlength=256))
        if len(present) == 1:
            idx[y0:y1] = mapper_for(int(present[0]))(rgb[y0:y1])
            continue
        band_rgb = rgb[y0:y1]
        band_idx = idx[y0:y1]
        for a in present:
            mask = band_plane == a
            pixels = band_rgb[mask]
            band_idx[mask] = mapper_for(int(a))(pixels.reshape(1, -1, 3))[0]
    return idx


# --------------------------------------------------------------------------------------------- save

_EXT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}

# Modes each common format can hold as they are; others are converted first (see _fit_mode).
_FORMAT_MODES: dict[str, frozenset[str]] = {
    "PNG": frozenset({"1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"}),
    "JPEG": frozenset({"1", "L", "RGB", "CMYK"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
    "TIFF": frozenset({"1", "CMYK", "F", "I", "I;16", "I;16B", "I;16L", "L", "LA", "LAB", "P", "PA", "RGB",
                       "RGBA", "YCbCr"}),
    "BMP": frozenset({"1", "L", "P", "RGB"}),
    "GIF": frozenset({"1", "L", "P", "RGB", "RGBA"}),
}
_JPEG_MAX_MARKER = 65533


def save_image(image: Image.Image, path: str | os.PathLike, *, format: str | None = None, quality: int = 95,
               replace: bool = True) -> None:
    """Write `image` to `path` atomically (temp file ``.nicd-tmp-*`` in the same folder, fsync, rename).

    With ``replace=False`` the file is published with ``link`` (never overwrites): when anything is at
    `path` by then, the temp file is removed and InputError ``E_EXISTS`` is raised.

    The format comes from `format` or the path's extension. PNG is lossless; JPEG uses `quality`
    (4:4:4 chroma for quality >= 90). ICC profile, EXIF, XMP and DPI from ``image.info`` are written
    where the format supports them. The mode is converted only if the format cannot hold it (RGBA to
    JPEG drops alpha; 16-bit gray to an 8-bit format keeps the high 8 bits, rounded).
    """
    path_s = os.fsdecode(os.fspath(path))
    fmt = _output_format(path_s, format)
    allowed = _FORMAT_MODES.get(fmt)
    im = _fit_mode(image, allowed) if allowed is not None else image
    params = _save_params(im, image.info, fmt, quality)

    directory = os.path.dirname(os.path.abspath(path_s))
    try:
        existing = os.stat(path_s)
        perms = stat.S_IMODE(existing.st_mode)
    except OSError:
        perms = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    except OSError as err:
        raise write_error(directory, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                im.save(f, format=fmt, **params)
            except (OSError, ValueError, KeyError):
                fallback = "RGBA" if _has_alpha(image) else "RGB"
                if allowed is not None or im.mode == fallback:
                    raise
                # a format without a mode table refused this mode: retry in RGB / RGBA
                f.seek(0)
                f.truncate()
                im = _to_mode(image, fallback)
                im.save(f, format=fmt, **params)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, perms)
        faults.point("write.temp-synced")
        if replace:
            os.replace(tmp, path_s)
        else:
            _publish_exclusive(tmp, path_s)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, Exception) and not isinstance(err, NicdError):
            raise write_error(path_s, err) from err
        raise
    faults.point("write.renamed")
    fsync_dir(directory)


def _publish_exclusive(tmp: str, path: str) -> None:
    """Give the finished temp file its name only when nothing is there (``link`` never overwrites)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise InputError(f"a file is already there: {path}", code="E_EXISTS", path=path) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        # no hard links on this filesystem: rename when nothing is there (a tiny window remains)
        if os.path.lexists(path):
            raise InputError(f"a file is already there: {path}", code="E_EXISTS", path=path) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _output_format(path: str, format: str | None) -> str:
    if format:
        fmt = format.strip().upper().lstrip(".")
        fmt = _EXT_ALIASES.get(fmt, fmt)
    else:
        ext = os.path.splitext(path)[1].lower()
        fmt = Image.registered_extensions().get(ext, "") if ext else ""
    Image.init()
    if not fmt or fmt not in Image.SAVE:
        what = repr(fmt) if fmt else "(unknown: give format= or a known extension)"
        raise InputError(f"cannot write images of format {what}: {path}", code="E_UNSUPPORTED_FORMAT", path=path)
    return fmt


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022




def _has_alpha(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return True
    return im.mode == "P" and "transparency" in im.info


def _fit_mode(im: Image.Image, allowed: frozenset[str]) -> Image.Image:
    mode = im.mode
    if mode in allowed:
        return im
    alpha = _has_alpha(im)
    if mode in _GRAY_MODES or mode in _GRAY_ALPHA_MODES:
        candidates = ["I;16", "I;16B"] if mode in _GRAY16_MODES or (mode == "I" and _fits_16_bits(im)) else []
        candidates += ["LA", "RGBA", "L", "RGB"] if alpha else ["L", "RGB"]
    elif mode == "P":
        candidates = ["RGBA", "RGB"] if alpha else ["RGB"]
    else:
        candidates = ["RGBA", "RGB"] if alpha else ["RGB"]
    for target in candidates:
        if target in allowed:
            return _to_mode(im, target)
    for target in ("RGB", "L"):
        if target in allowed:
            return _to_mode(im, target)
    return im  # nothing better: let Pillow try


def _fits_16_bits(im: Image.Image) -> bool:
    lo, hi = im.getextrema()
    return 0 <= lo and hi <= 65535


def _to_mode(im: Image.Image, target: str) -> Image.Image:
    mode = im.mode
    if mode == "La":
        im = _unpremultiply_la(im)
        mode = "LA"
    if target in ("I;16", "I;16B") and mode in _GRAY16_MODES:
        v = np.asarray(im).astype(_GRAY16_DTYPES[target])
        out = Image.frombuffer(target, im.size, v, "raw", target, 0, 1)
    elif target == "L" and mode in _GRAY_MODES and mode not in ("1", "L"):
        info: dict[str, Any] = {}
        enc = _gray_encoder(im, info)
        out = Image.frombuffer("L", im.size, np.ascontiguousarray(enc(np.asarray(im))), "raw", "L", 0, 1)
    elif target == "RGB" and mode in _GRAY_MODES and mode not in ("1", "L"):
        out = _to_mode(im, "L").convert("RGB")
    elif target in ("L", "RGB") and mode == "LA":
        out = im.getchannel("L") if target == "L" else im.getchannel("L").convert("RGB")
    elif target == "RGBA" and mode in _GRAY16_MODES | {"I", "F"}:
        out = _to_mode(im, "L").convert("RGBA")
    elif target == "RGB" and mode == "P" and "transparency" in im.info:
        out = im.convert("RGBA").convert("RGB")
    else:
        out = im.convert(target)
    out.info = dict(im.info)
    if out.mode != mode:
        out.info.pop("transparency", None)
    return out


def _unpremultiply_la(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    l = a[..., 0].astype(np.uint32)
    alpha = a[..., 1].astype(np.uint32)
    out = np.empty(a.shape, np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(alpha > 0, (l * 255 + alpha // 2) // np.maximum(alpha, 1), 0)
    out[..., 0] = np.minimum(v, 255)
    out[..., 1] = a[..., 1]
    res = Image.frombuffer("LA", im.size, out, "raw", "LA", 0, 1)
    res.info = dict(im.info)
    return res


def _save_params(im: Image.Image, info: dict[str, Any], fmt: str, quality: int) -> dict[str, Any]:
    icc = info.get("icc_profile") or None
    exif = info.get("exif") or None
    if isinstance(exif, Image.Exif):
        exif = exif.tobytes()
    xmp = info.get("xmp") or None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    dpi = info.get("dpi")
    params: dict[str, Any] = {}
    if fmt == "PNG":
        if icc:
            params["icc_profile"] = icc
        if exif:
            params["exif"] = exif
        if xmp:
            pnginfo = PngImagePlugin.PngInfo()
            pnginfo.add_itxt("XML:com.adobe.xmp", xmp)
            params["pnginfo"] = pnginfo
        if dpi:
            params["dpi"] = dpi
    elif fmt == "JPEG":
        params["quality"] = int(quality)
        if quality >= 90:
            params["subsampling"] = 0  # 4:4:4
        if icc:
            params["icc_profile"] = icc
        if exif:
            if exif[:4] in (b"II*\x00", b"MM\x00*"):
                exif = b"Exif\x00\x00" + exif
            if len(exif) <= _JPEG_MAX_MARKER:
                params["exif"] = exif
            else:
                log.warning("EXIF block of %d bytes is too long for JPEG; not written", len(exif))
        if xmp:
            if len(xmp) <= _JPEG_MAX_MARKER - 29:
                params["xmp"] = xmp
            else:
                log.warning("XMP packet of %d bytes is too long for JPEG; not written", len(xmp))
        if dpi:
            params["dpi"] = dpi
    elif fmt == "WEBP":
        params["quality"] = int(quality)
        if icc:
            params["icc_profile"] = icc
        if exif:
            params["exif"] = exif
        if xmp:
            params["xmp"] = xmp
    elif fmt == "TIFF":
        params["compression"] = "tiff_adobe_deflate"
        if icc:
            params["icc_profile"] = icc
        tags = Image.Exif()
        if exif:
            try:
                tags.load(exif)
            except Exception as err:  # noqa: BLE001
                log.warning("EXIF not written to TIFF: %s", err)
        if xmp:
            tags[700] = xmp
        if len(tags):
            params["tiffinfo"] = tags
        if dpi:
            params["dpi"] = dpi
    return params
