"""`nicd restore` on a real archive: small Kodak crops coded by the real one-shot scan into a real SQLite
database, then restored through typer's CliRunner and as a `python -m nicd` subprocess."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from typer.testing import CliRunner

from conftest import REPO, image_bytes, run_nicd, write_config
from nicd.cli import app

runner = CliRunner()
KODAK = REPO.parent / "shared" / "data" / "kodak"
EXIF_MAKE = "nicd-restore-test"


def _source(n: int, box: tuple[int, int, int, int]) -> Image.Image:
    p = KODAK / f"kodim{n:02d}.png"
    if p.exists():
        return Image.open(p).convert("RGB").crop(box)
    import io

    return Image.open(io.BytesIO(image_bytes(n, (box[2] - box[0], box[3] - box[1])))).convert("RGB")


def build_archive(tmp_path: Path, codec) -> tuple[Path, Path, Path]:
    """photos/a/one.png (RGB), photos/a/two.jpg (ICC + EXIF), photos/b/alpha.png (RGBA),
    photos/b/c/gray.png (L), coded by the real scan. Returns (config file, photos, database)."""
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b" / "c").mkdir(parents=True)
    _source(1, (0, 0, 160, 128)).save(photos / "a" / "one.png")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = EXIF_MAKE
    _source(2, (100, 100, 260, 228)).save(photos / "a" / "two.jpg", quality=92, icc_profile=icc, exif=exif.tobytes())
    rgba = _source(3, (200, 150, 344, 278)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    alpha[:20, :20] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(photos / "b" / "alpha.png")
    _source(4, (50, 50, 178, 178)).convert("L").save(photos / "b" / "c" / "gray.png")

    return code_folder(tmp_path, photos, codec, 4)


def code_folder(tmp_path: Path, photos: Path, codec, expect: int) -> tuple[Path, Path, Path]:
    """Code every image under ``photos`` with the real scan into ``tmp_path/state/nicd.db`` (policy keep).
    Returns (config file, photos, database)."""
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan

    db = tmp_path / "state" / "nicd.db"
    cfg_path = write_config(tmp_path / "nicd.toml", database=db, roots=[photos])
    res = scan([str(photos)], load_config(cfg_path), codec=codec)
    assert res.complete and res.done == expect, res.to_dict()
    return cfg_path, photos, db


@pytest.fixture
def archive(tmp_path, codec):
    return build_archive(tmp_path, codec)


def _originals(photos: Path) -> dict[str, tuple[bytes, Image.Image]]:
    out = {}
    for p in sorted(photos.rglob("*")):
        if p.is_file():
            im = Image.open(p)
            im.load()
            out[str(p.relative_to(photos))] = (p.read_bytes(), im)
    return out


def _recorded_psnr(db: Path) -> dict[str, float]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT f.path, b.psnr FROM files f JOIN bitstreams b ON b.content_sha256 = f.content_sha256"))
    finally:
        con.close()


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".nicd-tmp-")]


def test_restore_deleted_originals_to_their_paths(archive, tmp_path):
    cfg, photos, db = archive
    before = _originals(photos)
    recorded = _recorded_psnr(db)
    for rel in before:
        (photos / rel).unlink()

    r = runner.invoke(app, ["restore", str(photos), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "4 files restored to their original paths" in r.stdout

    after = _originals(photos)
    assert sorted(after) == sorted(before)
    for rel, (_, orig) in before.items():
        _, back = after[rel]
        assert back.size == orig.size and back.mode == orig.mode, rel
        assert back.format == orig.format, rel
        rec = recorded[str(photos / rel)]
        got = _psnr(orig, back)
        if orig.format == "PNG" and orig.mode in ("RGB", "RGBA"):
            # written losslessly: exactly the decoded image, hence exactly the recorded PSNR
            assert got == pytest.approx(rec, abs=1e-6), rel
        elif orig.format == "PNG":  # gray: the mean of the decoded channels, at least as close
            assert got >= rec - 1e-6, rel
        else:  # JPEG written at quality 95 on top of the nicd decode
            assert got >= max(15.0, min(rec, 30.0) - 2.0), (rel, got, rec)
    # RGBA: alpha byte for byte; JPEG: ICC profile and EXIF travelled
    assert np.array_equal(np.asarray(after["b/alpha.png"][1].getchannel("A")),
                          np.asarray(before["b/alpha.png"][1].getchannel("A")))
    jpg = after["a/two.jpg"][1]
    assert jpg.info.get("icc_profile") == before["a/two.jpg"][1].info.get("icc_profile")
    assert jpg.getexif().get(0x010F) == EXIF_MAKE
    assert not _temp_files(tmp_path)

    # once restored, a second run has nothing to do (the files are there) and still succeeds
    r = runner.invoke(app, ["restore", str(photos), "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    counts = json.loads(r.stdout)["counts"]
    assert counts["restored"] == 0 and counts["exists"] == 4


def test_restore_rgba_png_alpha_identical_subprocess(archive, tmp_path):
    cfg, photos, _ = archive
    src = photos / "b" / "alpha.png"
    orig = Image.open(src)
    orig.load()
    out = tmp_path / "restored"
    proc = run_nicd("restore", src, "--out", out, "--config", cfg, "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["counts"]["restored"] == 1 and res["ok"]
    target = out / "b" / "alpha.png"
    assert res["items"][0]["target"] == str(target)
    back = Image.open(target)
    assert back.mode == "RGBA" and back.size == orig.size
    assert np.asarray(back.getchannel("A")).tobytes() == np.asarray(orig.getchannel("A")).tobytes()


def test_restore_into_out_keeps_the_layout_and_can_change_format(archive, tmp_path):
    cfg, photos, _ = archive
    out = tmp_path / "restored"
    r = runner.invoke(app, ["restore", str(photos / "b"), str(photos / "a" / "one.png"), "--out", str(out),
                            "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["a/one.png", "b/alpha.png", "b/c/gray.png"]
    assert Image.open(out / "b" / "c" / "gray.png").mode == "L"
    # the originals were not touched
    assert all(p.exists() for p in (photos / "a" / "two.jpg", photos / "b" / "alpha.png"))

    # --format webp: suffixes follow the format
    out2 = tmp_path / "webp"
    r = runner.invoke(app, ["restore", str(photos), "--out", str(out2), "--format", "webp", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    got = sorted(str(p.relative_to(out2)) for p in out2.rglob("*") if p.is_file())
    assert got == ["a/one.webp", "a/two.webp", "b/alpha.webp", "b/c/gray.webp"]
    assert Image.open(out2 / "b" / "alpha.webp").mode == "RGBA"
    assert Image.open(out2 / "a" / "two.webp").format == "WEBP"


def test_refuses_to_overwrite_without_force(archive, tmp_path):
    cfg, photos, _ = archive
    one, two = photos / "a" / "one.png", photos / "a" / "two.jpg"
    original_two = two.read_bytes()
    one.write_bytes(b"someone else's file")  # another file where the original was

    r = runner.invoke(app, ["restore", str(photos / "a"), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert one.read_bytes() == b"someone else's file"
    assert "skipped (a file is already there; --force replaces it)" in r.stdout
    assert "1 left alone (the original is there, unchanged)" in r.stdout

    r = runner.invoke(app, ["restore", str(photos / "a"), "--force", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    res = {Path(i["path"]).name: i["status"] for i in json.loads(r.stdout)["items"]}
    assert res == {"one.png": "restored", "two.jpg": "present"}
    assert Image.open(one).size == (160, 128)
    assert two.read_bytes() == original_two  # an unchanged original is never replaced by its decode

    # into --out: an existing file is replaced only with --force
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "one.png").write_bytes(b"x")
    r = runner.invoke(app, ["restore", str(photos / "a" / "one.png"), "--out", str(out), "--config", str(cfg), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["items"][0]["code"] == "E_EXISTS"
    assert (out / "a" / "one.png").read_bytes() == b"x"
    r = runner.invoke(app, ["restore", str(photos / "a" / "one.png"), "--out", str(out), "--force", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert Image.open(out / "a" / "one.png").size == (160, 128)


def test_dry_run_writes_nothing(archive, tmp_path):
    cfg, photos, _ = archive
    (photos / "a" / "one.png").unlink()
    out = tmp_path / "dry"
    for args in (["--out", str(out)], []):
        r = runner.invoke(app, ["restore", str(photos), "--dry-run", "--config", str(cfg), *args, "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["dry_run"]
        statuses = {Path(i["path"]).name: i["status"] for i in res["items"]}
        if args:
            assert set(statuses.values()) == {"would_restore"}
        else:
            assert statuses["one.png"] == "would_restore" and statuses["two.jpg"] == "present"
    r = runner.invoke(app, ["restore", str(photos), "--dry-run", "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 0 and f"4 files would be restored under {out}" in r.stdout
    assert not out.exists()
    assert not (photos / "a" / "one.png").exists()
    assert not _temp_files(tmp_path)


def test_failed_or_interrupted_restore_leaves_no_partial_or_temp_file(archive, tmp_path, monkeypatch):
    from nicd.archive.restore import restore
    from nicd.config import load_config

    cfg, photos, _ = archive
    out = tmp_path / "out"
    real_save = Image.Image.save

    def failing_save(self, fp, *a, **kw):
        fp.write(b"\x89PNG half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    res = restore([photos / "b"], load_config(cfg), out=out)
    assert not res.ok and {i.code for i in res.items} == {"E_NO_SPACE"}  # the daemon's code for a full disk
    assert not [p for p in out.rglob("*") if p.is_file()]
    assert not _temp_files(tmp_path)

    r = runner.invoke(app, ["restore", str(photos / "b"), "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 1
    assert "alpha.png" in r.stderr and "No space left on device [E_NO_SPACE]" in r.stderr

    def interrupted_save(self, fp, *a, **kw):
        fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        restore([photos / "b"], load_config(cfg), out=out)
    r = runner.invoke(app, ["restore", str(photos / "b"), "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 130
    assert not [p for p in out.rglob("*") if p.is_file()]
    assert not _temp_files(tmp_path)

    monkeypatch.setattr(Image.Image, "save", real_save)
    r = runner.invoke(app, ["restore", str(photos / "b"), "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert len([p for p in out.rglob("*") if p.is_file()]) == 2


def test_a_damaged_bitstream_fails_its_file_only(archive, tmp_path):
    cfg, photos, db = archive
    con = sqlite3.connect(db)
    bid, data = con.execute(
        "SELECT b.id, b.data FROM bitstreams b JOIN files f ON f.content_sha256 = b.content_sha256 "
        "WHERE f.path = ?", (str(photos / "a" / "two.jpg"),)).fetchone()
    data = bytearray(data)
    data[len(data) // 2] ^= 0x40
    con.execute("UPDATE bitstreams SET data = ? WHERE id = ?", (bytes(data), bid))
    con.commit()
    con.close()

    out = tmp_path / "out"
    r = runner.invoke(app, ["restore", str(photos), "--out", str(out), "--config", str(cfg)])
    assert r.exit_code == 1
    assert f"{photos / 'a' / 'two.jpg'}:" in r.stderr and "[E_BITSTREAM_SHA256]" in r.stderr
    assert f"3 files restored under {out}" in r.stdout
    assert not (out / "a" / "two.jpg").exists()


def test_unknown_path_and_bad_format_are_clear_errors(archive, tmp_path):
    cfg, photos, _ = archive
    r = runner.invoke(app, ["restore", str(tmp_path / "elsewhere"), "--config", str(cfg)])
    assert r.exit_code == 1 and "[E_NOT_FOUND]" in r.stderr
    r = runner.invoke(app, ["restore", str(photos), "--format", "gif", "--config", str(cfg)])
    assert r.exit_code == 2 and "[E_ARGS]" in r.stderr
    # a folder prefix matches whole path components only: photos/a is not photos/ab
    (photos / "ab").mkdir()
    r = runner.invoke(app, ["restore", str(photos / "a"), "--dry-run", "--config", str(cfg), "--json"])
    assert sorted(Path(i["path"]).name for i in json.loads(r.stdout)["items"]) == ["one.png", "two.jpg"]
    r = runner.invoke(app, ["restore", str(photos / "ab"), "--config", str(cfg)])
    assert r.exit_code == 1 and "[E_NOT_FOUND]" in r.stderr
    # relative paths resolve against the working directory
    cwd = os.getcwd()
    try:
        os.chdir(photos)
        r = runner.invoke(app, ["restore", "b", "--dry-run", "--config", str(cfg), "--json"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0 and len(json.loads(r.stdout)["items"]) == 2
