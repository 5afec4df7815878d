"""Training: a tiny run lowers the loss, a resumed run equals an uninterrupted one, export works."""

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
from nicd.errors import ConfigError
from nicd.train.data import load_images, pack_folder
from nicd.train.export import export_checkpoint
from nicd.train.loop import Trainer, TrainOptions

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"


def opts(run_dir: Path, data: Path, **kw) -> TrainOptions:
    base = dict(run_dir=run_dir, train_data=data, val_data=data, n=16, m=24, patch=64, batch=4, lr=1e-3,
                validate_every=10_000, checkpoint_minutes=60, threads=1, seed=3)
    base.update(kw)
    return TrainOptions(**base)


def shipped_architecture(name: str) -> dict:
    """n, m and h of a shipped model, so that a run built to receive its weights follows the model
    when the default is replaced by a wider one."""
    config = registry.load_float_model(name).config()
    return {k: config[k] for k in ("n", "m", "h") if k in config}


def test_tiny_run_lowers_the_loss(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=60))
    losses = []
    trainer.run(on_progress=lambda p: losses.append(p["loss"]))
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("kind", ["mean-scale", "mean-scale-cc"])
def test_resumed_run_equals_uninterrupted(small_train, tmp_path, kind):
    full = Trainer(opts(tmp_path / "a", small_train, steps=8, kind=kind))
    full.run()
    first = Trainer(opts(tmp_path / "b", small_train, steps=4, kind=kind))
    first.run()
    resumed = Trainer(opts(tmp_path / "b", small_train, steps=8, kind=kind))
    assert resumed.step == 4
    resumed.run()
    for a, b in ((full.model.state_dict(), resumed.model.state_dict()), (full.ema.state_dict(), resumed.ema.state_dict())):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_validation_curve_is_written(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=4, validate_every=2))
    trainer.run()
    lines = (tmp_path / "run" / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("step,wall_seconds,train_loss") and len(lines) == 3


def test_export_encode_decode(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=3))
    trainer.run()
    info = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny", tmp_path / "models", alias="default")
    assert info.path.name.startswith("tiny-") and info.path.stem.endswith(info.sha256[:8])
    assert (tmp_path / "models" / f"{info.model_id}.json").exists()
    loaded, frozen = registry.load("default", tmp_path / "models")
    codec = Codec(loaded, frozen, pick_device("cpu"))
    rgb = np.asarray(Image.open(sorted(small_train.glob("*.png"))[0]).convert("RGB"))
    res = codec.encode(load_image(Image.fromarray(rgb)), quality=4)
    assert container.parse(res.data).model_id == info.model_id
    assert codec.decode_rgb(res.data).shape == rgb.shape
    # exporting again replaces the previous file in place
    trainer2 = Trainer(opts(tmp_path / "run", small_train, steps=4))
    trainer2.run()
    info2 = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny", tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").glob("tiny-*.npz")) == [info2.path.name]
    # a model whose name merely starts with "tiny" is another model: never touched
    other = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny-big", tmp_path / "models")
    export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny", tmp_path / "models")
    assert other.path.exists()


def test_tampered_weights_are_refused(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=1))
    trainer.run()
    info = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny", tmp_path / "models")
    data = bytearray(info.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    info.path.write_bytes(bytes(data))
    registry._load_cached.cache_clear()
    with pytest.raises(Exception) as err:
        registry.load(info.model_id, tmp_path / "models")
    assert getattr(err.value, "code", "") == "E_MODEL_HASH"


def test_pack_fits_budget(small_train, tmp_path):
    stats = pack_folder(small_train, tmp_path / "pack.npz", max_bytes=100_000, side=96)
    assert (tmp_path / "pack.npz").stat().st_size == stats["bytes"] <= 100_000
    assert 1 <= stats["images"] < 8  # eight crops do not fit: some were dropped
    images = load_images(tmp_path / "pack.npz", 64)
    assert len(images) == stats["images"] and all(im.shape == (96, 96, 3) for im in images)
    # dropped at random, not the tail of the sorted list
    with np.load(tmp_path / "pack.npz") as f:
        assert sorted(f.files) != [f"img{i:05d}" for i in range(stats["images"])]


def test_the_pack_budget_is_an_option_of_the_command(small_train, tmp_path):
    from typer.testing import CliRunner

    from nicd.cli import app

    r = CliRunner().invoke(app, ["train", "--data", str(small_train), "--pack", str(tmp_path / "p.npz"),
                                 "--pack-side", "96", "--pack-max-mb", "0.1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bytes"] == (tmp_path / "p.npz").stat().st_size <= 100_000


def test_a_centre_pack_holds_the_exact_pixels_validation_measures(small_train, tmp_path):
    pack_folder(small_train, tmp_path / "val.npz", side=96, centre=True)
    packed = load_images(tmp_path / "val.npz", 64)
    originals = load_images(small_train, 64)
    assert len(packed) == len(originals) == 8
    for crop, full in zip(packed, originals):
        h, w = full.shape[:2]
        assert np.array_equal(crop, full[(h - 96) // 2:(h - 96) // 2 + 96, (w - 96) // 2:(w - 96) // 2 + 96])
    # a narrower image gives a narrower crop, not none
    pack_folder(small_train, tmp_path / "wide.npz", side=150)
    assert {im.shape for im in load_images(tmp_path / "wide.npz", 64)} == {(128, 150, 3)}


def test_an_old_raw_pixel_pack_still_loads(small_train, tmp_path):
    raw = np.arange(64 * 80 * 3, dtype=np.uint8).reshape(64, 80, 3)
    np.savez_compressed(tmp_path / "old.npz", img00000=raw)
    assert np.array_equal(load_images(tmp_path / "old.npz", 64)[0], raw)


def test_a_slim_copy_exports_byte_identically_and_starts_new_runs(small_train, tmp_path):
    slim_path = tmp_path / "out" / "slim.pt"
    slim_path.parent.mkdir()
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=3, slim_copy=slim_path))
    trainer.run()
    assert slim_path.stat().st_size < 0.4 * (tmp_path / "run" / "checkpoint.pt").stat().st_size
    full = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "tiny", tmp_path / "a")
    slim = export_checkpoint(slim_path, "tiny", tmp_path / "b")
    assert full.path.read_bytes() == slim.path.read_bytes()
    # never resumed: it has no optimizer state

    (tmp_path / "slimrun").mkdir()
    (tmp_path / "slimrun" / "checkpoint.pt").write_bytes(slim_path.read_bytes())
    with pytest.raises(ConfigError, match="slim checkpoint"):
        Trainer(opts(tmp_path / "slimrun", small_train))
    # a new run from it starts from the shipped (float16) average, and the card names the chain
    tuned = Trainer(opts(tmp_path / "tuned", small_train, steps=1))
    tuned.init_from(str(slim_path))
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(v.half().float(), tuned.model.state_dict()[k]), k
    tuned.run()
    again = Trainer(opts(tmp_path / "again", small_train, steps=1))
    again.init_from(str(tmp_path / "tuned" / "checkpoint.pt"))
    again.run()
    info = export_checkpoint(tmp_path / "again" / "checkpoint.pt", "again", tmp_path / "models")
    origin = json.loads(info.path.with_suffix(".json").read_text())["training"]["init_from"]
    assert (origin["run"], origin["step"], origin["from"]["run"], origin["from"]["step"]) == ("tuned", 1, "run", 3)
    from nicd.train.cards import _origin

    (line,) = _origin({"init_from": origin})
    assert "a 1-step checkpoint (0.0 h) of `tuned`, itself fine-tuned from a 3-step checkpoint (0.0 h) of `run`" in line


def test_factorized_prior_trains_exports_and_codes(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=3, kind="factorized"))
    trainer.run()
    info = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "fact", tmp_path / "models")
    loaded, frozen = registry.load(info.model_id, tmp_path / "models")
    assert frozen.kind == "factorized"
    codec = Codec(loaded, frozen, pick_device("cpu"))
    rgb = np.asarray(Image.open(sorted(small_train.glob("*.png"))[1]).convert("RGB"))[:77, :93]
    res = codec.encode(load_image(Image.fromarray(np.ascontiguousarray(rgb))), quality=6)
    assert abs(len(res.data) - res.estimated_bits / 8) < 0.05 * len(res.data) + 200
    assert codec.decode_rgb(res.data).shape == rgb.shape


def test_ms_ssim_loss_trains(small_train, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for path in sorted(TRAIN.glob("*.png"))[:2]:
        with Image.open(path) as im:
            im.convert("RGB").resize((224, 200)).save(big / path.name)
    trainer = Trainer(opts(tmp_path / "run", big, steps=2, patch=192, batch=2, metric="ms-ssim"))
    losses = []
    trainer.run(on_progress=lambda p: losses.append(p["loss"]))
    assert len(losses) == 2 and all(np.isfinite(losses))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["options"]["metric"] == "ms-ssim"
    # An MS-SSIM run's learning curve carries MS-SSIM per quality as well as PSNR.
    figures = trainer.validate(images=1)
    assert set(figures) == {f"q{q}_{k}" for q in (1, 4, 8) for k in ("bpp", "psnr", "ms_ssim")}
    assert all(0 < figures[f"q{q}_ms_ssim"] <= 1 for q in (1, 4, 8))


def test_fixed_quality_run_trains_only_its_level(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=5, fixed_quality=4))
    before = trainer.model.gain.log_gain.detach().clone()
    trainer.run()
    after = trainer.model.gain.log_gain.detach()
    changed = [q for q in range(8) if not torch.equal(before[q], after[q])]
    assert changed == [3]
    from nicd.errors import ConfigError

    with pytest.raises(ConfigError, match="fixed quality 9"):
        Trainer(opts(tmp_path / "bad", small_train, fixed_quality=9))


def test_init_from_a_checkpoint_is_recorded_in_the_card(small_train, tmp_path):
    source = Trainer(opts(tmp_path / "mse", small_train, steps=3))
    source.run()
    tuned = Trainer(opts(tmp_path / "tuned", small_train, steps=0))
    tuned.init_from(str(tmp_path / "mse" / "checkpoint.pt"))
    for k, v in source.ema.state_dict().items():  # the average, which that run would ship
        assert torch.equal(v, tuned.model.state_dict()[k]), k
    tuned.run()
    resumed = Trainer(opts(tmp_path / "tuned", small_train, steps=1))  # the record survives a resumption
    resumed.run()
    info = export_checkpoint(tmp_path / "tuned" / "checkpoint.pt", "tuned", tmp_path / "models")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["training"]["init_from"]["step"] == 3 and card["training"]["steps"] == 1


@pytest.fixture
def bf16_allowed(monkeypatch):
    """These tests check what autocast computes, not its speed: let them run on any CPU."""
    import nicd.train.loop

    monkeypatch.setattr(nicd.train.loop, "cpu_has_fast_bf16", lambda: True)


def test_bf16_is_refused_on_a_cpu_without_native_bfloat16(small_train, tmp_path, monkeypatch):
    import nicd.train.loop

    monkeypatch.setattr(nicd.train.loop, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(ConfigError, match="no native bfloat16"):
        Trainer(opts(tmp_path / "run", small_train, steps=2, bf16=True))
    assert not (tmp_path / "run").exists()
    Trainer(opts(tmp_path / "run", small_train, steps=2)).run()  # float32 trains on it


def test_a_change_of_patch_size_on_resumption_is_recorded_in_the_card(small_train, tmp_path, bf16_allowed):
    from nicd.train.cards import write_card

    Trainer(opts(tmp_path / "run", small_train, steps=2)).run()
    Trainer(opts(tmp_path / "run", small_train, steps=5, patch=128, batch=1)).run()
    Trainer(opts(tmp_path / "run", small_train, steps=6, patch=128, batch=1)).run()  # same setting: no new entry
    Trainer(opts(tmp_path / "run", small_train, steps=7, patch=128, batch=1, bf16=True)).run()  # precision too
    info = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "run", tmp_path / "models")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["training"]["patches"] == [{"from_step": 0, "patch": 64, "batch": 4},
                                           {"from_step": 2, "patch": 128, "batch": 1},
                                           {"from_step": 6, "patch": 128, "batch": 1, "bf16": True}]
    summary = {"count": 1, "codecs": {"nicd": {"curve": [], "curve_ms_ssim": [], "bd_rate_vs_jpeg": None,
                                               "bd_rate_vs_avif": None, "bytes_to_ssim_0.97": None,
                                               "encode_mpix_per_s": 1.0, "decode_mpix_per_s": 1.0}}}
    write_card(info.path, summary, "nicd bench")
    assert "7 steps of 4×64² patches" not in info.path.with_suffix(".md").read_text()
    # each quality's row says what JPEG would spend at its PSNR (n/a outside JPEG's range)
    summary["codecs"]["nicd"].update(curve=[{"bpp": 0.3, "psnr": 28.0}, {"bpp": 1.6, "psnr": 35.0}],
                                     curve_ms_ssim=[], rate_vs_jpeg=[-0.25, None])
    write_card(info.path, summary, "nicd bench")
    table = info.path.with_suffix(".md").read_text()
    assert "| 1 | 0.300 | 28.00 |  | -25.0 % |" in table and "| 2 | 1.600 | 35.00 |  | n/a |" in table
    assert "2 steps of 4×64² patches, then 4 of 1×128², then 1 of 1×128² in bfloat16" in info.path.with_suffix(".md").read_text()
    # a run with --refine-steps: the refined figures are the card's own section, not a baseline
    summary.update(refine_steps=40)
    summary["codecs"]["nicd-refine"] = {**summary["codecs"]["nicd"], "curve": [{"bpp": 0.28, "psnr": 28.2}],
                                        "rate_vs_jpeg": [-0.3], "bd_rate_vs_jpeg": -0.3, "encode_mpix_per_s": 0.02}
    write_card(info.path, summary, "nicd bench --refine-steps 40")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["kodak"]["refined"]["refine_steps"] == 40 and card["kodak"]["refined"]["bd_rate_vs_jpeg"] == -0.3
    assert "nicd-refine" not in card["kodak"]["baselines"]
    text = info.path.with_suffix(".md").read_text()
    assert "`nicd encode --refine-steps 40`), same run" in text and "| 1 | 0.280 | 28.20 | -30.0 % |" in text
    # a plain rerun keeps those refined figures, marked as the earlier run's; a refined rerun replaces them
    del summary["codecs"]["nicd-refine"]
    summary.update(refine_steps=0)
    write_card(info.path, summary, "nicd bench")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["kodak"]["command"] == "nicd bench" and card["kodak"]["refined"]["bd_rate_vs_jpeg"] == -0.3
    assert card["kodak"]["refined"]["earlier_run"] and card["kodak"]["refined"]["command"] == "nicd bench --refine-steps 40"
    text = info.path.with_suffix(".md").read_text()
    assert "`nicd encode --refine-steps 40`), measured by an earlier run (`nicd bench --refine-steps 40`)" in text
    assert "| 1 | 0.280 | 28.20 | -30.0 % |" in text
    summary.update(refine_steps=8)
    summary["codecs"]["nicd-refine"] = {**summary["codecs"]["nicd"], "curve": [{"bpp": 0.27, "psnr": 28.3}],
                                        "rate_vs_jpeg": [-0.32], "bd_rate_vs_jpeg": -0.32}
    write_card(info.path, summary, "nicd bench --refine-steps 8")
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["kodak"]["refined"]["refine_steps"] == 8 and "earlier_run" not in card["kodak"]["refined"]
    assert "--refine-steps 8`), same run" in info.path.with_suffix(".md").read_text()

    # A checkpoint written before the record existed: its saved setting is taken as the one from step 0.
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["options"]["extra"]["patches"]
    torch.save(ckpt, ckpt_path)
    resumed = Trainer(opts(tmp_path / "run", small_train, steps=7, patch=64, batch=2))
    assert resumed.opts.extra["patches"] == [{"from_step": 0, "patch": 128, "batch": 1},
                                             {"from_step": 7, "patch": 64, "batch": 2}]


def test_patch_must_fit_the_model_stride(small_train, tmp_path):
    from nicd.errors import ConfigError

    with pytest.raises(ConfigError, match="patch"):
        Trainer(opts(tmp_path / "run", small_train, patch=100))


def test_learning_rate_drops_tenfold_at_the_decay_step(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, lr=2e-4, lr_decay_step=100))
    assert [trainer.lr_at(s) for s in (0, 99, 100, 10_000)] == [2e-4, 2e-4, pytest.approx(2e-5), pytest.approx(2e-5)]
    assert Trainer(opts(tmp_path / "run2", small_train, lr=2e-4, steps=10)).lr_at(9) == 2e-4


def test_aux_loss_moves_the_quantiles_to_the_tails():
    from nicd.codec.density import FactorizedDensity

    torch.manual_seed(0)
    density = FactorizedDensity(4)
    exact_lo, exact_hi = density.tail_bounds()
    median, _ = density.tail_bounds(tail=1.0)  # CDF = ½ on both sides
    optimizer = torch.optim.Adam([density.quantiles], lr=1.0)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1500, 2500], 0.03)
    first = float(density.aux_loss().detach())
    for _ in range(3000):
        optimizer.zero_grad()
        density.aux_loss().backward()
        optimizer.step()
        schedule.step()
    q = density.quantiles.detach().reshape(-1, 3).numpy()
    assert float(density.aux_loss().detach()) < 1e-3 * first
    np.testing.assert_allclose(q[:, 0], exact_lo, atol=0.05)
    np.testing.assert_allclose(q[:, 1], median, atol=0.05)
    np.testing.assert_allclose(q[:, 2], exact_hi, atol=0.05)


def test_weights_saved_before_the_quantiles_still_load():
    from nicd.codec.models import build_model

    model = build_model({"kind": "mean-scale", "n": 16, "m": 24})
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("quantiles")}
    fresh = build_model({"kind": "mean-scale", "n": 16, "m": 24})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.density_z.quantiles, model.density_z.quantiles)


def test_training_steps_the_aux_loss_and_checkpoints_its_optimizer(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=4))
    before = trainer.model.density_z.quantiles.detach().clone()
    aux = []
    trainer.run(on_progress=lambda p: aux.append(p["aux"]))
    assert len(aux) == 4 and not torch.equal(before, trainer.model.density_z.quantiles)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["aux_optimizer"]["state"]


def test_bf16_autocast_run_lowers_the_loss_and_keeps_float32_weights(small_train, tmp_path, bf16_allowed):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=60, bf16=True))
    losses = []
    trainer.run(on_progress=lambda p: losses.append(p["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_under_bf16_autocast_only_the_transforms_leave_float32():
    """h_a, h_s and the densities stay float32 (z reaches ±100, where bfloat16's grid is coarser than
    the quantization noise); g_a and g_s run in bfloat16."""
    from nicd.codec.models import build_model

    torch.manual_seed(0)
    model = build_model({"kind": "mean-scale", "n": 16, "m": 24}).train()
    seen = {}
    for name in ("g_a", "h_a", "h_s", "g_s"):
        getattr(model, name).register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    x, q = torch.rand(2, 3, 64, 64), torch.tensor([0, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, q)
    assert seen == {"g_a": torch.bfloat16, "h_a": torch.float32, "h_s": torch.float32, "g_s": torch.bfloat16}
    assert all(lk.dtype == torch.float32 for lk in out["likelihoods"].values())
    # without autocast: all float32, and the same likelihoods as ever for the same noise
    torch.manual_seed(1)
    ref = model(x, q)
    assert ref["x_hat"].dtype == torch.float32 and set(seen.values()) == {torch.float32}
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(x, q)
    bits = [sum(-torch.log2(lk).sum() for lk in o["likelihoods"].values()) for o in (ref, half)]
    assert abs(float((bits[1] / bits[0]).detach()) - 1) < 0.02


def test_export_ships_the_weight_average(small_train, tmp_path):
    trainer = Trainer(opts(tmp_path / "run", small_train, steps=5, ema_decay=0.5))
    trainer.run()
    raw, avg = trainer.model.state_dict(), trainer.ema.state_dict()
    assert not torch.equal(raw["g_s.0.weight"], avg["g_s.0.weight"])
    info = export_checkpoint(tmp_path / "run" / "checkpoint.pt", "avg", tmp_path / "models")
    assert json.loads(info.path.with_suffix(".json").read_text())["training"]["weights"].startswith("exponential")
    shipped = registry.load_float_model(str(info.path))
    # float16 weights in the file: equal to the average, not to the last step, within half precision
    w = shipped.state_dict()["g_s.0.weight"].float()
    assert (w - avg["g_s.0.weight"]).abs().max() < 1e-4 < 3e-4 < (w - raw["g_s.0.weight"]).abs().max()
    plain = Trainer(opts(tmp_path / "plain", small_train, steps=1, ema_decay=0.0))
    plain.run()
    assert plain.ema is None
    info = export_checkpoint(tmp_path / "plain" / "checkpoint.pt", "plain", tmp_path / "models")
    assert json.loads(info.path.with_suffix(".json").read_text())["training"]["weights"] == "last step"


def test_the_gpu_round_trip_through_the_cli(small_train, tmp_path):
    """What a lent GPU session does, on the CPU: pack, train with a slim copy, export the copy."""
    from typer.testing import CliRunner

    from nicd.cli import app

    runner = CliRunner()
    pack, val = tmp_path / "train.npz", tmp_path / "val.npz"
    r = runner.invoke(app, ["train", "--data", str(small_train), "--pack", str(pack), "--pack-side", "96"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 8
    r = runner.invoke(app, ["train", "--data", str(small_train), "--pack", str(val), "--pack-side", "64", "--pack-centre", "--pack-count", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 3
    slim = tmp_path / "out" / "run-slim.pt"
    slim.parent.mkdir()
    r = runner.invoke(app, ["train", "--run-dir", str(tmp_path / "run"), "--data", str(pack), "--val", str(val),
                            "--n", "16", "--m", "24", "--patch", "64", "--batch", "2", "--steps", "2",
                            "--validate-every", "1", "--slim-copy", str(slim)])
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "run" / "curve.csv").read_text().splitlines()) == 3
    models = tmp_path / "models"
    r = runner.invoke(app, ["export", "--checkpoint", str(slim), "--name", "gpu", "--models-dir", str(models)])
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)["path"]).is_file()
    for args in ([], ["--run-dir", str(tmp_path / "run"), "--checkpoint", str(slim)]):
        r = runner.invoke(app, ["export", *args, "--name", "gpu", "--models-dir", str(models)])
        assert r.exit_code != 0 and "give one of --run-dir and --checkpoint" in r.output
    r = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nope.pt"), "--name", "gpu", "--models-dir", str(models)])
    assert r.exit_code != 0 and "no such checkpoint file" in r.output
    assert len(list(models.glob("*.npz"))) == 1


def test_a_run_starts_from_a_slim_copy_of_a_shipped_model(small_train, tmp_path):
    from nicd.train.loop import slim_start

    torch.save(slim_start("default"), tmp_path / "start.pt")
    run = Trainer(opts(tmp_path / "run", small_train, steps=0, **shipped_architecture("default")))
    run.init_from(str(tmp_path / "start.pt"))
    for k, v in registry.load_float_model("default").state_dict().items():
        assert torch.equal(v, run.model.state_dict()[k]), k  # shipped weights are float16 already: exact
    path = registry.resolve("default")
    card = json.loads(path.with_suffix(".json").read_text())
    origin = run.opts.extra["init_from"]
    assert (origin["run"], origin["step"], origin["weights"]) == (path.stem, card["training"]["steps"], "average")
