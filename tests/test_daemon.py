"""The real daemon, as a subprocess (`python -m nicd watch`), over folders of small generated images:
a SIGKILL crash campaign, SIGTERM, hostile files, and the service CLI commands."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

from conftest import image_bytes, nicd_env, run_nicd, sha256, spawn_nicd, write_config

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _db(path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=10)
    con.row_factory = sqlite3.Row
    return con


def _job_states(db_path) -> dict[str, str]:
    if not os.path.exists(db_path):
        return {}
    con = _db(db_path)
    try:
        return {r["content_sha256"]: r["state"] for r in con.execute("SELECT content_sha256, state FROM jobs")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def _wait(pred, timeout, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(10)


def _check_crash_invariants(db_path, originals: dict[str, str]) -> None:
    """integrity_check ok; every original that is gone has a done job and a stored, checksummed bitstream."""
    con = _db(db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        blobs = {r["content_sha256"]: r for r in con.execute("SELECT content_sha256, data, data_sha256 FROM bitstreams")}
        jobs = {r["content_sha256"]: r["state"] for r in con.execute("SELECT content_sha256, state FROM jobs")}
        for s, r in blobs.items():
            assert jobs[s] == "done"
            assert hashlib.sha256(r["data"]).hexdigest() == r["data_sha256"]
        for s, state in jobs.items():
            if state == "done":
                assert s in blobs
        for path, s in originals.items():
            if not os.path.exists(path):
                assert s in blobs, f"{path} was removed without a stored bitstream"
        assert con.execute("SELECT count(*) FROM jobs WHERE state = 'failed'").fetchone()[0] == 0
    finally:
        con.close()


def test_crash_campaign_sigkill_at_random_moments(tmp_path, notify_socket, codec):
    """≥20 SIGKILLs of a working daemon (policy delete), each followed by the invariants; then a clean run
    finishes: every image done exactly once, no original removed without a verified bitstream."""
    rng = random.Random(int(os.environ.get("NICD_CRASH_SEED", "4")))
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    originals: dict[str, str] = {}
    for i in range(48):
        d = image_bytes(1000 + i, size=(64 + 16 * (i % 3), 64))
        p = root / ("sub" if i % 4 == 0 else "") / f"img-{i:03d}.png"
        p.write_bytes(d)
        originals[str(p)] = sha256(d)
    db_path = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path, roots=[root], policy="delete", settle=0.1)
    env = nicd_env(NOTIFY_SOCKET=notify_socket.path)
    kills = 0
    killed_while_working = 0
    for cycle in range(22):
        notify_socket.messages.clear()
        p = spawn_nicd("watch", "--config", cfg, env=env)
        try:
            if cycle % 4 == 3:
                time.sleep(rng.uniform(0.2, 2.5))  # anywhere in start-up: import, schema, model load
            else:
                assert notify_socket.wait_for("READY=1", 30), "daemon never became ready"
                before = sum(1 for s in _job_states(db_path).values() if s == "done")
                time.sleep(rng.uniform(0.0, 1.0))
                if sum(1 for s in _job_states(db_path).values() if s != "done") and before < len(originals):
                    killed_while_working += 1
            assert p.poll() is None, "the daemon exited by itself"
        finally:
            _kill(p)
        kills += 1
        _check_crash_invariants(db_path, originals)
    assert kills >= 20 and killed_while_working >= 5
    _finish_cleanly(cfg, db_path, originals, notify_socket, codec)


def _finish_cleanly(cfg, db_path, originals: dict[str, str], notify_socket, codec) -> None:
    """A clean run after the crashes finishes the rest (policy delete): every image done exactly once,
    its bitstream decodes, every original deleted once, each delete intent followed by its delete."""
    notify_socket.messages.clear()
    p = spawn_nicd("watch", "--config", cfg, env=nicd_env(NOTIFY_SOCKET=notify_socket.path))
    try:
        assert notify_socket.wait_for("READY=1", 30)
        assert _wait(lambda: set(_job_states(db_path).values()) == {"done"} and len(_job_states(db_path)) == len(originals)
                     and not any(os.path.exists(x) for x in originals), 90), _job_states(db_path)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    _check_crash_invariants(db_path, originals)
    con = _db(db_path)
    try:
        rows = con.execute("SELECT b.content_sha256, b.data, b.width, b.height FROM bitstreams b").fetchall()
        assert sorted(r["content_sha256"] for r in rows) == sorted(set(originals.values()))  # exactly once each
        for r in rows:  # every stored bitstream decodes to the original's size
            assert codec.decode(bytes(r["data"])).size == (r["width"], r["height"])
        files = {r["path"]: r["state"] for r in con.execute("SELECT path, state FROM files")}
        assert all(files[x] == "deleted" for x in originals)
        intents = {r[0] for r in con.execute("SELECT path FROM events WHERE kind='delete_intent'")}
        applied = {r[0] for r in con.execute("SELECT path FROM events WHERE kind='delete_applied'")}
        assert intents == applied == set(originals)
    finally:
        con.close()
    roots = {os.path.dirname(x) for x in originals}
    assert not [f for r in roots for f in os.listdir(r) if f.startswith(".nicd-")]  # nothing hidden left behind


# Each crash point of nicd/faults.py the daemon passes, at the first and at the third arrival (after
# other images have gone through it): (site, n) → what must be true at the moment of the kill, as
# (fewest and most bitstreams stored, delete intents, deletes applied, originals gone from their path).
# Images are discovered one by one, so coding and deleting interleave: the worker's points fix the
# number of bitstreams, the originals' points the number of deletes.
CRASH_POINTS = {
    "worker.before-commit": lambda n: (n - 1, n - 1, range(n), range(n), range(n)),
    "worker.after-commit": lambda n: (n, n, range(n + 1), range(n), range(n)),
    "originals.after-intent": lambda n: (n, 4, n, n - 1, n - 1),
    "originals.hidden": lambda n: (n, 4, n, n - 1, n),
    "originals.after-unlink": lambda n: (n, 4, n, n - 1, n),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("site", sorted(CRASH_POINTS))
def test_sigkill_at_each_crash_point_loses_nothing_and_the_next_start_finishes(tmp_path, notify_socket, codec, site, n):
    """NICD_FAULT=<site>:<n> kills the daemon at exactly that point (policy delete, 4 images); the
    invariants hold there, and the next start finishes everything exactly once."""
    root = tmp_path / "photos"
    root.mkdir()
    originals = {}
    for i in range(4):
        d = image_bytes(3000 + i, size=(64, 48))
        (root / f"{i}.png").write_bytes(d)
        originals[str(root / f"{i}.png")] = sha256(d)
    db_path = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path, roots=[root], policy="delete", settle=0.1)
    p = spawn_nicd("watch", "--config", cfg, env=nicd_env(NOTIFY_SOCKET=notify_socket.path, NICD_FAULT=f"{site}:{n}"))
    try:
        rc = p.wait(120)
    finally:
        _kill(p)
    assert rc == -signal.SIGKILL, f"the daemon did not reach {site} {n} times (exit {rc})"
    _check_crash_invariants(db_path, originals)
    con = _db(db_path)
    try:
        at_kill = (
            con.execute("SELECT count(*) FROM bitstreams").fetchone()[0],
            con.execute("SELECT count(*) FROM events WHERE kind = 'delete_intent'").fetchone()[0],
            con.execute("SELECT count(*) FROM events WHERE kind = 'delete_applied'").fetchone()[0],
            sum(not os.path.exists(x) for x in originals),
        )
    finally:
        con.close()
    fewest, most, *deletes = CRASH_POINTS[site](n)
    assert fewest <= at_kill[0] <= most, at_kill
    assert all(got in want if isinstance(want, range) else got == want for got, want in zip(at_kill[1:], deletes)), at_kill
    hidden = [f for f in os.listdir(root) if f.startswith(".nicd-del-")]
    assert len(hidden) == (site == "originals.hidden")  # the pinned original, found again by the repair
    _finish_cleanly(cfg, db_path, originals, notify_socket, codec)


@pytest.mark.parametrize("site", ["write.temp-synced", "write.renamed"])
def test_sigkill_while_nicd_decode_writes_leaves_no_half_file(tmp_path, codec, site):
    """Killed before the rename: no output file (the complete temp file is left, never under the
    target's name), and a second run writes it; killed after the rename: the whole file is there."""
    from nicd.codec.imageio import load_image

    data = codec.encode(load_image(image_bytes(7, (80, 56))), quality=3).data
    (tmp_path / "a.nicd").write_bytes(data)
    out = tmp_path / "out" / "a.png"
    out.parent.mkdir()
    r = run_nicd("decode", tmp_path / "a.nicd", "-o", out, "--device", "cpu", env=nicd_env(NICD_FAULT=f"{site}:1"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    temps = [f for f in os.listdir(out.parent) if f.startswith(".nicd-tmp-")]
    expected = codec.decode_rgb(data)
    if site == "write.temp-synced":
        assert not out.exists() and len(temps) == 1
        r = run_nicd("decode", tmp_path / "a.nicd", "-o", out, "--device", "cpu")
        assert r.returncode == 0, r.stderr
    else:
        assert temps == []
    from PIL import Image

    with Image.open(out) as im:
        assert (np.asarray(im.convert("RGB")) == expected).all()


def test_sigterm_stops_within_10s_and_the_next_start_finishes(tmp_path, notify_socket):
    root = tmp_path / "photos"
    root.mkdir()
    shas = set()
    for i in range(24):
        d = image_bytes(2000 + i, size=(192, 192))
        (root / f"{i}.png").write_bytes(d)
        shas.add(sha256(d))
    db_path = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path, roots=[root], settle=0.1)
    env = nicd_env(NOTIFY_SOCKET=notify_socket.path)
    p = spawn_nicd("watch", "--config", cfg, env=env)
    try:
        assert notify_socket.wait_for("READY=1", 30)
        assert _wait(lambda: list(_job_states(db_path).values()).count("done") >= 2, 30)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(10)
        elapsed = time.monotonic() - t0
    finally:
        _kill(p)
    assert rc == 0 and elapsed < 10
    msgs = notify_socket.poll(0.2)
    ready_at = next(i for i, m in enumerate(msgs) if "READY=1" in m)
    stop_at = next(i for i, m in enumerate(msgs) if "STOPPING=1" in m)
    assert ready_at < stop_at
    assert any(m.startswith("STATUS=pending") for m in msgs)  # queue counts reported to systemd
    states = _job_states(db_path)
    assert "running" not in states.values()  # nothing left half-done
    assert os.path.getsize(str(db_path) + "-wal") == 0 if os.path.exists(str(db_path) + "-wal") else True
    unfinished = [s for s, st in states.items() if st != "done"] + [s for s in shas if s not in states]
    assert unfinished, "the first run finished everything: make the images bigger for this test"

    p = spawn_nicd("watch", "--config", cfg, env=nicd_env())
    try:
        assert _wait(lambda: set(_job_states(db_path)) == shas and set(_job_states(db_path).values()) == {"done"}, 90)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0


def test_sigterm_during_a_long_encode_exits_0_without_an_abort(tmp_path):
    """The stop's grace period ends while the worker is still inside torch: the job goes back to the
    queue and the process exits 0 (it used to abort in the interpreter's shutdown: SIGABRT)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)  # ~25 s to code on one core
    Image.fromarray(noise).save(root / "big.png")
    db_path = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path, roots=[root], settle=0.1)
    log = (tmp_path / "stderr.log").open("wb")
    p = spawn_nicd("watch", "--config", cfg, env=nicd_env(), stderr=log)
    try:
        assert _wait(lambda: "running" in _job_states(db_path).values(), 60)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(15)
    finally:
        _kill(p)
        log.close()
    err = (tmp_path / "stderr.log").read_text()
    assert "terminate called" not in err, err
    assert rc == 0, err
    assert list(_job_states(db_path).values()) == ["pending"]  # released for the next start


def _truncated_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(7, size=(128, 128)))).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _bomb_png(w=40000, h=40000) -> bytes:
    """A tiny PNG whose header claims 1.6 gigapixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _verdicts(db_path) -> dict[str, tuple[str, str | None]]:
    """path -> (verdict, code) from the files and jobs tables."""
    con = _db(db_path)
    try:
        out = {}
        for r in con.execute("SELECT f.path, f.state, f.error_code, j.state AS js, j.error_code AS jc "
                             "FROM files f LEFT JOIN jobs j ON j.content_sha256 = f.content_sha256"):
            if r["state"] in ("failed", "missing"):
                out[r["path"]] = (r["state"], r["error_code"])
            elif r["js"] in ("done", "failed", "skipped"):
                out[r["path"]] = (r["js"], r["jc"])
        return out
    finally:
        con.close()


def test_bad_files_each_get_a_verdict_and_the_daemon_keeps_running(tmp_path, notify_socket):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "good.png").write_bytes(image_bytes(1))
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(_truncated_jpeg())
    (root / "not-an-image.png").write_bytes(b"this is a text file, not a picture\n" * 20)
    (root / "png-named.jpg").write_bytes(image_bytes(2))  # wrong extension: the content decides
    (root / "unreadable.png").write_bytes(image_bytes(3))
    os.chmod(root / "unreadable.png", 0)
    os.mkfifo(root / "fifo.jpg")
    (root / "bomb.png").write_bytes(_bomb_png())
    db_path = tmp_path / "state" / "nicd.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path, roots=[root], settle=1.0)
    cmd = []
    if os.geteuid() == 0:  # root reads mode-000 files: run the daemon without the DAC override capabilities
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    import sys

    from conftest import REPO

    p = subprocess.Popen(cmd + [sys.executable, "-m", "nicd", "watch", "--config", str(cfg)], cwd=str(REPO),
                         env=nicd_env(NOTIFY_SOCKET=notify_socket.path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert notify_socket.wait_for("READY=1", 30)
        # vanishing before read: appears, and is gone before its settle time is over
        (root / "vanishing.png").write_bytes(image_bytes(4))
        time.sleep(0.3)
        (root / "vanishing.png").unlink()
        expected = {
            "good.png": ("done", None),
            "png-named.jpg": ("done", None),
            "empty.jpg": ("failed", "E_EMPTY"),
            "truncated.jpg": ("failed", "E_TRUNCATED"),
            "not-an-image.png": ("failed", "E_NOT_IMAGE"),
            "unreadable.png": ("failed", "E_PERMISSION"),
            "fifo.jpg": ("failed", "E_NOT_REGULAR_FILE"),
            "bomb.png": ("failed", "E_TOO_LARGE"),
            "vanishing.png": ("missing", "E_VANISHED"),
        }
        want = {str(root / k): v for k, v in expected.items()}
        ok = _wait(lambda: all(_verdicts(db_path).get(k) == v for k, v in want.items()), 40, step=0.3)
        got = _verdicts(db_path)
        assert ok, {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        con = _db(db_path)
        msgs = [r[0] for r in con.execute("SELECT error_message FROM jobs WHERE state='failed' "
                                          "UNION ALL SELECT error_message FROM files WHERE error_code IS NOT NULL")]
        con.close()
        assert all(m and "\n" not in m for m in msgs)  # one-line messages
        # still alive, and still working
        assert p.poll() is None
        (root / "late.png").write_bytes(image_bytes(5))
        assert _wait(lambda: _verdicts(db_path).get(str(root / "late.png")) == ("done", None), 30)
        st = run_nicd("status", "--json", "--config", cfg)
        assert st.returncode == 0, st.stderr
        body = json.loads(st.stdout)
        assert body["daemon"]["state"] == "running"
        assert body["jobs"]["done"] == 3 and body["jobs"]["failed"] == 4
        assert set(body["jobs"]) == {"pending", "running", "done", "failed", "skipped"}
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(10)
        err = p.stderr.read().decode()
        p.stderr.close()
    assert rc == 0
    assert "Traceback" not in err, err


def test_bad_config_and_stale_schema_exit_78(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[watch]\nsettle_secs = 3\n")
    r = run_nicd("watch", "--config", bad)
    assert r.returncode == 78 and "watch.settle_secs" in r.stderr

    db_path = tmp_path / "n.db"
    cfg = write_config(tmp_path / "c.toml", database=db_path)
    r = run_nicd("db", "upgrade", "--config", cfg, "--json")
    from nicd.store.migrate import head_revision

    assert r.returncode == 0 and json.loads(r.stdout)["to"] == head_revision()
    con = sqlite3.connect(db_path)
    con.execute("UPDATE alembic_version SET version_num = '0000_old'")
    con.commit()
    con.close()
    for args in (["watch"], ["scan", str(tmp_path)], ["status"]):
        r = run_nicd(*args, "--config", cfg)
        assert r.returncode == 78 and "nicd db upgrade" in r.stderr, (args, r.stderr)


def test_scan_cli_codes_a_folder_and_lists_failures(tmp_path):
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    for i in range(3):
        (pics / ("sub" if i else "") / f"{i}.png").write_bytes(image_bytes(300 + i))
    (pics / "copy.png").write_bytes(image_bytes(300))  # same content, second name
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (pics / "notes.txt").write_text("not included")
    cfg = write_config(tmp_path / "c.toml", database=tmp_path / "db" / "nicd.db")
    r = run_nicd("scan", pics, "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["files"], res["done"], res["failed"], res["complete"]) == (5, 4, 1, True)
    assert res["failures"][0]["path"].endswith("broken.jpg") and res["failures"][0]["code"].startswith("E_")
    assert res["original_bytes"] > res["nicd_bytes"] > 0
    con = _db(tmp_path / "db" / "nicd.db")
    assert con.execute("SELECT count(*) FROM bitstreams").fetchone()[0] == 3  # the copy was coded once
    con.close()
    # a second scan: everything already has a verdict; human output lists the failure with its code
    r = run_nicd("scan", pics, "--config", cfg)
    assert r.returncode == 0
    assert "3 already done" in r.stdout or "4 already done" in r.stdout
    assert "broken.jpg" in r.stdout and "E_" in r.stdout
    r = run_nicd("scan", tmp_path / "does-not-exist", "--config", cfg)
    assert r.returncode == 1 and "E_NOT_FOUND" in r.stderr


def test_status_on_a_missing_database_reports_zeros(tmp_path):
    cfg = write_config(tmp_path / "c.toml", database=tmp_path / "none" / "nicd.db")
    r = run_nicd("status", "--json", "--config", cfg)
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert body["jobs"] == {"pending": 0, "running": 0, "done": 0, "failed": 0, "skipped": 0}
    assert body["database_exists"] is False and body["daemon"]["state"] == "not running"
    assert not (tmp_path / "none").exists()  # a reader never creates the database


def test_sd_notify_messages_and_a_full_receiver_never_blocks(tmp_path):
    import socket

    from nicd.daemon.notify import Notifier

    path = tmp_path / "n.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval() == 2.0
        assert n.ready(status="ok")
        assert rx.recv(100) == b"READY=1\nSTATUS=ok"
        t0 = time.monotonic()
        for _ in range(200):  # nobody reads: the kernel queue fills up; sends are dropped, not blocked
            n.status("x")
        assert time.monotonic() - t0 < 2 and n.dropped > 0
        n.close()
    finally:
        rx.close()
    assert Notifier({}).ready() is False  # outside systemd: a no-op


def test_journal_lines_carry_priority_prefixes(tmp_path):
    import logging

    from nicd.daemon.logs import setup_logging

    out = open(tmp_path / "log", "w+")
    st = os.fstat(out.fileno())
    setup_logging("INFO", stream=out, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    logging.getLogger("nicd.test").warning("disk %s", "full")
    logging.getLogger("nicd.test").info("hello")
    logging.getLogger("nicd.test").debug("hidden")
    out.seek(0)
    assert out.read().splitlines() == ["<4>nicd.test: disk full", "<6>nicd.test: hello"]
    out.close()
    other = open(tmp_path / "log2", "w+")
    setup_logging("INFO", stream=other, env={"JOURNAL_STREAM": "1:2"})  # stderr is not the journal stream
    logging.getLogger("nicd.test").error("boom")
    other.seek(0)
    line = other.read()
    assert not line.startswith("<") and "ERROR" in line and "boom" in line
    other.close()
    logging.getLogger("nicd").handlers.clear()


def test_systemd_unit_is_hardened_and_valid(tmp_path):
    from conftest import REPO

    unit = (REPO / "deploy" / "nicd.service").read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.splitlines() if "=" in ln and not ln.startswith("#")}
    assert lines["Type"] == "notify" and lines["MemoryDenyWriteExecute"] == "no"
    assert lines["RestartPreventExitStatus"] == "78" and lines["KillMode"] == "mixed"
    assert "nicd watch" in lines["ExecStart"] and lines["NoNewPrivileges"] == "yes"
    assert lines["ProtectSystem"] == "strict" and lines["RestrictAddressFamilies"] == "AF_UNIX"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    fake = tmp_path / "nicd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    u = tmp_path / "nicd.service"
    u.write_text(unit.replace("/opt/nicd/venv/bin/nicd", str(fake)))
    r = subprocess.run([analyze, "verify", str(u)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "nicd.service" in ln]
    assert problems == [], problems
