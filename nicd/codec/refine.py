"""Encoder-side refinement of the latent by stochastic Gumbel annealing (SGA).

Yang, Bamler, Mandt, "Improving inference for neural image compression" (NeurIPS 2020); optimising
each image's latent after the amortised analysis is Campos, Meierhans, Djelouah, Schroers,
"Content adaptive optimization for neural image compression" (CVPR workshops 2019).

The analysis transform's y is only a good first guess: the encoder may send any symbols, and those
that minimise this image's own cost R + λ·D under the decoder's fixed h_s and g_s code it better.
Gradient descent on that cost needs a stand-in for rounding; SGA draws floor or ceil of y − μ at
random, relaxed by Gumbel-softmax at a temperature annealed towards 0, so the last steps optimise
(nearly) the hard-rounded cost that is actually coded.

Only y moves. z stays that of the analysis, so the means and scales of y are exactly the integer
h_s's, and the rate in the loop is the coder's own estimate. The decoder is unchanged: a refined
file is an ordinary file, and the bitstream format does not know refinement exists.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from . import rounding
from .density import gaussian_likelihood
from .frozen import Z_LIMIT
from .intnet import ACT_FRACTION
from .models import ladder

# Adam on y in quantization-bin units, decaying linearly to 0. With 40 steps 0.06 lowered the coded
# R + λ·D more than 0.02 at every quality measured, and more than 0.04 at all but q1, where the two
# tie (benchmarks/refine_learning_rate.py, docs/refinement.md).
LEARNING_RATE = 6e-2
START_TEMPERATURE = 0.5  # Yang et al.'s upper bound on τ
MS_SSIM_MIN_SIDE = 161  # pytorch_msssim's five scales need this many pixels per side


def refine(frozen, pixels: np.ndarray, y_base: np.ndarray, quality: int, steps: int, config: dict,
           device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """(y before gain, z) to code for one tile, after `steps` SGA steps on R + λ·D.

    pixels: the tile (h, w, 3) uint8 before padding; y_base: its analysis (M, h', w') of the padded
    tile. Returns the analysis' own latents (and z None) where refining does not lower the cost the
    float transforms estimate, or where the metric cannot be measured on a tile this small."""
    if steps <= 0:
        return y_base, None
    if not frozen.hyper or frozen.int_ctx:
        raise InputError(f"latent refinement works on mean-scale hyperprior models, not on {frozen.kind!r}",
                         code="E_ARGS")
    metric = config.get("metric", "mse")
    h, w = pixels.shape[:2]
    if metric == "ms-ssim" and min(h, w) < MS_SSIM_MIN_SIDE:
        return y_base, None
    lam = ladder(config)[quality - 1]
    gain = frozen.gain[quality - 1][:, None, None]
    y0 = y_base * gain
    with torch.no_grad():
        z = frozen.h_a64(torch.from_numpy(y0)[None]).numpy()[0]
    z_int = np.clip(np.round(z), -Z_LIMIT, Z_LIMIT).astype(np.int64)
    idx, mean_fp = frozen._slice_params(0, frozen.int_h_s.raw(z_int[None]), None)

    _, g_s = frozen._on(device)
    f32 = dict(dtype=torch.float32, device=device)
    mean = torch.as_tensor(mean_fp / float(1 << ACT_FRACTION), **f32)[None]
    scale = torch.as_tensor(frozen.scales[idx], **f32)[None]
    inv = torch.exp(frozen.model.gain.log_inv_gain[quality - 1].detach()).to(**f32)[None, :, None, None]
    x = torch.as_tensor(pixels.transpose(2, 0, 1).copy(), **f32)[None] / 255.0
    n_pixels = h * w

    def cost(y_hat: torch.Tensor, fast: bool = False) -> torch.Tensor:
        bits = -torch.log2(gaussian_likelihood(y_hat, mean, scale)).sum()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            x_hat = g_s(y_hat * inv)[:, :, :h, :w].float()  # padding is not part of the image
        if metric == "ms-ssim":
            from pytorch_msssim import ms_ssim

            distortion = lam * (1 - ms_ssim(x_hat.clamp(0, 1), x, data_range=1.0))
        else:
            distortion = lam * 255**2 * ((x_hat - x) ** 2).mean()
        return distortion + bits / n_pixels

    y = torch.as_tensor(y0, **f32)[None].clone().requires_grad_(True)
    start = y.detach().clone()
    optimizer = torch.optim.Adam([y], lr=LEARNING_RATE)
    fast = _bfloat16_is_fast(device)
    noise = torch.Generator(device=device).manual_seed(0)  # the same input gives the same bytes
    with torch.enable_grad():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * (1 - step / steps)
            tau = START_TEMPERATURE * (1 - step / steps) + 1e-3
            loss = cost(mean + _sga(y - mean, tau, noise), fast=fast)
            (grad,) = torch.autograd.grad(loss, [y])
            y.grad = grad
            optimizer.step()
    # The candidates, hard-rounded as they would be coded: the analysis' latent as a plain encode
    # codes it (rate-aware rounding for MSE models, nicd.codec.rounding), the search's result rounded
    # to the nearest symbols, and rounded rate-aware too. A short search may lose to the first.
    weight = rounding.weight_for(config, quality)
    with torch.no_grad():
        candidates = [_round(start, mean, scale, weight), _round(y.detach(), mean, scale, None)]
        if weight is not None:
            candidates.append(_round(y.detach(), mean, scale, weight))
        costs = [float(cost(v)) for v in candidates]
    best = min(range(len(costs)), key=lambda i: costs[i] if math.isfinite(costs[i]) else math.inf)
    if best == 0 or not math.isfinite(costs[best]):
        return y_base, None
    # On the lattice μ + k, so that the encoder's rounding gives back exactly these symbols.
    return candidates[best][0].double().cpu().numpy() / gain, z_int.astype(np.float64)


def _round(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, weight: float | None) -> torch.Tensor:
    """y's symbols as the encoder would choose them (nearest, or rate-aware with `weight`), back on
    the lattice μ + k."""
    if weight is None:
        return torch.round(y - mean) + mean
    r = (y - mean).double().cpu().numpy()
    k = rounding.rate_aware_round(r, scale.double().cpu().numpy(), weight)
    return torch.from_numpy(k).to(y) + mean


def _bfloat16_is_fast(device: torch.device) -> bool:
    """Whether g_s runs faster in bfloat16 here (CUDA, or a CPU with AMX or AVX-512 BF16: 1.6x on
    this project's Xeon, same result to 0.001 dB). The search only needs the gradient's direction;
    the costs that decide whether to keep its result are float32."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private API: absent, assume the slow emulation
        return False


def _sga(r: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """A Gumbel-softmax relaxed draw of floor(r) or ceil(r), each more likely the nearer it is
    (Yang et al. 2020, eq. 7: logits −atanh(distance)/τ)."""
    floor = torch.floor(r)
    d = r - floor
    eps = 1e-4
    logits = torch.stack([-torch.atanh(d.clamp(eps, 1 - eps)), -torch.atanh((1 - d).clamp(eps, 1 - eps))]) / tau
    u = torch.rand(logits.shape, generator=generator, device=r.device, dtype=r.dtype)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-9)))
    return floor + torch.softmax(logits + gumbel, 0)[1]
