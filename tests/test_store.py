from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text

from nicd.store import migrate, queue
from nicd.store.engine import LockedError, SchemaError, Store, create_reader_engine
from nicd.store.models import Base


def test_new_database_is_created_at_head_with_durable_pragmas(store):
    with store.read() as conn:
        state = migrate.schema_state(conn)
        assert state["ok"] and state["current"] == migrate.head_revision()
        pragma = lambda p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("foreign_keys") == 1
        assert pragma("page_size") == 8192
        assert pragma("busy_timeout") >= 5000
        assert migrate.integrity_check(conn) == ["ok"]
        tables = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).scalars())
    assert {"contents", "files", "jobs", "bitstreams", "events", "daemons", "alembic_version"} <= tables


def test_foreign_keys_are_enforced(store):
    with pytest.raises(Exception):
        with store.write() as conn:
            conn.execute(text("INSERT INTO jobs (content_sha256, state, attempts, created_at, updated_at) "
                              "VALUES ('nope', 'pending', 0, '2020-01-01', '2020-01-01')"))


def test_migrations_match_the_models(store):
    """Like `alembic check`: autogenerate finds nothing to add or change."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.read() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_downgrade_works(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'n.db'}") as s:
        r1 = migrate.upgrade(s)
        assert r1["changed"] and r1["from"] is None and r1["backup"] is None
        assert migrate.upgrade(s)["changed"] is False
        migrate.downgrade(s, "base")
        with s.read() as conn:
            assert migrate.schema_state(conn)["empty"]


def test_stale_schema_is_refused_naming_the_upgrade_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    with Store(url) as s:
        migrate.ensure_schema(s)
        with s.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0000_old'"))
    with Store(url) as s:
        with pytest.raises(SchemaError) as ei:
            migrate.ensure_schema(s)
    assert "nicd db upgrade" in str(ei.value) and ei.value.code == "E_SCHEMA"


def test_foreign_database_is_refused(tmp_path):
    p = tmp_path / "other.db"
    sqlite3.connect(p).execute("CREATE TABLE photos (x)").connection.commit()
    with Store(f"sqlite:///{p}") as s:
        with pytest.raises(SchemaError):
            migrate.ensure_schema(s)


def test_backup_before_upgrade_is_a_consistent_copy(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    with Store(url) as s:
        migrate.ensure_schema(s)
        with s.write() as conn:
            queue.enqueue(conn, "a" * 64, 10)
        backup = migrate._backup_sqlite(s, "0001")
    assert backup.startswith(str(tmp_path / "n.db.pre-0001-")) and os.path.exists(backup)
    con = sqlite3.connect(backup)
    assert con.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_reader_is_read_only_and_works_without_a_wal_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    with Store(url) as s:
        migrate.ensure_schema(s)
        with s.write() as conn:
            queue.enqueue(conn, "b" * 64, 10)
    # the writer is gone; a reader must still open the WAL database and must not be able to write
    eng = create_reader_engine(url)
    try:
        with eng.connect() as conn:
            assert queue.counts(conn)["pending"] == 1
            with pytest.raises(Exception) as ei:
                conn.execute(text("DELETE FROM jobs"))
            assert "readonly" in str(ei.value).lower() or "read-only" in str(ei.value).lower()
    finally:
        eng.dispose()


def test_one_writer_per_database_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    s1 = Store(url)
    with pytest.raises(LockedError) as ei:
        Store(url)
    assert f"pid {os.getpid()}" in str(ei.value)
    s1.close()
    Store(url).close()  # released


def test_writer_lock_is_released_when_the_holder_is_killed(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    code = ("import sys,time; from nicd.store.engine import Store; s=Store(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError):
            Store(url)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        Store(url).close()
    finally:
        if p.poll() is None:
            p.kill()


def test_readers_never_see_database_is_locked_while_the_writer_works(tmp_path):
    """Design §I in small: status-style reads in a loop while the writer commits continuously."""
    from nicd.config import parse_config
    from nicd.daemon.status import status

    url = f"sqlite:///{tmp_path / 'n.db'}"
    cfg = parse_config({"storage": {"database": url}})
    stop = threading.Event()
    errors: list = []
    with Store(url) as s:
        migrate.ensure_schema(s)

        def write_loop():
            i = 0
            while not stop.is_set():
                with s.write() as conn:
                    for _ in range(20):
                        queue.enqueue(conn, f"{i:064x}", 100)
                        i += 1

        t = threading.Thread(target=write_loop)
        t.start()
        try:
            last = -1
            for _ in range(150):
                try:
                    n = status(cfg)["jobs"]["pending"]
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
                    continue
                assert n >= last  # monotonic between calls
                last = n
        finally:
            stop.set()
            t.join()
    assert errors == []
    assert last > 0


def test_storage_errors_have_codes():
    from nicd.store.engine import translate_db_error

    assert translate_db_error(sqlite3.OperationalError("database or disk is full")).code == "E_NO_SPACE"
    assert translate_db_error(sqlite3.OperationalError("database is locked")).code == "E_DB_BUSY"
    assert translate_db_error(sqlite3.DatabaseError("file is not a database")).code == "E_DB_CORRUPT"


def test_postgresql_sql_is_portable(tmp_path, capsys):
    """The migration renders for PostgreSQL (offline mode), and the claim locks rows with SKIP LOCKED."""
    from alembic import command
    from sqlalchemy.dialects import postgresql

    cfg = migrate.alembic_config("postgresql://nicd@localhost/nicd")
    command.upgrade(cfg, "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE jobs" in sql and "CREATE TABLE bitstreams" in sql and "BYTEA" in sql

    from sqlalchemy.dialects import sqlite as sqlite_dialect

    q = queue.claim_candidates_query(4)
    assert str(q.compile(dialect=postgresql.dialect())).rstrip().endswith("FOR UPDATE OF jobs SKIP LOCKED")
    assert "FOR UPDATE" not in str(q.compile(dialect=sqlite_dialect.dialect()))
