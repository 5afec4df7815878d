"""The .nicd bitstream container: header, side data, tile table, coded streams, trailer.

This module is the only place that knows the byte layout of a .nicd file; `docs/format.md` documents
it byte by byte. It deliberately imports nothing but the standard library (no torch, no Pillow), so
that `nicd info`, the daemon's store and third-party tools can read a file's header cheaply.

`parse` treats its input as hostile: it runs in O(len(data)), never allocates more than the input's
size, and raises only `nicd.errors.FormatError` (with one of the `E_FORMAT_*` codes below) on any
malformed input. `serialize` validates a `Container` first and raises `FormatError` with code
`E_FORMAT_FIELD` on a bad field, so an invalid file is never written.

Layout (version 1; all integers little-endian)::

    header   148 bytes, fixed size, ends with a CRC32 of bytes 0..143
    body     metadata entries, tile table, stream bytes
    trailer  u32 CRC32 of every byte before it, then b"NEND"
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from nicd.errors import FormatError

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "MAGIC",
    "END_MARKER",
    "HEADER_SIZE",
    "TRAILER_SIZE",
    "MAX_SIDE",
    "MAX_PIXELS",
    "MAX_STREAMS_PER_TILE",
    "MAX_METADATA_ENTRIES",
    "MAX_MODEL_ID_LEN",
    "MAX_MODE_LEN",
    "MAX_META_NAME_LEN",
    "MIN_TILE_SIZE",
    "MAX_TILE_SIZE",
    "TILE_SIZE_STEP",
    "MIN_QUALITY",
    "MAX_QUALITY",
    "Tile",
    "Container",
    "Header",
    "tile_grid",
    "validate",
    "serialize",
    "parse",
    "peek_header",
    "file_checksum_ok",
    # error codes
    "E_FORMAT_MAGIC",
    "E_FORMAT_VERSION",
    "E_FORMAT_TRUNCATED",
    "E_FORMAT_CHECKSUM",
    "E_FORMAT_LIMIT",
    "E_FORMAT_FIELD",
    "E_FORMAT_TRAILING",
]

# --------------------------------------------------------------------------------------------------
# Constants. Changing any of these (other than raising a limit that no field width caps) changes the
# bitstream and needs a FORMAT_VERSION bump: see docs/format.md, "Versioning policy".

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"\x89NICD\r\n\x1a\n"  # 9 bytes, PNG-style: catches text-mode transfer damage
END_MARKER = b"NEND"

MAX_SIDE = 1 << 20
MAX_PIXELS = 1 << 31
MAX_STREAMS_PER_TILE = 8
MAX_METADATA_ENTRIES = 64
MAX_MODEL_ID_LEN = 64
MAX_MODE_LEN = 16
MAX_META_NAME_LEN = 16
MODEL_HASH_LEN = 32
MIN_TILE_SIZE = 64
MAX_TILE_SIZE = 65536
TILE_SIZE_STEP = 64
MIN_QUALITY = 1
MAX_QUALITY = 8

# Error codes (all carried by FormatError).
E_FORMAT_MAGIC = "E_FORMAT_MAGIC"  # not a nicd file
E_FORMAT_VERSION = "E_FORMAT_VERSION"  # a nicd file of a format version this build cannot read
E_FORMAT_TRUNCATED = "E_FORMAT_TRUNCATED"  # the file ends early
E_FORMAT_CHECKSUM = "E_FORMAT_CHECKSUM"  # header or file CRC mismatch: the bytes were altered
E_FORMAT_LIMIT = "E_FORMAT_LIMIT"  # valid file, but it declares more than the limits allow
E_FORMAT_FIELD = "E_FORMAT_FIELD"  # a field has a value the format does not allow
E_FORMAT_TRAILING = "E_FORMAT_TRAILING"  # bytes after the end marker

# Header: magic, then this struct, then the header CRC32.
#   u16 version, u16 flags, u32 width, u32 height, u32 tile_size, u32 tile_count,
#   u16 metadata_count, u8 quality, 32s model_hash, 64s model_id, 16s mode
_HEADER_FIELDS = struct.Struct("<HHIIIIHB32s64s16s")
_VERSION_OFFSET = len(MAGIC)  # 9
_HEADER_CRC_OFFSET = len(MAGIC) + _HEADER_FIELDS.size  # 144
HEADER_SIZE = _HEADER_CRC_OFFSET + 4  # 148
TRAILER_SIZE = 4 + len(END_MARKER)  # 8

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U32_MAX = 0xFFFFFFFF
_MIN_TILE_ENTRY = 4 + 1 + 4  # symbol_crc, stream count, one stream length
_MIN_META_ENTRY = 1 + 1 + 4  # name length, one name byte, value length

assert _HEADER_FIELDS.size == 135 and HEADER_SIZE == 148


# --------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Tile:
    """One tile's coded data.

    `streams` are the entropy-coded streams of this tile (for example z, y, escapes),
    1..MAX_STREAMS_PER_TILE of them; an individual stream may be empty. `symbol_crc` is a CRC32
    (u32) of the coded symbols computed by the codec: the container stores it, never interprets it.
    """

    streams: tuple[bytes, ...]
    symbol_crc: int


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tile_size x tile_size tiles covering a width x height image."""
    return (-(-height // tile_size), -(-width // tile_size))


@dataclass(frozen=True)
class Container:
    """Everything a .nicd file holds, decoded. See docs/format.md for the meaning of each field."""

    model_id: str
    model_hash: bytes
    quality: int
    width: int
    height: int
    mode: str
    tile_size: int
    tiles: tuple[Tile, ...]
    metadata: tuple[tuple[str, bytes], ...] = ()
    flags: int = 0

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(rows, cols); tiles are stored row by row (raster order)."""
        return tile_grid(self.width, self.height, self.tile_size)

    def meta(self, name: str) -> bytes | None:
        """The side-data entry called `name`, or None."""
        for key, value in self.metadata:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Header:
    """The fixed header of a .nicd file, as returned by `peek_header` (no body, no tiles)."""

    version: int
    flags: int
    quality: int
    width: int
    height: int
    tile_size: int
    tile_count: int
    metadata_count: int
    model_hash: bytes
    model_id: str
    mode: str

    @property
    def tile_grid(self) -> tuple[int, int]:
        return tile_grid(self.width, self.height, self.tile_size)

    @property
    def header_size(self) -> int:
        return HEADER_SIZE


# --------------------------------------------------------------------------------------------------
# Validation (shared by serialize and parse)


def _fail(message: str, code: str = E_FORMAT_FIELD) -> FormatError:
    return FormatError(message, code=code)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _visible_ascii(b: bytes) -> bool:
    """True if every byte is a visible ASCII character (0x21..0x7E): no space, no control."""
    return all(0x21 <= c <= 0x7E for c in b)


def _check_name(value: object, what: str, max_len: int) -> bytes:
    if not isinstance(value, str):
        raise _fail(f"{what} must be a str, not {type(value).__name__}")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise _fail(f"{what} {value!r} is not ASCII") from None
    if not 1 <= len(raw) <= max_len:
        raise _fail(f"{what} {value!r} must be 1..{max_len} characters long, not {len(raw)}")
    if not _visible_ascii(raw):
        raise _fail(f"{what} {value!r} may contain only visible ASCII characters (no spaces)")
    return raw


def _check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(f"{what} must be bytes, not {type(value).__name__}")
    raw = bytes(value)
    if len(raw) > _U32_MAX:
        raise _fail(f"{what} is {len(raw)} bytes long, over the 4 GiB - 1 limit")
    return raw


def _check_range(value: object, what: str, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise _fail(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:  # type: ignore[operator]
        raise _fail(f"{what} is {value}, must be {lo}..{hi}")
    return value  # type: ignore[return-value]


def _check_geometry(
    width: int, height: int, tile_size: int, max_pixels: int, limit_code: str
) -> None:
    """Width, height, tile size and pixel count; values known to be ints."""
    for what, v in (("width", width), ("height", height)):
        if v < 1:
            raise _fail(f"{what} is {v}, must be at least 1")
        if v > MAX_SIDE:
            raise _fail(f"{what} is {v}, above the limit of {MAX_SIDE}", limit_code)
    if width * height > MAX_PIXELS:
        raise _fail(
            f"image is {width}x{height} = {width * height} pixels, above the format limit of "
            f"{MAX_PIXELS}",
            limit_code,
        )
    if width * height > max_pixels:
        raise _fail(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}",
            E_FORMAT_LIMIT,
        )
    if not (MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE and tile_size % TILE_SIZE_STEP == 0):
        raise _fail(
            f"tile size is {tile_size}, must be a multiple of {TILE_SIZE_STEP} in "
            f"{MIN_TILE_SIZE}..{MAX_TILE_SIZE}"
        )


def validate(c: Container) -> None:
    """Raise FormatError(code=E_FORMAT_FIELD) if `c` cannot be written as a version-1 file."""
    if not isinstance(c, Container):
        raise _fail(f"expected a Container, not {type(c).__name__}")
    _check_name(c.model_id, "model id", MAX_MODEL_ID_LEN)
    if not isinstance(c.model_hash, (bytes, bytearray, memoryview)):
        raise _fail(f"model hash must be bytes, not {type(c.model_hash).__name__}")
    if len(bytes(c.model_hash)) != MODEL_HASH_LEN:
        raise _fail(f"model hash must be exactly {MODEL_HASH_LEN} bytes, not {len(c.model_hash)}")
    _check_range(c.quality, "quality", MIN_QUALITY, MAX_QUALITY)
    for what, v in (("width", c.width), ("height", c.height), ("tile size", c.tile_size)):
        if not _is_int(v):
            raise _fail(f"{what} must be an int, not {type(v).__name__}")
    _check_geometry(c.width, c.height, c.tile_size, MAX_PIXELS, E_FORMAT_FIELD)
    _check_name(c.mode, "mode", MAX_MODE_LEN)
    _check_range(c.flags, "flags", 0, 0)  # reserved; must be 0 in version 1

    if not isinstance(c.metadata, (tuple, list)):
        raise _fail(
            f"metadata must be a tuple of (name, bytes) pairs, not {type(c.metadata).__name__}"
        )
    if len(c.metadata) > MAX_METADATA_ENTRIES:
        raise _fail(f"{len(c.metadata)} metadata entries, at most {MAX_METADATA_ENTRIES} allowed")
    seen: set[str] = set()
    for entry in c.metadata:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise _fail(f"metadata entry {entry!r:.60} is not a (name, bytes) pair")
        name, value = entry
        _check_name(name, "metadata name", MAX_META_NAME_LEN)
        if name in seen:
            raise _fail(f"metadata name {name!r} appears twice")
        seen.add(name)
        _check_bytes(value, f"metadata {name!r}")

    if not isinstance(c.tiles, (tuple, list)):
        raise _fail(f"tiles must be a tuple of Tile, not {type(c.tiles).__name__}")
    rows, cols = c.tile_grid
    if len(c.tiles) != rows * cols:
        raise _fail(
            f"{len(c.tiles)} tiles, but a {c.width}x{c.height} image in {c.tile_size}-pixel tiles "
            f"needs {rows}x{cols} = {rows * cols}"
        )
    for i, tile in enumerate(c.tiles):
        if not isinstance(tile, Tile):
            raise _fail(f"tile {i} is a {type(tile).__name__}, not a Tile")
        _check_range(tile.symbol_crc, f"tile {i} symbol CRC", 0, _U32_MAX)
        if not isinstance(tile.streams, (tuple, list)):
            raise _fail(
                f"tile {i} streams must be a tuple of bytes, not {type(tile.streams).__name__}"
            )
        if not 1 <= len(tile.streams) <= MAX_STREAMS_PER_TILE:
            raise _fail(
                f"tile {i} has {len(tile.streams)} streams, must have 1..{MAX_STREAMS_PER_TILE}"
            )
        for j, s in enumerate(tile.streams):
            _check_bytes(s, f"tile {i} stream {j}")


# --------------------------------------------------------------------------------------------------
# Writing


def _pad(raw: bytes, size: int) -> bytes:
    return raw + b"\0" * (size - len(raw))


def serialize(c: Container) -> bytes:
    """`c` as the bytes of a version-1 .nicd file; validates `c` first (E_FORMAT_FIELD)."""
    validate(c)
    head = MAGIC + _HEADER_FIELDS.pack(
        FORMAT_VERSION,
        c.flags,
        c.width,
        c.height,
        c.tile_size,
        len(c.tiles),
        len(c.metadata),
        c.quality,
        bytes(c.model_hash),
        _pad(c.model_id.encode("ascii"), MAX_MODEL_ID_LEN),
        _pad(c.mode.encode("ascii"), MAX_MODE_LEN),
    )
    parts: list[bytes] = [head, _U32.pack(zlib.crc32(head))]
    for name, value in c.metadata:
        raw_name = name.encode("ascii")
        value = bytes(value)
        parts += [_U8.pack(len(raw_name)), raw_name, _U32.pack(len(value)), value]
    for tile in c.tiles:
        parts.append(struct.pack("<IB", tile.symbol_crc, len(tile.streams)))
        parts.append(struct.pack(f"<{len(tile.streams)}I", *(len(s) for s in tile.streams)))
    for tile in c.tiles:
        parts.extend(bytes(s) for s in tile.streams)
    out = b"".join(parts)
    return out + _U32.pack(zlib.crc32(out)) + END_MARKER


# --------------------------------------------------------------------------------------------------
# Reading


class _Overrun(Exception):
    """A declared length points past the bytes available (internal; turned into a FormatError)."""


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"parse() needs bytes, not {type(data).__name__}")


def _decode_padded(raw: bytes, what: str, max_len: int) -> str:
    """A NUL-padded visible-ASCII field: 1..max_len characters then only NULs."""
    value = raw.rstrip(b"\0")
    if not value:
        raise _fail(f"{what} is empty")
    if not _visible_ascii(value):
        raise _fail(f"{what} contains a byte that is not visible ASCII")
    return value.decode("ascii")


def _read_header(data: bytes, max_pixels: int) -> Header:
    """Magic, version, header CRC, then the header fields. Reads nothing past byte HEADER_SIZE."""
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data):
            raise _fail(
                "file is empty" if not data else f"file is truncated ({len(data)} bytes)",
                E_FORMAT_TRUNCATED,
            )
        raise _fail("not a nicd file (bad magic bytes)", E_FORMAT_MAGIC)
    if data[: len(MAGIC)] != MAGIC:
        if data[:5] == MAGIC[:5]:
            raise _fail(
                "not a nicd file: the magic bytes are damaged (was it transferred in text mode?)",
                E_FORMAT_MAGIC,
            )
        raise _fail("not a nicd file (bad magic bytes)", E_FORMAT_MAGIC)
    if len(data) < _VERSION_OFFSET + 2:
        raise _fail(f"file is truncated ({len(data)} bytes, inside the header)", E_FORMAT_TRUNCATED)
    (version,) = _U16.unpack_from(data, _VERSION_OFFSET)
    if version not in SUPPORTED_VERSIONS:
        raise _fail(
            f"unsupported nicd format version {version} (this build reads version "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
            E_FORMAT_VERSION,
        )
    if len(data) < HEADER_SIZE:
        raise _fail(
            f"file is truncated ({len(data)} bytes, the header alone is {HEADER_SIZE})",
            E_FORMAT_TRUNCATED,
        )
    (stored_crc,) = _U32.unpack_from(data, _HEADER_CRC_OFFSET)
    if zlib.crc32(data[:_HEADER_CRC_OFFSET]) != stored_crc:
        raise _fail("header checksum mismatch: the file is corrupted", E_FORMAT_CHECKSUM)

    (
        version,
        flags,
        width,
        height,
        tile_size,
        tile_count,
        metadata_count,
        quality,
        model_hash,
        raw_model_id,
        raw_mode,
    ) = _HEADER_FIELDS.unpack_from(data, len(MAGIC))
    if flags != 0:
        raise _fail(f"header flags are {flags:#06x}; version {version} requires 0")
    if not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise _fail(f"quality is {quality}, must be {MIN_QUALITY}..{MAX_QUALITY}")
    _check_geometry(width, height, tile_size, max_pixels, E_FORMAT_LIMIT)
    rows, cols = tile_grid(width, height, tile_size)
    if tile_count != rows * cols:
        raise _fail(
            f"header declares {tile_count} tiles, but a {width}x{height} image in "
            f"{tile_size}-pixel tiles has {rows}x{cols} = {rows * cols}"
        )
    if metadata_count > MAX_METADATA_ENTRIES:
        raise _fail(
            f"header declares {metadata_count} metadata entries, at most {MAX_METADATA_ENTRIES} "
            "are allowed",
            E_FORMAT_LIMIT,
        )
    model_id = _decode_padded(raw_model_id, "model id", MAX_MODEL_ID_LEN)
    mode = _decode_padded(raw_mode, "mode", MAX_MODE_LEN)
    return Header(
        version=version,
        flags=flags,
        quality=quality,
        width=width,
        height=height,
        tile_size=tile_size,
        tile_count=tile_count,
        metadata_count=metadata_count,
        model_hash=bytes(model_hash),
        model_id=model_id,
        mode=mode,
    )


def _walk_body(
    data: bytes, pos: int, end: int, h: Header
) -> tuple[tuple[tuple[str, bytes], ...], tuple[Tile, ...], int]:
    """Read metadata, tile table and streams from data[pos:end].

    Raises _Overrun when a declared length or count needs more bytes than data[pos:end] holds (every
    length is checked before slicing, so nothing larger than the input is ever allocated), and
    FormatError(E_FORMAT_FIELD) on a bad value. Returns (metadata, tiles, position after streams).
    """

    def need(n: int, what: str) -> None:
        if n > end - pos:
            raise _Overrun(f"{what} needs {n} bytes at offset {pos}, only {max(end - pos, 0)} left")

    if h.metadata_count * _MIN_META_ENTRY > end - pos:
        raise _Overrun(f"{h.metadata_count} metadata entries cannot fit in {end - pos} bytes")
    metadata: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for k in range(h.metadata_count):
        need(1, f"metadata entry {k} name length")
        name_len = data[pos]
        pos += 1
        if not 1 <= name_len <= MAX_META_NAME_LEN:
            raise _fail(
                f"metadata entry {k} name length is {name_len}, must be 1..{MAX_META_NAME_LEN}"
            )
        need(name_len + 4, f"metadata entry {k} name")
        raw_name = data[pos : pos + name_len]
        pos += name_len
        if not _visible_ascii(raw_name):
            raise _fail(f"metadata entry {k} name is not visible ASCII")
        name = raw_name.decode("ascii")
        if name in seen:
            raise _fail(f"metadata name {name!r} appears twice")
        seen.add(name)
        (value_len,) = _U32.unpack_from(data, pos)
        pos += 4
        need(value_len, f"metadata {name!r} value")
        metadata.append((name, data[pos : pos + value_len]))
        pos += value_len

    if h.tile_count * _MIN_TILE_ENTRY > end - pos:
        raise _Overrun(f"a table of {h.tile_count} tiles cannot fit in {end - pos} bytes")
    table: list[tuple[int, tuple[int, ...]]] = []
    total = 0
    for i in range(h.tile_count):
        need(5, f"tile {i} entry")
        symbol_crc, n_streams = struct.unpack_from("<IB", data, pos)
        pos += 5
        if not 1 <= n_streams <= MAX_STREAMS_PER_TILE:
            raise _fail(f"tile {i} has {n_streams} streams, must have 1..{MAX_STREAMS_PER_TILE}")
        need(4 * n_streams, f"tile {i} stream lengths")
        lengths = struct.unpack_from(f"<{n_streams}I", data, pos)
        pos += 4 * n_streams
        total += sum(lengths)
        table.append((symbol_crc, lengths))
    need(total, "stream data")

    tiles: list[Tile] = []
    for symbol_crc, lengths in table:
        streams = []
        for n in lengths:
            streams.append(data[pos : pos + n])
            pos += n
        tiles.append(Tile(streams=tuple(streams), symbol_crc=symbol_crc))
    return tuple(metadata), tuple(tiles), pos


def _trailer_ok(data: bytes, at: int) -> bool:
    """True if a valid trailer (CRC of data[:at], then END_MARKER) starts at offset `at`."""
    if at < 0 or at + TRAILER_SIZE > len(data):
        return False
    if data[at + 4 : at + TRAILER_SIZE] != END_MARKER:
        return False
    return _U32.unpack_from(data, at)[0] == zlib.crc32(memoryview(data)[:at])


def file_checksum_ok(data: bytes) -> bool:
    """True if `data` ends with the end marker and the file CRC32 in its trailer matches.

    Never raises. Says nothing about the header or the structure: use `parse` for that.
    """
    try:
        data = _as_bytes(data)
    except TypeError:
        return False
    return len(data) >= len(MAGIC) + TRAILER_SIZE and _trailer_ok(data, len(data) - TRAILER_SIZE)


def peek_header(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Header:
    """The validated fixed header of a .nicd file, without reading the body or the trailer.

    Checks the magic, the version, the header CRC and the header fields, exactly as `parse` does.
    Needs only the first HEADER_SIZE (148) bytes; use `file_checksum_ok` or `parse` for the rest.
    """
    return _read_header(_as_bytes(data), max_pixels)


def parse(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Container:
    """Decode a .nicd file into a Container. Raises FormatError (code E_FORMAT_*) on any bad input.

    Validation order (docs/format.md): magic, version, header length, header CRC, header fields,
    then the file CRC and end marker, then the body structure. When the file CRC does not match, the
    body is walked only to tell truncation (E_FORMAT_TRUNCATED) and trailing data
    (E_FORMAT_TRAILING) from other damage (E_FORMAT_CHECKSUM). Runs in O(len(data)) and allocates
    at most about len(data).
    A non-bytes-like argument raises TypeError (a programming error, not bad input).
    """
    data = _as_bytes(data)
    h = _read_header(data, max_pixels)
    body_start = HEADER_SIZE
    trailer_at = len(data) - TRAILER_SIZE

    if trailer_at >= body_start and _trailer_ok(data, trailer_at):
        # The bytes are what the writer wrote; any inconsistency left is a writer bug.
        try:
            metadata, tiles, body_end = _walk_body(data, body_start, trailer_at, h)
        except _Overrun as e:
            raise _fail(f"inconsistent lengths: {e}") from None
        if body_end != trailer_at:
            raise _fail(
                f"{trailer_at - body_end} bytes between the last stream and the trailer "
                "are not accounted for"
            )
        return Container(
            model_id=h.model_id,
            model_hash=h.model_hash,
            quality=h.quality,
            width=h.width,
            height=h.height,
            mode=h.mode,
            tile_size=h.tile_size,
            tiles=tiles,
            metadata=metadata,
            flags=h.flags,
        )

    # The file CRC or end marker does not match: find the most useful explanation.
    if trailer_at < body_start:
        raise _fail(
            f"file is truncated ({len(data)} bytes, ends right after the header)",
            E_FORMAT_TRUNCATED,
        )
    ends_with_marker = data[-len(END_MARKER) :] == END_MARKER
    try:
        _, _, body_end = _walk_body(data, body_start, trailer_at, h)
    except _Overrun as e:
        if not ends_with_marker:
            raise _fail(f"file is truncated ({len(data)} bytes; {e})", E_FORMAT_TRUNCATED) from None
        raise _fail(
            f"file checksum mismatch: the file is corrupted ({e})", E_FORMAT_CHECKSUM
        ) from None
    except FormatError as e:
        raise _fail(
            f"file checksum mismatch: the file is corrupted ({e.message})", E_FORMAT_CHECKSUM
        ) from None
    if body_end < trailer_at and _trailer_ok(data, body_end):
        extra = len(data) - body_end - TRAILER_SIZE
        raise _fail(f"{extra} unexpected bytes after the end marker", E_FORMAT_TRAILING)
    if not ends_with_marker:
        raise _fail(
            "the end marker is missing or damaged: the file is corrupted", E_FORMAT_CHECKSUM
        )
    raise _fail("file checksum mismatch: the file is corrupted", E_FORMAT_CHECKSUM)
