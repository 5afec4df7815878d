"""An integer-exact hyper-synthesis `h_s` (Ballé, Johnston, Minnen, "Integer networks for data
compression with latent-variable models", ICLR 2019).

The trained float `h_s` is converted once, at export, into integer weights and biases with a
power-of-two rescale after every layer and clipped ReLUs. At coding time it runs on integer-valued
float64 tensors: every product and partial sum is an integer below 2**53, so the result is exact
whatever the summation order, thread count, memory layout, BLAS or device. Its outputs select the
probability tables of `y`, so encoder and decoder agree bit for bit. A channel-context model's context
networks (`models.ChannelContextHyperprior`) are converted the same way (`IntegerConvNet`), from
fixed-point inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .tables import scale_table

WEIGHT_BITS = 15  # |w_int| < 2**WEIGHT_BITS
ACT_FRACTION = 8  # activations are fixed point with 8 fractional bits
ACT_LIMIT = float(1 << 23)  # clip of every activation, keeps sums below 2**53
EXACT_LIMIT = float(1 << 53)


def nearest_scale_thresholds() -> np.ndarray:
    """Boundaries between neighbouring table scales at their geometric mean: a predicted scale takes
    the table nearest to it on the log axis. Models exported before stored the table scales
    themselves (the first table at least as wide as the prediction, as CompressAI does), which on
    the step-24,858 model cost 3.9 % / 2.6 % / 1.6 % more bits at q1 / q4 / q8 on Kodak; nearest < 0.1 %."""
    t = np.log(scale_table())
    return np.round(np.exp((t[1:] + t[:-1]) / 2) * (1 << ACT_FRACTION)).astype(np.int64)


@dataclass
class IntLayer:
    transposed: bool
    weight: torch.Tensor  # float64 holding integers
    bias: torch.Tensor  # float64 holding integers, in accumulator units
    shift: int  # accumulator → output fixed point: divide by 2**shift with rounding
    stride: int
    padding: int
    output_padding: int
    relu: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            acc = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding)
        else:
            acc = F.conv2d(x, self.weight, None, self.stride, self.padding)
        acc = acc + self.bias.reshape(1, -1, 1, 1)
        out = torch.floor((acc + float(1 << (self.shift - 1))) / float(1 << self.shift))
        return out.clamp(0.0 if self.relu else -ACT_LIMIT, ACT_LIMIT)


class IntegerConvNet:
    """A float nn.Sequential of convolutions and ReLUs as integer layers (ReLUs become the clip).

    `input_fraction`: fixed-point fraction bits of the input (0 for integer z; ACT_FRACTION for an
    input that is itself some network's fixed-point output); every layer's output has ACT_FRACTION."""

    def __init__(self, layers: list[IntLayer], input_fraction: int = 0):
        self.layers = layers
        self.input_fraction = input_fraction

    @staticmethod
    def convert(net: nn.Sequential, input_fraction: int = 0) -> list[IntLayer]:
        modules = list(net)
        layers: list[IntLayer] = []
        frac_in = input_fraction
        for i, mod in enumerate(modules):
            if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            w = mod.weight.detach().double()
            b = mod.bias.detach().double()
            wbits = int(np.floor(np.log2(((1 << WEIGHT_BITS) - 1) / max(float(w.abs().max()), 1e-12))))
            shift = frac_in + wbits - ACT_FRACTION
            if shift < 1:
                raise ValueError("weights too large for the integer conversion")
            w_int = torch.round(w * 2.0**wbits)
            b_int = torch.round(b * 2.0 ** (frac_in + wbits))
            layers.append(IntLayer(
                transposed=isinstance(mod, nn.ConvTranspose2d),
                weight=w_int,
                bias=b_int,
                shift=shift,
                stride=mod.stride[0],
                padding=mod.padding[0],
                output_padding=mod.output_padding[0] if isinstance(mod, nn.ConvTranspose2d) else 0,
                relu=relu,
            ))
            frac_in = ACT_FRACTION
        return layers

    def check_bounds(self, input_limit: float) -> None:
        """Prove that no accumulator can reach 2**53 for inputs of magnitude ≤ input_limit."""
        limit = input_limit
        for layer in self.layers:
            dims = (1, 2, 3) if not layer.transposed else (0, 2, 3)
            per_output = layer.weight.abs().sum(dim=dims)
            worst = float((per_output * limit + layer.bias.abs()).max())
            if worst >= EXACT_LIMIT:
                raise ValueError(f"integer network could overflow exact float64 range ({worst:.3g})")
            limit = ACT_LIMIT

    def float_state(self, prefix: str, conv_positions: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The float network these integer layers stand for (w_int / 2**wbits): lets a shipped model,
        which stores only the integer network, be trained further."""
        out, frac_in = {}, self.input_fraction
        for layer, pos in zip(self.layers, conv_positions):
            wbits = layer.shift - frac_in + ACT_FRACTION
            out[f"{prefix}.{pos}.weight"] = (layer.weight / 2.0**wbits).float()
            out[f"{prefix}.{pos}.bias"] = (layer.bias / 2.0 ** (frac_in + wbits)).float()
            frac_in = ACT_FRACTION
        return out

    def layer_state(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{prefix}.{i}.weight"] = layer.weight.numpy().astype(np.int16)
            out[f"{prefix}.{i}.bias"] = layer.bias.numpy().astype(np.int64)
            out[f"{prefix}.{i}.meta"] = np.array(
                [int(layer.transposed), layer.shift, layer.stride, layer.padding, layer.output_padding, int(layer.relu)],
                dtype=np.int64,
            )
        return out

    @staticmethod
    def layers_from_state(arrays: dict, prefix: str) -> list[IntLayer]:
        layers = []
        i = 0
        while f"{prefix}.{i}.meta" in arrays:
            t, shift, stride, padding, outpad, relu = (int(v) for v in arrays[f"{prefix}.{i}.meta"])
            layers.append(
                IntLayer(
                    transposed=bool(t),
                    weight=torch.from_numpy(np.asarray(arrays[f"{prefix}.{i}.weight"]).astype(np.float64)),
                    bias=torch.from_numpy(np.asarray(arrays[f"{prefix}.{i}.bias"]).astype(np.float64)),
                    shift=shift,
                    stride=stride,
                    padding=padding,
                    output_padding=outpad,
                    relu=bool(relu),
                )
            )
            i += 1
        return layers

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """x: float64 holding integers in 2**-input_fraction units → float64 holding integers."""
        for layer in self.layers:
            x = layer(x)
        return x


class IntegerHyperSynthesis(IntegerConvNet):
    """Maps integer z (N, C, h, w) to (scale index, mean in 1/2**ACT_FRACTION units), both int64."""

    # indices of the conv layers inside the float nn.Sequential h_s (ReLUs in between)
    conv_positions = (0, 2, 4)

    def __init__(self, layers: list[IntLayer], scale_thresholds: np.ndarray | None = None):
        super().__init__(layers, input_fraction=0)
        # Stored with the model, so no machine's exp() can move a threshold.
        if scale_thresholds is None:
            scale_thresholds = nearest_scale_thresholds()
        self.scale_thresholds = np.asarray(scale_thresholds, dtype=np.int64)
        levels = len(scale_table())
        if len(self.scale_thresholds) not in (levels - 1, levels) or np.any(np.diff(self.scale_thresholds) < 0):
            raise ValueError(f"scale thresholds must be {levels - 1} or {levels} non-decreasing integers")

    @classmethod
    def from_float(cls, h_s: nn.Sequential) -> "IntegerHyperSynthesis":
        net = cls(cls.convert(h_s, input_fraction=0))
        net.check_bounds()
        return net

    def check_bounds(self, z_limit: float = 2.0**15) -> None:
        """Prove that no accumulator can reach 2**53 for |z| ≤ z_limit (escaped z is clipped to it)."""
        super().check_bounds(z_limit)

    def float_state(self, prefix: str = "h_s") -> dict[str, torch.Tensor]:
        return super().float_state(prefix, self.conv_positions)

    def state(self) -> dict[str, np.ndarray]:
        return {"int_h_s.scale_thresholds": self.scale_thresholds, **self.layer_state("int_h_s")}

    @classmethod
    def from_state(cls, arrays: dict) -> "IntegerHyperSynthesis":
        net = cls(cls.layers_from_state(arrays, "int_h_s"), arrays.get("int_h_s.scale_thresholds"))
        net.check_bounds()  # a model file is data: prove its integer network exact before using it
        return net

    def scale_index(self, scales_fp: np.ndarray) -> np.ndarray:
        """Table index of fixed-point scales: the nearest table scale on the log axis."""
        index = np.searchsorted(self.scale_thresholds, scales_fp, side="left")
        return np.minimum(index, len(scale_table()) - 1)

    def raw(self, z_int: np.ndarray) -> np.ndarray:
        """h_s's fixed-point output (N, 2C, h, w) int64: C scales, then C means."""
        return self.run(torch.from_numpy(np.ascontiguousarray(z_int, dtype=np.float64))).numpy().astype(np.int64)

    def __call__(self, z_int: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.raw(z_int)
        c = out.shape[1] // 2
        return self.scale_index(out[:, :c]), out[:, c:]
