"""Alembic, driven from code: ``nicd db upgrade`` and the schema check at start.

The migration scripts live in ``migrations/`` at the repository root. A source checkout or an editable
install finds them next to the package; a wheel installs them as data files under
``<prefix>/share/nicd/migrations`` (as the models go to ``share/nicd/models``). ``$NICD_MIGRATIONS``
overrides both.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from ..errors import StorageError
from .engine import SchemaError, Store, redact

log = logging.getLogger("nicd.store")

UPGRADE_HINT = "run `nicd db upgrade`"


def migrations_dir() -> Path:
    env = os.environ.get("NICD_MIGRATIONS")
    pkg = Path(__file__).resolve().parent.parent  # .../nicd
    candidates = ([Path(env)] if env else []) + [
        pkg.parent / "migrations",  # a source checkout or an editable install
        Path(sys.prefix) / "share" / "nicd" / "migrations",  # a wheel install (data-files)
    ]
    for c in candidates:
        if (c / "env.py").is_file() and (c / "versions").is_dir():
            return c
    raise StorageError(
        "the database migrations are missing from this installation (looked in "
        + ", ".join(str(c) for c in candidates)
        + ")",
        code="E_MIGRATIONS_MISSING",
    )


def alembic_config(url: str | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:  # pragma: no cover - guarded by tests on the migration graph
        raise StorageError(f"the migrations have {len(heads)} heads; expected one", code="E_MIGRATIONS")
    return heads[0]


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def is_empty(conn: Connection) -> bool:
    return not (set(inspect(conn).get_table_names()) - {"alembic_version"})


def schema_state(conn: Connection) -> dict:
    cur = current_revision(conn)
    head = head_revision()
    return {"current": cur, "head": head, "ok": cur == head, "empty": cur is None and is_empty(conn)}


def _backup_sqlite(store: Store, rev: str | None) -> str | None:
    """``VACUUM INTO 'nicd.db.pre-<rev>.bak'`` before changing a schema that holds data."""
    if not store.sqlite_path:
        return None
    dest = f"{store.sqlite_path}.pre-{rev or 'base'}-{time.strftime('%Y%m%d%H%M%S')}.bak"
    store.execute_outside_transaction("VACUUM INTO ?", (dest,))
    return dest


def upgrade(store: Store, revision: str = "head") -> dict:
    """Apply the migrations up to ``revision``. Returns {"from", "to", "backup"}."""
    with store.read() as conn:
        before = current_revision(conn)
        empty = before is None and is_empty(conn)
    head = head_revision() if revision == "head" else revision
    if before == head:
        return {"from": before, "to": head, "backup": None, "changed": False}
    backup = None if empty else _backup_sqlite(store, before)
    cfg = alembic_config(redact(store.url))
    sqlite = store.dialect == "sqlite"
    with store._lock:
        if sqlite:
            # Batch (move-and-copy) migrations must not cascade: foreign keys off, outside a transaction.
            store.execute_outside_transaction("PRAGMA foreign_keys=OFF")
        try:
            with store.engine.connect() as conn:
                cfg.attributes["connection"] = conn
                try:
                    command.upgrade(cfg, revision)
                    if sqlite:
                        bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if bad:
                            raise StorageError(f"migration left {len(bad)} broken foreign keys", code="E_MIGRATIONS")
                except BaseException:
                    if conn.in_transaction():
                        conn.rollback()
                    raise
                if conn.in_transaction():
                    conn.commit()
        finally:
            if sqlite:
                store.execute_outside_transaction("PRAGMA foreign_keys=ON")
    log.info("database upgraded from %s to %s%s", before or "empty", head, f" (backup {backup})" if backup else "")
    return {"from": before, "to": head, "backup": backup, "changed": True}


def downgrade(store: Store, revision: str = "base") -> None:
    """Undo migrations down to ``revision`` ("base" = an empty database). For tests and rollbacks."""
    cfg = alembic_config()
    with store._lock, store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()


def ensure_schema(store: Store, *, create_if_empty: bool = True) -> dict:
    """At start: a new empty database is created at head; any other revision than head is refused."""
    with store.read() as conn:
        state = schema_state(conn)
    if state["ok"]:
        return state
    if state["empty"] and create_if_empty:
        upgrade(store)
        with store.read() as conn:
            return schema_state(conn)
    if state["current"] is None:
        raise SchemaError(
            f"the database {redact(store.url)} has tables but no nicd schema revision; is it a nicd database?",
            code="E_SCHEMA",
        )
    raise SchemaError(
        f"the database schema is at revision {state['current']}, this nicd needs {state['head']}: {UPGRADE_HINT}",
        code="E_SCHEMA",
    )


def check_schema_readonly(conn: Connection) -> dict:
    """For readers: raise SchemaError unless the schema is at head."""
    state = schema_state(conn)
    if not state["ok"]:
        raise SchemaError(
            f"the database schema is at revision {state['current'] or 'none'}, this nicd needs {state['head']}: {UPGRADE_HINT}",
        )
    return state


def integrity_check(conn: Connection) -> list[str]:
    """``PRAGMA integrity_check`` rows ('ok' when healthy); empty list on other databases."""
    if conn.dialect.name != "sqlite":
        return []
    return [r[0] for r in conn.execute(text("PRAGMA integrity_check")).fetchall()]
