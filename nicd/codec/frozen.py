"""A trained model frozen for coding: float transforms plus the integer tables and integer `h_s`.

Encoding runs the analysis transforms in float64 so that the rounding of `y` and `z` does not depend
on thread count, batch size or memory layout (float32 differs by ~1e-7 between those, which flips
a few symbols per image; float64 makes a flip a ~1e-9-per-image event). What the decoder needs to
select probability tables is computed exactly (integer `h_s`, a channel-context model's integer
context networks, integer tables). Synthesis stays float32: its differences only move pixels slightly.
"""

from __future__ import annotations

import copy
import math
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError, VerificationError
from . import entropy
from .density import gaussian_likelihood
from .intnet import ACT_FRACTION, ACT_LIMIT, IntegerConvNet, IntegerHyperSynthesis
from .models import ChannelContextHyperprior, CodecModel, MeanScaleHyperprior
from .tables import TableSet, factorized_tables, gaussian_tables, scale_table
from .rounding import rate_aware_round

Z_LIMIT = 1 << 15  # |z| clip: keeps the integer network inside its proven exact range
Y_LIMIT = 1 << 24


@dataclass
class CodedLatents:
    streams: tuple[bytes, bytes]  # (range-coded words, escape varints)
    symbol_crc: int
    estimated_bits: float  # −Σ log2 of the model's likelihoods of the coded symbols
    y_hat: np.ndarray  # (M, h, w) float64, what the decoder will reconstruct


def _learned_tables(density) -> TableSet:
    """Tables of a learned factorized density, trimmed to all but TAIL_MASS of each channel's mass.

    The density is evaluated on the integers holding all but 1e-15 of every channel's mass (within
    ±Z_LIMIT: beyond are escapes), so the trim sees the whole distribution."""
    lower, upper = density.tail_bounds(tail=1e-15)
    lo = int(max(np.floor(lower.min()) - 1, -Z_LIMIT))
    hi = int(min(np.ceil(upper.max()) + 1, Z_LIMIT))
    return factorized_tables(density.pmf_on_grid(lo, hi), lo)


def symbol_crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a, dtype="<i4").tobytes(), crc)
    return crc


class FrozenModel:
    def __init__(self, model: CodecModel, arrays: dict):
        self.model = model.eval()
        # float64 copies of everything that decides a symbol on the encoder side
        self.g_a64 = copy.deepcopy(model.g_a).double()
        self.h_a64 = copy.deepcopy(model.h_a).double() if hasattr(model, "h_a") else None
        density = model.density_z if hasattr(model, "density_z") else model.density_y
        self.density64 = copy.deepcopy(density).double()
        self.kind = model.kind
        self.stride = model.stride
        self.m = model.m
        self.n = model.n
        self.hyper = isinstance(model, MeanScaleHyperprior)  # z and h_s (else the factorized prior)
        if self.hyper:
            self.z_tables = TableSet.from_arrays(arrays, "z")
            self.y_tables = TableSet.from_arrays(arrays, "y")
            self.int_h_s = IntegerHyperSynthesis.from_state(arrays)
            self.z_models = entropy.TableModels(self.z_tables)
            self.int_ctx = _context_nets_from_state(arrays, model)
        else:
            self.y_tables = TableSet.from_arrays(arrays, "y")
        self.y_models = entropy.TableModels(self.y_tables)
        with torch.no_grad():
            self.gain = torch.exp(model.gain.log_gain.double()).numpy()
        self.scales = scale_table()
        # One copy of the transforms per device, made once and never moved: a shared model can then
        # serve encoders and decoders on different devices and threads at the same time.
        self._devices: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {"cpu": (self.g_a64, model.g_s)}
        self._devices_lock = threading.Lock()

    def _on(self, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
        key = str(torch.device(device))
        with self._devices_lock:
            if key not in self._devices:
                self._devices[key] = (copy.deepcopy(self.g_a64).to(device), copy.deepcopy(self.model.g_s).to(device))
            return self._devices[key]

    # -- freezing ------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def build_arrays(model: CodecModel) -> dict[str, np.ndarray]:
        """Integer tables (and integer h_s) for a trained model, as stored in its weights file."""
        arrays: dict[str, np.ndarray] = {}
        if isinstance(model, MeanScaleHyperprior):
            arrays.update(_learned_tables(model.density_z).to_arrays("z"))
            arrays.update(gaussian_tables().to_arrays("y"))
            arrays.update(IntegerHyperSynthesis.from_float(model.h_s).state())
            for s, net in enumerate(getattr(model, "ctx", ())):  # a channel-context model's
                int_net = IntegerConvNet(IntegerConvNet.convert(net, ACT_FRACTION), ACT_FRACTION)
                int_net.check_bounds(ACT_LIMIT)
                arrays.update(int_net.layer_state(f"int_ctx{s}"))
        else:
            arrays.update(_learned_tables(model.density_y).to_arrays("y"))
        return {k: (v.astype(np.int32) if k.endswith(".counts") else v) for k, v in arrays.items()}

    # -- transforms ----------------------------------------------------------------------------
    @torch.no_grad()
    def analyse(self, x: torch.Tensor) -> np.ndarray:
        """x: (B, 3, H, W) in [0, 1], H and W multiples of `stride` → y before gain, float64 numpy."""
        g_a, _ = self._on(x.device)
        return g_a(x.to(torch.float64)).cpu().numpy()

    @torch.no_grad()
    def synthesize(self, y_hat: np.ndarray, qualities: list[int], device: torch.device) -> torch.Tensor:
        """y_hat: (B, M, h, w) → reconstruction (B, 3, H, W) float32 in [0, 1] on the CPU."""
        _, g_s = self._on(device)
        inv = torch.exp(self.model.gain.log_inv_gain[[q - 1 for q in qualities]]).float().to(device)
        y = torch.from_numpy(y_hat).float().to(device) * inv[:, :, None, None]
        return g_s(y).clamp_(0, 1).cpu()

    # -- entropy coding ------------------------------------------------------------------------
    def code(self, y_base: np.ndarray, quality: int, z: np.ndarray | None = None,
             rounding_weight: float | None = None) -> CodedLatents:
        """Code y (before gain). `z`: the hyper-latent to code instead of h_a(y), where an encoder
        has optimised it (`nicd.codec.refine`); `rounding_weight`: round y − μ by rate as well as
        distance (`nicd.codec.rounding`; hyperprior models), None for the nearest symbol. The
        decoder cannot tell either."""
        y = y_base * self.gain[quality - 1][:, None, None]
        if self.hyper:
            return self._code_hyper(y, z, rounding_weight)
        return self._code_factorized(y)

    def decode(self, streams: tuple[bytes, ...], latent_hw: tuple[int, int], quality: int, crc: int) -> np.ndarray:
        if len(streams) != 2:
            raise VerificationError("a tile must hold 2 streams", code="E_FORMAT_STREAM")
        decoder = entropy.new_decoder(streams[0])
        escapes = entropy.EscapeReader(streams[1], Y_LIMIT)
        h, w = latent_hw
        if self.hyper:
            zh, zw = h // 4, w // 4
            z_ids = np.repeat(np.arange(self.n), zh * zw)
            z_int = entropy.decode_grouped(decoder, z_ids, self.z_models, escapes).reshape(1, self.n, zh, zw)
            if np.abs(z_int).max(initial=0) > Z_LIMIT:  # the encoder clips z to ±Z_LIMIT
                raise FormatError("coded z is out of range", code="E_FORMAT_STREAM")
            hyper = self.int_h_s.raw(z_int)
            sym = np.empty((self.m, h, w), dtype=np.int64)
            y_hat_fp = np.empty((self.m, h, w), dtype=np.int64)
            for s, channels in enumerate(self._slices()):
                idx, mean_fp = self._slice_params(s, hyper, y_hat_fp)
                sym[channels] = entropy.decode_grouped(decoder, idx.ravel(), self.y_models, escapes).reshape(idx.shape)
                y_hat_fp[channels] = sym[channels] * (1 << ACT_FRACTION) + mean_fp
            checks = (z_int, sym)
            y_hat = y_hat_fp / float(1 << ACT_FRACTION)
        else:
            ids = np.repeat(np.arange(self.m), h * w)
            sym = entropy.decode_grouped(decoder, ids, self.y_models, escapes).reshape(self.m, h, w)
            checks = (sym,)
            y_hat = sym.astype(np.float64)
        if symbol_crc(*checks) != crc:
            raise VerificationError(
                "decoded symbols do not match the encoder's checksum (corrupt stream or model tables that differ)",
                code="E_VERIFY_SYMBOLS",
            )
        if escapes.pos != len(escapes.data):
            raise VerificationError("escape stream has trailing bytes", code="E_VERIFY_SYMBOLS")
        return y_hat

    def _slices(self) -> list[slice]:
        """The channel slices of y, in coding order (one for a plain mean-scale model)."""
        k = len(self.int_ctx) + 1
        c = self.m // k
        return [slice(s * c, (s + 1) * c) for s in range(k)]

    def _slice_params(self, s: int, hyper: np.ndarray, y_hat_fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Table indices and fixed-point means of slice s, from h_s's output and (through slice s's
        integer context network) the slices before it: exactly what the decoder computes."""
        channels = self._slices()[s]
        scales_fp, means_fp = hyper[0, channels], hyper[0, self.m:][channels]
        if s:
            before = np.clip(y_hat_fp[: channels.start], -ACT_LIMIT, ACT_LIMIT)
            x = torch.from_numpy(np.concatenate([hyper[0], before])[None].astype(np.float64))
            delta = self.int_ctx[s - 1].run(x).numpy().astype(np.int64)[0]
            c = channels.stop - channels.start
            scales_fp, means_fp = scales_fp + delta[:c], means_fp + delta[c:]
        return self.int_h_s.scale_index(scales_fp), means_fp

    def _code_hyper(self, y: np.ndarray, z: np.ndarray | None, rounding_weight: float | None) -> CodedLatents:
        if z is None:
            with torch.no_grad():
                z = self.h_a64(torch.from_numpy(y)[None]).numpy()[0]
        z_int = np.clip(np.round(z), -Z_LIMIT, Z_LIMIT).astype(np.int64)
        hyper = self.int_h_s.raw(z_int[None])
        encoder = entropy.new_encoder()
        escaped = [
            entropy.encode_grouped(encoder, z_int.ravel(), np.repeat(np.arange(self.n), z_int[0].size), self.z_models),
        ]
        sym = np.empty(y.shape, dtype=np.int64)
        y_hat_fp = np.empty(y.shape, dtype=np.int64)
        idx = np.empty(y.shape, dtype=np.int64)
        mean = np.empty(y.shape, dtype=np.float64)
        for s, channels in enumerate(self._slices()):
            idx[channels], mean_fp = self._slice_params(s, hyper, y_hat_fp)
            mean[channels] = mean_fp / float(1 << ACT_FRACTION)
            r = y[channels] - mean[channels]
            if rounding_weight is None:
                k = np.round(r)
            else:
                k = rate_aware_round(r, self.scales[idx[channels]], rounding_weight)
            sym[channels] = np.clip(k, -Y_LIMIT, Y_LIMIT)
            escaped.append(entropy.encode_grouped(encoder, sym[channels].ravel(), idx[channels].ravel(), self.y_models))
            y_hat_fp[channels] = sym[channels] * (1 << ACT_FRACTION) + mean_fp
        streams = entropy.finish(encoder, escaped)
        y_hat = sym + mean
        with torch.no_grad():
            lz = self.density64.likelihood(torch.from_numpy(z_int[None]).double())
            ly = gaussian_likelihood(
                torch.from_numpy(y_hat), torch.from_numpy(mean), torch.from_numpy(self.scales[idx])
            )
        bits = float(-torch.log2(lz).sum() - torch.log2(ly).sum())
        return CodedLatents(streams, symbol_crc(z_int, sym), bits, y_hat)

    def _code_factorized(self, y: np.ndarray) -> CodedLatents:
        sym = np.clip(np.round(y), -Y_LIMIT, Y_LIMIT).astype(np.int64)
        encoder = entropy.new_encoder()
        escaped = [entropy.encode_grouped(encoder, sym.ravel(), np.repeat(np.arange(self.m), sym[0].size), self.y_models)]
        streams = entropy.finish(encoder, escaped)
        with torch.no_grad():
            ly = self.density64.likelihood(torch.from_numpy(sym[None]).double())
        return CodedLatents(streams, symbol_crc(sym), float(-torch.log2(ly).sum()), sym.astype(np.float64))


def _context_nets_from_state(arrays: dict, model: CodecModel) -> list[IntegerConvNet]:
    """The integer context networks of a channel-context model (none for a plain mean-scale one),
    each proven exact over its whole input range before use: a model file is data."""
    nets = []
    if isinstance(model, ChannelContextHyperprior):
        for s in range(model.SLICES - 1):
            net = IntegerConvNet(IntegerConvNet.layers_from_state(arrays, f"int_ctx{s}"), ACT_FRACTION)
            if not net.layers:
                raise KeyError(f"int_ctx{s}")
            net.check_bounds(ACT_LIMIT)
            nets.append(net)
    return nets


def latent_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """Latent (h, w) of a tile of height×width pixels padded up to a multiple of `stride`."""
    ph = math.ceil(height / stride) * stride
    pw = math.ceil(width / stride) * stride
    return ph // 16, pw // 16
