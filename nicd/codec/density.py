"""Differentiable probability models used while training (the float side of the entropy models).

- `FactorizedDensity`: the non-parametric per-channel density of Ballé et al., "Variational image
  compression with a scale hyperprior" (ICLR 2018), appendix 6.1, for the hyper-latent `z`.
- `gaussian_likelihood`: the probability mass of a unit bin under N(mean, scale) (Minnen et al. 2018).

The frozen integer tables that the entropy coder uses are built from these in `tables.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import lower_bound

LIKELIHOOD_BOUND = 1e-9
SCALE_BOUND = 0.11


class FactorizedDensity(nn.Module):
    """A learned cumulative distribution per channel: a small monotone MLP per channel."""

    def __init__(self, channels: int, filters=(3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
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
        module = self.double()
        lower = module.logits_cdf(v - 0.5)
        upper = module.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper)
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        self.float()
        return p.reshape(self.channels, -1).numpy()


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = lower_bound(scale, SCALE_BOUND)
    v = torch.abs(y - mean)
    # Using the upper tail for |v| keeps precision where the CDF is close to 1.
    upper = 0.5 * torch.erfc((v - 0.5) / (scale * math.sqrt(2)))
    lower = 0.5 * torch.erfc((v + 0.5) / (scale * math.sqrt(2)))
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)
