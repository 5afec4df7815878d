"""`nicd encode / decode / info / models` through typer's CliRunner and as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nicd.cli import app

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"
runner = CliRunner()


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    out = []
    for n in (3, 9):
        with Image.open(KODAK / f"kodim{n:02d}.png") as im:
            p = tmp_path / f"photo{n}.png"
            im.convert("RGB").crop((0, 0, 200, 136)).save(p)
            out.append(p)
    return out


def test_encode_decode_info_json(photos, tmp_path):
    out = tmp_path / "enc"
    r = runner.invoke(app, ["encode", *map(str, photos), "--out-dir", str(out), "--quality", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [Path(row["output"]).name for row in rows] == ["photo3.nicd", "photo9.nicd"]
    for row in rows:
        assert row["bytes"] == Path(row["output"]).stat().st_size and row["quality"] == 3
    r = runner.invoke(app, ["info", str(out / "photo3.nicd"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["width"], info["height"], info["quality"], info["checksum_ok"]) == (200, 136, 3, True)
    dec = tmp_path / "dec"
    r = runner.invoke(app, ["decode", str(out / "photo3.nicd"), str(out / "photo9.nicd"), "--out-dir", str(dec), "--json"])
    assert r.exit_code == 0, r.output
    for p in photos:
        with Image.open(dec / (p.stem + ".png")) as im:
            assert im.size == (200, 136)


def test_target_ssim_option(photos, tmp_path):
    r = runner.invoke(app, ["encode", str(photos[0]), "-o", str(tmp_path / "a.nicd"), "--target-ssim", "0.3", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert row["target_met"] and row["ssim"] >= 0.3


@pytest.mark.parametrize("name, content, code", [
    ("missing.png", None, "E_NOT_FOUND"),
    ("empty.png", b"", "E_EMPTY"),
    ("text.jpg", b"hello", "E_NOT_IMAGE"),
])
def test_encode_bad_input_one_line_nonzero(tmp_path, name, content, code):
    src = tmp_path / name
    if content is not None:
        src.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "nicd", "encode", str(src), "-o", str(tmp_path / "x.nicd")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and code in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "x.nicd").exists()


def test_decode_corrupt_file_one_line_nonzero(photos, tmp_path):
    enc = tmp_path / "a.nicd"
    assert runner.invoke(app, ["encode", str(photos[0]), "-o", str(enc)]).exit_code == 0
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "bad.nicd"
    bad.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "nicd", "decode", str(bad), "-o", str(tmp_path / "out.png")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "E_FORMAT_CHECKSUM" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.png").exists()
    r = runner.invoke(app, ["info", str(bad), "--json"])
    shown = json.loads(r.stdout)
    assert r.exit_code != 0 and shown["error"]["code"] == "E_FORMAT_CHECKSUM"
    # the header has its own CRC, so what it says is still shown
    assert shown["checksum_ok"] is False and shown["width"] == 200 and shown["model_id"].startswith("msh-")


def test_output_options_are_checked(photos, tmp_path):
    r = runner.invoke(app, ["encode", *map(str, photos), "-o", str(tmp_path / "x.nicd")])
    assert r.exit_code != 0 and "E_ARGS" in r.output
    other = tmp_path / "other"
    other.mkdir()
    twin = other / photos[0].name
    twin.write_bytes(photos[0].read_bytes())
    r = runner.invoke(app, ["encode", str(photos[0]), str(twin), "--out-dir", str(tmp_path / "od")])
    assert r.exit_code != 0 and "E_ARGS" in r.output and not (tmp_path / "od" / "photo3.nicd").exists()
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["encode", str(photos[0]), "--out-dir", str(tmp_path / "afile")])
    assert r.exit_code != 0 and "E_ARGS" in r.output


def test_one_bad_input_does_not_stop_the_others(photos, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    proc = subprocess.run([sys.executable, "-m", "nicd", "encode", str(photos[0]), str(bad), "--out-dir", str(tmp_path / "od")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "bad.png" in proc.stderr and "E_NOT_IMAGE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "od" / "photo3.nicd").exists() and not (tmp_path / "od" / "bad.nicd").exists()


def test_fifo_input_is_refused_promptly(tmp_path):
    fifo = tmp_path / "x.nicd"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "nicd", "info", str(fifo)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "E_NOT_REGULAR_FILE" in proc.stderr


def test_models_lists_default():
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert any("default" in row["aliases"] for row in rows)
    # the table says what each model measured against JPEG, refined too where its card has that
    default = next(row for row in rows if "default" in row["aliases"])
    r = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    assert f"{100 * default['kodak']['bd_rate_vs_jpeg']:+.1f} %" in r.stdout
    refined = default["kodak"]["refined"]  # the shipped card was measured with --refine-steps
    assert f"({100 * refined['bd_rate_vs_jpeg']:+.1f} % with --refine-steps {refined['refine_steps']})" in r.stdout


def _file_size_limit(limit: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_write_the_kernel_refuses_is_one_line_and_leaves_the_old_file(photos, tmp_path, command):
    """A real failed write (RLIMIT_FSIZE: the kernel answers EFBIG, as it answers ENOSPC on a full
    disk): one line with a storage code, exit 1, the file already at the target untouched, no temp file."""
    from conftest import nicd_env

    src = photos[0]
    r = subprocess.run([sys.executable, "-m", "nicd", "encode", src, "-o", tmp_path / "a.nicd"], env=nicd_env(),
                       capture_output=True, text=True, timeout=120)  # (also keeps the model: no warning below)
    assert r.returncode == 0, r.stderr
    if command == "decode":
        src, target = tmp_path / "a.nicd", tmp_path / "out" / "a.png"
    else:
        target = tmp_path / "out" / "a.nicd"  # the .nicd file is a few KB
    target.parent.mkdir()
    target.write_bytes(b"the previous version")
    r = subprocess.run([sys.executable, "-m", "nicd", command, src, "-o", target], env=nicd_env(), capture_output=True,
                       text=True, timeout=120, preexec_fn=_file_size_limit(100))
    assert r.returncode == 1
    assert r.stderr == f"nicd: {src}: cannot write {target}: File too large [E_STORAGE]\n", r.stderr
    assert target.read_bytes() == b"the previous version"
    assert os.listdir(target.parent) == ["a" + target.suffix]


def test_a_full_disk_is_reported_as_e_no_space():
    import errno

    from nicd.fsutil import write_error

    assert write_error("/x/a.png", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).code == "E_NO_SPACE"
    assert write_error("/x/a.png", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).code == "E_NO_SPACE"
    err = write_error("/x/a.png", OSError(errno.EACCES, os.strerror(errno.EACCES)))
    assert (err.code, err.message) == ("E_STORAGE", "cannot write /x/a.png: Permission denied")
