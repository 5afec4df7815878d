"""Discovery with real watchdog observers on temp folders, and the in-process daemon on the real codec."""

from __future__ import annotations

import os
import queue as queue_mod
import threading
import time

import pytest
from sqlalchemy import select

from conftest import image_bytes, sha256
from nicd.daemon.discovery import NameFilter, reconcile_root
from nicd.daemon.service import Discovery, run_watch
from nicd.daemon.watcher import Watcher
from nicd.store.engine import create_reader_engine
from nicd.store.models import Bitstream, Content, File, Job


def test_name_filter():
    f = NameFilter(["*.jpg", "*.png"], exclude=["*-thumb.jpg", "cache/*"])
    assert f.wants_file("IMG_001.JPG") and f.wants_file("a.png")
    assert not f.wants_file("a.gif")
    for temp in (".IMG_001.JPG.Xy12ab", ".nicd-tmp-abc.png", "a.jpg.part", "a.jpg.crdownload", "a.jpg~",
                 "~$a.jpg", ".goutputstream-XYZ", "a.jpg.tmp"):
        assert not f.wants_file(temp), temp
    assert not f.wants_file("x-thumb.jpg")
    assert not f.wants_path("/r/cache/x.jpg", "/r") and f.wants_path("/r/other/x.jpg", "/r")
    assert not f.wants_path("/r/.Trash-1000/x.jpg", "/r") and not f.wants_path("/r/@eaDir/x.jpg", "/r")
    assert not f.wants_path("/elsewhere/x.jpg", "/r")


def _db_rows(url):
    eng = create_reader_engine(url)
    try:
        with eng.connect() as conn:
            return {
                "contents": set(conn.execute(select(Content.sha256)).scalars()),
                "blobs": set(conn.execute(select(Bitstream.content_sha256)).scalars()),
                "jobs": dict(conn.execute(select(Job.content_sha256, Job.state)).all()),
                "files": {r.path: (r.state, r.content_sha256, r.error_code) for r in conn.execute(select(File))},
            }
    finally:
        eng.dispose()


def _wait(pred, timeout, step=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


@pytest.fixture
def daemon_thread(codec):
    """Run the real service loop in-process (real observer, real SQLite, real codec)."""
    started = []

    def start(config):
        stop = threading.Event()
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("rc", run_watch(config, stop, codec=codec)), daemon=True)
        t.start()
        started.append((t, stop))
        return stop, t, res

    yield start
    for t, stop in started:
        stop.set()
        t.join(15)


def test_files_written_every_way_are_coded_once_on_their_final_content(tmp_path, make_config, daemon_thread):
    root = tmp_path / "photos"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    pre = image_bytes(1)
    (root / "present-at-start.png").write_bytes(pre)
    cfg = make_config(roots=[root], settle=0.6)
    stop, t, res = daemon_thread(cfg)
    finals = {}

    def put(path, data):
        finals[str(path)] = sha256(data)

    put(root / "present-at-start.png", pre)
    time.sleep(1.0)
    # 1. in one go
    for i in range(3):
        d = image_bytes(10 + i)
        (root / f"instant-{i}.png").write_bytes(d)
        put(root / f"instant-{i}.png", d)
    # 2. rsync style: a temporary dot-name, then a rename
    d = image_bytes(20)
    (root / ".rsync-target.png.Ab12Cd").write_bytes(d)
    time.sleep(0.3)
    os.rename(root / ".rsync-target.png.Ab12Cd", root / "rsync-target.png")
    put(root / "rsync-target.png", d)
    # 3. into new subfolders, written right after mkdir -p
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    d = image_bytes(21)
    (deep / "deep.png").write_bytes(d)
    put(deep / "deep.png", d)
    # 4. moved in from outside the root
    d = image_bytes(22)
    (outside / "moved-in.png").write_bytes(d)
    os.rename(outside / "moved-in.png", root / "moved-in.png")
    put(root / "moved-in.png", d)
    # 5. slowly, in chunks: 10 chunks over ~2.5 s (the settle time is 0.6 s)
    d = image_bytes(23, size=(96, 96))
    with open(root / "slow.png", "wb") as fh:
        step = len(d) // 10 + 1
        for k in range(0, len(d), step):
            fh.write(d[k:k + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(0.25)
    put(root / "slow.png", d)

    url = cfg.storage.database
    ok = _wait(lambda: set(finals.values()) <= _db_rows(url)["blobs"], 60)
    assert ok, _db_rows(url)
    # 6. a tree renamed within the root: followed, nothing coded again
    os.rename(root / "a", root / "renamed")
    moved = str(root / "renamed" / "b" / "c" / "deep.png")
    assert _wait(lambda: _db_rows(url)["files"].get(moved, (None,))[0] == "hashed", 20)
    time.sleep(1.0)
    rows = _db_rows(url)
    stop.set()
    t.join(15)
    assert res.get("rc") == 0

    assert rows["contents"] == set(finals.values())  # no partial content was ever hashed
    assert rows["blobs"] == set(finals.values())  # each coded once (bitstreams are unique per content)
    assert set(rows["jobs"].values()) == {"done"}
    assert rows["files"][moved][1] == finals[str(deep / "deep.png")]
    assert not any(".rsync" in p for p in rows["files"])  # the temporary name was never taken


def _ingest_all(store, cfg):
    stop = threading.Event()
    disc = Discovery(store, cfg, None, stop, threading.Event())
    disc.settle = 0.0
    disc.full_scan()
    disc._process_due()
    return disc


def test_reconcile_without_events_and_missing_files(tmp_path, store, make_config):
    root = tmp_path / "r"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.png").write_bytes(image_bytes(i))
    cfg = make_config(roots=[root], database=store.sqlite_path)
    disc = _ingest_all(store, cfg)
    url = f"sqlite:///{store.sqlite_path}"
    assert len([v for v in _db_rows(url)["files"].values() if v[0] == "hashed"]) == 12
    # one file deleted: marked missing (its job and any bitstream stay)
    (root / "3.png").unlink()
    disc.full_scan()
    files = _db_rows(url)["files"]
    assert files[str(root / "3.png")][0] == "missing"
    assert sum(v[0] == "hashed" for v in files.values()) == 11
    # a changed file is hashed again, as new content
    (root / "4.png").write_bytes(image_bytes(99))
    disc.full_scan()
    disc._process_due()
    assert _db_rows(url)["files"][str(root / "4.png")][1] == sha256(image_bytes(99))


def test_a_vanished_root_never_makes_its_files_look_deleted(tmp_path, store, make_config):
    root = tmp_path / "mnt" / "photos"
    root.mkdir(parents=True)
    for i in range(15):
        (root / f"{i}.png").write_bytes(image_bytes(i))
    cfg = make_config(roots=[root], database=store.sqlite_path)
    disc = _ingest_all(store, cfg)
    url = f"sqlite:///{store.sqlite_path}"
    os.rename(root, tmp_path / "mnt" / "elsewhere")  # "unmounted"
    disc.full_scan()
    assert {v[0] for v in _db_rows(url)["files"].values()} == {"hashed"}
    # an empty folder in its place (the bare mount point): the mass-disappearance guard holds
    root.mkdir()
    todo, summary = reconcile_root(store, str(root), disc.names)
    assert summary["guarded"] and summary["missing"] == 0
    assert {v[0] for v in _db_rows(url)["files"].values()} == {"hashed"}


def test_dead_observer_is_restarted_and_events_flow_again(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    hints: queue_mod.Queue = queue_mod.Queue()
    w = Watcher([str(root)], hints)
    w.start()
    try:
        assert w.healthy() and w.check() is False
        w.observer.stop()  # the observer dies (watchdog gives no signal of its own)
        w.observer.join(5)
        assert not w.healthy()
        assert w.check() is True and w.restarts == 1 and w.healthy()
        (root / "after-restart.jpg").write_bytes(b"x")
        seen = set()
        end = time.monotonic() + 10
        while time.monotonic() < end and str(root / "after-restart.jpg") not in seen:
            try:
                seen.add(hints.get(timeout=0.2).path)
            except queue_mod.Empty:
                pass
        assert str(root / "after-restart.jpg") in seen
        # a root that disappears is dropped from the watch, and taken back when it returns
        os.rename(root, tmp_path / "gone")
        assert w.check() is True and str(root) not in w.scheduled
        os.rename(tmp_path / "gone", root)
        assert w.check() is True and str(root) in w.scheduled
    finally:
        w.stop()
