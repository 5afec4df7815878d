"""The schema and the job queue, unchanged, on a real PostgreSQL server (issue 4: "several machines will
later share one queue").

A throwaway cluster (``tests/pg.py``) on a unix socket; every test gets a fresh database through a
``postgresql+psycopg://`` URL. The SQLite queue tests of ``test_queue.py`` run here again, as they are,
against PostgreSQL (their ``store`` fixture is overridden below), and so does their state machine.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from PIL import Image
from sqlalchemy import func, inspect, select, text

from conftest import REPO, image_bytes, run_nicd
from pg import pg_server, pg_url  # noqa: F401 - fixtures
from nicd.store import migrate, queue
from nicd.store.engine import SchemaError, Store
from nicd.store.models import Base, Bitstream, File, Job

# The SQLite queue tests, run unchanged against PostgreSQL through the `store` fixture below.
import test_queue
from test_queue import (  # noqa: F401 - collected here a second time, on PostgreSQL
    blob,
    sha,
    test_a_job_interrupted_once_is_retried_alone,
    test_claim_order_budget_and_filter,
    test_complete_needs_the_lease,
    test_enqueue_is_idempotent_and_content_is_the_identity,
    test_exclusive_recovery_takes_back_every_other_lease,
    test_fail_and_skip_record_a_one_line_verdict,
    test_fewest_attempts_first_so_a_poison_image_never_blocks_the_queue,
    test_release_does_not_count_an_attempt,
    test_requeue_expired_and_attempt_limit,
)

KODAK = REPO.parent / "shared" / "data" / "kodak"
TABLES = {"contents", "files", "jobs", "bitstreams", "events", "daemons", "alembic_version"}


@pytest.fixture
def store(pg_url):
    """Overrides conftest's SQLite store: the imported test_queue tests run on PostgreSQL."""
    s = Store(pg_url)
    assert s.dialect == "postgresql" and not s.exclusive  # no lock file: PostgreSQL has many writers
    migrate.ensure_schema(s)
    yield s
    s.close()


# ----------------------------------------------------------------------------------------------- schema
def test_db_upgrade_creates_the_schema_at_head_matching_the_models(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with Store(pg_url) as s:
        with s.read() as conn:
            assert migrate.schema_state(conn) == {"current": None, "head": migrate.head_revision(), "ok": False,
                                                  "empty": True}
        r1 = migrate.upgrade(s)  # what `nicd db upgrade` calls
        assert r1 == {"from": None, "to": migrate.head_revision(), "backup": None, "changed": True}
        assert migrate.upgrade(s)["changed"] is False
        with s.read() as conn:
            assert migrate.schema_state(conn)["ok"]
            assert TABLES <= set(inspect(conn).get_table_names())
            assert migrate.integrity_check(conn) == []  # SQLite only
            # like `alembic check` (test_store.test_migrations_match_the_models): nothing to add or change
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diff == []
            types = dict(conn.execute(text(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public'")).all())
        assert types["bitstreams.data"] == "bytea"
        assert types["jobs.created_at"] == "timestamp with time zone"
        assert types["files.mtime_ns"] == "bigint"  # nanoseconds need 64 bits
        assert types["jobs.lease_expires_at"] == "double precision"

        # constraints are enforced by the server
        with pytest.raises(Exception, match="fk_jobs_content_sha256_contents"):
            with s.write() as conn:
                conn.execute(text("INSERT INTO jobs (content_sha256, state, attempts, created_at, updated_at) "
                                  "VALUES ('nope', 'pending', 0, now(), now())"))
        with s.write() as conn:
            queue.enqueue(conn, sha(1), 10)
        with pytest.raises(Exception, match="ck_jobs_state"):
            with s.write() as conn:
                conn.execute(text("UPDATE jobs SET state = 'lost'"))

        # a stale revision is refused, naming the command
        with s.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0000_old'"))
        with pytest.raises(SchemaError, match="nicd db upgrade"):
            migrate.ensure_schema(s)
        with s.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :h"), {"h": migrate.head_revision()})
            conn.execute(text("DELETE FROM jobs"))
            conn.execute(text("DELETE FROM contents"))

        # and the downgrade works too
        migrate.downgrade(s, "base")
        with s.read() as conn:
            assert migrate.schema_state(conn)["empty"]


def test_a_foreign_database_is_refused(pg_url):
    with Store(pg_url) as s:
        with s.write() as conn:
            conn.execute(text("CREATE TABLE photos (x int)"))
        with pytest.raises(SchemaError):
            migrate.ensure_schema(s)


def _toml(path: Path, url: str, roots=()) -> Path:
    roots_toml = ", ".join(f'"{r}"' for r in roots)
    path.write_text(f'[storage]\ndatabase = "{url}"\n[watch]\nroots = [{roots_toml}]\nsettle_seconds = 0.2\n'
                    f'[codec]\ndevice = "cpu"\n')
    return path


def test_nicd_db_upgrade_and_status_commands(pg_url, tmp_path):
    cfg = _toml(tmp_path / "cfg.toml", pg_url)
    r = run_nicd("db", "upgrade", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["changed"] is True and out["from"] is None and out["to"] == migrate.head_revision()
    assert out["database"].startswith("postgresql+psycopg://")
    r = run_nicd("db", "upgrade", "--config", cfg)
    assert r.returncode == 0 and "already at" in " ".join(r.stdout.split()), r.stdout + r.stderr
    with Store(pg_url) as s, s.read() as conn:
        assert migrate.schema_state(conn)["ok"]
    r = run_nicd("status", "--json", "--config", cfg)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["jobs"] == {"pending": 0, "running": 0, "done": 0, "failed": 0, "skipped": 0}
    assert st["schema"]["current"] == migrate.head_revision() and st["database_exists"]


# ------------------------------------------------------------------------------------------------ queue
def test_claim_skips_rows_locked_by_another_open_transaction(pg_url):
    """FOR UPDATE … SKIP LOCKED: a second claimer neither waits for nor takes the first one's jobs."""
    with Store(pg_url) as a, Store(pg_url) as b:
        migrate.ensure_schema(a)
        with a.write() as conn:
            for i in range(6):
                queue.enqueue(conn, sha(i), 10)
        with a.write() as ca:
            got_a = queue.claim(ca, "A", limit=2)
            with b.write() as cb:  # A has not committed: its rows are locked and still read as pending
                cb.execute(text("SET LOCAL lock_timeout = '2s'"))  # waiting would fail instead of hanging
                t0 = time.monotonic()
                got_b = queue.claim(cb, "B", limit=8)
                assert time.monotonic() - t0 < 1.5
        assert len(got_a) == 2 and not {j.id for j in got_a} & {j.id for j in got_b}
        assert len(got_a) + len(got_b) == 6
        with a.read() as conn:
            owners = dict(conn.execute(select(Job.id, Job.lease_owner)).all())
        assert {owners[j.id] for j in got_a} == {"A"} and {owners[j.id] for j in got_b} == {"B"}


N_JOBS = 300
CRASHED = 5


def _crasher(url: str) -> None:
    """Claims a few jobs with a 1 s lease and dies without a word (no release, no commit of a verdict)."""
    s = Store(url, take_lock=False)
    with s.write() as conn:
        got = queue.claim(conn, "crasher", limit=CRASHED, lease_seconds=1.0)
    assert len(got) == CRASHED
    os._exit(0)


def _worker(url: str, owner: str, ready, start, out) -> None:
    """The daemon's loop in small: recover expired leases, claim a batch, complete each job."""
    s = Store(url, take_lock=False)
    claimed: list[tuple[int, int]] = []
    try:
        ready.put(owner)
        start.wait(60)
        while True:
            with s.write() as conn:
                queue.requeue_expired(conn)
                jobs = queue.claim(conn, owner, limit=3)
            if not jobs:
                with s.read() as conn:
                    left = conn.execute(select(func.count()).select_from(Job).where(Job.state != "done")).scalar()
                if left == 0:
                    break
                time.sleep(0.05)  # someone else holds the rest (or a lease has yet to expire)
                continue
            claimed.extend((j.id, j.attempts) for j in jobs)
            for j in jobs:
                with s.write() as conn:
                    assert queue.complete(conn, j.id, owner, blob(j.content_sha256))
    finally:
        s.close()
        out.put((owner, claimed))


def test_three_processes_share_one_queue_and_expired_leases_are_taken_back(pg_url):
    with Store(pg_url) as s:
        migrate.ensure_schema(s)
        with s.write() as conn:
            for i in range(N_JOBS):
                queue.enqueue(conn, sha(i), 10)
    ctx = multiprocessing.get_context("spawn")
    crasher = ctx.Process(target=_crasher, args=(pg_url,))
    crasher.start()
    crasher.join(60)
    assert crasher.exitcode == 0
    with Store(pg_url, take_lock=False) as s, s.read() as conn:
        dead = set(conn.execute(select(Job.id).where(Job.state == "running", Job.lease_owner == "crasher")).scalars())
    assert len(dead) == CRASHED

    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(pg_url, f"w{k}", ready, start, out)) for k in range(3)]
    try:
        for p in procs:
            p.start()
        for _ in procs:  # all three started before any claims: they race for real
            ready.get(timeout=60)
        start.set()
        results = dict(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    ids = [i for claimed in results.values() for i, _ in claimed]
    assert len(ids) == N_JOBS and len(set(ids)) == N_JOBS  # every job claimed once by the live workers
    assert sum(1 for c in results.values() if c) >= 2  # they really shared the queue
    retried = {i: a for claimed in results.values() for i, a in claimed if i in dead}
    assert retried == {i: 2 for i in dead}  # the crasher's jobs, taken back after their lease expired
    with Store(pg_url, take_lock=False) as s, s.read() as conn:
        assert queue.counts(conn) == {"pending": 0, "running": 0, "done": N_JOBS, "failed": 0, "skipped": 0}
        assert conn.execute(select(func.count(func.distinct(Bitstream.content_sha256)))).scalar() == N_JOBS
        assert conn.execute(select(func.count()).select_from(Bitstream)).scalar() == N_JOBS
        assert conn.execute(select(func.count()).select_from(Job).where(Job.lease_owner.is_not(None))).scalar() == 0


def test_an_expired_lease_is_taken_back_in_real_time(store):
    with store.write() as conn:
        queue.enqueue(conn, sha(1), 10)
        (job,) = queue.claim(conn, "w", lease_seconds=0.3)
    with store.write() as conn:
        assert queue.requeue_expired(conn) == {"requeued": 0, "failed": 0}
        assert queue.renew(conn, "w", [job.id], lease_seconds=0.3) == 1
    time.sleep(0.4)
    with store.write() as conn:
        assert queue.requeue_expired(conn) == {"requeued": 1, "failed": 0}
        assert queue.complete(conn, job.id, "w", blob(sha(1))) is False  # the lease was lost
        (again,) = queue.claim(conn, "v")
    assert again.id == job.id and again.attempts == 2


def test_queue_state_machine_on_postgresql(pg_url):
    """test_queue's random operation sequences with crashes, on one PostgreSQL database (emptied per run)."""

    class PgQueueMachine(test_queue.QueueMachine):
        def __init__(self):
            RuleBasedStateMachine.__init__(self)
            self.url = pg_url
            self.store = Store(self.url)
            migrate.ensure_schema(self.store)
            with self.store.write() as conn:
                conn.execute(text("TRUNCATE bitstreams, files, jobs, contents, events RESTART IDENTITY"))
            self.owner = queue.new_owner()
            self.held = {}
            self.discovered = set()
            self.now = time.time()

        def teardown(self):
            self.store.close()

    run_state_machine_as_test(PgQueueMachine, settings=settings(
        max_examples=15, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)))


# ------------------------------------------------------------------------------------------------ scan
def _photo(n: int, dest: Path) -> None:
    p = KODAK / f"kodim{n:02d}.png"
    if p.exists():
        im = Image.open(p).convert("RGB")
        x, y = (im.width - 96) // 2 + 7 * n, (im.height - 96) // 2
        im.crop((x, y, x + 96, y + 96)).save(dest)
    else:  # without the shared data: a generated picture of the same size
        dest.write_bytes(image_bytes(n, (96, 96)))


def test_oneshot_scan_into_postgresql(pg_url, tmp_path, codec):
    from nicd.config import load_config
    from nicd.daemon.oneshot import scan
    from nicd.daemon.status import status

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for n in (1, 2, 3):
        _photo(n, photos / f"k{n}.png")
    _photo(4, photos / "sub" / "k4.png")
    shutil.copy(photos / "k1.png", photos / "sub" / "copy-of-k1.png")  # same content: coded once
    (photos / "broken.png").write_bytes(b"this is not an image")
    cfg = load_config(_toml(tmp_path / "cfg.toml", pg_url, roots=[photos]))
    assert cfg.storage.database == pg_url

    res = scan([str(photos)], cfg, codec=codec)
    assert res.complete and res.files == 6, res.to_dict()
    assert res.done + res.already == 5 and res.failed == 1, res.to_dict()
    assert [f["path"] for f in res.failures] == [str(photos / "broken.png")] and res.failures[0]["code"]

    shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("k*.png")}
    with Store(pg_url, take_lock=False) as s, s.read() as conn:
        jobs = conn.execute(select(Job.content_sha256, Job.state, Job.attempts, Job.lease_owner)).all()
        rows = conn.execute(select(Bitstream)).all()
        files = dict(conn.execute(select(File.path, File.content_sha256)).all())
    done = {j.content_sha256: j for j in jobs if j.state == "done"}
    assert set(done) == shas and all(j.attempts == 1 and j.lease_owner is None for j in done.values())
    assert len(rows) == 4 and {r.content_sha256 for r in rows} == shas  # every image once
    for r in rows:
        assert hashlib.sha256(r.data).hexdigest() == r.data_sha256 and r.nicd_bytes == len(r.data)
        assert (r.width, r.height) == (96, 96) and r.bpp == pytest.approx(8 * r.nicd_bytes / (96 * 96))
        assert r.psnr > 15 and 0 < r.ssim <= 1 and r.jpeg_bytes_at_equal_ssim and r.model
        assert r.original_bytes > 0 and r.encode_seconds is not None and r.created_at.tzinfo is not None
    assert files[str(photos / "sub" / "copy-of-k1.png")] == files[str(photos / "k1.png")]

    st = status(cfg)  # what `nicd status --json` prints
    assert st["jobs"] == {"pending": 0, "running": 0, "done": 4, "failed": 1, "skipped": 0}
    assert st["totals"]["images"] == 4
    assert st["totals"]["nicd_bytes"] == sum(r.nicd_bytes for r in rows)
    assert st["totals"]["original_bytes"] == sum(r.original_bytes for r in rows)
    assert st["throughput"]["images_last_hour"] == 4
    assert any(f["code"] == res.failures[0]["code"] for f in st["recent_failures"])

    again = scan([str(photos)], cfg, codec=codec)  # a second scan codes nothing again
    assert again.complete and again.done == 0 and again.already == 5 and again.failed == 1, again.to_dict()
    with Store(pg_url, take_lock=False) as s, s.read() as conn:
        assert conn.execute(select(func.count()).select_from(Bitstream)).scalar() == 4
        assert queue.counts(conn)["done"] == 4
