"""Encoder-side latent refinement (SGA): real bitstreams, decoded by the unchanged decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nicd import bench
from nicd.cli import app
from nicd.codec import metrics
from nicd.codec.api import TILE_SIZE, decoder_for, load_codec
from nicd.codec.imageio import load_image
from nicd.codec.refine import ladder
from nicd.errors import InputError

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def crop(n: int, box: tuple[int, int, int, int]) -> np.ndarray:
    with Image.open(KODAK / f"kodim{n:02d}.png") as im:
        return np.asarray(im.convert("RGB").crop(box))


def rd_cost(codec, rgb: np.ndarray, result) -> float:
    """What the model was trained to minimise, on the real file: bits per pixel of its bytes plus
    λ·255²·MSE (MSE models) or λ·(1 − MS-SSIM) of what the decoder gives back."""
    decoded = codec.decode_rgb(result.data)
    lam = ladder(codec.info.config)[result.quality - 1]
    bpp = 8 * len(result.data) / (rgb.shape[0] * rgb.shape[1])
    if codec.info.config.get("metric") == "ms-ssim":
        return bpp + lam * (1 - metrics.quality(rgb, decoded)["ms_ssim"])
    return bpp + lam * 255**2 * float(np.mean(((decoded.astype(np.float64) - rgb) / 255.0) ** 2))


@pytest.mark.parametrize("model, quality", [("default", 8), ("default", 3), ("ms-ssim", 6)])
def test_refinement_lowers_the_real_cost_and_decodes_with_the_plain_decoder(model, quality):
    rgb = np.ascontiguousarray(crop(23, (256, 128, 512, 384)))
    codec = load_codec(model, "cpu")
    image = load_image(Image.fromarray(rgb))
    plain = codec.encode(image, quality=quality)
    refined = codec.encode(image, quality=quality, refine_steps=12)
    assert refined.data != plain.data
    assert rd_cost(codec, rgb, refined) < rd_cost(codec, rgb, plain)
    # the decoder that the file's header names decodes it to what the encoder measured
    decoded = decoder_for(refined.data, "cpu").decode_rgb(refined.data)
    assert metrics.quality(rgb, decoded)["psnr"] == pytest.approx(refined.psnr, abs=1e-9)
    # the same input gives the same bytes (the Gumbel noise is seeded)
    assert codec.encode(image, quality=quality, refine_steps=12).data == refined.data


def test_refine_steps_zero_is_the_plain_encoder():
    rgb = np.ascontiguousarray(crop(5, (0, 0, 192, 128)))
    codec = load_codec("default", "cpu")
    image = load_image(Image.fromarray(rgb))
    assert codec.encode(image, quality=4, refine_steps=0).data == codec.encode(image, quality=4).data


def test_every_tile_is_refined_and_the_image_comes_back_whole():
    """Two tiles (the second 40 pixels wide): each is refined on its own pixels, without its padding."""
    rgb = np.concatenate([crop(1, (0, 0, 512, 96)), crop(1, (0, 100, 512, 196))], 1)
    rgb = np.ascontiguousarray(np.concatenate([rgb, rgb[:, :40]], 1)[:, : TILE_SIZE + 40])
    assert rgb.shape[1] == TILE_SIZE + 40
    codec = load_codec("default", "cpu")
    image = load_image(Image.fromarray(rgb))
    plain = codec.encode(image, quality=5)
    refined = codec.encode(image, quality=5, refine_steps=6)
    assert rd_cost(codec, rgb, refined) < rd_cost(codec, rgb, plain)
    assert codec.decode_rgb(refined.data).shape == rgb.shape


def test_an_ms_ssim_tile_too_small_to_measure_is_coded_as_analysed():
    rgb = np.ascontiguousarray(crop(7, (0, 0, 150, 120)))  # MS-SSIM needs 161 pixels a side
    codec = load_codec("ms-ssim", "cpu")
    image = load_image(Image.fromarray(rgb))
    assert codec.encode(image, quality=4, refine_steps=5).data == codec.encode(image, quality=4).data


@pytest.mark.parametrize("steps", [-1, 1001, 2.5, True, "30"])
def test_bad_step_counts_are_refused(steps):
    codec = load_codec("default", "cpu")
    image = load_image(Image.fromarray(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(InputError) as err:
        codec.encode(image, quality=4, refine_steps=steps)
    assert err.value.code == "E_ARGS"


def test_cli_encode_with_refinement_and_a_bad_value(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.ascontiguousarray(crop(9, (100, 100, 292, 228)))).save(src)
    runner = CliRunner()
    r = runner.invoke(app, ["encode", str(src), "-o", str(tmp_path / "a.nicd"), "-q", "7", "--refine-steps", "4", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert row["bytes"] == (tmp_path / "a.nicd").stat().st_size
    r = runner.invoke(app, ["decode", str(tmp_path / "a.nicd"), "-o", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "b.png") as im:
        assert im.size == (192, 128)
    r = runner.invoke(app, ["encode", str(src), "-o", str(tmp_path / "c.nicd"), "--refine-steps", "-3"])
    assert r.exit_code != 0 and not (tmp_path / "c.nicd").exists()


def test_bench_measures_refined_and_plain_side_by_side():
    images = [("k", np.ascontiguousarray(crop(3, (0, 0, 192, 128))))]
    rows = bench.run(images, load_codec("default", "cpu"), [7], ["jpeg"], refine_steps=4)
    plain = [r for r in rows if r.codec == "nicd"]
    refined = [r for r in rows if r.codec == bench.REFINED]
    assert len(plain) == len(refined) == 1 and plain[0].bytes != refined[0].bytes
    assert set(bench.summary(rows)["codecs"]) == {"nicd", bench.REFINED, "jpeg"}


def test_the_daemon_refines_when_the_config_asks(tmp_path):
    """`nicd scan` (the daemon's queue, batches and store) with `codec.refine_steps`: the stored
    bitstream is a refined one, cheaper in R + λ·D than the plain encoder's."""
    import sqlite3

    from conftest import run_nicd, write_config

    rgb = np.ascontiguousarray(crop(19, (200, 300, 392, 428)))
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(rgb).save(pics / "a.png")
    cfg = write_config(tmp_path / "c.toml", database=tmp_path / "db" / "nicd.db")
    cfg.write_text(cfg.read_text().replace('[codec]\n', '[codec]\nquality = 7\nrefine_steps = 8\n'))
    r = run_nicd("scan", pics, "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["done"] == 1
    con = sqlite3.connect(str(tmp_path / "db" / "nicd.db"))
    stored, quality, steps = con.execute("SELECT data, quality, refine_steps FROM bitstreams").fetchone()
    con.close()
    codec = load_codec("default", "cpu")
    plain = codec.encode(load_image(Image.fromarray(rgb)), quality=7)
    assert (quality, steps) == (7, 8) and stored != plain.data
    stored_result = type(plain)(**{**plain.__dict__, "data": stored})
    assert rd_cost(codec, rgb, stored_result) < rd_cost(codec, rgb, plain)


def test_an_archive_from_before_refinement_upgrades_with_its_bitstreams_unrefined(tmp_path):
    """Migration 0003 adds bitstreams.refine_steps: rows written at 0002 keep their bytes, with NULL."""
    import sqlite3

    from conftest import image_bytes, run_nicd, write_config
    from nicd.store import migrate
    from nicd.store.engine import Store

    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "a.png").write_bytes(image_bytes(7))
    db = tmp_path / "db" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db)
    assert run_nicd("scan", pics, "--config", cfg).returncode == 0
    store = Store(f"sqlite:///{db}")
    try:
        migrate.downgrade(store, "0002")
    finally:
        store.close()
    con = sqlite3.connect(db)
    before = con.execute("SELECT data FROM bitstreams").fetchone()[0]
    assert "refine_steps" not in [c[1] for c in con.execute("PRAGMA table_info(bitstreams)")]
    con.close()
    r = run_nicd("db", "upgrade", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["from"], json.loads(r.stdout)["to"]) == ("0002", "0003")
    con = sqlite3.connect(db)
    assert con.execute("SELECT data, refine_steps FROM bitstreams").fetchall() == [(before, None)]
    con.close()
