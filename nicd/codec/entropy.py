"""Entropy coding of integer latents with constriction's range coder over frozen integer tables.

Symbols that share a table are coded together (i.i.d. under that table), tables in increasing order,
each group in raster order; the decoder knows every symbol's table before it decodes (from the
integer hyper-synthesis or the channel), so it can rebuild the same groups. Values outside a table's
range are coded as its escape symbol and written verbatim (zig-zag varints) in a separate stream.
"""

from __future__ import annotations

import numpy as np
import constriction

from ..errors import FormatError
from .tables import TOTAL, TableSet


class TableModels:
    """constriction models built from integer counts (counts / 2**PRECISION is exact in float64)."""

    def __init__(self, tables: TableSet):
        self.tables = tables
        self._models: dict[int, object] = {}

    def model(self, k: int):
        m = self._models.get(k)
        if m is None:
            n = int(self.tables.lengths[k])
            probs = self.tables.counts[k, :n].astype(np.float64) / TOTAL
            m = constriction.stream.model.Categorical(probs, perfect=False)
            self._models[k] = m
        return m

    def bits(self, values: np.ndarray, table_ids: np.ndarray) -> float:
        """The ideal code length of values under the tables (escape payloads not counted)."""
        t = self.tables
        sym = values - t.offsets[table_ids]
        esc = (sym < 0) | (sym >= t.lengths[table_ids] - 1)
        sym = np.where(esc, t.lengths[table_ids] - 1, sym)
        return float(-np.log2(t.counts[table_ids, sym] / TOTAL).sum())


def _zigzag_varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        u = (v << 1) ^ (v >> 63)
        while True:
            b = u & 0x7F
            u >>= 7
            if u:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
    return bytes(out)


class EscapeReader:
    """Reads the zig-zag varints of escaped values; any value beyond ±limit is a format error."""

    def __init__(self, data: bytes, limit: int):
        self.data = data
        self.pos = 0
        self.limit = limit

    def read(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        data, pos = self.data, self.pos
        for i in range(count):
            u = 0
            shift = 0
            while True:
                if pos >= len(data) or shift > 63:
                    raise FormatError("escape stream is truncated or malformed", code="E_FORMAT_STREAM")
                b = data[pos]
                pos += 1
                u |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            v = (u >> 1) ^ -(u & 1)
            if not -self.limit <= v <= self.limit:
                raise FormatError("escape stream holds a value out of range", code="E_FORMAT_STREAM")
            out[i] = v
        self.pos = pos
        return out


def _groups(table_ids: np.ndarray, num_tables: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table_ids, kind="stable")
    counts = np.bincount(table_ids, minlength=num_tables)
    return order, counts


def encode_grouped(encoder, values: np.ndarray, table_ids: np.ndarray, models: TableModels) -> np.ndarray:
    """Encode flat int64 `values`, each under table `table_ids[i]`; returns the escaped values in order."""
    t = models.tables
    order, counts = _groups(table_ids, len(t.lengths))
    vals = values[order]
    ids = table_ids[order]
    sym = vals - t.offsets[ids]
    esc = (sym < 0) | (sym >= t.lengths[ids] - 1)
    sym = np.where(esc, t.lengths[ids] - 1, sym).astype(np.int32)
    start = 0
    for k, n in enumerate(counts.tolist()):
        if n:
            encoder.encode(sym[start : start + n], models.model(k))
        start += n
    return vals[esc]


def decode_grouped(decoder, table_ids: np.ndarray, models: TableModels, escapes: EscapeReader) -> np.ndarray:
    t = models.tables
    order, counts = _groups(table_ids, len(t.lengths))
    sym = np.empty(len(table_ids), dtype=np.int64)
    start = 0
    for k, n in enumerate(counts.tolist()):
        if n:
            try:
                sym[start : start + n] = decoder.decode(models.model(k), n)
            except (AssertionError, ValueError, RuntimeError) as exc:
                # constriction refuses words that no symbol sequence could have produced
                raise FormatError(f"coded stream is corrupt ({exc})", code="E_FORMAT_STREAM") from None
        start += n
    ids = table_ids[order]
    esc = sym == t.lengths[ids] - 1
    vals = sym + t.offsets[ids]
    n_esc = int(esc.sum())
    if n_esc:
        vals[esc] = escapes.read(n_esc)
    out = np.empty_like(vals)
    out[order] = vals
    return out


def new_encoder():
    return constriction.stream.queue.RangeEncoder()


def finish(encoder, escaped: list[np.ndarray]) -> tuple[bytes, bytes]:
    words = encoder.get_compressed()
    esc = np.concatenate(escaped) if escaped else np.zeros(0, dtype=np.int64)
    return words.astype("<u4").tobytes(), _zigzag_varints(esc.astype(np.int64))


def new_decoder(stream: bytes):
    if len(stream) % 4:
        raise FormatError("coded stream length is not a whole number of 32-bit words", code="E_FORMAT_STREAM")
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    if words.size == 0:
        words = np.zeros(1, dtype=np.uint32)
    return constriction.stream.queue.RangeDecoder(words)
