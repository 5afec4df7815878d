"""Engines and connections for nicd's database.

SQLite (the embedded default), per ``shared/design/storage.md``:

- WAL journal, ``synchronous=FULL`` (a committed "done" survives power loss, which matters once the
  originals policy deletes files), ``busy_timeout``, ``foreign_keys=ON``; ``page_size=8192`` and
  incremental auto-vacuum on a new file, before the first table.
- pysqlite's own transaction handling is switched off (``isolation_level=None``) and nicd emits ``BEGIN``
  itself: ``BEGIN IMMEDIATE`` on the writer, so a write transaction never fails with
  ``SQLITE_BUSY_SNAPSHOT`` on its first write.
- One writer connection per process, used under a lock (SQLite allows one writer at a time anyway, and
  a single writing connection also keeps clear of the WAL-reset bug of SQLite < 3.51.3).
- Readers open the file with ``mode=ro``: they cannot write nor checkpoint.
- A lock file (``<db>.lock``, ``flock``) makes the daemon and ``nicd scan`` the one writer.

Other databases (PostgreSQL) go through the same API with SQLAlchemy's defaults.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import threading
from typing import Iterator
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool, StaticPool

from ..errors import StorageError

log = logging.getLogger("nicd.store")

BUSY_TIMEOUT_MS = 10_000


class SchemaError(StorageError):
    """The database schema is not at the revision this nicd needs (run `nicd db upgrade`)."""

    code = "E_SCHEMA"


class LockedError(StorageError):
    """Another nicd process (the daemon, or a scan) is writing to this database."""

    code = "E_LOCKED"


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str | URL) -> str | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if db.startswith("file:"):
        db = db[5:]
    if not db or db == ":memory:":
        return None
    return os.path.abspath(os.path.expanduser(db))


def redact(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_creator(path: str, *, readonly: bool):
    target = f"file:{quote(path)}?mode=ro" if readonly else f"file:{quote(path)}?mode=rwc"

    def connect():
        con = sqlite3.connect(
            target,
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            isolation_level=None,  # no implicit BEGIN/COMMIT from the sqlite3 module
        )
        return con

    return connect


def _install_sqlite_events(engine: Engine, *, writer: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no branch
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            if writer:
                # Both are no-ops once the file has tables; they must come before the first table.
                cur.execute("PRAGMA page_size=8192")
                cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
            else:
                cur.execute("PRAGMA query_only=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no branch
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def create_writer_engine(url: str | URL) -> Engine:
    """The engine the daemon (or a scan) writes through. Creates the SQLite file's folder if needed."""
    path = sqlite_file(url)
    if is_sqlite(url):
        if path is None:
            raise StorageError("storage.database: an in-memory SQLite database cannot be shared; give a file", code="E_STORAGE_URL")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the database folder {os.path.dirname(path)}: {exc.strerror}", code="E_STORAGE_OPEN", path=path) from None
        engine = create_engine("sqlite://", creator=_sqlite_creator(path, readonly=False), poolclass=StaticPool)
        _install_sqlite_events(engine, writer=True)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def create_reader_engine(url: str | URL) -> Engine:
    """A read-only engine (``mode=ro`` for SQLite): for `nicd status`, reports and other readers."""
    path = sqlite_file(url)
    if is_sqlite(url):
        if path is None:
            raise StorageError("storage.database: an in-memory SQLite database cannot be shared; give a file", code="E_STORAGE_URL")
        engine = create_engine("sqlite://", creator=_sqlite_creator(path, readonly=True), poolclass=NullPool)
        _install_sqlite_events(engine, writer=False)
        return engine
    return create_engine(url, pool_pre_ping=True, poolclass=NullPool)


def translate_db_error(exc: BaseException) -> StorageError:
    """Turn a driver error into a StorageError with a stable code (E_NO_SPACE, E_DB_BUSY, ...)."""
    orig = getattr(exc, "orig", exc)
    text = str(orig)
    low = text.lower()
    if isinstance(orig, OSError) and orig.errno == errno.ENOSPC or "database or disk is full" in low or "no space" in low:
        return StorageError(f"database: disk full ({text})", code="E_NO_SPACE")
    if "database is locked" in low or "busy" in low:
        # the driver's own words ("database is locked") would read as a failure of nicd's locking
        return StorageError(f"database: another process kept it busy for more than {BUSY_TIMEOUT_MS // 1000} s; try again",
                            code="E_DB_BUSY")
    if "readonly" in low or "read-only" in low:
        return StorageError(f"database: read-only ({text})", code="E_DB_READONLY")
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return StorageError(f"database: damaged ({text})", code="E_DB_CORRUPT")
    if "unable to open" in low:
        return StorageError(f"database: cannot open ({text})", code="E_STORAGE_OPEN")
    return StorageError(f"database error: {text}", code="E_STORAGE")


class WriterLock:
    """An exclusive ``flock`` on ``<db>.lock``: one writing nicd process per SQLite database.

    The lock is released by the kernel when the process dies (even by SIGKILL), so it never goes stale.
    """

    def __init__(self, db_path: str):
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError):
                    with open(self.path) as fh:
                        holder = fh.read().strip()
                raise LockedError(
                    f"another nicd process is writing to this database ({holder or 'unknown pid'}); "
                    "stop it first (e.g. `systemctl stop nicd`)",
                    path=self.path,
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


class Store:
    """The writer side of the database: one engine, one lock, short ``BEGIN IMMEDIATE`` transactions."""

    def __init__(self, url: str | URL, *, take_lock: bool = True):
        self.url = str(url)
        self.sqlite_path = sqlite_file(url)
        self.dialect = make_url(url).get_backend_name()
        self._lock = threading.RLock()
        self._file_lock: WriterLock | None = None
        if take_lock and self.sqlite_path:
            self._file_lock = WriterLock(self.sqlite_path)
            self._file_lock.acquire()
        try:
            self.engine = create_writer_engine(url)
        except BaseException:
            self.close()
            raise

    @property
    def exclusive(self) -> bool:
        """True when this process is known to be the only writer (it holds the SQLite lock file)."""
        return self._file_lock is not None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._lock:
            try:
                with self.engine.connect() as conn:
                    with conn.begin():
                        yield conn
            except DBAPIError as exc:
                raise translate_db_error(exc) from exc

    def write(self):
        """A write transaction (BEGIN IMMEDIATE on SQLite): committed on success, rolled back on any exception."""
        return self._transaction()

    def read(self):
        """A transaction on the writer's connection, for reads that must see this process's own writes."""
        return self._transaction()

    def execute_outside_transaction(self, sql: str, params: tuple = ()) -> list:
        """Run one SQLite statement in autocommit mode (VACUUM, checkpoints, PRAGMAs that refuse transactions)."""
        with self._lock:
            raw = self.engine.raw_connection()
            try:
                cur = raw.driver_connection.execute(sql, params)
                rows = cur.fetchall()
                cur.close()
                return rows
            except sqlite3.Error as exc:
                raise translate_db_error(exc) from exc
            finally:
                raw.close()

    def checkpoint(self) -> None:
        """``PRAGMA wal_checkpoint(TRUNCATE)``: keep the -wal file small (idle time and shutdown)."""
        if self.dialect != "sqlite":
            return
        try:
            self.execute_outside_transaction("PRAGMA wal_checkpoint(TRUNCATE)")
        except StorageError as exc:  # busy readers: try again later
            log.debug("checkpoint skipped: %s", exc)

    def close(self) -> None:
        with self._lock:
            eng = getattr(self, "engine", None)
            if eng is not None:
                eng.dispose()
            if self._file_lock is not None:
                self._file_lock.release()
                self._file_lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
