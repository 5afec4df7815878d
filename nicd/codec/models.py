"""The learned transforms and their training-time forward pass.

- `FactorizedPrior`: Ballé, Minnen, Singh, Hwang, Johnston, "Variational image compression with a
  scale hyperprior" (ICLR 2018), the factorized-prior baseline ("bmshj2018-factorized").
- `MeanScaleHyperprior`: Minnen, Ballé, Toderici, "Joint autoregressive and hierarchical priors for
  learned image compression" (NeurIPS 2018), without the autoregressive context ("mbt2018-mean").
  `h_s` uses ReLU so that it can be turned into an integer network (Ballé, Johnston, Minnen,
  "Integer networks for data compression with latent-variable models", ICLR 2019).

Both are variable-rate through gain units (Cui et al., "Asymmetric gained deep image compression
with continuous rate adaptation", CVPR 2021): quality level q scales the latent by a learned
per-channel gain before quantization and undoes it before synthesis, so one set of transforms covers
every rate point.

Contract shared by every model: `forward(x, q)` for training returns the reconstruction and the
likelihoods; `compress` / `decompress` (in `coder.py`) work on frozen integer tables.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .density import FactorizedDensity, gaussian_likelihood
from .layers import GDN, conv, deconv

# Rate-distortion trade-off per quality level (1 = lowest). The MSE values are CompressAI's
# bmshj2018/mbt2018 lambdas, which land near 0.15 bpp at q1 and 2 bpp at q8 on Kodak.
LAMBDAS_MSE = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
LAMBDAS_MSSSIM = (2.40, 4.58, 8.73, 16.64, 31.73, 60.50, 115.37, 220.00)
QUALITIES = len(LAMBDAS_MSE)


def ladder(config: dict) -> tuple[float, ...]:
    """The λ of every quality level a model was trained for (its own ladder, else its metric's)."""
    if config.get("lambdas"):
        return tuple(config["lambdas"])
    return LAMBDAS_MSSSIM if config.get("metric") == "ms-ssim" else LAMBDAS_MSE


def is_ladder(values) -> bool:
    """Whether `values` can be a quality ladder: one finite positive λ per level, increasing."""
    return (len(values) == QUALITIES and all(math.isfinite(v) and v > 0 for v in values)
            and all(b > a for a, b in zip(values, values[1:])))


def quantize_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounding with a straight-through gradient (Minnen & Singh 2020, 'mixed' quantization)."""
    return x + (torch.round(x) - x).detach()


def add_noise(x: torch.Tensor, training: bool = True) -> torch.Tensor:
    """Uniform noise as the differentiable proxy of rounding (Ballé 2017); rounding in eval mode."""
    if not training:
        return torch.round(x)
    return x + torch.empty_like(x).uniform_(-0.5, 0.5)


def entropy_model_precision(x: torch.Tensor):
    """Float32 for everything but g_a and g_s under bfloat16 autocast. bfloat16 keeps 8 bits of
    mantissa: at |z| ≈ 100 its grid is 0.5 wide, coarser than the ±0.5 quantization noise, and the
    bin masses are differences of two CDFs. h_a, h_s and the densities work at 1/16 of the
    resolution or less, so float32 there costs little. Without autocast this changes nothing."""
    return torch.autocast(x.device.type, enabled=False)


def analysis(n: int, m: int) -> nn.Sequential:
    return nn.Sequential(conv(3, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m))


def synthesis(n: int, m: int) -> nn.Sequential:
    return nn.Sequential(
        deconv(m, n), GDN(n, inverse=True), deconv(n, n), GDN(n, inverse=True),
        deconv(n, n), GDN(n, inverse=True), deconv(n, 3),
    )


class GainUnits(nn.Module):
    """Per-quality, per-channel positive gains (stored as logs) and their inverses."""

    def __init__(self, channels: int, qualities: int = QUALITIES):
        super().__init__()
        # Spread the initial gains so that higher quality starts with finer quantization.
        init = torch.linspace(-1.0, 1.5, qualities).reshape(qualities, 1).repeat(1, channels)
        self.log_gain = nn.Parameter(init.clone())
        self.log_inv_gain = nn.Parameter(-init.clone())

    def gain(self, q: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_gain[q])[:, :, None, None]

    def inverse(self, q: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_inv_gain[q])[:, :, None, None]


class CodecModel(nn.Module):
    """Common parts: padding stride and the architecture description saved with the weights.

    `lambdas`: the quality ladder the gain units were trained for, one λ per level, where it is not
    the metric's default ladder above (a model trained before the ladder was an option has none)."""

    stride = 64
    kind = ""

    def __init__(self, n: int, m: int, lambdas: tuple[float, ...] | None = None):
        super().__init__()
        self.n, self.m = n, m
        self.lambdas = tuple(float(v) for v in lambdas) if lambdas else None
        if self.lambdas is not None and not is_ladder(self.lambdas):
            raise ValueError(f"a quality ladder is {QUALITIES} increasing positive λ values, not {lambdas}")

    def config(self) -> dict:
        # "lambdas" only where set, so that every earlier model's config (and name) stays as it was
        return {"kind": self.kind, "n": self.n, "m": self.m, **({"lambdas": list(self.lambdas)} if self.lambdas else {})}

    def aux_loss(self) -> torch.Tensor:
        """The factorized densities' quantile loss (see `FactorizedDensity.aux_loss`)."""
        return sum(m.aux_loss() for m in self.modules() if isinstance(m, FactorizedDensity))

    def aux_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the aux loss alone, on their own optimizer."""
        return [p for name, p in self.named_parameters() if name.endswith("quantiles")]

    def main_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.endswith("quantiles")]


class FactorizedPrior(CodecModel):
    kind = "factorized"
    stride = 16

    def __init__(self, n: int = 128, m: int = 192, lambdas: tuple[float, ...] | None = None):
        super().__init__(n, m, lambdas)
        self.g_a = analysis(n, m)
        self.g_s = synthesis(n, m)
        self.gain = GainUnits(m)
        self.density_y = FactorizedDensity(m)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> dict:
        y = self.g_a(x).float() * self.gain.gain(q)
        y_hat = quantize_ste(y)
        x_hat = self.g_s(y_hat * self.gain.inverse(q))
        with entropy_model_precision(x):
            likelihood = self.density_y.likelihood(add_noise(y, self.training))
        return {"x_hat": x_hat, "likelihoods": {"y": likelihood}}


class MeanScaleHyperprior(CodecModel):
    """`h` is the width of h_s's hidden layers (h, 3h/2; Minnen et al. use M, 3M/2, the default). A
    model widened in M (`nicd.train.widen`) keeps its h_s hidden layers: only their last layer,
    which predicts a scale and a mean per latent channel, grows."""

    kind = "mean-scale"

    def __init__(self, n: int = 128, m: int = 192, h: int | None = None, lambdas: tuple[float, ...] | None = None):
        super().__init__(n, m, lambdas)
        self.h = h or m
        self.g_a = analysis(n, m)
        self.g_s = synthesis(n, m)
        self.h_a = nn.Sequential(
            conv(m, n, 3, 1), nn.LeakyReLU(inplace=True), conv(n, n), nn.LeakyReLU(inplace=True), conv(n, n)
        )
        self.h_s = nn.Sequential(
            deconv(n, self.h), nn.ReLU(inplace=True), deconv(self.h, self.h * 3 // 2), nn.ReLU(inplace=True),
            conv(self.h * 3 // 2, m * 2, 3, 1),
        )
        self.gain = GainUnits(m)
        self.density_z = FactorizedDensity(n)

    def config(self) -> dict:
        # "h" only where it differs, so that every earlier model's config (and name) stays as it was
        return {**super().config(), **({"h": self.h} if self.h != self.m else {})}

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> dict:
        y = self.g_a(x).float() * self.gain.gain(q)
        with entropy_model_precision(x):
            z = self.h_a(y)
            z_noisy = add_noise(z, self.training)
            # h_s sees the rounded z at inference; the straight-through rounding trains it on that.
            scales, means = self.h_s(quantize_ste(z)).chunk(2, 1)
            y_hat = quantize_ste(y - means) + means
            likelihoods = {
                "y": gaussian_likelihood(add_noise(y - means, self.training) + means, means, scales),
                "z": self.density_z.likelihood(z_noisy),
            }
        x_hat = self.g_s(y_hat * self.gain.inverse(q))
        return {"x_hat": x_hat, "likelihoods": likelihoods}


class ChannelContextHyperprior(MeanScaleHyperprior):
    """A mean-scale hyperprior whose latent is coded in `SLICES` channel slices, each slice's scales
    and means corrected from the hyperprior's and the slices decoded before it: the channel-wise
    autoregressive context of Minnen & Singh, "Channel-wise autoregressive entropy models for learned
    image compression" (ICIP 2020), without latent residual prediction.

    Each slice after the first has a small ReLU network `ctx[s-1]` (integer-exact at coding time,
    like h_s, because its scales select tables) that reads h_s's output and the dequantized earlier
    slices and adds a correction to h_s's scales and means. Its last layer starts at zero, so a model
    fine-tuned from a mean-scale hyperprior starts exactly where that model stands.
    """

    kind = "mean-scale-cc"
    SLICES = 4
    CONTEXT_WIDTHS = (128, 96)
    # |ŷ| fed to the context networks is clipped here: the integer networks' proven range
    # (intnet.ACT_LIMIT in 1/256 units); no trained latent comes near it.
    CONTEXT_INPUT_LIMIT = 32768.0

    def __init__(self, n: int = 128, m: int = 192, h: int | None = None, lambdas: tuple[float, ...] | None = None):
        super().__init__(n, m, h, lambdas)
        if m % self.SLICES:
            raise ValueError(f"M={m} does not split into {self.SLICES} slices")
        c = m // self.SLICES
        self.ctx = nn.ModuleList()
        for s in range(1, self.SLICES):
            w1, w2 = self.CONTEXT_WIDTHS
            net = nn.Sequential(
                conv(2 * m + s * c, w1, 3, 1), nn.ReLU(inplace=True), conv(w1, w2, 3, 1), nn.ReLU(inplace=True),
                conv(w2, 2 * c, 3, 1),
            )
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.ctx.append(net)

    def slice_params(self, s: int, hyper: torch.Tensor, y_hat_before: torch.Tensor | None):
        """(scales, means) of slice s: h_s's, plus the context network's correction."""
        c = self.m // self.SLICES
        scales = hyper[:, s * c:(s + 1) * c]
        means = hyper[:, self.m + s * c:self.m + (s + 1) * c]
        if s == 0:
            return scales, means
        limit = self.CONTEXT_INPUT_LIMIT
        delta = self.ctx[s - 1](torch.cat([hyper, y_hat_before.clamp(-limit, limit)], 1))
        return scales + delta[:, :c], means + delta[:, c:]

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> dict:
        y = self.g_a(x).float() * self.gain.gain(q)
        c = self.m // self.SLICES
        with entropy_model_precision(x):
            z = self.h_a(y)
            z_noisy = add_noise(z, self.training)
            hyper = self.h_s(quantize_ste(z))
            y_hats, likelihoods = [], []
            for s in range(self.SLICES):
                y_s = y[:, s * c:(s + 1) * c]
                scales, means = self.slice_params(s, hyper, torch.cat(y_hats, 1) if s else None)
                y_hats.append(quantize_ste(y_s - means) + means)
                likelihoods.append(gaussian_likelihood(add_noise(y_s - means, self.training) + means, means, scales))
            y_hat = torch.cat(y_hats, 1)
        x_hat = self.g_s(y_hat * self.gain.inverse(q))
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(likelihoods, 1), "z": self.density_z.likelihood(z_noisy)}}


MODEL_KINDS = {cls.kind: cls for cls in (FactorizedPrior, MeanScaleHyperprior, ChannelContextHyperprior)}


def build_model(config: dict) -> CodecModel:
    extra = {key: config[key] for key in ("h", "lambdas") if config.get(key)}
    return MODEL_KINDS[config["kind"]](n=config["n"], m=config["m"], **extra)
