"""The archive keeps the model files its bitstreams were written with, so that an upgrade that replaces
the installed models never makes a stored image undecodable. A real archive (the real one-shot scan into
a real SQLite file), an "upgraded" installation simulated by pointing NICD_MODELS_DIR at a folder without
the model, and the real restore, check and originals policy."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import nicd_env, run_nicd
from nicd.cli import app
from test_restore import _source, code_folder

runner = CliRunner()


def _kept_rows(db: Path) -> list[tuple[str, str, bytes]]:
    con = sqlite3.connect(db)
    try:
        return [(m, s, bytes(d)) for m, s, d in con.execute("SELECT model_id, sha256, data FROM codec_models")]
    finally:
        con.close()


def _sql(db: Path, statement: str, *args) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(statement, args)
        con.commit()
    finally:
        con.close()


@pytest.fixture
def small_archive(tmp_path, codec):
    """Two Kodak crops coded by the real scan (policy keep). Returns (config path, photos, database)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    _source(5, (0, 0, 160, 128)).save(photos / "one.png")
    _source(6, (200, 100, 328, 228)).save(photos / "two.png")
    return code_folder(tmp_path, photos, codec, 2)


@pytest.fixture
def upgraded(tmp_path, monkeypatch, codec):
    """An installation whose models folder no longer holds the model the archive was written with."""
    models = tmp_path / "upgraded-models"
    models.mkdir()
    (models / "aliases.json").write_text("{}\n")
    monkeypatch.setenv("NICD_MODELS_DIR", str(models))
    from nicd.codec import registry

    with pytest.raises(Exception) as exc:
        registry.find_by_hash(codec.model_hash)
    assert getattr(exc.value, "code", None) == "E_MODEL_UNKNOWN"
    return models


def test_the_first_bitstream_commits_its_model_file_with_it(small_archive, codec):
    _, _, db = small_archive
    rows = _kept_rows(db)
    assert len(rows) == 1
    model_id, sha, data = rows[0]
    assert (model_id, sha) == (codec.model_id, codec.info.sha256)
    assert hashlib.sha256(data).hexdigest() == sha
    assert data == codec.info.path.read_bytes()
    con = sqlite3.connect(db)
    assert {m for (m,) in con.execute("SELECT model FROM bitstreams")} == {model_id}
    con.close()


def test_after_an_upgrade_restore_and_check_use_the_archives_copy(small_archive, upgraded):
    cfg, photos, db = small_archive
    # before the upgrade: what the installed model decodes the archive to (same process set-up as below,
    # since the float synthesis may round a pixel differently with another thread count)
    installed = photos.parent / "installed"
    r = run_nicd("restore", photos, "--out", installed, "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    for p in photos.iterdir():
        p.unlink()

    # the real command line, in a fresh process that has only the upgraded models folder
    env = {**nicd_env(), "NICD_MODELS_DIR": str(upgraded)}
    r = run_nicd("restore", photos, "--config", cfg, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["restored"] == 2
    for name in ("one.png", "two.png"):
        back, ref = Image.open(photos / name), Image.open(next(installed.rglob(name)))
        assert np.array_equal(np.asarray(back), np.asarray(ref)), name

    r = runner.invoke(app, ["check", "--full", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["problems"] == [] and all(i["decoded"] for i in out["items"])


def test_without_the_archives_copy_an_upgrade_is_caught_by_name(small_archive, upgraded, codec):
    cfg, photos, db = small_archive
    _sql(db, "DELETE FROM codec_models")
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code != 0
    codes = [p["code"] for p in json.loads(r.stdout)["problems"]]
    assert codes.count("E_CHECK_MODEL_NOT_KEPT") == 1 and codes.count("E_MODEL_UNKNOWN") == 2, codes

    out = photos.parent / "out"
    r = runner.invoke(app, ["restore", str(photos), "--out", str(out), "--config", str(cfg), "--json"])
    assert r.exit_code != 0
    items = json.loads(r.stdout)["items"]
    assert {i["code"] for i in items} == {"E_MODEL_UNKNOWN"}
    assert all("nor kept in the archive" in i["message"] for i in items)
    assert not out.exists() or not any(out.rglob("*.png"))


def test_a_damaged_copy_is_reported_and_never_used(small_archive, upgraded):
    cfg, photos, db = small_archive
    (model_id, sha, data), = _kept_rows(db)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    _sql(db, "UPDATE codec_models SET data = ? WHERE sha256 = ?", bytes(damaged), sha)
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code != 0
    problems = json.loads(r.stdout)["problems"]
    assert [p["code"] for p in problems].count("E_MODEL_HASH") >= 3, problems  # the copy, then both bitstreams
    assert any(model_id in p["message"] and p["path"] is None for p in problems)


def test_an_archive_from_schema_0001_gets_its_models_at_the_next_start(small_archive, codec):
    """Schema 0001 had no codec_models: `nicd db upgrade` adds the table (after a backup), and the next
    start of the daemon (here the one-shot scan) keeps the installed models its bitstreams name."""
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan
    from nicd.store import migrate
    from nicd.store.engine import Store

    cfg, photos, db = small_archive
    store = Store(f"sqlite:///{db}")
    try:
        migrate.downgrade(store, "0001")
    finally:
        store.close()
    con = sqlite3.connect(db)
    assert "codec_models" not in {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert con.execute("SELECT count(*) FROM bitstreams").fetchone()[0] == 2
    con.close()

    r = runner.invoke(app, ["db", "upgrade", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    up = json.loads(r.stdout)
    assert (up["from"], up["to"]) == ("0001", migrate.head_revision()) and Path(up["backup"]).exists()
    assert _kept_rows(db) == []
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert [p["code"] for p in json.loads(r.stdout)["problems"]] == ["E_CHECK_MODEL_NOT_KEPT"]

    res = scan([str(photos)], load_config(cfg), codec=codec)  # nothing new to code; the start keeps the model
    assert res.complete and res.done == 0
    assert [(m, s) for m, s, _ in _kept_rows(db)] == [(codec.model_id, codec.info.sha256)]
    r = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["problems"] == [], r.output


def test_an_original_is_deleted_only_once_the_archive_keeps_its_model(small_archive, codec):
    from nicd.config import load_config
    from nicd.daemon import originals
    from nicd.daemon.service import open_store
    from nicd.daemon.worker import Worker

    cfg, photos, db = small_archive
    _sql(db, "DELETE FROM codec_models")
    store = open_store(load_config(cfg))
    try:
        policy = originals.OriginalsPolicy(store, "delete", codec)
        assert policy.apply() == 0
        assert sorted(p.name for p in photos.iterdir()) == ["one.png", "two.png"]

        assert Worker(store, load_config(cfg), codec, "test-owner").keep_models() == []
        assert policy.apply() == 2
        assert list(photos.iterdir()) == []
    finally:
        store.close()


def test_a_model_loaded_from_its_bytes_decodes_like_the_installed_file(small_archive, codec):
    from nicd.codec import registry
    from nicd.codec.api import codec_from_bytes
    from nicd.errors import ModelError

    _, _, db = small_archive
    con = sqlite3.connect(db)
    bitstream = bytes(con.execute("SELECT data FROM bitstreams ORDER BY id LIMIT 1").fetchone()[0])
    con.close()
    data = codec.info.path.read_bytes()
    other = codec_from_bytes(codec.model_id, data, "cpu")
    assert other.info.path is None and other.info.sha256 == codec.info.sha256
    assert np.array_equal(other.decode_rgb(bitstream), codec.decode_rgb(bitstream))

    with pytest.raises(ModelError) as exc:  # bytes that are not the named model's file
        registry.load_bytes(codec.model_id, data[:-1])
    assert exc.value.code == "E_MODEL_HASH"
    junk = b"not a model"
    with pytest.raises(ModelError) as exc:  # named by its hash, but not an .npz
        registry.load_bytes("junk-" + hashlib.sha256(junk).hexdigest()[:8], junk)
    assert exc.value.code == "E_MODEL_FILE"


# ---------------------------------------------------------------- single files: `nicd encode` / `decode`


def test_encode_keeps_its_model_so_decode_works_after_an_upgrade(tmp_path, upgraded, codec):
    src = tmp_path / "in.png"
    _source(7, (0, 0, 128, 96)).save(src)
    data_home = tmp_path / "xdg-data"
    env = nicd_env(XDG_DATA_HOME=data_home)  # the installed models (NICD_MODELS_DIR is not passed on)
    env.pop("NICD_MODELS_DIR", None)
    r = run_nicd("encode", src, "-o", tmp_path / "a.nicd", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr
    kept = data_home / "nicd" / "models" / f"{codec.model_id}.npz"
    assert kept.read_bytes() == codec.info.path.read_bytes()
    r = run_nicd("decode", tmp_path / "a.nicd", "-o", tmp_path / "before.png", "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr

    env_upgraded = {**env, "NICD_MODELS_DIR": str(upgraded)}
    r = run_nicd("decode", tmp_path / "a.nicd", "-o", tmp_path / "after.png", "--device", "cpu", env=env_upgraded)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "after.png")), np.asarray(Image.open(tmp_path / "before.png")))

    r = run_nicd("info", tmp_path / "a.nicd", "--json", env=env_upgraded)
    assert r.returncode == 0 and json.loads(r.stdout)["model_file"] == str(kept), r.stderr
    r = run_nicd("info", tmp_path / "a.nicd", "--json", env=env)
    assert json.loads(r.stdout)["model_file"] == str(codec.info.path)

    kept.unlink()  # neither installed nor kept: one readable line, non-zero
    r = run_nicd("info", tmp_path / "a.nicd", "--json", env=env_upgraded)
    assert r.returncode == 0 and json.loads(r.stdout)["model_file"] is None
    r = run_nicd("decode", tmp_path / "a.nicd", "-o", tmp_path / "never.png", "--device", "cpu", env=env_upgraded)
    assert r.returncode != 0 and "E_MODEL_UNKNOWN" in r.stderr and not (tmp_path / "never.png").exists()


def test_encode_still_writes_when_the_model_cannot_be_kept(tmp_path):
    src = tmp_path / "in.png"
    _source(8, (0, 0, 96, 64)).save(src)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the data directory would be\n")
    r = run_nicd("encode", src, "-o", tmp_path / "a.nicd", "--device", "cpu", env=nicd_env(XDG_DATA_HOME=blocked))
    assert r.returncode == 0, r.stderr
    assert "could not be kept" in r.stderr and (tmp_path / "a.nicd").stat().st_size > 0


def test_an_installed_model_file_is_kept_only_when_it_matches_its_name(codec, tmp_path):
    from nicd.codec import registry
    from nicd.errors import ModelError

    data, sha = registry.installed_bytes(codec.model_id)
    assert sha == codec.info.sha256 and len(data) == codec.info.path.stat().st_size
    forged = tmp_path / f"{codec.model_id[:-8]}deadbeef.npz"
    forged.write_bytes(data)
    with pytest.raises(ModelError) as err:
        registry.installed_bytes(forged.stem, tmp_path)
    assert err.value.code == "E_MODEL_HASH"
    with pytest.raises(ModelError) as err:
        registry.installed_bytes("no-such-model", tmp_path)
    assert err.value.code == "E_MODEL_UNKNOWN"
