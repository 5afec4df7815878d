"""The committed slim copies of the production runs (checkpoints/): what a new machine starts a run
from when the run folder is gone, so they must load as a run's start, and export and code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nicd.codec import registry
from nicd.codec.api import Codec, pick_device
from nicd.codec.imageio import load_image
from nicd.codec.metrics import psnr
from nicd.train.export import export_checkpoint
from nicd.train.loop import Trainer, TrainOptions

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = sorted((ROOT / "checkpoints").glob("*.pt"))
KODIM = ROOT.parent / "shared" / "data" / "kodak" / "kodim23.png"


def test_the_default_models_run_has_a_committed_copy():
    run = registry.resolve("default").stem.rsplit("-", 1)[0]  # msh-96-256-mse-<hash> -> msh-96-256-mse
    assert ROOT / "checkpoints" / f"{run}.pt" in CHECKPOINTS


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem)
def test_a_committed_copy_is_slim_starts_a_run_and_codes(path, small_train, tmp_path):
    assert path.stat().st_size < 16 << 20  # replaced in place each session: it must stay small
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["slim"] and "optimizer" not in ckpt
    weights = ckpt["ema"] if "ema" in ckpt else ckpt["model"]
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())

    config, options = ckpt["config"], ckpt["options"]
    run = Trainer(TrainOptions(run_dir=tmp_path / "run", train_data=small_train, val_data=small_train, patch=64,
                               batch=2, steps=0, threads=1, kind=config["kind"], n=config["n"], m=config["m"],
                               h=config.get("h"), metric=options["metric"]))
    run.init_from(str(path))
    for k, v in weights.items():
        assert torch.equal(v.to(run.model.state_dict()[k].dtype), run.model.state_dict()[k]), k

    info = export_checkpoint(path, "copy", tmp_path / "models")
    loaded, frozen = registry.load(info.model_id, tmp_path / "models")
    codec = Codec(loaded, frozen, pick_device("cpu"))
    rgb = np.ascontiguousarray(load_image(KODIM).rgb[128:256, 256:448])
    res = codec.encode(load_image(Image.fromarray(rgb)), quality=4)
    # trained weights, not fresh ones: the shipped default measures 36.0 dB at 0.28 bpp on this crop
    assert psnr(rgb, codec.decode_rgb(res.data)) > 34
    assert len(res.data) * 8 / rgb[..., 0].size < 0.5
