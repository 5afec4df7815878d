"""`nicd report` on a real archive filled by the real one-shot scan: totals match the rows and the
database, `--json` has the documented keys, `--plot` writes a PNG."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, image_bytes, run_nicd, write_config
from nicd.cli import app

runner = CliRunner()
KODAK = REPO.parent / "shared" / "data" / "kodak"
ADDITIVE = ("images", "pixels", "original_bytes", "nicd_bytes", "jpeg_bytes_at_equal_ssim", "jpeg_images")
REQUIRED = ("images", "original_bytes", "nicd_bytes", "jpeg_bytes_at_equal_ssim", "savings_vs_jpeg")


def _crop(n: int, box) -> Image.Image:
    p = KODAK / f"kodim{n:02d}.png"
    if p.exists():
        return Image.open(p).convert("RGB").crop(box)
    return Image.open(io.BytesIO(image_bytes(n, (box[2] - box[0], box[3] - box[1])))).convert("RGB")


@pytest.fixture(scope="module")
def archive(tmp_path_factory, codec):
    """Five images in three folders plus a copy (same content twice), coded by the real scan."""
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan

    tmp = tmp_path_factory.mktemp("report")
    photos = tmp / "photos"
    for d in ("2023", "2024/summer", "2024/winter"):
        (photos / d).mkdir(parents=True)
    _crop(5, (0, 0, 176, 176)).save(photos / "2023" / "a.png")  # MS-SSIM needs a side above 160
    _crop(6, (300, 100, 444, 228)).save(photos / "2023" / "b.jpg", quality=90)
    _crop(7, (10, 10, 138, 170)).save(photos / "2024" / "summer" / "c.png")
    _crop(8, (200, 200, 328, 328)).save(photos / "2024" / "winter" / "d.webp", quality=90)
    _crop(9, (0, 200, 144, 328)).save(photos / "2024" / "winter" / "e.png")
    shutil.copy(photos / "2023" / "a.png", photos / "2024" / "summer" / "copy-of-a.png")
    cfg_path = write_config(tmp / "nicd.toml", database=tmp / "state" / "nicd.db", roots=[photos])
    res = scan([str(photos)], load_config(cfg_path), codec=codec)
    assert res.complete and res.files == 6 and res.done + res.already == 6, res.to_dict()
    return cfg_path, photos, tmp / "state" / "nicd.db"


def _db_sums(db: Path) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n, ob, nb, jb = con.execute("SELECT count(*), sum(original_bytes), sum(nicd_bytes), "
                                    "sum(jpeg_bytes_at_equal_ssim) FROM bitstreams").fetchone()
    finally:
        con.close()
    return {"images": n, "original_bytes": ob, "nicd_bytes": nb, "jpeg_bytes_at_equal_ssim": jb or 0}


def test_totals_equal_the_rows_and_the_database(archive):
    cfg, photos, db = archive
    r = runner.invoke(app, ["report", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    for key in REQUIRED:
        assert key in rep and key in rep["total"], key
    assert isinstance(rep["folders"], list) and rep["folders"]

    # totals = sum of the folder rows = sums over the bitstreams table
    for key in ADDITIVE:
        assert rep[key] == sum(f[key] for f in rep["folders"]), key
    sums = _db_sums(db)
    for key, v in sums.items():
        assert rep[key] == v, key
    assert rep["images"] == 5  # the copy is one image (one content), counted once

    # the fractions are what they say
    assert rep["savings_vs_jpeg"] == pytest.approx(1 - rep["nicd_bytes"] / rep["jpeg_bytes_at_equal_ssim"])
    assert rep["savings_vs_original"] == pytest.approx(1 - rep["nicd_bytes"] / rep["original_bytes"])
    for f in rep["folders"]:
        assert f["savings_vs_original"] == pytest.approx(1 - f["nicd_bytes"] / f["original_bytes"])
    folders = {Path(f["folder"]).relative_to(photos).as_posix(): f["images"] for f in rep["folders"]}
    assert folders == {"2023": 2, "2024/summer": 1, "2024/winter": 2}

    # means: per image, over the images having the figure
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    psnrs = [r[0] for r in con.execute("SELECT psnr FROM bitstreams")]
    ms = [r[0] for r in con.execute("SELECT ms_ssim FROM bitstreams WHERE ms_ssim IS NOT NULL")]
    con.close()
    assert rep["mean_psnr"] == pytest.approx(sum(psnrs) / len(psnrs))
    assert ms and rep["mean_ms_ssim"] == pytest.approx(sum(ms) / len(ms))


def test_a_path_selects_its_folders(archive):
    cfg, photos, _ = archive
    r = runner.invoke(app, ["report", str(photos / "2024"), "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["path"] == str(photos / "2024")
    # the copy of a.png lies under 2024/summer: within this selection it counts there
    assert {Path(f["folder"]).name: f["images"] for f in rep["folders"]} == {"summer": 2, "winter": 2}
    assert rep["images"] == 4
    for key in ADDITIVE:
        assert rep[key] == sum(f[key] for f in rep["folders"]), key

    r = runner.invoke(app, ["report", str(photos / "2024" / "winter" / "e.png"), "--config", str(cfg), "--json"])
    assert json.loads(r.stdout)["images"] == 1


def test_table_output_and_plot_subprocess(archive, tmp_path):
    cfg, photos, _ = archive
    r = runner.invoke(app, ["report", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    for name in ("2023", "summer", "winter", "total", "vs JPEG"):
        assert name in r.stdout, name

    plot = tmp_path / "plots" / "rd.png"
    plot.parent.mkdir()
    proc = run_nicd("report", photos, "--plot", plot, "--json", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["plot"] == str(plot) and rep["images"] == 5
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert [p.name for p in plot.parent.iterdir()] == ["rd.png"]  # atomic write: no temp file left


def test_a_database_not_created_yet_gives_an_empty_report(tmp_path):
    cfg = write_config(tmp_path / "nicd.toml", database=tmp_path / "none" / "nicd.db")
    r = runner.invoke(app, ["report", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["images"] == 0 and rep["folders"] == [] and rep["savings_vs_jpeg"] is None
    assert not (tmp_path / "none" / "nicd.db").exists()  # a reader never creates the database
    r = runner.invoke(app, ["report", "--config", str(cfg), "--plot", str(tmp_path / "empty.png")])
    assert r.exit_code == 0 and "no images stored yet" in r.stdout
    assert (tmp_path / "empty.png").exists()


def test_ctrl_c_is_one_line_and_exit_130(archive, monkeypatch):
    import nicd.archive.report as report_lib

    cfg = archive[0]

    def interrupted(*_a, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_lib, "report", interrupted)
    r = runner.invoke(app, ["report", "--config", str(cfg)])
    assert r.exit_code == 130
    assert r.stderr.strip() == "nicd: report interrupted" and "Traceback" not in r.output


def test_path_selection_is_exact_on_both_sql_forms():
    """The SQLite range form and the portable substr form select the same rows: whole path components,
    case-sensitive, no wildcards."""
    from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, select

    from nicd.archive import path_filter

    paths = ["/p/a", "/p/a/x.png", "/p/a/b/y.png", "/p/ab/z.png", "/p/a b/q.png", "/p/a0/r.png", "/p/A/s.png",
             "/p/a_/t.png", "/p/a%/u.png", "/p/é/v.png", "/p/é/w/x.png", "/q/a/x.png"]
    md = MetaData()
    t = Table("t", md, Column("id", Integer, primary_key=True), Column("path", Text))
    eng = create_engine("sqlite://")
    md.create_all(eng)
    with eng.begin() as conn:
        conn.execute(t.insert(), [{"path": p} for p in paths])
        for prefix, expected in [
            ("/p/a", {"/p/a", "/p/a/x.png", "/p/a/b/y.png"}),
            ("/p/a/", {"/p/a", "/p/a/x.png", "/p/a/b/y.png"}),
            ("/p/a_", {"/p/a_/t.png"}),
            ("/p/é", {"/p/é/v.png", "/p/é/w/x.png"}),
            ("/p/a/x.png", {"/p/a/x.png"}),
            ("/", set(paths)),
        ]:
            for dialect in ("sqlite", "postgresql"):
                got = set(conn.execute(select(t.c.path).where(path_filter(t.c.path, prefix, dialect))).scalars())
                assert got == expected, (prefix, dialect, got)
