"""The rate–distortion training loop (Ballé et al. 2017: loss = λ·255²·MSE + bpp, or
λ·(1 − MS-SSIM) + bpp), resumable bit for bit from its checkpoints.

The library never prints: progress goes to an `on_progress(dict)` callback and to a CSV learning
curve beside the checkpoint.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import platform
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..codec.metrics import MSSSIM_MIN_SIDE
from ..codec.models import LAMBDAS_MSE, LAMBDAS_MSSSIM, QUALITIES, build_model
from ..errors import ConfigError
from ..fsutil import atomic_write_bytes
from .data import PatchSampler, load_images


@dataclass
class TrainOptions:
    run_dir: Path
    train_data: Path
    val_data: Path | None = None
    kind: str = "mean-scale"
    n: int = 128
    m: int = 192
    # Width of h_s's hidden layers; None: M (Minnen et al. 2018). A model widened in M keeps the
    # width it had (`nicd.train.widen`).
    h: int | None = None
    metric: str = "mse"  # mse | ms-ssim
    # The quality ladder, one λ per level (`nicd.train.ladder`); None: the source's (with --init-from,
    # or the checkpoint's on resumption), else the metric's default.
    lambdas: tuple[float, ...] | None = None
    patch: int = 256
    batch: int = 2
    steps: int = 1_000_000
    lr: float = 1e-4
    # The step from which lr drops 10× (the final annealing phase, Ballé et al. 2018). Absolute, not a
    # fraction of `steps`: runs go on across sessions and `steps` is often only where this sitting stops.
    lr_decay_step: int | None = None
    clip: float = 1.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    checkpoint_minutes: float = 5.0
    validate_every: int = 500
    max_seconds: float | None = None
    # None: variable rate, every batch draws quality levels uniformly. An int (1..8): a fixed-rate run
    # trained at that level only, the control for measuring what variable rate costs.
    fixed_quality: int | None = None
    # bfloat16 autocast for the forward pass (convolutions in bf16, ~1.8× faster on a CPU with
    # AVX512-BF16, refused on a CPU without native bfloat16: `cpu_has_fast_bf16`); weights,
    # optimizer and loss stay float32, validation runs in float32.
    bf16: bool = False
    # Exponential moving average of the weights (Polyak averaging): what validation measures and what
    # `nicd export` ships. A CPU run at a high learning rate wanders ±1 dB from snapshot to snapshot
    # on Kodak; the average does not. 0 turns it off.
    ema_decay: float = 0.999
    # Also write a slim copy (`slim_checkpoint`) here at every checkpoint: on a lent GPU, into the
    # folder whose files come back, so that a call cut off at its time limit still returns its weights.
    slim_copy: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.h == self.m:
            self.h = None  # the default width: one spelling, so that a resumption compares equal


# CompressAI uses 1e-3; ten times that lets the quantiles (which start at ±10) reach the tails of a
# trained z density (~±100) within ~10k steps. They only seed the export's exact bisection, so the
# jitter this leaves (~0.01) costs nothing.
AUX_LR = 1e-2


# A channel-context model's context networks train at this multiple of the learning rate (`_param_groups`).
CONTEXT_LR_FACTOR = 10.0


def _lambdas(metric: str) -> tuple[float, ...]:
    if metric == "mse":
        return LAMBDAS_MSE
    if metric == "ms-ssim":
        return LAMBDAS_MSSSIM
    raise ConfigError(f"unknown training metric {metric!r}: use mse or ms-ssim")


def rd_loss(out: dict, x: torch.Tensor, q: torch.Tensor, metric: str, ladder: tuple[float, ...] | None = None) -> dict:
    """Per-sample λ from each sample's quality level (on `ladder`, default: the metric's); returns
    loss, bpp, mse (means over the batch)."""
    lambdas = torch.tensor(ladder or _lambdas(metric), device=x.device)[q]
    pixels = x.shape[2] * x.shape[3]
    bits = sum(torch.log(lk).sum(dim=(1, 2, 3)) for lk in out["likelihoods"].values()) / -math.log(2)
    bpp = bits / pixels
    x_hat = out["x_hat"]
    mse = ((x_hat - x) ** 2).mean(dim=(1, 2, 3))
    if metric == "mse":
        distortion = lambdas * 255**2 * mse
    else:
        from pytorch_msssim import ms_ssim

        ms = ms_ssim(x_hat.clamp(0, 1), x, data_range=1.0, size_average=False)
        distortion = lambdas * (1 - ms)
    loss = (distortion + bpp).mean()
    return {"loss": loss, "bpp": bpp.mean(), "mse": mse.mean()}


def slim_checkpoint(ckpt: dict) -> dict:
    """The part of a checkpoint that ships: the weight average (or, without one, the last weights) in
    float16, with the run's options, step and wall time. Small enough (~8 MB for 96/144) to come back
    from a lent GPU, whose tool returns files of at most 16 MiB. It has no optimizer, RNG or sampler
    state, so it is exported (`nicd export --checkpoint`) or starts a new run (`--init-from`), and
    is never resumed. The export of a slim checkpoint is byte-identical to that of its full one:
    export rounds the weights to float16 first."""
    averaged = ckpt.get("ema") is not None
    weights = ckpt["ema"] if averaged else ckpt["model"]
    half = {k: (v.half() if v.is_floating_point() else v).detach().cpu() for k, v in weights.items()}
    return {
        "slim": True,
        "options": ckpt["options"],
        "config": ckpt["config"],
        "ema" if averaged else "model": half,
        "step": ckpt["step"],
        "wall_seconds": ckpt.get("wall_seconds", 0.0),
        "device": ckpt.get("device", "cpu"),
        "hardware": ckpt.get("hardware"),
    }


def slim_start(source: str) -> dict:
    """A slim checkpoint to start a run from on another machine (a lent GPU, where the shipped
    models' tables cannot be read without the entropy coder): from a run's checkpoint.pt, or from a
    shipped model (name, alias or .npz), whose card supplies the step count and its own origin."""
    if source.endswith(".pt"):
        return slim_checkpoint(torch.load(source, map_location="cpu", weights_only=False))
    from ..codec import registry

    path = registry.resolve(source)
    model = registry.load_float_model(source)
    training = registry.read_card(path).get("training", {})
    extra = {"init_from": training["init_from"]} if training.get("init_from") else {}
    return slim_checkpoint({
        "options": {"run_dir": path.stem, "metric": training.get("metric", "mse"), "extra": extra},
        "config": model.config(),
        "ema": model.state_dict(),
        "step": training.get("steps", 0),
        "wall_seconds": training.get("wall_seconds", 0.0),
        "device": training.get("device", "cpu"),
    })


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively here (AVX512-BF16 / AMX, or AVX512 with its
    fast emulation). Without it autocast falls back to reference kernels, ~35× slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class Trainer:
    """Owns model, optimizer, sampler and the run folder (checkpoint.pt, curve.csv)."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        _lambdas(opts.metric)
        if opts.fixed_quality is not None and not 1 <= opts.fixed_quality <= QUALITIES:
            raise ConfigError(f"fixed quality {opts.fixed_quality} is outside 1..{QUALITIES}")
        if opts.bf16 and torch.device(opts.device).type == "cpu" and not cpu_has_fast_bf16():
            raise ConfigError("--bf16: this CPU has no native bfloat16 (oneDNN reports none; an AVX2 EPYC "
                              "measured 37 s a step against 1 s in float32): train without --bf16")
        torch.set_num_threads(opts.threads)
        self.run_dir = Path(opts.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.curve_path = self.run_dir / "curve.csv"
        self.device = torch.device(opts.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch sizes: let cuDNN pick its fastest kernels once
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)
        if opts.lambdas is not None:
            opts.lambdas = tuple(float(v) for v in opts.lambdas)
        self.model = build_model({"kind": opts.kind, "n": opts.n, "m": opts.m, "h": opts.h,
                                  "lambdas": opts.lambdas}).to(self.device)
        if opts.patch % self.model.stride:
            raise ConfigError(f"patch {opts.patch} must be a multiple of {self.model.stride} for a {opts.kind} model")
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=opts.lr)
        self.aux_optimizer = torch.optim.Adam(self.model.aux_parameters(), lr=AUX_LR)
        self.ema = self._new_ema() if opts.ema_decay else None
        self.step = 0
        self.wall_seconds = 0.0
        self.sampler = PatchSampler(load_images(opts.train_data, opts.patch), opts.patch, opts.batch, opts.seed)
        self.val_images = load_images(opts.val_data, 64) if opts.val_data else []
        saved = self._load() if self.ckpt_path.exists() else None
        self._record_patches(saved)

    def _param_groups(self) -> list[dict]:
        """One group; a channel-context model's context networks in a second one at
        CONTEXT_LR_FACTOR × the learning rate: they start from zero beside transforms that are
        already trained (at the transforms' rate, 430 steps moved the bits by 0.01 %)."""
        main = self.model.main_parameters()
        context = {id(p) for name, p in self.model.named_parameters() if name.startswith("ctx.")}
        if not context:
            return [{"params": main}]
        return [{"params": [p for p in main if id(p) not in context]},
                {"params": [p for p in main if id(p) in context], "lr_scale": CONTEXT_LR_FACTOR}]

    # -- weight averaging ----------------------------------------------------------------------
    def _new_ema(self) -> torch.nn.Module:
        ema = copy.deepcopy(self.model)
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.opts.ema_decay
        floats, others = ([], []), ([], [])
        for avg, cur in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
            group = floats if avg.dtype.is_floating_point else others
            group[0].append(avg)
            group[1].append(cur)
        # One fused kernel per operation over all tensors: on a GPU, ~100 small launches fewer per step.
        torch._foreach_mul_(floats[0], d)
        torch._foreach_add_(floats[0], floats[1], alpha=1 - d)
        for avg, cur in zip(*others):
            avg.copy_(cur)

    @property
    def shipped_model(self) -> torch.nn.Module:
        """The weights validation measures and export ships: the average when there is one."""
        return self.ema if self.ema is not None else self.model

    # -- checkpoints -------------------------------------------------------------------------
    def init_from(self, source: str, widen: bool = False) -> None:
        """Start this (new) run from a shipped model (name, alias or .npz) or another run's checkpoint.pt.

        Only the weights are taken (a checkpoint's average where it has one): optimizer, step and
        sampler start afresh. The source is recorded in
        the checkpoint so that the model card can say what the run was fine-tuned from.
        With `widen`, a source with fewer latent channels than this run's model is first widened
        to them (`nicd.train.widen`); it decodes the same pixels.
        """
        if self.step:
            raise ConfigError(f"run {self.run_dir} has already started; --init-from applies only to a new run")
        if source.endswith(".pt"):
            ckpt = torch.load(source, map_location="cpu", weights_only=False)
            averaged = ckpt.get("ema") is not None  # the weights that run would ship
            config, state = ckpt["config"], ckpt["ema"] if averaged else ckpt["model"]
            source_opts = ckpt.get("options", {})
            origin = {"checkpoint": str(source), "step": ckpt["step"], "wall_seconds": ckpt.get("wall_seconds", 0.0),
                      "weights": "average" if averaged else "last step", "device": ckpt.get("device", "cpu")}
            if source_opts.get("run_dir"):
                origin["run"] = Path(source_opts["run_dir"]).name
            if source_opts.get("extra", {}).get("init_from"):
                origin["from"] = source_opts["extra"]["init_from"]  # the chain of fine-tunings
        else:
            from ..codec import registry

            start = registry.load_float_model(source)
            config, state = start.config(), start.state_dict()
            # the model's own name: an alias such as "default" moves on with the next export
            path = registry.resolve(source)
            origin = {"model": path.stem}
            # The source's card leaves models/ at the next export: keep its training in the chain.
            trained = registry.read_card(path).get("training", {})
            for key in ("steps", "wall_seconds", "device"):
                if key in trained:
                    origin[key] = trained[key]
            if trained.get("init_from"):
                origin["from"] = trained["init_from"]
        if widen:
            from .widen import widen_state

            origin["widened_from_m"] = config["m"]
            config, state = widen_state(config, state, self.model.m)
        if config["kind"] == "mean-scale" and self.model.kind == "mean-scale-cc":
            # The context networks start at zero: the new model codes exactly as its source did.
            fresh = self.model.state_dict()
            config = {**config, "kind": self.model.kind}
            state = {**{k: v for k, v in fresh.items() if k.startswith("ctx.")}, **state}
            origin["context_added"] = True
        source_ladder = tuple(config["lambdas"]) if config.get("lambdas") else None
        trained_on = source_ladder or _lambdas(self.opts.metric)
        if self.opts.lambdas is None:
            self._set_ladder(source_ladder)  # keep the source's
        elif trained_on != self.opts.lambdas:
            from .ladder import relabel_gains

            origin["ladder_from"] = list(trained_on)
            state = relabel_gains(state, trained_on, self.opts.lambdas)
        config = {k: v for k, v in config.items() if k != "lambdas"}
        if self.model.lambdas:
            config["lambdas"] = list(self.model.lambdas)
        if config != self.model.config():
            raise ConfigError(f"--init-from {source} is {config}, this run is {self.model.config()}")
        self.model.load_state_dict({k: v.to(self.model.state_dict()[k].dtype) for k, v in state.items()})
        if self.ema is not None:
            self.ema = self._new_ema()
        self.opts.extra["init_from"] = origin

    def _set_ladder(self, ladder: tuple[float, ...] | None) -> None:
        """Adopt a source's or a checkpoint's quality ladder (the model's config carries it)."""
        self.opts.lambdas = ladder
        for model in (self.model, self.ema):
            if model is not None:
                model.lambdas = ladder

    def _record_patches(self, saved: dict | None) -> None:
        """Keep the run's patch schedule in `extra["patches"]`: a new entry whenever a resumption
        changes the patch size, the batch or the precision (`"bf16": true`, absent when float32),
        so that the model card can say what the steps were made of. A run checkpointed before this
        record existed gets its last saved setting from step 0."""
        patches = self.opts.extra.setdefault("patches", [])
        if not patches and saved is not None and self.step:
            patches.append({"from_step": 0, "patch": saved["patch"], "batch": saved["batch"]})
        setting = {"patch": self.opts.patch, "batch": self.opts.batch, **({"bf16": True} if self.opts.bf16 else {})}
        last = patches[-1] if patches else None
        if last is None or {k: v for k, v in last.items() if k != "from_step"} != setting:
            if last is not None and last["from_step"] == self.step:
                patches.pop()  # changed again before any step was made
            patches.append({"from_step": self.step, **setting})

    def _load(self) -> dict:
        """Restore everything from checkpoint.pt; returns the options the run was saved with."""
        # RNG states must stay CPU tensors: load everything on the CPU, the model moves itself below.
        ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("slim"):
            raise ConfigError(f"{self.ckpt_path} is a slim checkpoint (weights only): start a new run from it with "
                              f"--init-from, or export it")
        saved = ckpt["options"]
        for key in ("kind", "n", "m", "h", "metric"):
            if saved.get(key) != getattr(self.opts, key):
                raise ConfigError(f"run {self.run_dir} was started with {key}={saved.get(key)!r}, not {getattr(self.opts, key)!r}")
        ladder = tuple(ckpt["config"]["lambdas"]) if ckpt["config"].get("lambdas") else None
        if self.opts.lambdas is not None and self.opts.lambdas != ladder:
            raise ConfigError(f"run {self.run_dir} trains the ladder {list(ladder or _lambdas(self.opts.metric))}, "
                              f"not {list(self.opts.lambdas)}: start a new run from it with --init-from")
        self._set_ladder(ladder)
        # What a run was started from stays with it across resumptions (the model card quotes it).
        self.opts.extra = {**saved.get("extra", {}), **self.opts.extra}
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            # A run checkpointed without an average starts one from its current weights.
            self.ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if "aux_optimizer" in ckpt:  # runs checkpointed before the aux loss existed start it afresh
            self.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        self.step = ckpt["step"]
        self.wall_seconds = ckpt.get("wall_seconds", 0.0)
        self.sampler.set_state(ckpt["sampler"])
        _set_rng_state(ckpt["rng"])
        return saved

    def save(self) -> None:
        opts = asdict(self.opts)
        opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}
        ckpt = {
            "options": opts,
            "config": self.model.config(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "sampler": self.sampler.state(),
            "rng": _rng_state(),
            "device": str(self.device),
            "hardware": self.hardware(),
        }
        atomic_torch_save(ckpt, self.ckpt_path)
        if self.opts.slim_copy:
            atomic_torch_save(slim_checkpoint(ckpt), Path(self.opts.slim_copy))

    def hardware(self) -> str:
        """What the steps ran on, for the model card (export may run on another machine)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{platform.machine()} {platform.processor() or ''}".strip()

    # -- training ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        decay = self.opts.lr_decay_step
        return self.opts.lr * (0.1 if decay is not None and step >= decay else 1.0)

    def train_step(self) -> dict:
        self.model.train()
        x = torch.from_numpy(self.sampler.sample()).to(self.device).float() / 255.0
        if self.opts.fixed_quality:
            q = torch.full((x.shape[0],), self.opts.fixed_quality - 1, device=self.device)
        else:
            q = torch.randint(0, QUALITIES, (x.shape[0],), device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.bf16):
            out = self.model(x, q)
        if self.opts.bf16:  # the loss (rates, MSE, MS-SSIM) is always summed in float32
            out = {"x_hat": out["x_hat"].float(), "likelihoods": {k: v.float() for k, v in out["likelihoods"].items()}}
        losses = rd_loss(out, x, q, self.opts.metric, self.model.lambdas)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.main_parameters(), self.opts.clip)
        self.optimizer.step()
        # The quantiles follow the density on their own optimizer (Ballé et al. 2018, CompressAI).
        self.aux_optimizer.zero_grad(set_to_none=True)
        losses["aux"] = self.model.aux_loss()
        losses["aux"].backward()
        self.aux_optimizer.step()
        if self.ema is not None:
            self._update_ema()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def validate(self, qualities=(1, 4, 8), crop: int = 256, images: int = 12) -> dict:
        """Estimated bpp (rounded latents) and PSNR on centre crops of the validation photos, of the
        weights that would ship (the average when there is one)."""
        model = self.shipped_model
        model.eval()
        result = {}
        for quality in qualities:
            bpps, psnrs, mss = [], [], []
            for im in self.val_images[:images]:
                h, w = im.shape[:2]
                c = min(crop, h, w) // 64 * 64
                y0, x0 = (h - c) // 2, (w - c) // 2
                x = torch.from_numpy(np.ascontiguousarray(im[y0:y0 + c, x0:x0 + c].transpose(2, 0, 1)))
                x = x[None].float().to(self.device) / 255.0
                out = model(x, torch.tensor([quality - 1], device=self.device))
                bits = sum(-torch.log2(lk).sum() for lk in out["likelihoods"].values())
                bpps.append(float(bits) / (c * c))
                mse = float(((out["x_hat"].clamp(0, 1) * 255).round() / 255 - x).pow(2).mean())
                psnrs.append(10 * math.log10(1 / max(mse, 1e-12)))
                if self.opts.metric == "ms-ssim" and c >= MSSSIM_MIN_SIDE:
                    from pytorch_msssim import ms_ssim

                    x_q = (out["x_hat"].clamp(0, 1) * 255).round()
                    mss.append(float(ms_ssim(x_q, x * 255, data_range=255)))
            result[f"q{quality}_bpp"] = float(np.mean(bpps))
            result[f"q{quality}_psnr"] = float(np.mean(psnrs))
            if mss:  # only ms-ssim runs carry these columns, so a run's CSV header never changes
                result[f"q{quality}_ms_ssim"] = float(np.mean(mss))
        return result

    def _append_curve(self, row: dict) -> None:
        new = not self.curve_path.exists()
        with open(self.curve_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self, on_progress: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None) -> dict:
        """Train until `steps`, `max_seconds`, SIGTERM/SIGINT or `stop()`; checkpoint on the way out."""
        stopping = {"flag": False}

        def _handler(signum, frame):
            stopping["flag"] = True

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, _handler)
            except ValueError:  # not in the main thread
                pass
        started = time.monotonic()
        last_ckpt = started
        running = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
        count = 0
        try:
            while self.step < self.opts.steps and not stopping["flag"] and not (stop and stop()):
                if self.opts.max_seconds and time.monotonic() - started >= self.opts.max_seconds:
                    break
                t0 = time.monotonic()
                losses = self.train_step()
                self.wall_seconds += time.monotonic() - t0
                for k in running:
                    running[k] += losses[k]
                count += 1
                row = None
                if self.val_images and self.step % self.opts.validate_every == 0:
                    row = {"step": self.step, "wall_seconds": round(self.wall_seconds, 1)}
                    row.update({f"train_{k}": round(v / count, 5) for k, v in running.items()})
                    row.update({k: round(v, 4) for k, v in self.validate().items()})
                    self._append_curve(row)
                    running = {k: 0.0 for k in running}
                    count = 0
                if on_progress:
                    on_progress({"step": self.step, "steps": self.opts.steps, **losses, "validation": row})
                if time.monotonic() - last_ckpt >= self.opts.checkpoint_minutes * 60:
                    self.save()
                    last_ckpt = time.monotonic()
        finally:
            self.save()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {"step": self.step, "wall_seconds": self.wall_seconds, "stopped_by_signal": stopping["flag"]}
