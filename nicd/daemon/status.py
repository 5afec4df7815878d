"""``nicd status``: what the daemon is doing, from the database only (read-only connection)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from ..config import Config
from ..errors import StorageError
from ..store import catalog, migrate, queue
from ..store.engine import create_reader_engine, redact, sqlite_file, translate_db_error
from ..store.models import JOB_STATES, Bitstream, Daemon, File, Job

HEARTBEAT_STALE_SECONDS = 30.0


def _empty(url: str, exists: bool) -> dict:
    return {
        "database": redact(url),
        "database_exists": exists,
        "schema": None,
        "daemon": {"state": "not running"},
        "jobs": {s: 0 for s in JOB_STATES},
        "files": {},
        "totals": {"images": 0, "original_bytes": 0, "nicd_bytes": 0, "jpeg_bytes_at_equal_ssim": 0},
        "throughput": {"images_last_hour": 0, "images_per_minute": 0.0, "original_bytes_per_second": 0.0},
        "recent_failures": [],
    }


def status(config: Config) -> dict:
    """``{"jobs": {"pending": n, "running": n, "done": n, "failed": n, "skipped": n}, "daemon": {...},
    "files": {...}, "totals": {...}, "throughput": {...}, "recent_failures": [...], ...}``.

    Never writes: SQLite is opened with ``mode=ro``. A database that does not exist yet gives zeros.
    Raises SchemaError when the schema is not the one this nicd needs.
    """
    url = config.storage.database
    path = sqlite_file(url)
    if path is not None and not os.path.exists(path):
        return _empty(url, False)
    engine = create_reader_engine(url)
    try:
        with engine.connect() as conn:
            try:
                state = migrate.check_schema_readonly(conn)
                out = _empty(url, True)
                out["schema"] = {"current": state["current"], "head": state["head"]}
                out["jobs"] = queue.counts(conn)
                out["files"] = catalog.file_counts(conn)
                out["daemon"] = _daemon(conn)
                n, ob, nb, jb = conn.execute(select(
                    func.count(Bitstream.id), func.coalesce(func.sum(Bitstream.original_bytes), 0),
                    func.coalesce(func.sum(Bitstream.nicd_bytes), 0),
                    func.coalesce(func.sum(Bitstream.jpeg_bytes_at_equal_ssim), 0))).one()
                out["totals"] = {"images": n, "original_bytes": int(ob), "nicd_bytes": int(nb),
                                 "jpeg_bytes_at_equal_ssim": int(jb)}
                since = datetime.now(timezone.utc) - timedelta(hours=1)
                hn, hb = conn.execute(select(func.count(Bitstream.id), func.coalesce(func.sum(Bitstream.original_bytes), 0))
                                      .where(Bitstream.created_at >= since)).one()
                out["throughput"] = {"images_last_hour": hn, "images_per_minute": round(hn / 60.0, 3),
                                     "original_bytes_per_second": round(int(hb) / 3600.0, 1)}
                a_path = (select(func.min(File.path)).where(File.content_sha256 == Job.content_sha256)
                          .correlate(Job).scalar_subquery())
                fails = conn.execute(
                    select(a_path, Job.error_code, Job.error_message, Job.finished_at, Job.content_sha256)
                    .where(Job.state == "failed").order_by(Job.finished_at.desc()).limit(5)).all()
                file_fails = conn.execute(
                    select(File.path, File.error_code, File.error_message, File.updated_at)
                    .where(File.state == "failed").order_by(File.updated_at.desc()).limit(5)).all()
                out["recent_failures"] = (
                    [{"path": r[0], "content_sha256": r[4], "code": r[1], "message": r[2], "at": _iso(r[3])} for r in fails]
                    + [{"path": r[0], "code": r[1], "message": r[2], "at": _iso(r[3])} for r in file_fails]
                )
                return out
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - driver errors become StorageError with a code
                raise translate_db_error(exc) from exc
    finally:
        engine.dispose()


def _iso(v) -> str | None:
    return v.isoformat() if v is not None else None


def _daemon(conn) -> dict:
    rows = conn.execute(select(Daemon.owner, Daemon.host, Daemon.pid, Daemon.started_at, Daemon.heartbeat_at, Daemon.state,
                            Daemon.status_text, Daemon.processed, Daemon.bytes_in, Daemon.observer_restarts)
                     .order_by(Daemon.heartbeat_at.desc())).all()
    now = time.time()
    for r in rows:
        age = now - r.heartbeat_at
        if r.state in ("running", "starting") and age < HEARTBEAT_STALE_SECONDS:
            return {"state": "running", "host": r.host, "pid": r.pid, "since": _iso(r.started_at),
                    "heartbeat_age_seconds": round(age, 1), "status": r.status_text, "processed": r.processed,
                    "bytes_in": r.bytes_in, "observer_restarts": r.observer_restarts}
    if rows:
        r = rows[0]
        return {"state": "not running", "last_seen": round(now - r.heartbeat_at, 1),
                "last_state": r.state if r.state != "running" else "died", "status": r.status_text}
    return {"state": "not running"}
