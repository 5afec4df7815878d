"""nicd's database: models, engines, migrations and the durable job queue.

Library code only (no printing). See ``shared/design/storage.md`` for the reasons behind each choice.
"""

from __future__ import annotations

from .engine import LockedError, SchemaError, Store, create_reader_engine, create_writer_engine, redact, translate_db_error
from .models import JOB_STATES, Base, Bitstream, Content, Daemon, Event, File, Job

__all__ = [
    "Base",
    "Bitstream",
    "Content",
    "Daemon",
    "Event",
    "File",
    "Job",
    "JOB_STATES",
    "LockedError",
    "SchemaError",
    "Store",
    "create_reader_engine",
    "create_writer_engine",
    "redact",
    "translate_db_error",
]
