"""`nicd check` on a real archive (real scan, real SQLite), damaged on purpose directly in SQLite; and the
readers (`check`, `report`, `restore`) while a writer holds a write transaction, as the daemon does."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, image_bytes, run_nicd, write_config
from nicd.cli import app

runner = CliRunner()
KODAK = REPO.parent / "shared" / "data" / "kodak"


def _crop(n: int, box) -> Image.Image:
    p = KODAK / f"kodim{n:02d}.png"
    if p.exists():
        return Image.open(p).convert("RGB").crop(box)
    return Image.open(io.BytesIO(image_bytes(n, (box[2] - box[0], box[3] - box[1])))).convert("RGB")


@pytest.fixture
def archive(tmp_path, codec):
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan

    photos = tmp_path / "photos"
    (photos / "x").mkdir(parents=True)
    _crop(10, (0, 0, 144, 128)).save(photos / "x" / "one.png")
    _crop(11, (100, 100, 228, 228)).save(photos / "x" / "two.jpg", quality=90)
    rgba = _crop(12, (50, 50, 178, 162)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(photos / "three.png")
    db = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "nicd.toml", database=db, roots=[photos])
    res = scan([str(photos)], load_config(cfg), codec=codec)
    assert res.complete and res.done == 3, res.to_dict()
    return cfg, photos, db


def _sql(db: Path, sql: str, params=()) -> list:
    con = sqlite3.connect(db, timeout=10)
    try:
        rows = con.execute(sql, params).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


def _bitstream_of(db: Path, path: Path) -> tuple[int, bytes]:
    return _sql(db, "SELECT b.id, b.data FROM bitstreams b JOIN files f ON f.content_sha256 = b.content_sha256 "
                    "WHERE f.path = ?", (str(path),))[0]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_check_passes_on_a_clean_database_and_never_writes(archive):
    cfg, photos, db = archive
    before = _sha(db)
    r = runner.invoke(app, ["check", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "3 of 3 bitstreams OK" in r.stdout

    r = runner.invoke(app, ["check", "--full", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ok"] and res["full"] and res["bitstreams"] == 3 and res["compared_with_original"] == 3
    assert res["integrity"] == ["ok"] and res["problems"] == []
    for item in res["items"]:
        assert item["decoded"] and item["original"] == "compared"
        assert item["measured"]["psnr"] == pytest.approx(item["recorded"]["psnr"], abs=1e-6)
        assert item["measured"]["ssim"] == pytest.approx(item["recorded"]["ssim"], abs=1e-6)

    # originals gone: --full still decodes everything, the figures cannot be measured again
    (photos / "x" / "one.png").unlink()
    proc = run_nicd("check", "--full", "--json", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["ok"] and res["compared_with_original"] == 2 and res["originals_gone"] == 1

    r = runner.invoke(app, ["report", "--config", str(cfg), "--json"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["restore", str(photos), "--dry-run", "--config", str(cfg)])
    assert r.exit_code == 0
    assert _sha(db) == before  # read-only: the database file is byte for byte the same


def test_a_flipped_byte_in_a_stored_bitstream_is_named(archive):
    cfg, photos, db = archive
    victim = photos / "x" / "two.jpg"
    bid, data = _bitstream_of(db, victim)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    _sql(db, "UPDATE bitstreams SET data = ? WHERE id = ?", (bytes(bad), bid))

    r = runner.invoke(app, ["check", "--config", str(cfg)])
    assert r.exit_code == 1
    assert f"{victim}: " in r.stderr and "[E_BITSTREAM_SHA256]" in r.stderr
    assert "2 of 3 bitstreams OK" in r.stdout

    # the recorded SHA-256 rewritten to match: the container's own CRC still catches it
    _sql(db, "UPDATE bitstreams SET data_sha256 = ? WHERE id = ?", (hashlib.sha256(bad).hexdigest(), bid))
    proc = run_nicd("check", "--json", "--config", cfg)
    assert proc.returncode == 1, proc.stderr
    res = json.loads(proc.stdout)
    assert not res["ok"]
    assert [(p["path"], p["code"]) for p in res["problems"]] == [(str(victim), "E_FORMAT_CHECKSUM")]

    # a truncated blob
    _sql(db, "UPDATE bitstreams SET data = ?, data_sha256 = ? WHERE id = ?",
         (data[:100], hashlib.sha256(data[:100]).hexdigest(), bid))
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["problems"][0]["code"] == "E_BITSTREAM_SIZE"


def test_full_check_compares_the_recorded_figures(archive):
    cfg, photos, db = archive
    victim = photos / "x" / "one.png"
    bid, _ = _bitstream_of(db, victim)
    _sql(db, "UPDATE bitstreams SET psnr = psnr + 1.0 WHERE id = ?", (bid,))
    assert runner.invoke(app, ["check", "--config", str(cfg)]).exit_code == 0  # checksums are fine
    r = runner.invoke(app, ["check", "--full", "--config", str(cfg)])
    assert r.exit_code == 1
    assert f"{victim}: " in r.stderr and "[E_CHECK_FIGURES]" in r.stderr and "psnr" in r.stderr


def test_lost_bitstreams_are_named(archive):
    cfg, photos, db = archive
    victim = photos / "three.png"
    bid, _ = _bitstream_of(db, victim)
    _sql(db, "DELETE FROM bitstreams WHERE id = ?", (bid,))
    _sql(db, "UPDATE files SET state = 'deleted' WHERE path = ?", (str(victim),))
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code == 1
    got = {(p["path"], p["code"]) for p in json.loads(r.stdout)["problems"]}
    assert got == {(str(victim), "E_CHECK_LOST"), (str(victim), "E_CHECK_NO_BITSTREAM")}


def test_readers_never_meet_database_is_locked_while_a_writer_writes(archive, tmp_path):
    """The daemon's way of writing: the writer lock file, BEGIN IMMEDIATE, a transaction held open."""
    from sqlalchemy import text

    from nicd.store.engine import Store

    cfg, photos, db = archive
    store = Store(f"sqlite:///{db}")  # takes <db>.lock as the daemon does
    try:
        with store.write() as conn:
            conn.execute(text("INSERT INTO events (at, kind, path) VALUES ('2024-01-01', 'test_hold', 'x')"))
            conn.execute(text("UPDATE files SET updated_at = updated_at"))
            t0 = time.monotonic()
            for args in (["check", "--full"], ["report"], ["restore", str(photos), "--dry-run"],
                         ["restore", str(photos / "x"), "--out", str(tmp_path / "out")]):
                r = runner.invoke(app, [*args, "--config", str(cfg), "--json"])
                assert r.exit_code == 0, (args, r.output)
                assert "locked" not in r.output.lower()
            proc = run_nicd("check", "--config", cfg, timeout=60)
            assert proc.returncode == 0 and "locked" not in (proc.stdout + proc.stderr).lower(), proc.stderr
            assert time.monotonic() - t0 < 60
        assert len(list((tmp_path / "out").rglob("*.*"))) == 2
    finally:
        store.close()
    # and the writer's transaction committed normally afterwards
    assert _sql(db, "SELECT count(*) FROM events WHERE kind = 'test_hold'") == [(1,)]


def test_readers_run_while_a_writer_commits_and_checkpoints_in_a_loop(archive, tmp_path):
    """Short write transactions and WAL checkpoints (TRUNCATE) as the daemon makes them, in a thread,
    while the readers run over and over: none fails."""
    import threading

    from sqlalchemy import text

    from nicd.archive.check import check
    from nicd.archive.report import report
    from nicd.archive.restore import restore
    from nicd.config import load_config
    from nicd.store.engine import Store

    cfg_path, photos, db = archive
    cfg = load_config(cfg_path)
    stop = threading.Event()
    writes, errors = [0], []

    def writer():
        store = Store(f"sqlite:///{db}")
        try:
            while not stop.is_set():
                with store.write() as conn:
                    conn.execute(text("INSERT INTO events (at, kind, detail) VALUES ('2024-01-01', 'load', :d)"),
                                 {"d": "x" * 2000})
                    time.sleep(0.002)  # hold the write transaction a little
                writes[0] += 1
                if writes[0] % 25 == 0:
                    store.checkpoint()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            store.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(4):
            assert report(cfg).total["images"] == 3
            assert check(cfg).ok
            res = restore([photos], cfg, out=tmp_path / f"out{i}")
            assert res.ok and res.count("restored") == 3
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert writes[0] > 10
