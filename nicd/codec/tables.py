"""Frozen integer probability tables: the only probabilities the entropy coder ever sees.

A file must decode on any machine, so nothing that selects or shapes a coding distribution may be
computed in floating point at coding time (see docs/format.md and Ballé, Johnston, Minnen, ICLR 2019).
Tables are integer counts summing to 2**PRECISION, built once at export time and stored with the
model; the coder divides them by 2**PRECISION, which is exact, so every machine hands bit-identical
probabilities to constriction.

Each table covers symbols lo..hi plus one trailing escape entry; values outside [lo, hi] are coded as
the escape and then written verbatim in the escape stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PRECISION = 22
TOTAL = 1 << PRECISION
TAIL_MASS = 1e-9

# Scale table of the Gaussian conditional: 64 log-spaced scales, as in CompressAI's get_scale_table.
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64


def scale_table() -> np.ndarray:
    return np.exp(np.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))


@dataclass
class TableSet:
    """Integer PMFs, one row per table: counts[k, :length[k]] for symbols offset[k] .. offset[k]+length[k]-2,
    counts[k, length[k]-1] is the escape."""

    counts: np.ndarray  # (K, L) int64
    lengths: np.ndarray  # (K,) int64
    offsets: np.ndarray  # (K,) int64

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.counts": self.counts, f"{prefix}.lengths": self.lengths, f"{prefix}.offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str) -> "TableSet":
        return cls(
            np.asarray(arrays[f"{prefix}.counts"], dtype=np.int64),
            np.asarray(arrays[f"{prefix}.lengths"], dtype=np.int64),
            np.asarray(arrays[f"{prefix}.offsets"], dtype=np.int64),
        )


def quantize_pmf(pmf: np.ndarray, total: int = TOTAL) -> np.ndarray:
    """Float probabilities (symbols followed by escape) → integer counts ≥ 1 that sum to `total`."""
    pmf = np.asarray(pmf, dtype=np.float64)
    pmf = np.maximum(pmf, 0.0)
    counts = np.maximum(np.round(pmf / pmf.sum() * total), 1).astype(np.int64)
    # Fix the sum on the largest entries, never going below 1.
    diff = int(total - counts.sum())
    order = np.argsort(-counts)
    i = 0
    while diff != 0:
        k = order[i % len(order)]
        step = 1 if diff > 0 else -1
        if counts[k] + step >= 1:
            counts[k] += step
            diff -= step
        i += 1
    return counts


def _pack(pmfs: list[np.ndarray], offsets: list[int]) -> TableSet:
    width = max(len(p) for p in pmfs)
    counts = np.zeros((len(pmfs), width), dtype=np.int64)
    for k, p in enumerate(pmfs):
        counts[k, : len(p)] = quantize_pmf(p)
    return TableSet(counts, np.array([len(p) for p in pmfs], dtype=np.int64), np.array(offsets, dtype=np.int64))


def gaussian_tables(scales: np.ndarray | None = None) -> TableSet:
    """Zero-mean discretized Gaussians N(0, s²) over -L..L with L = ceil(s · z(tail)), plus escape."""
    scales = scale_table() if scales is None else scales
    multiplier = 6.109  # -Φ⁻¹(TAIL_MASS / 2), so the escape carries ~1e-9 of the mass
    pmfs, offsets = [], []
    for s in scales:
        half = int(math.ceil(s * multiplier))
        v = np.arange(-half, half + 1, dtype=np.float64)
        upper = np.array([0.5 * math.erfc((abs(t) - 0.5) / (s * math.sqrt(2))) for t in v])
        lower = np.array([0.5 * math.erfc((abs(t) + 0.5) / (s * math.sqrt(2))) for t in v])
        p = upper - lower
        tail = max(1.0 - p.sum(), 0.0)
        pmfs.append(np.append(p, tail))
        offsets.append(-half)
    return _pack(pmfs, offsets)


def factorized_tables(pmf_grid: np.ndarray, grid_lo: int) -> TableSet:
    """Per-channel tables from a learned density evaluated on integers grid_lo.. (C, G), trimmed to
    the range holding all but TAIL_MASS of each channel's mass."""
    pmfs, offsets = [], []
    for row in pmf_grid:
        row = np.maximum(row, 0.0)
        cdf = np.cumsum(row) / max(row.sum(), 1e-300)
        lo = int(np.searchsorted(cdf, TAIL_MASS / 2))
        hi = int(np.searchsorted(cdf, 1 - TAIL_MASS / 2))
        hi = min(max(hi, lo), len(row) - 1)
        p = row[lo : hi + 1]
        tail = max(1.0 - p.sum(), 0.0)
        pmfs.append(np.append(p, tail))
        offsets.append(grid_lo + lo)
    return _pack(pmfs, offsets)
