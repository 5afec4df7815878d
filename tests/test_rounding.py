"""Rate-aware rounding (nicd.codec.rounding): floor or ceil by bits + w·error², in every plain encode
of an MSE model; the decoder is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nicd.codec import rounding
from nicd.codec.api import load_codec
from nicd.codec.density import gaussian_likelihood
from nicd.codec.imageio import load_image
from nicd.codec.models import ladder

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def kodak(n: int) -> np.ndarray:
    with Image.open(KODAK / f"kodim{n:02d}.png") as im:
        return np.asarray(im.convert("RGB"))


def _bits(k: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return -torch.log2(gaussian_likelihood(torch.from_numpy(k), torch.zeros(()), torch.from_numpy(scale))).numpy()


def test_it_only_ever_moves_a_symbol_one_step_towards_the_mean():
    rng = np.random.default_rng(0)
    r = rng.normal(0, 3, 20_000)
    scale = np.exp(rng.uniform(np.log(0.11), np.log(60), r.shape))
    nearest = np.round(r)
    for weight in (2.0, 30.0, 200.0):
        k = rounding.rate_aware_round(r, scale, weight)
        assert np.all((k == np.floor(r)) | (k == np.ceil(r)))
        assert np.all(np.abs(k) <= np.abs(nearest))  # towards μ, never away
        assert np.all(_bits(k, scale) <= _bits(nearest, scale) + 1e-9)
        changed = k != nearest
        assert 0 < changed.mean() < 0.5, weight
        # what it gives up in distance it saves in bits, element by element
        cost = lambda s: _bits(s, scale) + weight * (r - s) ** 2  # noqa: E731
        assert np.all(cost(k) <= cost(nearest) + 1e-9)
    # a very large weight is plain rounding again; a zero weight always takes the cheaper symbol
    assert np.array_equal(rounding.rate_aware_round(r, scale, 1e9), nearest)
    assert np.all(rounding.rate_aware_round(np.full(5, 0.9), np.full(5, 0.5), 0.0) == 0)


def test_the_weight_follows_the_ladder_of_mse_models_only():
    config = {"metric": "mse", "lambdas": [0.0008, 0.002, 0.004, 0.008, 0.02, 0.04, 0.08, 0.18]}
    weights = [rounding.weight_for(config, q) for q in range(1, 9)]
    assert weights == pytest.approx([rounding.WEIGHT_SCALE * lam**0.3 for lam in config["lambdas"]])
    assert weights == sorted(weights)  # finer qualities trade fewer bits for distance
    assert rounding.weight_for({"metric": "ms-ssim"}, 4) is None
    assert rounding.weight_for({}, 4) == pytest.approx(rounding.WEIGHT_SCALE * ladder({})[3] ** 0.3)  # CompressAI's λ


def test_plain_encodes_cost_less_and_a_short_refinement_never_costs_more(monkeypatch):
    """Real bytes and decoded pixels of the shipped default on a Kodak crop, with and without it."""
    codec = load_codec("default", "cpu")
    source = np.ascontiguousarray(kodak(4)[:256, :384])
    image = load_image(Image.fromarray(source))
    lams = ladder(codec.info.config)

    def coded(q: int, **kw):
        res = codec.encode(image, quality=q, **kw)
        decoded = codec.decode_rgb(res.data).astype(np.float64)
        mse = np.mean((decoded - source) ** 2)  # 0–255 units, so the cost's 255² is in it
        return res.data, len(res.data) * 8 / source[..., 0].size + lams[q - 1] * mse

    aware = {q: coded(q) for q in (2, 5)}
    # A search of two steps is worse than rate-aware rounding alone; refinement then keeps the latter
    # (it weighs its candidates by the float model's estimate, hence the small tolerance).
    refined = coded(5, refine_steps=2)
    assert refined[1] <= aware[5][1] * 1.002, (refined[1], aware[5][1])
    monkeypatch.setattr(rounding, "weight_for", lambda config, quality: None)
    plain = {q: coded(q) for q in (2, 5)}
    for q in (2, 5):
        assert len(aware[q][0]) < len(plain[q][0]), q
        assert aware[q][1] < plain[q][1], (q, aware[q][1], plain[q][1])
