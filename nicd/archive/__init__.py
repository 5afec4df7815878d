"""The archive side of nicd: what an operator does with the database the daemon fills.

- :func:`nicd.archive.restore.restore` — decode stored bitstreams back to image files;
- :func:`nicd.archive.report.report` — per-folder and total savings and quality figures;
- :func:`nicd.archive.check.check` — verify every stored bitstream (checksums; with ``full``, a decode).

All three only *read* the database, through :class:`Reader`: a read-only engine (SQLite opened with
``mode=ro`` + ``query_only``, so these commands can neither write nor checkpoint), short read
transactions (one per blob, so a long restore never pins the WAL and the daemon's checkpoints still
complete), ``busy_timeout`` and a retry on top of it, so that no reader ever fails with "database is
locked" while the daemon writes (in WAL mode a reader never waits for the writer anyway; the retry
covers the rare moments when SQLite briefly needs an exclusive lock, e.g. WAL recovery).

Library code: never prints, raises :class:`nicd.errors.NicdError` subclasses with stable codes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable, TypeVar

from sqlalchemy import and_, func, or_
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ..config import Config
from ..errors import StorageError

__all__ = ["Reader", "normalize_path", "path_filter"]

T = TypeVar("T")

# A read that still meets a lock after BUSY_TIMEOUT_MS is tried again this many times.
BUSY_RETRIES = 3


def normalize_path(path: str | os.PathLike) -> str:
    """The absolute, normalised form the store records paths in (no symlink resolution)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def path_filter(column, path: str, dialect: str = "sqlite"):
    """SQL condition: ``column`` is ``path`` or lies under the folder ``path`` (whole components only:
    ``/a/b`` is not under ``/a/bc``).

    Not LIKE, which is inexact (SQLite's ignores ASCII case; ``%`` and ``_`` are wildcards). On SQLite
    (binary collation) a range on the string — ``p/`` <= x < ``p0``, since ``0`` follows ``/`` — which
    the unique index on ``files.path`` serves; elsewhere (a server's collation may not sort bytewise)
    an exact prefix comparison with ``substr``.
    """
    if path == os.sep:
        return column.is_not(None)
    base = path.rstrip(os.sep)
    prefix = base + os.sep
    if dialect == "sqlite":
        return or_(column == base, and_(column >= prefix, column < base + chr(ord(os.sep) + 1)))
    return or_(column == base, func.substr(column, 1, len(prefix)) == prefix)


class Reader:
    """Read-only access to the configured database (see the module docstring).

    ``exists`` is False when the SQLite file has not been created yet; :meth:`run` then must not be
    called (callers return an empty result). The schema is checked on open (``E_SCHEMA``).
    """

    def __init__(self, config: Config):
        from ..store.engine import create_reader_engine, redact, sqlite_file

        self.url = config.storage.database
        self.database = redact(self.url)
        path = sqlite_file(self.url)
        self.exists = path is None or os.path.exists(path)
        self.engine = create_reader_engine(self.url) if self.exists else None
        self.dialect = self.engine.dialect.name if self.engine is not None else "sqlite"
        if self.engine is not None:
            try:
                self.run(self._check_schema)
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _check_schema(conn: Connection) -> None:
        from ..store import migrate

        migrate.check_schema_readonly(conn)

    def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in one short read transaction; driver errors become StorageError with a code.

        A busy database (after SQLite's own ``busy_timeout``) is tried again a few times; if it is
        still busy, the error says so without the driver's wording.
        """
        from ..store.engine import BUSY_TIMEOUT_MS, translate_db_error

        if self.engine is None:
            raise StorageError(f"the database {self.database} does not exist yet", code="E_NO_DATABASE")
        for attempt in range(BUSY_RETRIES + 1):
            try:
                with self.engine.connect() as conn:
                    with conn.begin():
                        return fn(conn)
            except (DBAPIError, sqlite3.Error) as exc:
                err = translate_db_error(exc)
                if err.code != "E_DB_BUSY":
                    raise err from exc
                if attempt == BUSY_RETRIES:
                    waited = (BUSY_RETRIES + 1) * BUSY_TIMEOUT_MS // 1000
                    raise StorageError(
                        f"the database {self.database} stayed busy for more than {waited} s; try again later",
                        code="E_DB_BUSY",
                    ) from None
                time.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
