"""Differentiable probability models used while training (the float side of the entropy models).

- `FactorizedDensity`: the non-parametric per-channel density of Ballé et al., "Variational image
  compression with a scale hyperprior" (ICLR 2018), appendix 6.1, for the hyper-latent `z`.
- `gaussian_likelihood`: the probability mass of a unit bin under N(mean, scale) (Minnen et al. 2018).

The frozen integer tables that the entropy coder uses are built from these in `tables.py`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import lower_bound
from .tables import TAIL_MASS

LIKELIHOOD_BOUND = 1e-9
SCALE_BOUND = 0.11
TAIL_LOGIT = math.log(2 / TAIL_MASS - 1)  # logit of TAIL_MASS / 2, negated


class FactorizedDensity(nn.Module):
    """A learned cumulative distribution per channel: a small monotone MLP per channel.

    `quantiles` (C, 1, 3) track where each channel's CDF is TAIL_MASS/2, ½ and 1 − TAIL_MASS/2; they are
    learned by `aux_loss` alone, on their own optimizer (Ballé et al. 2018; CompressAI's
    EntropyBottleneck), and tell the export where the probability mass lies.
    """

    def __init__(self, channels: int, filters=(3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1, 1))
        dims = (1,) + tuple(filters) + (1,)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """x: (C, 1, K) → logit of the CDF at x, (C, 1, K)."""
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            x = torch.matmul(F.softplus(m), x) + b
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before the quantiles existed: start them where a new model would.
        state_dict.setdefault(prefix + "quantiles", self.quantiles.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def aux_loss(self) -> torch.Tensor:
        """Σ |logit CDF(quantile) − target|: zero when the quantiles sit at the tails and the median."""
        target = torch.tensor([-TAIL_LOGIT, 0.0, TAIL_LOGIT], dtype=self.quantiles.dtype, device=self.quantiles.device)
        return (self.logits_cdf(self.quantiles) - target).abs().sum()

    @torch.no_grad()
    def tail_bounds(self, tail: float = TAIL_MASS, limit: float = 2.0**16) -> tuple[np.ndarray, np.ndarray]:
        """Per channel, the exact (float64) points where the CDF is tail/2 and 1 − tail/2.

        The CDF is monotone, so bisection finds them; the learned quantiles only seed the bracket, so
        an aux loss that has not converged (or weights from before it existed) cannot cut off mass.
        Clamped to ±limit, beyond which values are escapes anyway.
        """
        density = copy.deepcopy(self).double()

        def f(v: np.ndarray) -> np.ndarray:
            return density.logits_cdf(torch.from_numpy(v).reshape(-1, 1, 1)).reshape(-1).numpy()

        q = density.quantiles.detach().reshape(-1, 3).numpy()
        bounds, logit = [], math.log(2 / tail - 1)
        for column, target in ((0, -logit), (2, logit)):
            lo, hi = q[:, column] - 1.0, q[:, column] + 1.0
            for _ in range(64):  # widen the bracket until it holds the target
                below, above = f(lo) > target, f(hi) < target
                if not (below.any() or above.any()):
                    break
                width = hi - lo
                lo = np.where(below, np.maximum(lo - width, -limit), lo)
                hi = np.where(above, np.minimum(hi + width, limit), hi)
            for _ in range(64):
                mid = (lo + hi) / 2
                low = f(mid) < target
                lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
            bounds.append(np.clip((lo + hi) / 2, -limit, limit))
        return bounds[0], bounds[1]

    def likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of the unit bin centred on each value of x, shape (B, C, H, W)."""
        b, c, h, w = x.shape
        v = x.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        # Evaluate on the side of the median where the sigmoid is not saturated.
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        p = lower_bound(p, LIKELIHOOD_BOUND)
        return p.reshape(c, b, h, w).permute(1, 0, 2, 3)

    @torch.no_grad()
    def pmf_on_grid(self, lo: int, hi: int) -> np.ndarray:
        """Float64 probability of every integer in [lo, hi] per channel: (C, hi - lo + 1)."""
        grid = torch.arange(lo, hi + 1, dtype=torch.float64)
        v = grid.reshape(1, 1, -1).repeat(self.channels, 1, 1)
        module = copy.deepcopy(self).double()
        lower = module.logits_cdf(v - 0.5)
        upper = module.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper)
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return p.reshape(self.channels, -1).numpy()


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = lower_bound(scale, SCALE_BOUND)
    v = torch.abs(y - mean)
    # Using the upper tail for |v| keeps precision where the CDF is close to 1.
    upper = 0.5 * torch.erfc((v - 0.5) / (scale * math.sqrt(2)))
    lower = 0.5 * torch.erfc((v + 0.5) / (scale * math.sqrt(2)))
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)
