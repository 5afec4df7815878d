"""Widening a trained mean-scale hyperprior's latent (M) without changing the pixels it decodes.

M bounds what g_a / g_s can represent at all: 16×16×3 pixels go through M numbers. On Kodak, block
PCA keeping 144 of the 768 dimensions of every 16×16 block reaches 34.0 dB, 192 reach 37.1 and 256
reach 41.7 (docs/training.md), and a 96/144 model's unquantized g_s(g_a(x)) sits at ~35 dB: the
flat top of its rate–distortion curve. Training a wider model from scratch would throw away
every step made so far, so the new channels are grown onto the trained one, in the manner of
Net2Net (Chen, Goodfellow, Shlens, "Net2Net: accelerating learning via knowledge transfer",
ICLR 2016):

- g_a's last layer gets new random output filters, spread like its trained ones: the new latents
  are features of the image from the first step;
- g_s's first layer reads them with zero weights: the decoded image is unchanged, and the gradient
  of those weights (the distortion's, times the rounded new latents) starts the read-out at once;
- h_a ignores them (zero weights), so z, and the bits of z, are unchanged;
- h_s's last layer predicts their scale and mean from zero weights and a bias (scale `NEW_SCALE`,
  mean 0), until h_a learns to see them;
- the gains of a new channel start at the mean of the old channels' gains at each quality.

The widened model decodes the same pixels as the one it came from; it spends more bits at first
(tests/test_widen.py), which the rate term then trims where the new channels do not pay for
themselves.

A gentler start fails: new filters at zero (or tiny) give latents that round to 0, so g_s's
read-out never sees a non-zero value, its gradient stays 0, and the rate term keeps the filters at
zero. Measured: 8,500 steps of such a start left every new latent at 0 (docs/training.md).
"""

from __future__ import annotations

import torch

from ..codec.models import MeanScaleHyperprior, build_model
from ..errors import ConfigError

# The scale h_s predicts for a new latent until h_a sees them: about the spread of the random
# filters' output at the middle quality levels.
NEW_SCALE = 1.0


@torch.no_grad()
def widen_latents(model: MeanScaleHyperprior, m: int, seed: int = 0) -> MeanScaleHyperprior:
    """A copy of `model` with `m` latent channels (m > model.m) that decodes the same pixels."""
    if not isinstance(model, MeanScaleHyperprior):
        raise ConfigError(f"only mean-scale models can be widened, not {model.kind}")
    old = model.m
    if m <= old:
        raise ConfigError(f"widening needs more latent channels than the model's {old}, not {m}")
    wide = MeanScaleHyperprior(n=model.n, m=m, h=model.h, lambdas=model.lambdas)  # same ladder
    state = wide.state_dict()
    source = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    last_a = f"g_a.{len(model.g_a) - 1}"
    last_s = f"h_s.{len(model.h_s) - 1}"
    for key, value in source.items():
        target = state[key]
        if target.shape == value.shape:
            target.copy_(value)
        elif key == f"{last_a}.weight":
            target.copy_(torch.randn(target.shape, generator=generator) * float(value.std()))
            target[:old] = value
        elif key == f"{last_a}.bias":
            target.zero_()
            target[:old] = value
        elif key == "g_s.0.weight":  # ConvTranspose2d: (in = M, out, k, k)
            target.zero_()
            target[:old] = value
        elif key == "h_a.0.weight":  # Conv2d: (out, in = M, k, k)
            target.zero_()
            target[:, :old] = value
        elif key in (f"{last_s}.weight", f"{last_s}.bias"):
            # outputs: M scales, then M means (MeanScaleHyperprior.forward's chunk(2, 1))
            target.zero_()
            target[:old] = value[:old]
            target[m:m + old] = value[old:]
            if key.endswith("bias"):
                target[old:m] = NEW_SCALE
        elif key in ("gain.log_gain", "gain.log_inv_gain"):
            target[:, :old] = value
            target[:, old:] = value.mean(dim=1, keepdim=True)
        else:
            raise ConfigError(f"cannot widen {key}: {tuple(value.shape)} → {tuple(target.shape)}")
    wide.load_state_dict(state)
    return wide


def widen_state(config: dict, state: dict[str, torch.Tensor], m: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """`widen_latents` on a config and state dict (as checkpoints hold them)."""
    model = build_model(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    wide = widen_latents(model, m)
    return wide.config(), wide.state_dict()
