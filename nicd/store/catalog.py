"""The ``files`` table: what was found where, with which stat signature and which content.

All functions take a Connection inside a write transaction (see :mod:`nicd.store.queue`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .models import Event, File, utcnow
from .queue import enqueue, one_line


@dataclass(frozen=True)
class Signature:
    """What a stat says about a file; a change means the file must be looked at again."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Signature":
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def same_content_hint(self, other: "Signature | None") -> bool:
        """Same size, mtime and file: the content is taken as unchanged (ctime moves on chmod/rename)."""
        return other is not None and (self.size, self.mtime_ns, self.inode, self.dev) == (
            other.size, other.mtime_ns, other.inode, other.dev)


@dataclass(frozen=True)
class KnownFile:
    id: int
    path: str
    state: str
    signature: Signature | None
    content_sha256: str | None
    error_code: str | None


def _sig_values(sig: Signature | None) -> dict:
    if sig is None:
        return {}
    return {"size": sig.size, "mtime_ns": sig.mtime_ns, "ctime_ns": sig.ctime_ns, "inode": sig.inode, "dev": sig.dev}


def _upsert_file(conn: Connection, path: str, root: str, values: dict) -> None:
    now = utcnow()
    row = {"path": path, "root": root, "first_seen": now, "updated_at": now, **values}
    upd = {k: v for k, v in row.items() if k not in ("path", "first_seen")}
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):
        ins = (sqlite if name == "sqlite" else postgresql).insert(File.__table__).values(**row)
        conn.execute(ins.on_conflict_do_update(index_elements=["path"], set_=upd))
        return
    if conn.execute(update(File).where(File.path == path).values(**upd)).rowcount == 0:  # pragma: no cover
        conn.execute(File.__table__.insert().values(**row))


def _row_to_known(r) -> KnownFile:
    sig = None
    if r.size is not None and r.mtime_ns is not None:
        sig = Signature(r.size, r.mtime_ns, r.ctime_ns or 0, r.inode or 0, r.dev or 0)
    return KnownFile(r.id, r.path, r.state, sig, r.content_sha256, r.error_code)


_COLS = (File.id, File.path, File.state, File.size, File.mtime_ns, File.ctime_ns, File.inode, File.dev,
         File.content_sha256, File.error_code)


def get_file(conn: Connection, path: str) -> KnownFile | None:
    r = conn.execute(select(*_COLS).where(File.path == path)).first()
    return _row_to_known(r) if r else None


def files_under(conn: Connection, root: str) -> dict[str, KnownFile]:
    """Every known file of ``root`` (by its recorded root), keyed by path."""
    return {r.path: _row_to_known(r) for r in conn.execute(select(*_COLS).where(File.root == root))}


def record_hashed(
    conn: Connection,
    path: str,
    root: str,
    sig: Signature,
    sha256: str,
    *,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, str]:
    """The file at ``path`` holds content ``sha256``: link it and make sure that content has a job."""
    job_id, job_state = enqueue(conn, sha256, sig.size, width, height)
    _upsert_file(conn, path, root, {**_sig_values(sig), "content_sha256": sha256, "state": "hashed",
                                    "error_code": None, "error_message": None})
    return job_id, job_state


def record_failure(conn: Connection, path: str, root: str, sig: Signature | None, code: str, message: str) -> None:
    """A file-level verdict (not a regular file, permission denied, vanished, never stable, ...)."""
    _upsert_file(conn, path, root, {**_sig_values(sig), "content_sha256": None, "state": "failed",
                                    "error_code": code, "error_message": one_line(message, code)})


def mark_missing(conn: Connection, paths: Iterable[str]) -> int:
    """Files no longer found on an available root. Their bitstreams stay; 'deleted' rows stay 'deleted'."""
    paths = list(paths)
    n = 0
    for i in range(0, len(paths), 500):
        n += conn.execute(
            update(File)
            .where(File.path.in_(paths[i:i + 500]), File.state.in_(("new", "hashed", "failed")))
            .values(state="missing", updated_at=utcnow())
        ).rowcount
    return n


def record_vanished(conn: Connection, path: str, root: str) -> None:
    """A file seen (by an event or a scan) that was gone when nicd came to read it."""
    if conn.execute(select(File.id).where(File.path == path)).first() is not None:
        mark_missing(conn, [path])
        return
    _upsert_file(conn, path, root, {"state": "missing", "error_code": "E_VANISHED",
                                    "error_message": "the file vanished before it could be read"})


def mark_rehash(conn: Connection, path: str) -> None:
    """The file no longer holds the content recorded for it: look at it again."""
    conn.execute(update(File).where(File.path == path, File.state == "hashed").values(state="new", updated_at=utcnow()))


def paths_for_content(conn: Connection, sha256: str, states: tuple[str, ...] = ("hashed",)) -> list[str]:
    return list(conn.execute(
        select(File.path).where(File.content_sha256 == sha256, File.state.in_(states)).order_by(File.id)
    ).scalars())


def mark_deleted(conn: Connection, path: str, sha256: str, detail: str = "") -> bool:
    res = conn.execute(
        update(File).where(File.path == path, File.content_sha256 == sha256, File.state == "hashed")
        .values(state="deleted", updated_at=utcnow())
    )
    add_event(conn, "delete_applied", path=path, sha256=sha256, detail=detail)
    return res.rowcount == 1


def add_event(conn: Connection, kind: str, *, path: str | None = None, sha256: str | None = None, detail: str = "") -> None:
    conn.execute(Event.__table__.insert().values(at=utcnow(), kind=kind, path=path, content_sha256=sha256, detail=detail or None))


def file_counts(conn: Connection) -> dict[str, int]:
    out = {s: 0 for s in ("new", "hashed", "failed", "missing", "deleted")}
    for state, n in conn.execute(select(File.state, func.count()).group_by(File.state)):
        out[state] = n
    return out
