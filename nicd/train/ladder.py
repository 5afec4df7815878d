"""Moving a trained variable-rate model onto another quality ladder (another λ per level).

The gain units of Cui et al. (CVPR 2021) lie nearly on a line in log λ: the shipped MSE model's
mean log gain steps by 0.30–0.34 per level over its 8 levels, each a factor ~1.93 in λ. Cui et
al. interpolate between two trained levels in that space for rates in between; here the same
interpolation (and, past the ends, extrapolation along the nearest trained segment) seeds the gain
vectors of a new ladder, which training at the new λ values then refines. A level whose λ is on
both ladders keeps its gains exactly.

Why a ladder is moved at all: the CompressAI λ values land a 96/144 model's quality 1 at 0.27 bpp
on Kodak, not near 0.15 (docs/training.md).
"""

from __future__ import annotations

import math

import torch

from ..codec.models import QUALITIES, is_ladder
from ..errors import ConfigError

GAIN_KEYS = ("gain.log_gain", "gain.log_inv_gain")


def parse_ladder(text: str) -> tuple[float, ...]:
    """`--lambdas "0.0008,0.001734,..."` → one increasing positive float per quality level."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not is_ladder(values):
        raise ConfigError(f"--lambdas must be {QUALITIES} increasing positive numbers, comma-separated, not {text!r}")
    return values


def _interpolate(rows: torch.Tensor, source: list[float], target: float) -> torch.Tensor:
    """The row at log λ = log target on the piecewise-linear curve through (log source[i], rows[i])."""
    logs = [math.log(v) for v in source]
    t = math.log(target)
    for i, value in enumerate(logs):
        if math.isclose(t, value, rel_tol=0, abs_tol=1e-12):
            return rows[i].clone()
    i = max(0, min(len(logs) - 2, sum(v < t for v in logs) - 1))  # segment holding t, or nearest end segment
    w = (t - logs[i]) / (logs[i + 1] - logs[i])
    return (1 - w) * rows[i] + w * rows[i + 1]


def relabel_gains(state: dict, source: tuple[float, ...], target: tuple[float, ...]) -> dict:
    """A copy of a model state whose gain units serve the `target` ladder (same transforms)."""
    out = dict(state)
    for key in GAIN_KEYS:
        rows = state[key].float()
        out[key] = torch.stack([_interpolate(rows, list(source), lam) for lam in target]).to(state[key].dtype)
    return out
