"""The originals policy: ``keep`` (default) or ``delete``.

``delete`` removes an original only when all of these hold, checked right before the unlink:

- its content's job is ``done`` and the commit is durable (WAL + ``synchronous=FULL``);
- the bitstream read back *from the database* matches its stored SHA-256 and decodes to an image of
  the recorded size (so a damaged blob never justifies a delete);
- the file on disk still holds exactly that content (re-read and re-hashed);
- nicd has never deleted a file at that path before (a file put back by ``nicd restore`` is left alone).

Each delete is logged as ``delete_intent`` before and ``delete_applied`` after (``events`` table); a crash
in between is repaired at the next start (:func:`repair`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable

from sqlalchemy import select

from ..errors import NicdError
from ..fsutil import fsync_dir
from ..store import catalog
from ..store.engine import Store
from ..store.models import Bitstream, Event, File, Job
from .discovery import read_regular_file

log = logging.getLogger("nicd.originals")


class OriginalsPolicy:
    def __init__(self, store: Store, policy: str, codec):
        self.store = store
        self.policy = policy
        self.codec = codec
        self.deleted = 0

    def apply(self, shas: Iterable[str] | None = None, should_stop=lambda: False) -> int:
        """Apply the policy to the given contents (or every eligible file). Returns the number deleted."""
        if self.policy != "delete":
            return 0
        with self.store.read() as conn:
            q = (
                select(File.path, File.content_sha256)
                .join(Job, Job.content_sha256 == File.content_sha256)
                .where(File.state == "hashed", Job.state == "done")
                .order_by(File.id)
            )
            if shas is not None:
                shas = list(shas)
                if not shas:
                    return 0
                q = q.where(File.content_sha256.in_(shas))
            rows = conn.execute(q).all()
            done_before = set(conn.execute(select(Event.path).where(Event.kind == "delete_applied")).scalars())
        n = 0
        verified: dict[str, bool] = {}
        for path, sha in rows:
            if should_stop():
                break
            if path in done_before:
                continue  # restored by the user after nicd deleted it once: never delete again
            if sha not in verified:
                verified[sha] = self._verify_stored(sha)
            if verified[sha] and self._delete_one(path, sha):
                n += 1
        self.deleted += n
        return n

    def _verify_stored(self, sha: str) -> bool:
        with self.store.read() as conn:
            row = conn.execute(
                select(Bitstream.data, Bitstream.data_sha256, Bitstream.width, Bitstream.height)
                .where(Bitstream.content_sha256 == sha)
            ).first()
        if row is None:
            log.error("content %s is done but has no bitstream: original kept", sha[:12])
            return False
        data = bytes(row.data)
        if hashlib.sha256(data).hexdigest() != row.data_sha256:
            log.error("stored bitstream of %s does not match its checksum: original kept", sha[:12])
            return False
        try:
            image = self.codec.decode(data)
        except NicdError as err:
            log.error("stored bitstream of %s does not decode (%s): original kept", sha[:12], err)
            return False
        if tuple(image.size) != (row.width, row.height):
            log.error("stored bitstream of %s decodes to %s, expected %sx%s: original kept", sha[:12], image.size, row.width, row.height)
            return False
        return True

    def _delete_one(self, path: str, sha: str) -> bool:
        try:
            data, _ = read_regular_file(path)
        except NicdError:
            return False
        if hashlib.sha256(data).hexdigest() != sha:
            with self.store.write() as conn:
                catalog.mark_rehash(conn, path)
            return False
        with self.store.write() as conn:
            catalog.add_event(conn, "delete_intent", path=path, sha256=sha)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete original %s: %s", path, exc.strerror or exc)
            with self.store.write() as conn:
                catalog.add_event(conn, "delete_failed", path=path, sha256=sha, detail=str(exc))
            return False
        fsync_dir(os.path.dirname(path))
        with self.store.write() as conn:
            catalog.mark_deleted(conn, path, sha)
        log.info("deleted original %s (bitstream stored and verified)", path)
        return True


def repair(store: Store) -> int:
    """At start: finish deletes interrupted between intent and applied. Returns the number repaired."""
    with store.read() as conn:
        intents = conn.execute(
            select(Event.path, Event.content_sha256).where(Event.kind == "delete_intent")
        ).all()
        applied = set(conn.execute(select(Event.path).where(Event.kind.in_(("delete_applied", "delete_failed")))).scalars())
    n = 0
    for path, sha in intents:
        if path in applied or os.path.lexists(path):
            continue  # not deleted yet: the normal policy pass will do it (or it was restored)
        with store.write() as conn:
            catalog.mark_deleted(conn, path, sha, detail="repaired at start")
        n += 1
    return n


