"""The .nicd container: layout, round trips, and hostile input.

Everything here works on real bytes. `_reference_encode` is an independent encoder written from
docs/format.md alone, so these tests also check that the document and the code agree; the pinned
SHA-256 of a golden file catches any bitstream change (which would need a FORMAT_VERSION bump).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

from nicd.codec import container as C  # noqa: E402
from nicd.codec.container import (  # noqa: E402
    FORMAT_VERSION,
    MAGIC,
    MAX_PIXELS,
    MAX_SIDE,
    MAX_STREAMS_PER_TILE,
    Container,
    Header,
    Tile,
    file_checksum_ok,
    parse,
    peek_header,
    serialize,
)
from nicd.errors import FormatError  # noqa: E402

CODES = {
    "E_FORMAT_MAGIC",
    "E_FORMAT_VERSION",
    "E_FORMAT_TRUNCATED",
    "E_FORMAT_CHECKSUM",
    "E_FORMAT_LIMIT",
    "E_FORMAT_FIELD",
    "E_FORMAT_TRAILING",
}

# Documented offsets (docs/format.md, "Header").
OFF_VERSION, OFF_FLAGS, OFF_WIDTH, OFF_HEIGHT, OFF_TILE_SIZE = 9, 11, 13, 17, 21
OFF_TILE_COUNT, OFF_META_COUNT, OFF_QUALITY, OFF_HASH = 25, 29, 31, 32
OFF_MODEL_ID, OFF_MODE, OFF_HEADER_CRC, BODY = 64, 128, 144, 148


# ------------------------------------------------------------------------------------------------
# Helpers


def _reference_encode(c: Container) -> bytes:
    """An encoder written from docs/format.md only (no code shared with container.py)."""
    h = bytearray(MAGIC)
    h += struct.pack("<H", 1)
    h += struct.pack("<H", c.flags)
    h += struct.pack("<IIII", c.width, c.height, c.tile_size, len(c.tiles))
    h += struct.pack("<HB", len(c.metadata), c.quality)
    h += c.model_hash
    h += c.model_id.encode().ljust(64, b"\0")
    h += c.mode.encode().ljust(16, b"\0")
    assert len(h) == 144
    h += struct.pack("<I", zlib.crc32(h))
    for name, value in c.metadata:
        h += bytes([len(name)]) + name.encode() + struct.pack("<I", len(value)) + value
    for t in c.tiles:
        h += struct.pack("<IB", t.symbol_crc, len(t.streams))
        h += b"".join(struct.pack("<I", len(s)) for s in t.streams)
    for t in c.tiles:
        h += b"".join(t.streams)
    h += struct.pack("<I", zlib.crc32(h)) + b"NEND"
    return bytes(h)


def _refix(b: bytes | bytearray) -> bytes:
    """Recompute the header CRC and the file CRC so that only structural checks can object."""
    b = bytearray(b)
    if len(b) >= BODY:
        b[OFF_HEADER_CRC:BODY] = struct.pack("<I", zlib.crc32(b[:OFF_HEADER_CRC]))
    if len(b) >= BODY + 8:
        b[-8:-4] = struct.pack("<I", zlib.crc32(b[:-8]))
    return bytes(b)


def _put(b: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(b)
    struct.pack_into(fmt, out, offset, value)
    return _refix(out)


def _make(width=3000, height=2000, tile_size=1024, metadata=(), n_streams=3, **kw) -> Container:
    rows, cols = -(-height // tile_size), -(-width // tile_size)
    tiles = tuple(
        Tile(
            streams=tuple(bytes([i, j]) * (i + j) for j in range(n_streams)),
            symbol_crc=(0x9E3779B9 * (i + 1)) & 0xFFFFFFFF,
        )
        for i in range(rows * cols)
    )
    fields = dict(
        model_id="msh-96-144-mse-3f2a9c1d",
        model_hash=hashlib.sha256(b"weights").digest(),
        quality=3,
        width=width,
        height=height,
        mode="RGB",
        tile_size=tile_size,
        tiles=tiles,
        metadata=metadata,
    )
    fields.update(kw)
    return Container(**fields)


def _err(data, **kw) -> FormatError:
    with pytest.raises(FormatError) as ei:
        parse(data, **kw)
    assert ei.value.code in CODES, ei.value.code
    return ei.value


# A small container (a few hundred bytes) used by the exhaustive and fuzz tests. Its bytes contain
# no b"NEND" before the trailer, so every truncation is reported as E_FORMAT_TRUNCATED.
SMALL = _make(
    width=130,
    height=70,
    tile_size=64,
    metadata=(("icc", b"\x00ICCPROFILE" * 2), ("exif", b""), ("info", b'{"dpi": [72, 72]}')),
    n_streams=2,
)
SMALL_BYTES = serialize(SMALL)


# ------------------------------------------------------------------------------------------------
# Round trips and layout


ROUNDTRIP_CASES = {
    "1x1-one-tile": _make(width=1, height=1, tile_size=64, n_streams=1),
    "3000x2000-tile1024-6-tiles": _make(),
    "with-metadata": _make(
        metadata=(("icc", b"\x01" * 300), ("exif", b"Exif\0\0"), ("xmp", b"<x/>"), ("alpha", b"a"))
    ),
    "empty-streams": dataclasses.replace(
        _make(width=200, height=64, tile_size=64),
        tiles=tuple(Tile(streams=(b"",) * k, symbol_crc=0) for k in (1, 2, 8, 3)),
    ),
    "max-streams-rgba": _make(
        width=65, height=129, tile_size=64, n_streams=MAX_STREAMS_PER_TILE, mode="RGBA"
    ),
    "i16-tile-65536-q8": _make(width=70000, height=3, tile_size=65536, mode="I;16", quality=8),
    "long-names": _make(
        width=64, height=64, tile_size=64, model_id="x" * 64, mode="M" * 16,
        metadata=(("n" * 16, b"v"),), quality=1,
    ),
}


@pytest.mark.parametrize("c", ROUNDTRIP_CASES.values(), ids=ROUNDTRIP_CASES.keys())
def test_roundtrip(c):
    b = serialize(c)
    assert b == _reference_encode(c)
    back = parse(b)
    assert back == c
    assert serialize(back) == b
    assert isinstance(back.tiles, tuple) and isinstance(back.metadata, tuple)
    assert all(isinstance(s, bytes) for t in back.tiles for s in t.streams)
    rows, cols = back.tile_grid
    assert len(back.tiles) == rows * cols
    assert file_checksum_ok(b)


def test_grid_and_meta():
    c = ROUNDTRIP_CASES["3000x2000-tile1024-6-tiles"]
    assert c.tile_grid == (2, 3) and len(c.tiles) == 6
    assert ROUNDTRIP_CASES["1x1-one-tile"].tile_grid == (1, 1)
    m = parse(serialize(ROUNDTRIP_CASES["with-metadata"]))
    assert m.meta("exif") == b"Exif\0\0"
    assert m.meta("icc") == b"\x01" * 300
    assert m.meta("palette") is None
    assert [k for k, _ in m.metadata] == ["icc", "exif", "xmp", "alpha"]  # order kept


def test_layout_offsets_match_docs():
    c = ROUNDTRIP_CASES["3000x2000-tile1024-6-tiles"]
    b = serialize(c)
    assert C.HEADER_SIZE == BODY == 148 and C.TRAILER_SIZE == 8
    assert b[:9] == MAGIC == b"\x89NICD\r\n\x1a\n"
    assert struct.unpack_from("<H", b, OFF_VERSION)[0] == FORMAT_VERSION == 1
    assert struct.unpack_from("<HIIII", b, OFF_FLAGS) == (0, 3000, 2000, 1024, 6)
    assert struct.unpack_from("<HB", b, OFF_META_COUNT) == (0, 3)
    assert b[OFF_HASH:OFF_MODEL_ID] == c.model_hash
    assert b[OFF_MODEL_ID:OFF_MODE].rstrip(b"\0") == b"msh-96-144-mse-3f2a9c1d"
    assert b[OFF_MODE:OFF_HEADER_CRC] == b"RGB" + b"\0" * 13
    assert struct.unpack_from("<I", b, OFF_HEADER_CRC)[0] == zlib.crc32(b[:OFF_HEADER_CRC])
    assert b[-4:] == b"NEND"
    assert struct.unpack_from("<I", b, len(b) - 8)[0] == zlib.crc32(b[:-8])
    # tile table starts right after the (empty) metadata
    assert struct.unpack_from("<IB3I", b, BODY) == (c.tiles[0].symbol_crc, 3, 0, 2, 4)


def test_golden_bytes_are_pinned():
    """If this fails the bitstream changed: bump FORMAT_VERSION and keep version 1 decodable."""
    golden = Container(
        model_id="msh-96-144-mse-3f2a9c1d",
        model_hash=bytes(range(32)),
        quality=3,
        width=100,
        height=70,
        mode="RGBA",
        tile_size=64,
        tiles=(
            Tile((b"z0", b"y0y0", b""), 0x01020304),
            Tile((b"z1",), 0xFFFFFFFF),
            Tile((b"z2", b"y2"), 0),
            Tile((b"",), 7),
        ),
        metadata=(("icc", b"ICC!"), ("exif", b"")),
    )
    b = serialize(golden)
    assert len(b) == 237
    assert hashlib.sha256(b).hexdigest() == (
        "4fb55affe3c2c119a748ee48d5a8761fd046a042a15db12e2c3b6e717071a03a"
    )
    assert parse(b) == golden


def test_peek_header_and_checksum_helper():
    b = serialize(ROUNDTRIP_CASES["with-metadata"])
    h = peek_header(b[:BODY])  # the header alone is enough
    assert isinstance(h, Header)
    assert (h.version, h.width, h.height, h.tile_size, h.tile_count, h.metadata_count) == (
        1, 3000, 2000, 1024, 6, 4,
    )
    assert (h.model_id, h.mode, h.quality, h.flags, h.tile_grid) == (
        "msh-96-144-mse-3f2a9c1d", "RGB", 3, 0, (2, 3),
    )
    assert file_checksum_ok(b)
    assert not file_checksum_ok(b[:-1])
    assert not file_checksum_ok(b"")
    flipped = bytearray(b)
    flipped[BODY + 3] ^= 0x10
    assert not file_checksum_ok(bytes(flipped))
    assert peek_header(bytes(flipped)) == h  # header intact, body damaged
    with pytest.raises(FormatError) as ei:
        peek_header(b[:100])
    assert ei.value.code == "E_FORMAT_TRUNCATED"


def test_parse_accepts_bytearray_and_memoryview():
    assert parse(bytearray(SMALL_BYTES)) == SMALL
    assert parse(memoryview(SMALL_BYTES)) == SMALL


# ------------------------------------------------------------------------------------------------
# Property: arbitrary valid containers round trip

_visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@st.composite
def containers(draw):
    tile_size = draw(st.sampled_from([64, 128, 192, 256]))
    width = draw(st.integers(1, 300))
    height = draw(st.integers(1, 300))
    n = -(-width // tile_size) * -(-height // tile_size)
    tiles = tuple(
        Tile(
            streams=tuple(draw(st.lists(st.binary(max_size=12), min_size=1, max_size=8))),
            symbol_crc=draw(st.integers(0, 0xFFFFFFFF)),
        )
        for _ in range(n)
    )
    names = draw(st.lists(st.text(_visible, min_size=1, max_size=16), max_size=5, unique=True))
    metadata = tuple((k, draw(st.binary(max_size=24))) for k in names)
    return Container(
        model_id=draw(st.text(_visible, min_size=1, max_size=64)),
        model_hash=draw(st.binary(min_size=32, max_size=32)),
        quality=draw(st.integers(1, 8)),
        width=width,
        height=height,
        mode=draw(st.text(_visible, min_size=1, max_size=16)),
        tile_size=tile_size,
        tiles=tiles,
        metadata=metadata,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(containers())
def test_property_roundtrip(c):
    b = serialize(c)
    assert b == _reference_encode(c)
    assert parse(b) == c


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_property_arbitrary_bytes_rejected(data):
    for candidate in (data, MAGIC + data, SMALL_BYTES[:11] + data, SMALL_BYTES[:BODY] + data):
        if candidate == SMALL_BYTES:
            continue
        _err(candidate)


# ------------------------------------------------------------------------------------------------
# Exhaustive damage on a small file


def test_small_file_is_small():
    assert 300 <= len(SMALL_BYTES) <= 600
    assert b"NEND" not in SMALL_BYTES[:-4]


def test_every_single_bit_flip_is_rejected():
    assert parse(SMALL_BYTES) == SMALL
    codes = {}
    for i in range(len(SMALL_BYTES)):
        for bit in range(8):
            b = bytearray(SMALL_BYTES)
            b[i] ^= 1 << bit
            try:
                parse(bytes(b))
            except FormatError as e:  # anything else propagates and fails the test
                assert e.code in CODES
                codes[e.code] = codes.get(e.code, 0) + 1
            else:
                pytest.fail(f"bit {bit} of byte {i} flipped, and parse accepted it")
    # the header CRC, the file CRC and the magic check all take part
    assert set(codes) == {"E_FORMAT_MAGIC", "E_FORMAT_VERSION", "E_FORMAT_CHECKSUM"}, codes
    assert sum(codes.values()) == 8 * len(SMALL_BYTES)


def test_every_truncation_is_reported_as_truncation():
    for n in range(len(SMALL_BYTES)):
        e = _err(SMALL_BYTES[:n])
        assert e.code == "E_FORMAT_TRUNCATED", (n, e.code, e.message)


def test_trailing_garbage_is_rejected():
    for extra in (b"\0", b"x", b"NEND", SMALL_BYTES[-8:], bytes(100)):
        e = _err(SMALL_BYTES + extra)
        assert e.code == "E_FORMAT_TRAILING", (extra, e.code)
        assert str(len(extra)) in e.message
    # two files glued together
    assert _err(SMALL_BYTES + SMALL_BYTES).code == "E_FORMAT_TRAILING"


# ------------------------------------------------------------------------------------------------
# Seeded fuzzing

FUZZ_SEED = int(os.environ.get("NICD_FUZZ_SEED", "20240611"))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0:  # 1..4 bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # insert bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:  # delete bytes
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 8)]
    elif kind == 3:  # inflate a 4-byte field
        i = rng.randrange(len(b) - 3)
        b[i : i + 4] = b"\xff\xff\xff\xff"
    elif kind == 4:  # version swap
        struct.pack_into("<H", b, OFF_VERSION, rng.choice([0, 2, 3, 0x100, 0xFFFF, 1]))
    elif kind == 5:  # overwrite one byte with a random value (may be a no-op)
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 6:  # truncate, then append random bytes
        del b[rng.randrange(len(b)) :]
        b += bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
    else:  # duplicate a chunk
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 32))
        b[j:j] = b[i:j]
    return bytes(b)


def _check_mutant(mutant: bytes, original: bytes, expected: Container, refixed: bool) -> str:
    t0 = time.perf_counter()
    try:
        got = parse(mutant)
    except FormatError as e:
        outcome = e.code
        assert e.code in CODES
    else:
        if refixed:
            # With fixed CRCs a structurally valid file may parse; then it must be canonical.
            assert serialize(got) == mutant
        else:
            assert mutant == original, "a real mutation was accepted"
            assert got == expected
        outcome = "ok"
    assert time.perf_counter() - t0 < 2.0
    return outcome


def test_seeded_random_mutations():
    print(f"fuzz seed: {FUZZ_SEED} (set NICD_FUZZ_SEED to replay)")
    rng = random.Random(FUZZ_SEED)
    outcomes: dict[str, int] = {}
    for _ in range(5000):
        mutant = _mutate(rng, SMALL_BYTES)
        o = _check_mutant(mutant, SMALL_BYTES, SMALL, refixed=False)
        outcomes[o] = outcomes.get(o, 0) + 1
    print(outcomes)
    assert outcomes.get("E_FORMAT_CHECKSUM", 0) > 1000
    assert outcomes.get("E_FORMAT_VERSION", 0) > 100


def test_seeded_random_mutations_with_valid_checksums():
    """Mutations whose CRCs are recomputed: only the structural checks stand in the way."""
    rng = random.Random(FUZZ_SEED + 1)
    outcomes: dict[str, int] = {}
    for _ in range(3000):
        mutant = _refix(_mutate(rng, SMALL_BYTES))
        o = _check_mutant(mutant, SMALL_BYTES, SMALL, refixed=True)
        outcomes[o] = outcomes.get(o, 0) + 1
    print(outcomes)
    assert outcomes.get("E_FORMAT_FIELD", 0) > 100


def test_random_bytes_are_rejected():
    rng = random.Random(FUZZ_SEED + 2)
    for n in (0, 1, 8, 9, 10, 11, 100, 147, 148, 149, 156, 1000, 100_000):
        for _ in range(20):
            blob = bytes(rng.randrange(256) for _ in range(min(n, 2000))) * (n // 2000 + 1)
            blob = blob[:n]
            _err(blob)
            _err(MAGIC + blob)
            e = _err(MAGIC + b"\x01\x00" + blob)
            assert e.code in {"E_FORMAT_TRUNCATED", "E_FORMAT_CHECKSUM"}


# ------------------------------------------------------------------------------------------------
# Specific rejections, each with valid CRCs so that the intended check is the one that fires


def test_bad_magic():
    e = _err(b"GIF89a" + bytes(300))
    assert e.code == "E_FORMAT_MAGIC" and "not a nicd file" in e.message
    assert _err(b"\x89PNG\r\n\x1a\n" + bytes(300)).code == "E_FORMAT_MAGIC"
    assert _err(b"x").code == "E_FORMAT_MAGIC"
    # text-mode transfer: CRLF -> LF
    damaged = SMALL_BYTES.replace(b"\r\n", b"\n", 1)
    e = _err(damaged)
    assert e.code == "E_FORMAT_MAGIC" and "text mode" in e.message


@pytest.mark.parametrize("version", [0, 2, 7, 0xFFFF])
def test_unknown_version_is_named(version):
    e = _err(_put(SMALL_BYTES, OFF_VERSION, "<H", version))
    assert e.code == "E_FORMAT_VERSION"
    assert str(version) in e.message


def test_empty_file():
    e = _err(b"")
    assert e.code == "E_FORMAT_TRUNCATED" and "empty" in e.message


HEADER_FIELD_CASES = [
    ("flags", OFF_FLAGS, "<H", 1, "E_FORMAT_FIELD"),
    ("quality-0", OFF_QUALITY, "<B", 0, "E_FORMAT_FIELD"),
    ("quality-9", OFF_QUALITY, "<B", 9, "E_FORMAT_FIELD"),
    ("width-0", OFF_WIDTH, "<I", 0, "E_FORMAT_FIELD"),
    ("height-0", OFF_HEIGHT, "<I", 0, "E_FORMAT_FIELD"),
    ("width-huge", OFF_WIDTH, "<I", MAX_SIDE + 1, "E_FORMAT_LIMIT"),
    ("height-max-u32", OFF_HEIGHT, "<I", 0xFFFFFFFF, "E_FORMAT_LIMIT"),
    ("tile-size-0", OFF_TILE_SIZE, "<I", 0, "E_FORMAT_FIELD"),
    ("tile-size-100", OFF_TILE_SIZE, "<I", 100, "E_FORMAT_FIELD"),
    ("tile-size-big", OFF_TILE_SIZE, "<I", 65536 + 64, "E_FORMAT_FIELD"),
    ("tile-count", OFF_TILE_COUNT, "<I", 5, "E_FORMAT_FIELD"),
    ("tile-count-huge", OFF_TILE_COUNT, "<I", 0xFFFFFFFF, "E_FORMAT_FIELD"),
    ("meta-count-huge", OFF_META_COUNT, "<H", 0xFFFF, "E_FORMAT_LIMIT"),
    ("model-id-empty", OFF_MODEL_ID, "<B", 0, "E_FORMAT_FIELD"),
    ("model-id-nonascii", OFF_MODEL_ID + 2, "<B", 0xE9, "E_FORMAT_FIELD"),
    ("model-id-nul-inside", OFF_MODEL_ID + 2, "<B", 0, "E_FORMAT_FIELD"),
    ("model-id-junk-in-padding", OFF_MODEL_ID + 60, "<B", ord("x"), "E_FORMAT_FIELD"),
    ("model-id-space", OFF_MODEL_ID + 1, "<B", ord(" "), "E_FORMAT_FIELD"),
    ("mode-empty", OFF_MODE, "<B", 0, "E_FORMAT_FIELD"),
    ("mode-control-char", OFF_MODE, "<B", 7, "E_FORMAT_FIELD"),
]


@pytest.mark.parametrize(
    "off,fmt,value,code",
    [c[1:] for c in HEADER_FIELD_CASES],
    ids=[c[0] for c in HEADER_FIELD_CASES],
)
def test_bad_header_field(off, fmt, value, code):
    bad = _put(SMALL_BYTES, off, fmt, value)
    assert _err(bad).code == code
    with pytest.raises(FormatError) as ei:
        peek_header(bad)
    assert ei.value.code == code


def test_header_damage_without_crc_fix_is_a_checksum_error():
    bad = bytearray(SMALL_BYTES)
    bad[OFF_WIDTH] ^= 1
    assert _err(bytes(bad)).code == "E_FORMAT_CHECKSUM"
    bad = bytearray(SMALL_BYTES)
    bad[OFF_HEADER_CRC] ^= 0x80
    assert _err(bytes(bad)).code == "E_FORMAT_CHECKSUM"


def test_max_pixels_limit():
    big = serialize(ROUNDTRIP_CASES["3000x2000-tile1024-6-tiles"])
    assert parse(big, max_pixels=6_000_000).width == 3000
    e = _err(big, max_pixels=5_999_999)
    assert e.code == "E_FORMAT_LIMIT" and "6000000" in e.message
    # over the format's own limit, even with a generous max_pixels
    b = _put(SMALL_BYTES, OFF_WIDTH, "<I", MAX_SIDE)
    b = _put(b, OFF_HEIGHT, "<I", MAX_SIDE)
    assert _err(b, max_pixels=1 << 62).code == "E_FORMAT_LIMIT"


def _meta_offsets(b: bytes, count: int) -> list[int]:
    """Offsets of the metadata entries of a serialized file."""
    out, pos = [], BODY
    for _ in range(count):
        out.append(pos)
        n = b[pos]
        (vlen,) = struct.unpack_from("<I", b, pos + 1 + n)
        pos += 1 + n + 4 + vlen
    out.append(pos)  # the tile table
    return out


def test_duplicate_metadata_name():
    c = _make(width=64, height=64, tile_size=64, metadata=(("icc", b"a"), ("icd", b"b")))
    b = serialize(c)
    second = _meta_offsets(b, 2)[1]
    assert b[second + 1 : second + 4] == b"icd"
    bad = _refix(b[: second + 3] + b"c" + b[second + 4 :])
    e = _err(bad)
    assert e.code == "E_FORMAT_FIELD" and "icc" in e.message and "twice" in e.message


@pytest.mark.parametrize("value,code", [(0, "E_FORMAT_FIELD"), (17, "E_FORMAT_FIELD")])
def test_bad_metadata_name_length(value, code):
    b = serialize(SMALL)
    assert _err(_put(b, BODY, "<B", value)).code == code


def test_bad_metadata_name_bytes():
    b = serialize(SMALL)
    for byte in (0x00, 0x20, 0x7F, 0xFF):
        assert _err(_put(b, BODY + 1, "<B", byte)).code == "E_FORMAT_FIELD"


def test_inflated_lengths_with_valid_checksums():
    b = SMALL_BYTES
    offs = _meta_offsets(b, len(SMALL.metadata))
    value_len_at = offs[0] + 1 + b[offs[0]]
    table = offs[-1]
    targets = {
        "metadata value length": value_len_at,
        "tile 0 stream 0 length": table + 5,
        "tile 3 stream 1 length": table + 3 * 13 + 9,
    }
    for what, off in targets.items():
        for value in (0xFFFFFFFF, 0x7FFFFFFF, len(b)):
            t0 = time.perf_counter()
            e = _err(_put(b, off, "<I", value))
            assert time.perf_counter() - t0 < 0.5
            assert e.code == "E_FORMAT_FIELD", (what, value, e.code)
    # a shrunken length leaves bytes unaccounted for
    assert struct.unpack_from("<I", b, table + 3 * 13 + 9)[0] == 8
    e = _err(_put(b, table + 3 * 13 + 9, "<I", 7))
    assert e.code == "E_FORMAT_FIELD" and "not accounted for" in e.message
    # a length inflated without fixing the CRC: the file checksum speaks first
    bad = bytearray(b)
    struct.pack_into("<I", bad, table + 5, 0xFFFFFFFF)
    assert _err(bytes(bad)).code == "E_FORMAT_CHECKSUM"


@pytest.mark.parametrize("n_streams", [0, MAX_STREAMS_PER_TILE + 1, 255])
def test_bad_stream_count(n_streams):
    table = _meta_offsets(SMALL_BYTES, len(SMALL.metadata))[-1]
    e = _err(_put(SMALL_BYTES, table + 4, "<B", n_streams))
    assert e.code == "E_FORMAT_FIELD" and "streams" in e.message


def test_hostile_counts_are_fast():
    """A valid header declaring a huge tile grid over a tiny body is rejected at once."""
    b = _put(SMALL_BYTES, OFF_WIDTH, "<I", MAX_SIDE)
    b = _put(b, OFF_HEIGHT, "<I", 2048)
    b = _put(b, OFF_TILE_COUNT, "<I", (MAX_SIDE // 64) * 32)
    t0 = time.perf_counter()
    e = _err(b)
    assert time.perf_counter() - t0 < 0.5
    assert e.code == "E_FORMAT_FIELD"
    # a large, intact file with garbage for a body parses (and fails) in linear time
    blob = SMALL_BYTES[:BODY] + random.Random(1).randbytes(20_000_000)
    t0 = time.perf_counter()
    _err(_refix(blob + b"\0" * 8))
    _err(blob)
    assert time.perf_counter() - t0 < 2.0


def test_big_valid_file_parses_fast():
    c = _make(width=8192, height=8192, tile_size=512)  # 256 tiles
    c = dataclasses.replace(
        c, tiles=tuple(Tile((bytes(40_000), b"e" * 100), i) for i in range(len(c.tiles)))
    )
    b = serialize(c)
    t0 = time.perf_counter()
    assert parse(b) == c
    assert time.perf_counter() - t0 < 2.0


# ------------------------------------------------------------------------------------------------
# serialize validates

BASE = _make(width=130, height=70, tile_size=64, metadata=(("icc", b"x"),))

INVALID = {
    "quality-0": dict(quality=0),
    "quality-9": dict(quality=9),
    "quality-bool": dict(quality=True),
    "hash-31": dict(model_hash=bytes(31)),
    "hash-33": dict(model_hash=bytes(33)),
    "hash-str": dict(model_hash="0" * 32),
    "tiles-too-few": dict(tiles=BASE.tiles[:-1]),
    "tiles-too-many": dict(tiles=BASE.tiles + BASE.tiles[:1]),
    "model-id-nonascii": dict(model_id="msh-é"),
    "model-id-empty": dict(model_id=""),
    "model-id-65": dict(model_id="m" * 65),
    "model-id-space": dict(model_id="a b"),
    "model-id-bytes": dict(model_id=b"msh"),
    "mode-empty": dict(mode=""),
    "mode-17": dict(mode="R" * 17),
    "width-0": dict(width=0),
    "height-negative": dict(height=-5),
    "width-over-side": dict(width=MAX_SIDE + 1),
    "pixels-over-limit": dict(width=MAX_SIDE, height=MAX_SIDE, tile_size=65536),
    "width-float": dict(width=130.0),
    "tile-size-100": dict(tile_size=100),
    "tile-size-0": dict(tile_size=0),
    "tile-size-too-big": dict(tile_size=65536 + 64),
    "flags": dict(flags=1),
    "zero-streams": dict(tiles=(Tile((), 0),) + BASE.tiles[1:]),
    "nine-streams": dict(tiles=(Tile((b"",) * 9, 0),) + BASE.tiles[1:]),
    "stream-str": dict(tiles=(Tile(("abc",), 0),) + BASE.tiles[1:]),
    "crc-negative": dict(tiles=(Tile((b"",), -1),) + BASE.tiles[1:]),
    "crc-too-big": dict(tiles=(Tile((b"",), 1 << 32),) + BASE.tiles[1:]),
    "not-a-tile": dict(tiles=((b"",),) + BASE.tiles[1:]),
    "meta-dup": dict(metadata=(("icc", b"a"), ("icc", b"b"))),
    "meta-name-empty": dict(metadata=(("", b"a"),)),
    "meta-name-17": dict(metadata=(("n" * 17, b"a"),)),
    "meta-name-nonascii": dict(metadata=(("ïcc", b"a"),)),
    "meta-value-str": dict(metadata=(("icc", "a"),)),
    "meta-not-pair": dict(metadata=(("icc",),)),
    "meta-too-many": dict(
        metadata=tuple((f"m{i}", b"") for i in range(C.MAX_METADATA_ENTRIES + 1))
    ),
}


@pytest.mark.parametrize("changes", INVALID.values(), ids=INVALID.keys())
def test_serialize_rejects_invalid_fields(changes):
    bad = dataclasses.replace(BASE, **changes)
    with pytest.raises(FormatError) as ei:
        serialize(bad)
    assert ei.value.code == "E_FORMAT_FIELD"


def test_serialize_accepts_the_limits():
    assert parse(serialize(BASE)) == BASE
    meta = tuple((f"m{i}", b"") for i in range(C.MAX_METADATA_ENTRIES))
    c = dataclasses.replace(BASE, metadata=meta)
    assert parse(serialize(c)) == c
    # width*height exactly at MAX_PIXELS is allowed
    c = _make(width=MAX_SIDE, height=MAX_PIXELS // MAX_SIDE, tile_size=65536, n_streams=1)
    assert c.width * c.height == MAX_PIXELS
    assert parse(serialize(c)) == c


# ------------------------------------------------------------------------------------------------
# No heavy imports


def test_container_imports_neither_torch_nor_pillow():
    code = (
        "import sys, nicd.codec.container; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'PIL' not in sys.modules, 'PIL imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
