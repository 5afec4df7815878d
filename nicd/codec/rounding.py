"""Rate-aware rounding of the latent: the encoder's choice between floor and ceil.

Plain rounding of y − μ picks the nearest symbol, whatever it costs to code. The encoder may send any
symbol, so for each element it takes, of floor and ceil, the one with the lower
`bits + w·(y − μ − k)²`: rate–distortion optimised quantisation as video encoders do it
(Karczewicz, Ye, Chong, "Rate distortion optimized quantization", ITU-T VCEG-AH21, 2008), and in
learned codecs the dead-zone quantisers of Zhou et al., "Variable rate image compression method
with dead-zone quantizer" (CVPR workshops 2020). Under a Gaussian centred on μ the cheaper symbol
is the one nearer μ, so the rule is a dead zone whose width follows each element's scale: where
the prior is peaked a symbol of 0 costs a fraction of a bit and a ±1 several, and the encoder takes
the 0 unless the error it adds is worth more.

`w` (bits per squared latent unit) stands for what that error costs in distortion. The synthesis'
Jacobian predicts it only for independent errors; these are not (they all lean towards μ, so their
effects add up coherently), and a per-channel Jacobian weighting measured no better than one weight
per quality. The weight is `340·λ^0.3`, fitted on validation photographs: 170 lowers the coded
R + λ·D most at every quality, 340 the bits at equal PSNR over the whole ladder, which is what the
codec is measured by (benchmarks/rate_aware_rounding.py, docs/refinement.md). The decoder does not
change and cannot tell.
"""

from __future__ import annotations

import numpy as np
import torch

from .density import gaussian_likelihood
from .models import ladder

WEIGHT_SCALE = 340.0
WEIGHT_EXPONENT = 0.3


def weight_for(config: dict, quality: int) -> float | None:
    """The rounding weight for a model (its card's config) at a quality level; None (plain
    rounding) for models trained for MS-SSIM, whose λ weighs another distortion: it was not
    fitted there."""
    if config.get("metric", "mse") != "mse":
        return None
    return WEIGHT_SCALE * ladder(config)[quality - 1] ** WEIGHT_EXPONENT


def rate_aware_round(r: np.ndarray, scale: np.ndarray, weight: float) -> np.ndarray:
    """floor(r) or ceil(r), whichever has the lower `bits + weight·(r − k)²`, where bits are those
    of k under a zero-mean Gaussian of `scale` discretised to integers (the coder's model). r is
    y − μ; the result is float64 like `np.round`'s."""
    k = np.round(r)
    # Bits only fall towards 0, so only an element that the nearest symbol takes away from 0 can
    # change, to the symbol one step nearer 0: the others cost nothing to evaluate.
    away = np.nonzero(np.abs(k) > np.abs(r))
    near, toward, rest = k[away], k[away] - np.sign(k[away]), r[away]
    sigma = torch.from_numpy(scale[away])
    zero = torch.zeros((), dtype=torch.float64)
    bits = [-torch.log2(gaussian_likelihood(torch.from_numpy(v), zero, sigma)).numpy() for v in (near, toward)]
    switch = bits[1] + weight * (rest - toward) ** 2 < bits[0] + weight * (rest - near) ** 2
    k[tuple(a[switch] for a in away)] = toward[switch]
    return k
