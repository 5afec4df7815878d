"""Regressions for the data-safety review: the delete policy, restore into watched roots and over files
that appear meanwhile, vanished mounts, lease renewal during a long encode, exit codes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from conftest import image_bytes, sha256


# ------------------------------------------------------------------------------------------ helpers


def _codec():
    from nicd.codec.api import load_codec

    return load_codec("default", "cpu")


class _DecodeOK:
    """The real codec (the policy decodes with it before any delete)."""

    def __new__(cls):
        return _codec()


_BITSTREAM: list[bytes] = []


def _bitstream() -> bytes:
    """A real 8×8 bitstream of the default model: what these tests store for every content, whatever
    its bytes (the policy checks that the stored bitstream decodes to the recorded size)."""
    if not _BITSTREAM:
        from PIL import Image

        from nicd.codec.imageio import load_image

        _BITSTREAM.append(_codec().encode(load_image(Image.new("RGB", (8, 8), (90, 120, 200))), quality=1).data)
    return _BITSTREAM[0]


def _ingest_done(store, path: str, root: str) -> str:
    """Record ``path`` as hashed and its content's job as done with a stored bitstream whose model the
    archive keeps."""
    from nicd.codec import registry
    from nicd.store import catalog, kept_models, queue
    from nicd.store.catalog import Signature

    data = open(path, "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    with store.write() as c:
        catalog.record_hashed(c, path, root, Signature.of(os.lstat(path)), sha)
    with store.write() as c:
        jobs = queue.claim(c, "w")
    blob = _bitstream()
    info = _codec().info
    with store.write() as c:
        for j in jobs:
            assert queue.complete(c, j.id, "w", dict(
                content_sha256=j.content_sha256, data=blob, data_sha256=hashlib.sha256(blob).hexdigest(), width=8,
                height=8, original_bytes=len(data), nicd_bytes=len(blob), bpp=1.0, model=info.model_id))
        kept_models.keep(c, info.model_id, info.sha256, registry.file_bytes(info))
    return sha


def _coded_original(store, tmp_path: Path, content: bytes) -> tuple[Path, Path, str]:
    """A watch root holding one file ``a.png`` whose content is coded and stored: (root, file, sha)."""
    root = tmp_path / "root"
    root.mkdir()
    p = root / "a.png"
    p.write_bytes(content)
    return root, p, _ingest_done(store, str(p), str(root))


def _events(store):
    from nicd.store.models import Event

    with store.read() as c:
        return [(r.kind, r.path, r.detail) for r in c.execute(select(Event.kind, Event.path, Event.detail).order_by(Event.id))]


def _file_state(store, path):
    from nicd.store import catalog

    with store.read() as c:
        return catalog.get_file(c, path).state


# ------------------------------------------------- 1. the delete policy deletes only verified content


def test_delete_keeps_a_version_saved_between_intent_and_unlink(store, tmp_path, monkeypatch):
    from nicd.daemon import originals
    from nicd.store import catalog

    root, p, sha = _coded_original(store, tmp_path, b"ORIGINAL-v1")

    real_add = catalog.add_event

    def add_event(conn, kind, **kw):
        real_add(conn, kind, **kw)
        if kind == "delete_intent":  # an editor saves a new version (temp + rename) right now
            tmp = root / ".a.png.tmp"
            tmp.write_bytes(b"EDITED-v2 (never coded)")
            os.replace(tmp, p)

    monkeypatch.setattr(catalog, "add_event", add_event)
    n = originals.OriginalsPolicy(store, "delete", _DecodeOK()).apply([sha])
    monkeypatch.setattr(catalog, "add_event", real_add)
    assert n == 0
    assert p.read_bytes() == b"EDITED-v2 (never coded)"
    assert sorted(os.listdir(root)) == ["a.png"]  # no hidden file left behind
    assert _file_state(store, str(p)) == "new"  # looked at again
    assert [e[0] for e in _events(store)] == ["delete_intent", "delete_aborted"]


def test_delete_still_deletes_verified_content_and_leaves_no_hidden_file(store, tmp_path):
    from nicd.daemon import originals

    root, p, sha = _coded_original(store, tmp_path, b"ORIGINAL-v1")
    assert originals.OriginalsPolicy(store, "delete", _DecodeOK()).apply([sha]) == 1
    assert os.listdir(root) == []
    assert _file_state(store, str(p)) == "deleted"
    assert [e[0] for e in _events(store)] == ["delete_intent", "delete_applied"]


def test_concurrent_policy_passes_delete_once(store, tmp_path):
    from nicd.daemon import originals

    root = tmp_path / "root"
    root.mkdir()
    shas = []
    for i in range(6):
        p = root / f"{i}.png"
        p.write_bytes(b"content %d" % i)
        shas.append(_ingest_done(store, str(p), str(root)))
    pol = originals.OriginalsPolicy(store, "delete", _DecodeOK())
    counts = []
    ts = [threading.Thread(target=lambda: counts.append(pol.apply(shas))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sum(counts) == 6
    kinds = [e[0] for e in _events(store)]
    assert kinds.count("delete_intent") == 6 and kinds.count("delete_applied") == 6
    assert os.listdir(root) == []


def test_repair_puts_back_a_hidden_file_left_by_a_crash(store, tmp_path):
    from nicd.daemon import originals
    from nicd.store import catalog

    root = tmp_path / "root"
    root.mkdir()
    a, b = root / "a.png", root / "b.png"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    sha_a = _ingest_done(store, str(a), str(root))
    sha_b = _ingest_done(store, str(b), str(root))
    # crash right after the rename: a's path is free; b's path was taken by a new file meanwhile
    with store.write() as c:
        catalog.add_event(c, "delete_intent", path=str(a), sha256=sha_a, detail=".nicd-del-aaaa")
        catalog.add_event(c, "delete_intent", path=str(b), sha256=sha_b, detail=".nicd-del-bbbb")
    os.rename(a, root / ".nicd-del-aaaa")
    os.rename(b, root / ".nicd-del-bbbb")
    b.write_bytes(b"NEW B")
    assert originals.repair(store) == 2
    assert a.read_bytes() == b"A"
    assert b.read_bytes() == b"NEW B"
    rec = [n for n in os.listdir(root) if ".nicd-recovered-" in n]
    assert len(rec) == 1 and (root / rec[0]).read_bytes() == b"B" and rec[0].startswith("b.png")
    assert not [n for n in os.listdir(root) if n.startswith(".nicd-del-")]
    assert _file_state(store, str(a)) != "deleted" and _file_state(store, str(b)) != "deleted"
    assert originals.repair(store) == 0  # resolved once and for all


def test_verify_stored_keeps_the_original_on_any_decoder_exception(store, tmp_path):
    from nicd.daemon import originals

    class Boom:
        info, device = _codec().info, _codec().device

        def decode(self, data):
            raise RuntimeError("decoder bug")

    root, p, sha = _coded_original(store, tmp_path, b"A")
    assert originals.OriginalsPolicy(store, "delete", Boom()).apply([sha]) == 0
    assert p.read_bytes() == b"A"


# ------------------------------------------- 4. a vanished small root or mount is not "files missing"


def test_small_root_whose_contents_vanish_is_not_marked_missing(store, tmp_path):
    from nicd.daemon.discovery import Ingestor, NameFilter, reconcile_root
    from nicd.store.models import File

    root = tmp_path / "mnt"
    root.mkdir()
    for i in range(9):
        (root / f"{i}.jpg").write_bytes(b"x%d" % i)
        Ingestor(store).ingest(str(root / f"{i}.jpg"), str(root), settle=0)
    os.rename(root, tmp_path / "away")  # unmounted: the bare, empty mount point remains
    root.mkdir()
    _, summary = reconcile_root(store, str(root), NameFilter(["*.jpg"]))
    with store.read() as c:
        assert set(c.execute(select(File.state)).scalars()) == {"hashed"}
    assert summary["guarded"] and summary["missing"] == 0


def test_files_on_an_unmounted_filesystem_are_not_marked_missing(store, tmp_path, monkeypatch):
    from nicd.daemon.discovery import Ingestor, NameFilter, reconcile_root
    from nicd.store import catalog

    root = tmp_path / "root"
    (root / "nested").mkdir(parents=True)
    (root / "keep.jpg").write_bytes(b"k")
    Ingestor(store).ingest(str(root / "keep.jpg"), str(root), settle=0)
    nested = [root / "nested" / f"{i}.jpg" for i in range(2)]
    for p in nested:
        p.write_bytes(p.name.encode())
        Ingestor(store).ingest(str(p), str(root), settle=0)
    # they were on another filesystem mounted at root/nested (recorded device differs)
    with store.write() as c:
        from sqlalchemy import update

        from nicd.store.models import File
        c.execute(update(File).where(File.path.like(f"{root}/nested/%")).values(dev=os.stat(root).st_dev + 1))
    for p in nested:
        p.unlink()  # the mount is gone: its mount point is empty
    _, summary = reconcile_root(store, str(root), NameFilter(["*.jpg"]))
    with store.read() as c:
        assert {catalog.get_file(c, str(p)).state for p in nested} == {"hashed"}
    assert summary["guarded"]
    # a real delete on the root's own filesystem is still noticed
    (root / "keep.jpg").unlink()
    (root / "new.jpg").write_bytes(b"n")
    reconcile_root(store, str(root), NameFilter(["*.jpg"]))
    with store.read() as c:
        assert catalog.get_file(c, str(root / "keep.jpg")).state == "missing"


# ------------------------------------------------- 5. a long encode keeps its leases (and the watchdog)


def test_batch_longer_than_its_lease_completes(store, make_config, tmp_path, monkeypatch):
    from nicd.daemon.worker import Worker
    from nicd.store import catalog, queue
    from nicd.store.catalog import Signature

    root = tmp_path / "root"
    root.mkdir()
    p = root / "a.png"
    data = image_bytes(1, (32, 32))
    p.write_bytes(data)
    with store.write() as c:
        catalog.record_hashed(c, str(p), str(root), Signature.of(os.lstat(p)), sha256(data), width=32, height=32)

    real = _codec()

    class SlowCodec:
        info = real.info

        def encode_batch(self, prepared, **kw):
            time.sleep(2.0)  # much longer than the 0.6 s lease
            return real.encode_batch(prepared, **kw)

    real_claim = queue.claim
    monkeypatch.setattr(queue, "claim", lambda *a, **kw: real_claim(*a, **{**kw, "lease_seconds": 0.6}))
    cfg = make_config(roots=[root])
    w = Worker(store, cfg, SlowCodec(), "owner-1")
    w.lease_seconds = 0.6
    stop = threading.Event()
    beats = []

    def supervisor():  # what the daemon's main thread does: requeue expired leases, watch the beats
        while not stop.is_set():
            with store.write() as c:
                queue.requeue_expired(c, current_owner="owner-1")
            beats.append(time.monotonic() - w.stats.last_beat)
            time.sleep(0.05)

    t = threading.Thread(target=supervisor)
    t.start()
    try:
        verdicts = w.run_batch()
    finally:
        stop.set()
        t.join()
    assert [v.state for v in verdicts] == ["done"]
    assert max(beats) < 1.0  # beaten while busy: the watchdog stays fed


# ------------------------------------------------------------------- 8. database problems exit 78


@pytest.mark.parametrize("code", ["E_DB_READONLY", "E_DB_CORRUPT"])
def test_database_problems_exit_78(code):
    from nicd.cli.service_cmds import _exit_code
    from nicd.errors import StorageError

    assert _exit_code(StorageError("database: x", code=code)) == 78


def test_watch_on_a_corrupt_database_exits_78(tmp_path):
    from conftest import run_nicd, write_config

    db = tmp_path / "state" / "nicd.db"
    db.parent.mkdir()
    db.write_bytes(b"this is not a database" * 300)
    cfg = write_config(tmp_path / "c.toml", database=db)
    r = run_nicd("watch", "--config", cfg, timeout=60)
    assert r.returncode == 78, r.stderr


# ------------------------------------- 2/3. restore: never into a watched root under policy delete,
#                                            never over a file that appears while decoding


@pytest.fixture
def deleted_archive(tmp_path, codec):
    """root/a.png and root/b.jpg coded by the real scan with policy delete (both originals deleted)."""
    from conftest import write_config
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan

    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(image_bytes(3, (48, 40)))
    (root / "b.jpg").write_bytes(image_bytes(4, (48, 40), "JPEG"))
    cfg_path = write_config(tmp_path / "c.toml", database=tmp_path / "state" / "nicd.db", roots=[root], policy="delete")
    cfg = load_config(cfg_path)
    res = scan([str(root)], cfg, codec=codec)
    assert res.done == 2 and os.listdir(root) == []
    return cfg_path, cfg, root


def test_restore_refuses_targets_in_watched_roots_under_policy_delete(deleted_archive, tmp_path):
    from typer.testing import CliRunner

    from nicd.archive.restore import restore
    from nicd.cli import app

    cfg_path, cfg, root = deleted_archive
    # the reviewer's e2e: --format png beside the deleted a.jpg-like file would be coded and deleted
    res = restore([str(root / "b.jpg")], cfg, format="png")
    assert [(i.status, i.code) for i in res.items] == [("failed", "E_TARGET_WATCHED")]
    assert os.listdir(root) == []
    res = restore([str(root)], cfg, out=str(root / "restored"))
    assert {i.code for i in res.items} == {"E_TARGET_WATCHED"}
    assert os.listdir(root) == []
    r = CliRunner().invoke(app, ["restore", str(root / "b.jpg"), "--format", "png", "--config", str(cfg_path)])
    assert r.exit_code == 1 and "E_TARGET_WATCHED" in r.output
    # allowed: back to their own paths in their own formats (nicd never deletes there again) ...
    res = restore([str(root)], cfg)
    assert [i.status for i in res.items] == ["restored", "restored"]
    assert sorted(os.listdir(root)) == ["a.png", "b.jpg"]
    # ... and anywhere outside the watched roots
    res = restore([str(root)], cfg, out=str(tmp_path / "elsewhere"), format="png")
    assert [i.status for i in res.items] == ["restored", "restored"]


def test_restore_without_force_never_replaces_a_file_that_appears_while_decoding(deleted_archive, tmp_path, monkeypatch):
    import dataclasses

    from nicd.archive import restore as R

    _, cfg, root = deleted_archive
    cfg = dataclasses.replace(cfg, originals=dataclasses.replace(cfg.originals, policy="keep"))
    target = root / "a.png"
    real = R._decode

    def slow_decode(*a):
        img = real(*a)
        target.write_bytes(b"USER FILE copied in meanwhile")  # after the existence check
        return img

    monkeypatch.setattr(R, "_decode", slow_decode)
    res = R.restore([str(target)], cfg)
    assert [(i.status, i.code) for i in res.items] == [("exists", "E_EXISTS")]
    assert target.read_bytes() == b"USER FILE copied in meanwhile"
    assert os.listdir(root) == ["a.png"]  # no temp file left
    res = R.restore([str(target)], cfg, force=True)  # --force replaces
    assert [i.status for i in res.items] == ["restored"]
    assert target.read_bytes() != b"USER FILE copied in meanwhile"


def test_save_image_exclusive_never_overwrites(tmp_path):
    import io

    from PIL import Image

    from nicd.codec.imageio import save_image
    from nicd.errors import NicdError

    im = Image.open(io.BytesIO(image_bytes(1, (16, 16))))
    p = tmp_path / "x.png"
    p.write_bytes(b"mine")
    with pytest.raises(NicdError) as ei:
        save_image(im, p, replace=False)
    assert ei.value.code == "E_EXISTS" and p.read_bytes() == b"mine" and os.listdir(tmp_path) == ["x.png"]
    save_image(im, tmp_path / "y.png", replace=False)
    assert Image.open(tmp_path / "y.png").size == (16, 16)


def test_repair_pairs_each_intent_with_what_follows_it(store, tmp_path):
    """An earlier failed attempt at the same path does not hide a later interrupted delete (6)."""
    from nicd.daemon import originals
    from nicd.store import catalog

    root, p, sha = _coded_original(store, tmp_path, b"A")
    with store.write() as c:
        catalog.add_event(c, "delete_intent", path=str(p), sha256=sha, detail=".nicd-del-1111")
        catalog.add_event(c, "delete_failed", path=str(p), sha256=sha, detail="permission denied")
        catalog.add_event(c, "delete_intent", path=str(p), sha256=sha, detail=".nicd-del-2222")
    p.unlink()  # the second attempt unlinked the verified file, then the process died
    assert originals.repair(store) == 1
    assert _file_state(store, str(p)) == "deleted"


def test_policy_for_known_content_runs_on_the_worker_thread():
    """Discovery hands contents to the worker loop instead of deleting on its own thread (9)."""
    from nicd.daemon.service import WorkerLoop

    calls = []

    class Policy:
        policy = "delete"

        def apply(self, shas, should_stop=lambda: False):
            calls.append((threading.current_thread().name, list(shas) if shas is not None else None))
            return 0

    class FakeWorker:
        policy = Policy()
        stats = SimpleNamespace(last_error=None)

        def beat(self):
            pass

        def run_batch(self):
            return None

    stop, avail = threading.Event(), threading.Event()
    loop = WorkerLoop(FakeWorker(), stop, avail, store=None, sweep_seconds=3600)
    loop.next_sweep = time.monotonic() + 3600
    loop.request_policy("ab" * 32)  # called by discovery
    assert calls == []
    t = threading.Thread(target=loop.run, name="nicd-worker")
    t.start()
    try:
        assert _until(lambda: calls)
    finally:
        stop.set()
        avail.set()
        t.join(5)
    assert calls[0] == ("nicd-worker", ["ab" * 32])


def _until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


# ------------------------------------------------------------------------- 9. a full disk loses nothing


def _limit_pages(store, pages: int | None) -> None:
    """SQLite's own size cap on the writer connection: past it every write that needs a new page fails
    with SQLITE_FULL ("database or disk is full"), the error a full disk gives. None lifts it."""
    with store.write() as c:
        c.exec_driver_sql(f"PRAGMA max_page_count = {4294967294 if pages is None else pages}")


def test_a_full_disk_pauses_the_worker_keeps_every_original_and_charges_no_attempt(store, make_config, tmp_path):
    """The daemon's worker loop over a real SQLite file that cannot grow: no bitstream, no deleted
    original, the jobs given back as pending with no attempt used, E_NO_SPACE reported; once there is
    room again, everything is coded and only then are the originals deleted (policy delete)."""
    from nicd.daemon import originals
    from nicd.daemon.service import WorkerLoop
    from nicd.daemon.worker import Worker
    from nicd.store import catalog, queue
    from nicd.store.catalog import Signature
    from nicd.store.models import Bitstream, Job

    root = tmp_path / "root"
    root.mkdir()
    contents = {}
    for i in range(3):
        p = root / f"img-{i}.png"
        p.write_bytes(image_bytes(500 + i, (48, 40)))
        contents[p] = p.read_bytes()
        with store.write() as c:
            catalog.record_hashed(c, str(p), str(root), Signature.of(os.lstat(p)), sha256(contents[p]), width=48, height=40)
    with store.write() as c:
        pages = c.exec_driver_sql("PRAGMA page_count").scalar()
    _limit_pages(store, pages)

    codec = _codec()
    cfg = make_config(roots=[root], policy="delete")
    stop, work = threading.Event(), threading.Event()
    worker = Worker(store, cfg, codec, "owner-1", stop=stop, policy=originals.OriginalsPolicy(store, "delete", codec))
    loop = WorkerLoop(worker, stop, work, store)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while loop.backoff < 2.0 and time.monotonic() < deadline:  # at least two full-disk failures in a row
            time.sleep(0.05)
        assert loop.backoff >= 2.0 and worker.stats.last_error.startswith("E_NO_SPACE"), worker.stats.last_error
        with store.read() as c:
            jobs = c.execute(select(Job.state, Job.attempts, Job.lease_owner)).all()
            assert c.execute(select(Bitstream.id)).all() == []
        # between two tries every job is pending again, with no attempt charged and no lease held
        assert {(j.state, j.lease_owner) for j in jobs} <= {("pending", None), ("running", "owner-1")}
        assert all(j.attempts <= 1 for j in jobs)
        assert all(p.read_bytes() == data for p, data in contents.items())

        _limit_pages(store, None)  # room again
        assert _until(lambda: _counts(store)["done"] == 3 and not any(p.exists() for p in contents), 90), _counts(store)
    finally:
        stop.set()
        work.set()
        thread.join(30)
    with store.read() as c:
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        assert len(c.execute(select(Bitstream.id)).all()) == 3
        assert sorted(a for (a,) in c.execute(select(Job.attempts))) == [1, 1, 1]  # the full disk cost none
    assert not list(root.glob(".nicd-*"))


def _counts(store):
    from nicd.store import queue

    with store.read() as c:
        return queue.counts(c)



def test_a_storage_error_that_recurs_on_one_image_ends_in_its_verdict_not_a_loop(store, make_config, tmp_path):
    """A database that refuses one image's bitstream (a real SQLite trigger, not a mock): the other
    images of its batch are given back uncounted and coded; that one is retried, its attempts counted,
    and failed with the storage error's code after MAX_ATTEMPTS, not retried forever."""
    from nicd.daemon.worker import Worker
    from nicd.errors import StorageError
    from nicd.store import catalog, queue
    from nicd.store.catalog import Signature
    from nicd.store.models import Job

    root = tmp_path / "root"
    root.mkdir()
    shas = []
    for i in range(4):
        p = root / f"img-{i}.png"
        p.write_bytes(image_bytes(700 + i, (40, 32)))
        shas.append(sha256(p.read_bytes()))
        with store.write() as c:
            catalog.record_hashed(c, str(p), str(root), Signature.of(os.lstat(p)), shas[-1], width=40, height=32)
    poison = shas[1]  # coded second in the first batch: one image before it, two after
    with store.write() as c:
        c.exec_driver_sql(f"CREATE TRIGGER refuse_one BEFORE INSERT ON bitstreams WHEN NEW.content_sha256 = '{poison}' "
                          "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END")
    worker = Worker(store, make_config(roots=[root]), _codec(), "owner-1")
    errors = 0
    for _ in range(3 * queue.MAX_ATTEMPTS):
        try:
            if worker.run_batch() is None:
                break
        except StorageError as exc:
            assert exc.code == "E_STORAGE" and "refused by the test trigger" in exc.message
            errors += 1
    else:
        pytest.fail("the queue never drained")
    with store.read() as c:
        jobs = {r.content_sha256: r for r in c.execute(select(Job.content_sha256, Job.state, Job.attempts, Job.error_code,
                                                                 Job.error_message))}
    assert errors == queue.MAX_ATTEMPTS  # the last one is recorded as the verdict
    assert (jobs[poison].state, jobs[poison].attempts, jobs[poison].error_code) == ("failed", queue.MAX_ATTEMPTS, "E_STORAGE")
    assert jobs[poison].error_message.startswith(f"storing the result failed {queue.MAX_ATTEMPTS} times: database error")
    assert all((jobs[s].state, jobs[s].attempts) == ("done", 1) for s in shas if s != poison)
