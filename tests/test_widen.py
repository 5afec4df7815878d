"""Growing a trained model's latent channels (nicd.train.widen): same output, then trainable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nicd.codec import container, registry
from nicd.codec.api import Codec, pick_device
from nicd.codec.imageio import load_image
from nicd.codec.models import FactorizedPrior, MeanScaleHyperprior, build_model
from nicd.errors import ConfigError
from nicd.train.cards import training_source
from nicd.train.export import export_checkpoint
from nicd.train.loop import Trainer, TrainOptions
from nicd.train.widen import widen_latents

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def kodak_crop(side: int = 128) -> torch.Tensor:
    rgb = np.asarray(Image.open(KODAK / "kodim05.png").convert("RGB"))[:side, :side]
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].float() / 255


def bits(out: dict) -> dict[str, float]:
    return {k: float(-torch.log2(v).sum()) for k, v in out["likelihoods"].items()}


@torch.no_grad()
def test_a_shipped_model_widened_decodes_the_same_pixels():
    # the MS-SSIM model is 96/144 as the default was before it was widened (the next to widen)
    model = registry.load_float_model("ms-ssim").float().eval()
    wide = widen_latents(model, model.m + 112).eval()
    assert wide.config() == {**model.config(), "m": model.m + 112, "h": model.config().get("h", model.m)}
    x = kodak_crop()
    for q in (0, 7):
        a, b = model(x, torch.tensor([q])), wide(x, torch.tensor([q]))
        assert torch.equal(a["x_hat"], b["x_hat"])
        ba, bb = bits(a), bits(b)
        assert ba["z"] == bb["z"]
        # the new latents are live features (not rounded away), so they cost bits from the start
        new = torch.round(wide.g_a(x)[:, model.m:] * wide.gain.gain(torch.tensor([q]))[:, model.m:])
        # (at the lowest level's small gains fewer survive the rounding than at the top)
        assert float((new != 0).float().mean()) > (0.1 if q == 7 else 0.02)
        assert bb["y"] > ba["y"]
    assert torch.equal(wide.g_s[0].weight[:model.m], model.g_s[0].weight)
    assert not wide.g_s[0].weight[model.m:].any()


def test_widened_channels_learn_and_the_model_round_trips_as_a_bitstream(small_train, tmp_path):
    base = dict(train_data=small_train, val_data=None, n=16, patch=64, batch=4, lr=1e-3,
                checkpoint_minutes=60, threads=1, seed=3)
    source = Trainer(TrainOptions(run_dir=tmp_path / "narrow", m=24, steps=30, **base))
    source.run()
    wide = Trainer(TrainOptions(run_dir=tmp_path / "wide", m=40, h=24, steps=30, **base))
    wide.init_from(str(tmp_path / "narrow" / "checkpoint.pt"), widen=True)
    assert not wide.model.g_s[0].weight[24:].any()
    wide.run()
    # g_s learnt to read the new latents (its weights for them start at zero)
    assert float(wide.model.g_s[0].weight[24:].detach().abs().sum()) > 0
    assert wide.opts.extra["init_from"]["widened_from_m"] == 24
    # a resumption must name the same architecture
    with pytest.raises(ConfigError, match="h=24"):
        Trainer(TrainOptions(run_dir=tmp_path / "wide", m=40, steps=31, **base))
    info = export_checkpoint(tmp_path / "wide" / "checkpoint.pt", "wide", tmp_path / "models")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["architecture"] == {"kind": "mean-scale", "n": 16, "m": 40, "h": 24}
    assert "widened from 24 latent channels" in training_source(card["training"]["init_from"])
    loaded, frozen = registry.load(info.model_id, tmp_path / "models")
    codec = Codec(loaded, frozen, pick_device("cpu"))
    rgb = np.asarray(Image.open(sorted(small_train.glob("*.png"))[0]).convert("RGB"))
    res = codec.encode(load_image(Image.fromarray(rgb)), quality=6)
    assert container.parse(res.data).model_id == info.model_id
    out = codec.decode_rgb(res.data)
    assert out.shape == rgb.shape
    # the bitstream decodes to what the float model reconstructs (a 30-step model: not to the photo)
    float_model = registry.load_float_model(info.model_id, tmp_path / "models").float().eval()
    x = torch.from_numpy(rgb[:128, :128].transpose(2, 0, 1).copy())[None].float() / 255  # a stride multiple
    with torch.no_grad():
        expected = float_model(x, torch.tensor([5]))["x_hat"].clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    psnr = 10 * np.log10(255**2 / np.mean((out[:128, :128].astype(float) - expected) ** 2))
    assert psnr > 40, psnr


def test_widening_refuses_what_it_cannot_do():
    model = MeanScaleHyperprior(n=8, m=12)
    with pytest.raises(ConfigError, match="more latent channels"):
        widen_latents(model, 12)
    with pytest.raises(ConfigError, match="only mean-scale"):
        widen_latents(FactorizedPrior(n=8, m=12), 16)


def test_the_default_hyper_width_keeps_earlier_configs_unchanged():
    assert MeanScaleHyperprior(n=8, m=12).config() == {"kind": "mean-scale", "n": 8, "m": 12}
    assert MeanScaleHyperprior(n=8, m=12, h=12).config() == {"kind": "mean-scale", "n": 8, "m": 12}
    narrow_hs = build_model({"kind": "mean-scale", "n": 8, "m": 20, "h": 12})
    assert [tuple(p.shape) for p in narrow_hs.h_s.parameters()][-2] == (40, 18, 3, 3)


def test_the_cli_widens_a_checkpoint_into_a_new_run(small_train, tmp_path):
    from typer.testing import CliRunner

    from nicd.cli import app

    runner = CliRunner()
    common = ["--data", str(small_train), "--val", str(small_train), "--n", "16", "--patch", "64", "--batch", "2",
              "--steps", "2", "--validate-every", "1000"]
    r = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "narrow"), "--m", "24", *common])
    assert r.exit_code == 0, r.output
    source = str(tmp_path / "narrow" / "checkpoint.pt")
    # without --widen a wider run refuses the narrower weights, in one readable line
    r = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "a"), "--m", "40", "--hyper-width", "24", "--init-from", source, *common])
    assert r.exit_code != 0 and "'m': 24" in r.output
    r = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "b"), "--m", "40", "--hyper-width", "24", "--init-from", source,
                            "--widen", *common])
    assert r.exit_code == 0, r.output
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"] == {"kind": "mean-scale", "n": 16, "m": 40, "h": 24} and ckpt["step"] == 2
