"""nicd.codec.imageio: any Pillow image -> H×W×3 uint8 + side data -> the original size and mode.

Fixtures are real files written at test time (numpy + Pillow, a few PNGs written byte by byte).
"Perfect decode" round trips pass the prepared `rgb` straight to `restore_image`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]

from nicd.codec import imageio as IO  # noqa: E402
from nicd.codec.imageio import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    PreparedImage,
    load_image,
    restore_image,
    save_image,
)
from nicd.errors import FormatError, InputError, NicdError, StorageError  # noqa: E402

RNG_SEED = 1234


# ------------------------------------------------------------------------------------------ helpers


def rng(seed: int = RNG_SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(w: int, h: int, bit_depth: int, color_type: int, raw: bytes | None = None,
              *, idat: bytes | None = None) -> bytes:
    """A PNG written by hand: IHDR, one IDAT (zlib of `raw` rows, each with filter byte 0), IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(raw or b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """16-bit PNG bytes of an (h, w[, c]) uint16 array."""
    h, w = arr.shape[:2]
    be = arr.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + be[y].tobytes() for y in range(h))
    return png_bytes(w, h, 16, color_type, raw)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def save(im: Image.Image, path: Path, **params) -> Path:
    im.save(path, **params)
    return path


def roundtrip(source, **kw) -> tuple[PreparedImage, Image.Image]:
    prepared = load_image(source, **kw)
    assert prepared.rgb.dtype == np.uint8 and prepared.rgb.ndim == 3 and prepared.rgb.shape[2] == 3
    assert prepared.rgb.flags.c_contiguous
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in prepared.side.items())
    assert set(prepared.side) <= {"alpha", "palette", "icc", "exif", "xmp", "info"}
    restored = restore_image(prepared.rgb, prepared.mode, prepared.side)
    return prepared, restored


def reopen(path) -> Image.Image:
    """Open, decode and close a file (the loaded image stays usable)."""
    with Image.open(path) as im:
        im.load()
    return im


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def icc_profile() -> bytes:
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except Exception:  # pragma: no cover - Pillow built without littlecms: any bytes travel the same
        return b"\x00\x00\x02\x30fake-icc-profile" + bytes(range(256))


def exif_bytes(orientation: int = 6) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation  # Orientation
    ex[0x010F] = "nicd-test-make"  # Make
    ex[0x0131] = "nicd"  # Software
    return ex.tobytes()


def distinct_palette(n: int, seed: int = RNG_SEED) -> np.ndarray:
    """n palette colours at least 24 apart on some channel (so small noise keeps the nearest one)."""
    grid = np.array([(r, g, b) for r in range(0, 256, 36) for g in range(0, 256, 36) for b in range(0, 256, 36)],
                    np.uint8)
    pick = rng(seed).permutation(len(grid))[:n]
    return grid[pick]


def palette_image(w: int, h: int, n: int = 40, seed: int = RNG_SEED) -> Image.Image:
    pal = distinct_palette(n, seed)
    idx = rng(seed).integers(0, n, (h, w), dtype=np.uint8)
    im = Image.frombytes("P", (w, h), idx.tobytes())
    im.putpalette(pal.tobytes())
    return im


def random_image(mode: str, w: int, h: int, seed: int = RNG_SEED) -> Image.Image:
    g = rng(seed)
    if mode == "1":
        return Image.fromarray(g.integers(0, 2, (h, w)).astype(bool))
    if mode.startswith("I;16"):
        v = g.integers(0, 65536, (h, w), dtype=np.uint16)
        dt = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
        return Image.frombytes(mode, (w, h), v.astype(dt).tobytes())
    if mode == "I":
        return Image.frombytes("I", (w, h), g.integers(-5000, 70000, (h, w)).astype("=i4").tobytes())
    if mode == "F":
        return Image.frombytes("F", (w, h), (g.random((h, w)) * 3 - 1).astype("=f4").tobytes())
    if mode in ("P", "PA"):
        im = palette_image(w, h, 40, seed)
        if mode == "PA":
            a = g.integers(0, 256, (h, w), dtype=np.uint8)
            pa = np.stack([arr(im), a], axis=-1)
            out = Image.frombytes("PA", (w, h), pa.tobytes())
            out.putpalette(im.getpalette())
            return out
        return im
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = g.integers(0, 256, (h, w, bands), dtype=np.uint8)
    if mode in ("RGBa", "La"):  # valid premultiplied data: colour <= alpha
        data[..., :-1] = np.minimum(data[..., :-1], data[..., -1:])
    return Image.frombytes(mode, (w, h), data.tobytes())


def expect_error(code: str, source, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        load_image(source, **kw)
    err = info.value
    assert err.code == code, (err.code, str(err))
    assert "\n" not in str(err) and str(err)
    return err


# ------------------------------------------------------------------------------- round trips per mode

FILE_CASES = [
    # (mode, format to save in, extension)
    ("RGB", "PNG", "png"),
    ("RGBA", "PNG", "png"),
    ("L", "PNG", "png"),
    ("LA", "PNG", "png"),
    ("1", "PNG", "png"),
    ("I;16", "PNG", "png"),
    ("P", "PNG", "png"),
    ("P", "GIF", "gif"),
    ("PA", "TIFF", "tif"),
    ("CMYK", "TIFF", "tif"),
    ("CMYK", "JPEG", "jpg"),
    ("I", "TIFF", "tif"),
    ("F", "TIFF", "tif"),
    ("RGB", "JPEG", "jpg"),
    ("L", "JPEG", "jpg"),
    ("RGBA", "WEBP", "webp"),
    ("LAB", "TIFF", "tif"),
    ("YCbCr", "TIFF", "tif"),
]


@pytest.mark.parametrize("mode,fmt,ext", FILE_CASES, ids=[f"{m}-{f}" for m, f, _ in FILE_CASES])
def test_file_roundtrip_keeps_size_and_mode(tmp_path, mode, fmt, ext):
    src = random_image(mode, 37, 23)
    path = save(src, tmp_path / f"in.{ext}", format=fmt)
    original = reopen(path)
    prepared, restored = roundtrip(path)
    assert prepared.format == fmt
    assert prepared.mode == original.mode
    assert (prepared.width, prepared.height) == (37, 23)
    assert prepared.rgb.shape == (23, 37, 3)
    assert restored.mode == original.mode and restored.size == original.size
    a0, a1 = arr(original), arr(restored)
    if original.mode in ("RGB", "L", "1", "LA", "RGBA", "P", "PA"):
        assert np.array_equal(a0, a1)
    elif original.mode == "I;16":
        assert np.abs(a0.astype(int) - a1.astype(int)).max() <= 128
    if original.mode in ("RGBA", "LA", "PA"):
        assert restored.getchannel("A").tobytes() == original.getchannel("A").tobytes()
    if original.mode in ("P", "PA"):
        assert restored.getpalette() == original.getpalette()


IN_MEMORY_MODES = ["RGB", "RGBA", "RGBa", "RGBX", "L", "LA", "La", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F",
                   "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", IN_MEMORY_MODES)
@pytest.mark.parametrize("size", [(1, 1), (37, 23), (2, 5)], ids=["1x1", "37x23", "2x5"])
def test_in_memory_roundtrip_every_mode(mode, size):
    src = random_image(mode, *size)
    prepared, restored = roundtrip(src)
    assert prepared.format is None
    assert prepared.mode == mode and restored.mode == mode and restored.size == size
    a0, a1 = arr(src), arr(restored)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "L", "LA", "La", "1", "P", "PA"):
        assert np.array_equal(a0, a1), mode  # exact: alpha and palette indices included
    elif mode.startswith("I;16"):
        assert np.abs(a0.astype(np.int64) - a1.astype(np.int64)).max() <= 128
    elif mode in ("I", "F"):  # the value range mapped affinely onto 0..255: error at most half a step
        scale = prepared.info["gray"]["scale"]
        slack = 0.5 if mode == "I" else 1e-4 * scale  # I rounds to integers
        assert np.abs(a0.astype(np.float64) - a1.astype(np.float64)).max() <= scale / 2 + slack
        if size == (37, 23):
            assert scale <= (75000 / 255 if mode == "I" else 3 / 255) + 1e-9
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        assert restored.getchannel(restored.getbands()[-1]).tobytes() == src.getchannel(src.getbands()[-1]).tobytes()


def test_gray_kinds_are_replicated_and_restored_by_channel_mean():
    g = rng().integers(0, 256, (9, 11), dtype=np.uint8)
    prepared = load_image(Image.fromarray(g))
    assert np.array_equal(prepared.rgb, np.repeat(g[..., None], 3, axis=2))
    # a lossy decode that tints the channels: restore takes the rounded mean
    rgb = prepared.rgb.astype(np.int16)
    rgb[..., 0] += 2
    rgb[..., 2] -= 1
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    out = restore_image(rgb, "L", prepared.side)
    expect = np.floor(rgb.astype(np.float64).mean(axis=2) + 0.5).astype(np.uint8)
    assert np.array_equal(arr(out), expect)


def test_mode_1_thresholds_at_128():
    src = Image.fromarray(np.array([[True, False, True]]))
    prepared = load_image(src)
    assert prepared.rgb.reshape(-1, 3)[:, 0].tolist() == [255, 0, 255]
    rgb = np.array([[[128, 128, 128], [127, 127, 127], [200, 100, 90]]], np.uint8)
    out = restore_image(rgb, "1", prepared.side)
    assert out.mode == "1" and arr(out).tolist() == [[True, False, True]]


def test_i16_png_codes_high_bits_and_scales_back(tmp_path):
    v = np.array([[0, 127, 128, 385], [65535, 65408, 32896, 1000]], np.uint16)
    path = write(tmp_path / "g16.png", png16(v, 0))
    prepared, restored = roundtrip(path)
    assert prepared.mode == "I;16" and restored.mode == "I;16"
    assert prepared.info.get("bits") == 16
    assert prepared.rgb[..., 0].tolist() == np.floor(v / 257 + 0.5).astype(int).tolist()
    out = arr(restored).astype(np.int64)
    assert out.tolist() == (prepared.rgb[..., 0].astype(np.int64) * 257).tolist()
    assert np.abs(out - v).max() <= 128
    # and it writes back as a 16-bit PNG
    save_image(restored, tmp_path / "out.png")
    again = reopen(tmp_path / "out.png")
    assert again.mode == "I;16" and np.array_equal(arr(again), arr(restored))


def test_16bit_rgb_png_what_pillow_13_does(tmp_path):
    """Pillow opens 16-bit RGB/RGBA PNGs as 8-bit RGB/RGBA (high byte) and 16-bit LA as RGBA."""
    g = rng()
    rgb16 = g.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    path = write(tmp_path / "rgb16.png", png16(rgb16, 2))
    prepared, restored = roundtrip(path)
    assert prepared.mode == reopen(path).mode == "RGB"
    assert prepared.info["bits"] == 16 and prepared.info["rawmode"].startswith("RGB;16")
    assert np.array_equal(prepared.rgb, (rgb16 >> 8).astype(np.uint8))
    assert restored.mode == "RGB" and restored.size == (5, 6)

    rgba16 = g.integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    path = write(tmp_path / "rgba16.png", png16(rgba16, 6))
    prepared, restored = roundtrip(path)
    assert prepared.mode == restored.mode == "RGBA" and prepared.info["bits"] == 16
    assert np.array_equal(arr(restored)[..., 3], (rgba16[..., 3] >> 8).astype(np.uint8))

    la16 = g.integers(0, 65536, (6, 5, 2), dtype=np.uint16)
    path = write(tmp_path / "la16.png", png16(la16, 4))
    prepared, restored = roundtrip(path)
    assert prepared.mode == reopen(path).mode == restored.mode
    assert np.array_equal(arr(restored), arr(reopen(path)))


def test_palette_indices_and_palette_identical_on_perfect_decode(tmp_path):
    src = palette_image(41, 17, n=200)
    path = save(src, tmp_path / "p.png")
    prepared, restored = roundtrip(path)
    assert prepared.mode == "P" and "palette" in prepared.side
    assert restored.getpalette() == reopen(path).getpalette()
    assert np.array_equal(arr(restored), arr(reopen(path)))


def test_palette_with_near_identical_colours_stays_exact():
    """Pillow's quantizer uses a coarse colour cache; exact colours must still get their own index."""
    pal = np.array([[i, i, i] for i in range(256)], np.uint8)  # neighbours differ by 1
    idx = np.arange(256, dtype=np.uint8).reshape(16, 16)
    src = Image.frombytes("P", (16, 16), idx.tobytes())
    src.putpalette(pal.tobytes())
    prepared, restored = roundtrip(src)
    assert np.array_equal(arr(restored), idx)


def test_palette_lossy_decode_maps_to_nearest_original_colour():
    src = palette_image(30, 20, n=60)
    prepared = load_image(src)
    noise = rng(7).integers(-6, 7, prepared.rgb.shape)
    noisy = np.clip(prepared.rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    out = restore_image(noisy, "P", prepared.side)
    assert out.getpalette() == src.getpalette()
    assert np.array_equal(arr(out), arr(src))  # colours 36 apart: ±6 noise keeps the nearest


@pytest.mark.parametrize("band_bytes", [None, 64], ids=["whole", "bands"])
@pytest.mark.parametrize("kind", ["index", "bytes"])
def test_palette_transparency_exact_even_after_lossy_decode(tmp_path, monkeypatch, kind, band_bytes):
    if band_bytes:
        monkeypatch.setattr(IO, "_BAND_BYTES", band_bytes)
    w, h = 24, 16
    pal = distinct_palette(16)
    pal[0] = pal[1]  # the transparent entry has the same colour as an opaque one
    idx = rng(3).integers(0, 16, (h, w), dtype=np.uint8)
    src = Image.frombytes("P", (w, h), idx.tobytes())
    src.putpalette(pal.tobytes())
    if kind == "index":
        src.info["transparency"] = 0
    else:
        src.info["transparency"] = bytes([0, 255, 128] + [255] * 13)
    path = save(src, tmp_path / "t.png")
    original = reopen(path)
    expected_alpha = arr(original.convert("RGBA"))[..., 3]

    prepared, restored = roundtrip(path)
    assert "alpha" in prepared.side
    assert np.array_equal(arr(restored), arr(original))
    assert restored.info["transparency"] == original.info["transparency"]
    assert np.array_equal(arr(restored.convert("RGBA"))[..., 3], expected_alpha)

    noisy = np.clip(prepared.rgb.astype(int) + rng(4).integers(-20, 21, prepared.rgb.shape), 0, 255).astype(np.uint8)
    lossy = restore_image(noisy, prepared.mode, prepared.side)
    assert np.array_equal(arr(lossy.convert("RGBA"))[..., 3], expected_alpha)
    # and it survives a PNG write
    save_image(lossy, tmp_path / "out.png")
    again = reopen(tmp_path / "out.png")
    assert again.mode == "P" and np.array_equal(arr(again.convert("RGBA"))[..., 3], expected_alpha)


def test_rgba_palette_mode():
    src = Image.new("P", (3, 2))
    src.putpalette(bytes([10, 20, 30, 255, 40, 50, 60, 0, 70, 80, 90, 128]), "RGBA")
    src.putdata([0, 1, 2, 2, 1, 0])
    prepared, restored = roundtrip(src)
    assert restored.palette.mode == "RGBA"
    assert restored.getpalette("RGBA") == src.getpalette("RGBA")
    assert np.array_equal(arr(restored), arr(src))
    assert np.array_equal(arr(restored.convert("RGBA")), arr(src.convert("RGBA")))


def test_alpha_side_data_is_zlib_of_the_plane():
    src = random_image("RGBA", 13, 7)
    prepared = load_image(src)
    assert zlib.decompress(prepared.side["alpha"]) == src.getchannel("A").tobytes()
    assert np.array_equal(prepared.rgb, arr(src)[..., :3])  # colour not composited


def test_cmyk_jpeg_keeps_mode_and_icc(tmp_path):
    icc = icc_profile()
    src = random_image("CMYK", 16, 8)
    path = save(src, tmp_path / "c.jpg", icc_profile=icc, quality=95)
    prepared, restored = roundtrip(path)
    assert prepared.mode == restored.mode == "CMYK"
    assert prepared.side["icc"] == icc and restored.info["icc_profile"] == icc
    assert np.array_equal(prepared.rgb, arr(reopen(path).convert("RGB")))


def test_multiframe_codes_first_frame_and_records_count(tmp_path):
    frames = [palette_image(8, 6, 16, seed=s) for s in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = reopen(path)
    prepared, restored = roundtrip(path)
    assert prepared.info["frames"] == 3
    assert restored.mode == first.mode and restored.size == first.size
    assert np.array_equal(arr(restored), arr(first))

    tiff = tmp_path / "pages.tif"
    random_image("RGB", 5, 4, seed=1).save(tiff, save_all=True, append_images=[random_image("RGB", 5, 4, seed=2)])
    prepared = load_image(tiff)
    assert prepared.info["frames"] == 2
    assert np.array_equal(prepared.rgb, arr(random_image("RGB", 5, 4, seed=1)))


def test_exif_orientation_not_applied_and_kept(tmp_path):
    exif = exif_bytes(orientation=6)
    src = random_image("RGB", 40, 20)
    path = save(src, tmp_path / "o.jpg", exif=exif, quality=95)
    prepared, restored = roundtrip(path)
    assert prepared.rgb.shape == (20, 40, 3)  # not rotated
    assert prepared.side["exif"] == reopen(path).info["exif"]
    for ext in ("jpg", "png"):
        out = tmp_path / f"out.{ext}"
        save_image(restored, out)
        again = reopen(out)
        assert again.size == (40, 20)
        assert again.getexif()[0x0112] == 6


@pytest.mark.parametrize("src_fmt,src_ext", [("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("dst_ext", ["png", "jpg"])
def test_icc_exif_xmp_survive_load_restore_save_reopen(tmp_path, src_fmt, src_ext, dst_ext):
    icc = icc_profile()
    exif = exif_bytes(orientation=3)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    src = random_image("RGB", 12, 9)
    params = {"icc_profile": icc, "exif": exif}
    if src_fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        params["pnginfo"] = info
    else:
        params["xmp"] = xmp
    path = save(src, tmp_path / f"in.{src_ext}", format=src_fmt, **params)
    prepared, restored = roundtrip(path)
    assert prepared.side["icc"] == icc
    assert prepared.side["exif"].endswith(exif[6:]) and prepared.side["xmp"] == xmp
    assert restored.info["icc_profile"] == icc and restored.info["exif"] == prepared.side["exif"]

    out = tmp_path / f"out.{dst_ext}"
    save_image(restored, out)
    again = reopen(out)
    assert again.info["icc_profile"] == icc
    assert again.getexif()[0x0112] == 3 and again.getexif()[0x010F] == "nicd-test-make"
    assert again.info["exif"][-len(exif) + 6:] == exif[6:]  # EXIF bytes as they were
    got_xmp = again.info.get("xmp")
    assert (got_xmp.encode() if isinstance(got_xmp, str) else got_xmp) == xmp


def test_dpi_is_carried(tmp_path):
    path = save(random_image("RGB", 4, 4), tmp_path / "d.png", dpi=(300, 300))
    prepared, restored = roundtrip(path)
    assert json.loads(prepared.side["info"])["dpi"] == pytest.approx([300, 300], abs=0.01)
    save_image(restored, tmp_path / "d2.jpg")
    assert reopen(tmp_path / "d2.jpg").info["dpi"] == pytest.approx((300, 300), abs=0.5)


def test_banded_conversion_matches_whole_image(monkeypatch):
    """Large images are converted in bands; force tiny bands so that path runs on small images."""
    monkeypatch.setattr(IO, "_BAND_BYTES", 64)
    for mode in ["RGB", "RGBA", "L", "LA", "I;16", "I", "F", "P", "PA", "CMYK", "1"]:
        src = random_image(mode, 37, 29)
        prepared, restored = roundtrip(src)
        monkeypatch.setattr(IO, "_BAND_BYTES", 8 << 20)
        whole = load_image(src)
        monkeypatch.setattr(IO, "_BAND_BYTES", 64)
        assert np.array_equal(prepared.rgb, whole.rgb), mode
        assert prepared.side == whole.side, mode
        assert np.array_equal(arr(restored), arr(restore_image(whole.rgb, mode, whole.side))), mode


def test_bytes_source_and_pathlike(tmp_path):
    src = random_image("RGB", 6, 5)
    buf = io.BytesIO()
    src.save(buf, "PNG")
    p1 = load_image(buf.getvalue())
    p2 = load_image(str(save(src, tmp_path / "x.png")))
    p3 = load_image(tmp_path / "x.png")
    assert p1.format == p2.format == p3.format == "PNG"
    assert np.array_equal(p1.rgb, p2.rgb) and np.array_equal(p2.rgb, p3.rgb)


def test_restore_rejects_bad_side_data():
    prepared = load_image(random_image("RGBA", 5, 4))
    with pytest.raises(FormatError):
        restore_image(prepared.rgb, "RGBA", {})
    with pytest.raises(FormatError):
        restore_image(prepared.rgb, "RGBA", {"alpha": zlib.compress(b"\x00" * 19)})
    with pytest.raises(FormatError):
        restore_image(prepared.rgb, "RGBA", {"alpha": b"not zlib"})
    with pytest.raises(FormatError):
        restore_image(prepared.rgb, "P", {"palette": b"\x00\x01"})
    with pytest.raises(FormatError):
        restore_image(prepared.rgb, "L", {"info": b"{nope"})
    with pytest.raises(ValueError):
        restore_image(prepared.rgb.astype(np.float32), "RGB", {})
    with pytest.raises(InputError) as info:
        restore_image(prepared.rgb, "XYZ;9", {})
    assert info.value.code == "E_UNSUPPORTED_MODE"


def test_module_does_not_import_torch():
    code = "import sys, nicd.codec.imageio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- errors


def test_error_not_found(tmp_path):
    err = expect_error("E_NOT_FOUND", tmp_path / "missing.png")
    assert err.path == str(tmp_path / "missing.png")
    f = write(tmp_path / "file", b"x")
    expect_error("E_NOT_FOUND", f / "below.png")


def test_error_directory(tmp_path):
    expect_error("E_NOT_REGULAR_FILE", tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_error_fifo_returns_promptly(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list = []

    def attempt():
        try:
            load_image(fifo)
        except InputError as err:
            result.append(err)

    t = threading.Thread(target=attempt, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so the test process can exit, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("load_image blocked on a FIFO")
    assert time.monotonic() - t0 < 2
    assert result and result[0].code == "E_NOT_REGULAR_FILE"


def test_error_empty(tmp_path):
    expect_error("E_EMPTY", write(tmp_path / "empty.png", b""))
    expect_error("E_EMPTY", b"")


def test_error_not_image(tmp_path):
    expect_error("E_NOT_IMAGE", write(tmp_path / "notes.jpg", b"these are not the pixels you are looking for\n"))
    expect_error("E_NOT_IMAGE", b"\x00" * 100)


def _noise_png(tmp_path: Path) -> bytes:
    im = random_image("RGB", 64, 64)
    path = save(im, tmp_path / "noise.png", compress_level=1)
    return path.read_bytes()


def test_error_truncated_png_mid_idat(tmp_path):
    data = _noise_png(tmp_path)
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    cut = data[: start + length // 2]
    err = expect_error("E_TRUNCATED", write(tmp_path / "cut.png", cut))
    assert err.path.endswith("cut.png")
    expect_error("E_TRUNCATED", cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_error_truncated_jpeg(tmp_path):
    path = save(random_image("RGB", 64, 64), tmp_path / "full.jpg", quality=90)
    data = path.read_bytes()
    expect_error("E_TRUNCATED", write(tmp_path / "cut.jpg", data[: len(data) * 6 // 10]))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_error_corrupt_png_data(tmp_path):
    data = bytearray(_noise_png(tmp_path))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = b"\xff" * 50  # garbage in the deflate stream (CRC mismatch too)
    expect_error("E_TRUNCATED", bytes(data))


def test_load_truncated_images_flag_is_forced_off(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _noise_png(tmp_path)
    start = data.index(b"IDAT") + 4
    expect_error("E_TRUNCATED", data[: start + 200])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_error_too_large_header_65535_square_is_fast(tmp_path):
    data = png_bytes(65535, 65535, 8, 2, idat=zlib.compress(b"\x00" * 16))
    path = write(tmp_path / "bomb.png", data)
    t0 = time.monotonic()
    expect_error("E_TOO_LARGE", path)
    expect_error("E_TOO_LARGE", data)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_error_too_large_checked_before_decoding(tmp_path):
    # 10001×10000 is just over the default limit and under Pillow's own bomb limit; the IDAT is
    # tiny, so decoding would fail with E_TRUNCATED: E_TOO_LARGE proves the header was checked first.
    assert 10001 * 10000 > DEFAULT_MAX_PIXELS
    data = png_bytes(10001, 10000, 8, 0, idat=zlib.compress(b"\x00" * 64))
    t0 = time.monotonic()
    expect_error("E_TOO_LARGE", write(tmp_path / "big.png", data))
    assert time.monotonic() - t0 < 1.0


def test_max_pixels_enforced(tmp_path):
    path = save(random_image("RGB", 20, 20), tmp_path / "s.png")
    expect_error("E_TOO_LARGE", path, max_pixels=399)
    assert load_image(path, max_pixels=400).rgb.shape == (20, 20, 3)
    expect_error("E_TOO_LARGE", random_image("L", 20, 20), max_pixels=100)


def test_error_permission_chmod(tmp_path):
    if os.geteuid() != 0:
        path = save(random_image("RGB", 4, 4), tmp_path / "secret.png")
        os.chmod(path, 0)
        try:
            expect_error("E_PERMISSION", path)
        finally:
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        return
    # Root reads any file, so a forked child drops to `nobody` and tries a file only root may read.
    folder = Path(tempfile.mkdtemp(prefix="nicd-perm-"))
    try:
        folder.chmod(0o755)
        path = save(random_image("RGB", 4, 4), folder / "secret.png")
        os.chmod(path, 0o600)
        pid = os.fork()
        if pid == 0:  # child: exit 0 only for the right error code
            status = 4
            try:
                os.setgid(65534)
                os.setuid(65534)
                load_image(path)
                status = 2
            except NicdError as err:
                status = 0 if err.code == "E_PERMISSION" else 3
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(folder)


def test_error_permission_on_open(tmp_path, monkeypatch):
    path = save(random_image("RGB", 4, 4), tmp_path / "secret.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(IO.os, "open", denied)
    expect_error("E_PERMISSION", path)


def test_error_unsupported_mode():
    im = Image.new("L", (2, 2))
    im._mode = "XYZ;9"  # a mode no Pillow plugin produces today
    expect_error("E_UNSUPPORTED_MODE", im)


# --------------------------------------------------------------------------------------- save_image


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".nicd-tmp-")]


def test_save_image_atomic_writes_and_fsyncs(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(IO.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    replaced: list[tuple] = []
    real_replace = os.replace
    monkeypatch.setattr(IO.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b))[1])
    im = random_image("RGB", 9, 7)
    out = tmp_path / "a.png"
    save_image(im, out)
    assert np.array_equal(arr(reopen(out)), arr(im))
    assert leftovers(tmp_path) == []
    assert len(synced) >= 2  # the file, then the directory
    assert len(replaced) == 1 and Path(replaced[0][0]).name.startswith(".nicd-tmp-")
    assert Path(replaced[0][0]).parent == tmp_path and replaced[0][1] == str(out)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_save_image_replaces_existing_only_on_success(tmp_path, monkeypatch):
    out = tmp_path / "keep.png"
    out.write_bytes(b"old contents")
    os.chmod(out, 0o640)
    save_image(random_image("RGB", 5, 5), out)
    assert reopen(out).size == (5, 5)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    before = out.read_bytes()

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(StorageError):
        save_image(random_image("RGB", 6, 6), out)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_save_image_unknown_format(tmp_path):
    with pytest.raises(InputError) as info:
        save_image(random_image("RGB", 2, 2), tmp_path / "x.unknownext")
    assert info.value.code == "E_UNSUPPORTED_FORMAT"
    assert leftovers(tmp_path) == [] and not (tmp_path / "x.unknownext").exists()
    save_image(random_image("RGB", 2, 2), tmp_path / "noext", format="png")
    assert reopen(tmp_path / "noext").format == "PNG"


def test_save_image_jpeg_quality_and_subsampling(tmp_path):
    im = random_image("RGB", 32, 32)
    save_image(im, tmp_path / "hi.jpg", quality=95)
    save_image(im, tmp_path / "lo.jpg", quality=50)
    hi, lo = reopen(tmp_path / "hi.jpg"), reopen(tmp_path / "lo.jpg")
    assert JpegImagePlugin.get_sampling(hi) == 0  # 4:4:4
    assert JpegImagePlugin.get_sampling(lo) == 2  # 4:2:0
    assert (tmp_path / "lo.jpg").stat().st_size < (tmp_path / "hi.jpg").stat().st_size


def test_save_image_converts_only_when_needed(tmp_path):
    rgba = random_image("RGBA", 8, 8)
    save_image(rgba, tmp_path / "a.jpg")
    assert reopen(tmp_path / "a.jpg").mode == "RGB"
    save_image(rgba, tmp_path / "a.png")
    assert np.array_equal(arr(reopen(tmp_path / "a.png")), arr(rgba))
    save_image(rgba, tmp_path / "a.webp")
    assert reopen(tmp_path / "a.webp").mode == "RGBA"

    g16 = Image.frombytes("I;16", (2, 1), np.array([65535, 257 * 10], "<u2").tobytes())
    save_image(g16, tmp_path / "g.jpg", quality=100)
    j = reopen(tmp_path / "g.jpg")
    assert j.mode == "L" and abs(int(arr(j)[0, 0]) - 255) <= 2 and abs(int(arr(j)[0, 1]) - 10) <= 2

    la = random_image("La", 4, 3)
    save_image(la, tmp_path / "la.png")
    assert reopen(tmp_path / "la.png").mode == "LA"
    save_image(random_image("RGBa", 4, 3), tmp_path / "rgba.png")
    assert reopen(tmp_path / "rgba.png").mode == "RGBA"
    save_image(random_image("CMYK", 4, 3), tmp_path / "c.jpg")
    assert reopen(tmp_path / "c.jpg").mode == "CMYK"
    save_image(random_image("PA", 4, 3), tmp_path / "pa.png")
    assert reopen(tmp_path / "pa.png").mode == "RGBA"
    save_image(random_image("F", 4, 3), tmp_path / "f.tif")
    assert reopen(tmp_path / "f.tif").mode == "F"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "I", "F", "PA"])
def test_restore_then_save_tiff_keeps_mode(tmp_path, mode):
    src = random_image(mode, 7, 5)
    prepared, restored = roundtrip(src)
    save_image(restored, tmp_path / "o.tif")
    again = reopen(tmp_path / "o.tif")
    assert again.mode == mode and again.size == (7, 5)


def test_tiff_metadata_and_16bit_int_to_png(tmp_path):
    icc = icc_profile()
    src = random_image("RGB", 6, 4)
    path = save(src, tmp_path / "m.tif", icc_profile=icc, exif=exif_bytes(orientation=8))
    prepared, restored = roundtrip(path)
    # Pillow 13 itself applies a TIFF's Orientation while decoding and drops the tag: the pixels
    # arrive upright (4×6 here), so no orientation travels and the result displays the same.
    assert prepared.rgb.shape == (6, 4, 3) and restored.size == reopen(path).size == (4, 6)
    assert prepared.side["icc"] == icc
    kept = Image.Exif()
    kept.load(prepared.side["exif"])
    assert kept[0x010F] == "nicd-test-make" and 0x0112 not in kept and 0x0111 not in kept  # no strip offsets
    save_image(restored, tmp_path / "m2.tif")
    again = reopen(tmp_path / "m2.tif")
    assert again.info["icc_profile"] == icc and again.getexif()[0x010F] == "nicd-test-make"
    assert again.size == (4, 6) and np.array_equal(arr(again), arr(restored))
    # an I image with 16-bit values goes to PNG as I;16, not clipped to 8 bits
    v = np.array([[0, 300, 65535]], "=i4")
    save_image(Image.frombytes("I", (3, 1), v.tobytes()), tmp_path / "i.png")
    i16 = reopen(tmp_path / "i.png")
    assert i16.mode == "I;16" and arr(i16).tolist() == [[0, 300, 65535]]
