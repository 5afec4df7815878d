"""The durable job queue: one job per distinct content, leases, attempts.

Every function takes a :class:`sqlalchemy.engine.Connection` inside a write transaction (``Store.write()``:
``BEGIN IMMEDIATE`` on SQLite) and does one short piece of work. State changes are single
``UPDATE … WHERE id IN … AND state = …`` statements checked by row count, so a job can never be moved by
someone who does not hold it.

Portable SQL only: the same statements run on SQLite and PostgreSQL. The claim reads candidates with
``SELECT … FOR UPDATE OF jobs SKIP LOCKED`` (SQLAlchemy renders nothing for it on SQLite, where
``BEGIN IMMEDIATE`` already serializes writers), so several machines can share one PostgreSQL queue.

States: ``pending → running → done | failed | skipped``; a ``running`` job whose lease expired (its worker
died) goes back to ``pending`` — or to ``failed`` with ``E_TOO_MANY_ATTEMPTS`` once it has been claimed
``max_attempts`` times, so an image that kills the worker cannot loop forever. Claims take the jobs with
the fewest attempts first, so such an image never blocks the head of the queue, and a job interrupted
once is retried in a batch of its own, so it cannot use up the attempts of the jobs batched with it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Sequence

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .models import JOB_STATES, Bitstream, Content, Job, utcnow

MAX_ATTEMPTS = 8  # a kill-looping image is given up after this many claims (systemd restarts in between)
LEASE_SECONDS = 600.0
# A job whose worker already died once while holding it is retried alone: a poison image (one that kills
# the process) then only ever takes itself down, never the rest of its batch.
ISOLATE_AFTER_ATTEMPTS = 1
E_TOO_MANY_ATTEMPTS = "E_TOO_MANY_ATTEMPTS"
E_VANISHED = "E_VANISHED"

__all__ = [
    "ClaimedJob",
    "MAX_ATTEMPTS",
    "LEASE_SECONDS",
    "new_owner",
    "owner_pid",
    "enqueue",
    "claim",
    "complete",
    "fail",
    "release",
    "renew",
    "requeue_expired",
    "counts",
]


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    content_sha256: str
    attempts: int
    size: int
    width: int | None
    height: int | None

    @property
    def megapixels(self) -> float:
        """Pixels from the header read at hashing time; unknown sizes count as 1 MP per 1 MB of file."""
        if self.width and self.height:
            return self.width * self.height / 1e6
        return max(self.size / 1e6, 0.01)


def new_owner() -> str:
    """A lease owner name: ``host:pid:random`` (unique per process start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_pid(owner: str | None) -> tuple[str, int] | None:
    try:
        host, pid, _ = (owner or "").rsplit(":", 2)
        return host, int(pid)
    except ValueError:
        return None


def _insert_ignore(conn: Connection, table, values: dict, index_elements: Sequence[str]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING (SQLite, PostgreSQL); True when a row was inserted."""
    name = conn.dialect.name
    if name == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(index_elements))
    elif name == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=list(index_elements))
    else:  # pragma: no cover - other dialects: a savepoint around a plain insert
        try:
            with conn.begin_nested():
                conn.execute(table.insert().values(**values))
            return True
        except IntegrityError:
            return False
    return conn.execute(stmt).rowcount == 1


def enqueue(conn: Connection, sha256: str, size: int, width: int | None = None, height: int | None = None) -> tuple[int, str]:
    """Make sure the content and its job exist (idempotent). Returns (job id, job state).

    A job that was skipped because its content had vanished from disk is made pending again: the content
    is back.
    """
    now = utcnow()
    _insert_ignore(
        conn,
        Content.__table__,
        {"sha256": sha256, "size": size, "width": width, "height": height, "first_seen": now},
        ["sha256"],
    )
    if width and height:
        conn.execute(
            update(Content).where(Content.sha256 == sha256, Content.width.is_(None)).values(width=width, height=height)
        )
    _insert_ignore(
        conn,
        Job.__table__,
        {"content_sha256": sha256, "state": "pending", "attempts": 0, "created_at": now, "updated_at": now},
        ["content_sha256"],
    )
    conn.execute(
        update(Job)
        .where(Job.content_sha256 == sha256, Job.state == "skipped", Job.error_code == E_VANISHED)
        .values(state="pending", error_code=None, error_message=None, attempts=0, updated_at=now, finished_at=None)
    )
    row = conn.execute(select(Job.id, Job.state).where(Job.content_sha256 == sha256)).one()
    return row.id, row.state


def claim_candidates_query(limit: int, job_ids: list[int] | None = None):
    """``SELECT … FROM jobs JOIN contents … WHERE state='pending' ORDER BY attempts, id LIMIT n
    FOR UPDATE OF jobs SKIP LOCKED`` (the locking clause is rendered only where the dialect has it)."""
    q = (
        select(Job.id, Job.content_sha256, Job.attempts, Content.size, Content.width, Content.height)
        .join(Content, Content.sha256 == Job.content_sha256)
        .where(Job.state == "pending")
        .order_by(Job.attempts, Job.id)
        # never more rows than a claim can take: on PostgreSQL every row read here stays locked until the
        # claim commits, and the rows locked but not taken would be skipped by the other claimers meanwhile
        .limit(max(limit, 1))
        .with_for_update(skip_locked=True, of=Job.__table__)
    )
    if job_ids is not None:
        q = q.where(Job.id.in_(job_ids))
    return q


def claim(
    conn: Connection,
    owner: str,
    *,
    limit: int = 16,
    max_megapixels: float | None = None,
    lease_seconds: float = LEASE_SECONDS,
    job_ids: Iterable[int] | None = None,
    now: float | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` pending jobs (fewest attempts first), stopping before ``max_megapixels``.

    The first job is always taken, however large, so a big image is processed alone. With ``job_ids``
    only those jobs are considered (``nicd scan`` works through the files it found).
    """
    now = time.time() if now is None else now
    if job_ids is not None:
        job_ids = list(job_ids)
        if not job_ids:
            return []
    rows = conn.execute(claim_candidates_query(limit, job_ids)).all()
    picked: list[ClaimedJob] = []
    total = 0.0
    for r in rows:
        job = ClaimedJob(r.id, r.content_sha256, r.attempts + 1, r.size, r.width, r.height)
        if picked and (len(picked) >= limit or (max_megapixels is not None and total + job.megapixels > max_megapixels)
                       or r.attempts >= ISOLATE_AFTER_ATTEMPTS or picked[0].attempts > ISOLATE_AFTER_ATTEMPTS):
            break
        picked.append(job)
        total += job.megapixels
    if not picked:
        return []
    res = conn.execute(
        update(Job)
        .where(Job.id.in_([j.id for j in picked]), Job.state == "pending")
        .values(
            state="running",
            lease_owner=owner,
            lease_expires_at=now + lease_seconds,
            attempts=Job.attempts + 1,
            updated_at=utcnow(),
        )
    )
    if res.rowcount != len(picked):  # pragma: no cover - only without row locks (other dialects)
        got = set(
            conn.execute(
                select(Job.id).where(Job.id.in_([j.id for j in picked]), Job.lease_owner == owner, Job.state == "running")
            ).scalars()
        )
        picked = [j for j in picked if j.id in got]
    return picked


def one_line(message: str | None, default: str = "") -> str:
    lines = (message or "").strip().splitlines()
    return (lines[0] if lines else default)[:1000]


def _held(job_id: int, owner: str):
    return and_(Job.id == job_id, Job.state == "running", Job.lease_owner == owner)


def complete(conn: Connection, job_id: int, owner: str, bitstream: dict) -> bool:
    """Mark the job done and store its bitstream, in the caller's transaction.

    Returns False (and writes nothing) when the job is no longer held by ``owner`` (lease lost).
    """
    now = utcnow()
    res = conn.execute(
        update(Job)
        .where(_held(job_id, owner))
        .values(state="done", lease_owner=None, lease_expires_at=None, error_code=None, error_message=None,
                updated_at=now, finished_at=now)
    )
    if res.rowcount != 1:
        return False
    values = dict(bitstream)
    values.setdefault("created_at", now)
    conn.execute(Bitstream.__table__.insert().values(**values))
    return True


def fail(conn: Connection, job_id: int, owner: str, code: str, message: str, *, state: str = "failed") -> bool:
    """Record a verdict without a bitstream: ``failed`` (or ``skipped``) with an error code and a one-line message."""
    if state not in ("failed", "skipped"):
        raise ValueError(state)
    now = utcnow()
    res = conn.execute(
        update(Job)
        .where(_held(job_id, owner))
        .values(state=state, lease_owner=None, lease_expires_at=None, error_code=code,
                error_message=one_line(message, code), updated_at=now, finished_at=now)
    )
    return res.rowcount == 1


def release(conn: Connection, owner: str, job_ids: Iterable[int] | None = None, *, count_attempt: bool = False) -> int:
    """Give leased jobs back as pending, by default without counting the attempt (clean shutdown,
    transient errors); ``count_attempt`` keeps it counted, for an error that may recur on that job (its
    caller gives up on it after ``MAX_ATTEMPTS``)."""
    q = update(Job).where(Job.state == "running", Job.lease_owner == owner)
    if job_ids is not None:
        ids = list(job_ids)
        if not ids:
            return 0
        q = q.where(Job.id.in_(ids))
    uncounted = func.max(Job.attempts - 1, 0) if conn.dialect.name == "sqlite" else func.greatest(Job.attempts - 1, 0)
    res = conn.execute(
        q.values(state="pending", lease_owner=None, lease_expires_at=None,
                 attempts=Job.attempts if count_attempt else uncounted, updated_at=utcnow())
    )
    return res.rowcount


def renew(conn: Connection, owner: str, job_ids: Iterable[int], lease_seconds: float = LEASE_SECONDS, now: float | None = None) -> int:
    ids = list(job_ids)
    if not ids:
        return 0
    now = time.time() if now is None else now
    res = conn.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.state == "running", Job.lease_owner == owner)
        .values(lease_expires_at=now + lease_seconds, updated_at=utcnow())
    )
    return res.rowcount


def requeue_expired(
    conn: Connection,
    *,
    now: float | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    current_owner: str | None = None,
    exclusive: bool = False,
) -> dict[str, int]:
    """Recover jobs whose worker died: expired leases (any database) or, when ``exclusive`` (this process
    holds the SQLite writer lock, so every other owner is dead), every lease not held by ``current_owner``.

    Jobs already claimed ``max_attempts`` times become ``failed`` with ``E_TOO_MANY_ATTEMPTS``.
    """
    now = time.time() if now is None else now
    dead = Job.lease_expires_at < now
    if exclusive:
        dead = (Job.lease_owner != current_owner) | Job.lease_owner.is_(None) | dead if current_owner else Job.state == "running"
    base = and_(Job.state == "running", dead)
    ts = utcnow()
    failed = conn.execute(
        update(Job)
        .where(base, Job.attempts >= max_attempts)
        .values(state="failed", lease_owner=None, lease_expires_at=None, error_code=E_TOO_MANY_ATTEMPTS,
                error_message=f"the worker stopped {max_attempts} times while coding this image (crash, kill or out of memory); not retried",
                updated_at=ts, finished_at=ts)
    ).rowcount
    requeued = conn.execute(
        update(Job).where(base).values(state="pending", lease_owner=None, lease_expires_at=None, updated_at=ts)
    ).rowcount
    return {"requeued": requeued, "failed": failed}


def counts(conn: Connection) -> dict[str, int]:
    """``{"pending": n, "running": n, "done": n, "failed": n, "skipped": n}`` (every state present)."""
    out = {s: 0 for s in JOB_STATES}
    for state, n in conn.execute(select(Job.state, func.count()).group_by(Job.state)):
        out[state] = n
    return out
