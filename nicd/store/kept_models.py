"""The ``codec_models`` table: the archive's own copy of every model its bitstreams were written with.

A bitstream names its model by the SHA-256 of the model's file. Upgrading nicd replaces the installed
models, so an archive that relied on them alone could no longer decode what it stored before, and
with the ``delete`` policy the originals are gone. The daemon therefore stores a model's file here in
the same transaction as the first bitstream written with it (and, at start, for bitstreams written
before this table existed while their model is still installed); decoding falls back on this copy.

All functions take a Connection: writers inside a write transaction (see :mod:`nicd.store.queue`).
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ..errors import StorageError
from .models import Bitstream, KeptModel, utcnow


def keep(conn: Connection, model_id: str, sha256: str, data: bytes) -> bool:
    """Store a model's file unless it is already kept. True when it was stored now."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"the bytes given for model {model_id} are not its file", code="E_MODEL_HASH")
    if is_kept(conn, sha256):
        return False
    row = {"sha256": sha256, "model_id": model_id, "data": data, "kept_at": utcnow()}
    name = conn.dialect.name
    if name in ("sqlite", "postgresql"):  # two daemons on one PostgreSQL may race to keep the same model
        ins = (sqlite if name == "sqlite" else postgresql).insert(KeptModel.__table__).values(**row)
        return conn.execute(ins.on_conflict_do_nothing(index_elements=["sha256"])).rowcount == 1
    conn.execute(KeptModel.__table__.insert().values(**row))  # pragma: no cover
    return True


def is_kept(conn: Connection, sha256: str) -> bool:
    return conn.execute(select(KeptModel.sha256).where(KeptModel.sha256 == sha256)).first() is not None


def fetch(conn: Connection, sha256: str) -> tuple[str, bytes] | None:
    """(model id, file bytes) of a kept model, or None."""
    row = conn.execute(select(KeptModel.model_id, KeptModel.data).where(KeptModel.sha256 == sha256)).first()
    return None if row is None else (row[0], bytes(row[1]))


def kept(conn: Connection) -> list[tuple[str, str, int]]:
    """(model id, SHA-256, size in bytes) of every kept model file."""
    rows = conn.execute(select(KeptModel.model_id, KeptModel.sha256, func.length(KeptModel.data))
                        .order_by(KeptModel.model_id))
    return [(model_id, sha, int(size)) for model_id, sha, size in rows]


def unkept_in_use(conn: Connection) -> list[str]:
    """Model ids that stored bitstreams name but the archive does not keep."""
    kept_ids = select(KeptModel.model_id)
    rows = conn.execute(select(Bitstream.model).where(Bitstream.model.not_in(kept_ids)).distinct())
    return sorted(r[0] for r in rows)
