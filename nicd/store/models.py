"""SQLAlchemy 2 models: the whole schema of nicd's database.

- ``contents``: one row per distinct original content (SHA-256 of the file bytes): the identity of a job.
- ``files``: one row per path ever discovered, with its stat signature and the content it held when it
  was last hashed. File-level verdicts (not a regular file, permission, vanished, unstable) live here,
  since such a file has no content hash.
- ``jobs``: one per content: ``pending → running → done | failed | skipped``, with a lease and attempts.
- ``bitstreams``: the ``.nicd`` bytes and their figures, one per content; in their own table so that
  scans and reports never touch blob pages.
- ``codec_models``: the file of every model a stored bitstream was written with, by its SHA-256, so that
  the archive decodes on its own after the installed models are upgraded.
- ``events``: append-only audit of actions on originals (intent / applied).
- ``daemons``: heartbeat of running daemons (``nicd status`` reads it).

Every change is an Alembic migration under ``migrations/``; constraints are named through the naming
convention below so that later batch migrations on SQLite can drop them.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATES = ("pending", "running", "done", "failed", "skipped")
FILE_STATES = ("new", "hashed", "failed", "missing", "deleted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Content(Base):
    __tablename__ = "contents"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)  # from the image header at hashing time (for batching)
    height: Mapped[int | None] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint("state IN ('new','hashed','failed','missing','deleted')", name="state"),
        Index("ix_files_content_sha256", "content_sha256"),
        Index("ix_files_root_state", "root", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    root: Mapped[str] = mapped_column(Text, nullable=False)
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    ctime_ns: Mapped[int | None] = mapped_column(BigInteger)
    inode: Mapped[int | None] = mapped_column(BigInteger)
    dev: Mapped[int | None] = mapped_column(BigInteger)
    content_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("contents.sha256"))
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="new")
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('pending','running','done','failed','skipped')", name="state"),
        Index("ix_jobs_state_attempts_id", "state", "attempts", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_sha256: Mapped[str] = mapped_column(String(64), ForeignKey("contents.sha256"), nullable=False, unique=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)  # unix seconds
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Bitstream(Base):
    __tablename__ = "bitstreams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_sha256: Mapped[str] = mapped_column(String(64), ForeignKey("contents.sha256"), nullable=False, unique=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    data_sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # checked on every read
    original_format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    original_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    nicd_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bpp: Mapped[float] = mapped_column(Float, nullable=False)
    psnr: Mapped[float | None] = mapped_column(Float)
    ssim: Mapped[float | None] = mapped_column(Float)
    ms_ssim: Mapped[float | None] = mapped_column(Float)
    jpeg_bytes_at_equal_ssim: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    quality: Mapped[int | None] = mapped_column(Integer)
    target_ssim: Mapped[float | None] = mapped_column(Float)
    target_psnr: Mapped[float | None] = mapped_column(Float)
    refine_steps: Mapped[int | None] = mapped_column(Integer)  # `codec.refine_steps`; NULL: before it existed
    encode_seconds: Mapped[float | None] = mapped_column(Float)
    decode_seconds: Mapped[float | None] = mapped_column(Float)
    baseline_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class KeptModel(Base):
    __tablename__ = "codec_models"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # of `data`; bitstream headers carry it
    model_id: Mapped[str] = mapped_column(String(200), nullable=False)  # <name>-<first 8 hex digits of sha256>
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # the model's .npz file, byte for byte
    kept_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)  # delete_intent | delete_applied | ...
    path: Mapped[str | None] = mapped_column(Text)
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class Daemon(Base):
    __tablename__ = "daemons"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    heartbeat_at: Mapped[float] = mapped_column(Float, nullable=False)  # unix seconds
    state: Mapped[str] = mapped_column(String(32), nullable=False)  # starting | running | stopping | stopped
    status_text: Mapped[str | None] = mapped_column(Text)
    processed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    observer_restarts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
