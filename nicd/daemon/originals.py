"""The originals policy: ``keep`` (default) or ``delete``.

``delete`` removes an original only when all of these hold, checked right before the unlink:

- its content's job is ``done`` and the commit is durable (WAL + ``synchronous=FULL``);
- the bitstream read back *from the database* matches its stored SHA-256 and decodes to an image of
  the recorded size (so a damaged blob never justifies a delete), with the model file the archive keeps
  for it (so the archive alone restores the image, whatever models a later nicd installs);
- the file on disk still holds exactly that content (re-read and re-hashed);
- nicd has never deleted a file at that path before (a file put back by ``nicd restore`` is left alone).

Each delete is logged as ``delete_intent`` before and ``delete_applied`` after (``events`` table); a crash
in between is repaired at the next start (:func:`repair`).

The delete never removes "whatever is at the path now": the path is first renamed to a hidden name in
the same folder (``.nicd-del-<token>``, recorded in the intent), which pins one file; that file is read
through a descriptor (no symlink followed) and unlinked only when it holds exactly the verified content.
Anything else is put back with ``link`` (which never overwrites): an editor's new version saved in the
window between the check and the delete survives. Policy passes are serialized (one lock per policy).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import stat
import threading
from typing import Iterable

from sqlalchemy import select

from .. import faults
from ..errors import NicdError
from ..fsutil import fsync_dir
from ..store import catalog, kept_models
from ..store.engine import Store
from ..store.models import Bitstream, Event, File, Job
from .discovery import read_regular_file

log = logging.getLogger("nicd.originals")

DEL_PREFIX = ".nicd-del-"  # hidden (dotfile) names: never ingested by discovery
RECOVERED_INFIX = ".nicd-recovered-"
_RESOLVING = ("delete_applied", "delete_failed", "delete_aborted")


class OriginalsPolicy:
    def __init__(self, store: Store, policy: str, codec):
        self.store = store
        self.policy = policy
        self.codec = codec
        self.deleted = 0
        self._lock = threading.RLock()  # one pass at a time (worker, sweep and discovery all call apply)

    def apply(self, shas: Iterable[str] | None = None, should_stop=lambda: False) -> int:
        """Apply the policy to the given contents (or every eligible file). Returns the number deleted."""
        if self.policy != "delete":
            return 0
        with self._lock:
            return self._apply(shas, should_stop)

    def _apply(self, shas, should_stop) -> int:
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
        from ..codec import container

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
            codec = self._kept_codec(container.peek_header(data).model_hash.hex())
            if codec is None:
                log.error("the model of the bitstream of %s is not kept in the archive: original kept", sha[:12])
                return False
            image = codec.decode(data)
        except Exception as err:  # noqa: BLE001 - any decoder failure means: keep the original
            log.error("stored bitstream of %s does not decode (%s: %s): original kept", sha[:12], type(err).__name__, err)
            return False
        if tuple(image.size) != (row.width, row.height):
            log.error("stored bitstream of %s decodes to %s, expected %sx%s: original kept", sha[:12], image.size, row.width, row.height)
            return False
        return True

    def _kept_codec(self, model_sha: str):
        """The codec of the archive's own copy of a model, or None when the archive does not keep it."""
        with self.store.read() as conn:
            got = kept_models.fetch(conn, model_sha)
        if got is None or hashlib.sha256(got[1]).hexdigest() != model_sha:
            return None
        if model_sha == self.codec.info.sha256:  # the very bytes the loaded codec was built from
            return self.codec
        from ..codec.api import codec_from_bytes

        return codec_from_bytes(got[0], got[1], self.codec.device.type)

    def _delete_one(self, path: str, sha: str) -> bool:
        try:
            data, _ = read_regular_file(path)
        except NicdError:
            return False
        if hashlib.sha256(data).hexdigest() != sha:
            with self.store.write() as conn:
                catalog.mark_rehash(conn, path)
            return False
        del data
        folder = os.path.dirname(path)
        tmp_name = DEL_PREFIX + secrets.token_hex(8)
        tmp = os.path.join(folder, tmp_name)
        with self.store.write() as conn:  # durable before the rename: repair() finds the hidden name
            catalog.add_event(conn, "delete_intent", path=path, sha256=sha, detail=tmp_name)
        faults.point("originals.after-intent")
        try:
            os.rename(path, tmp)  # pins one file: whatever is at the path from now on is not touched
        except FileNotFoundError:
            with self.store.write() as conn:
                catalog.add_event(conn, "delete_aborted", path=path, sha256=sha, detail="vanished before the delete")
            return False
        except OSError as exc:
            log.warning("cannot delete original %s: %s", path, exc.strerror or exc)
            with self.store.write() as conn:
                catalog.add_event(conn, "delete_failed", path=path, sha256=sha, detail=str(exc))
            return False
        faults.point("originals.hidden")
        try:
            held = _hash_pinned(tmp)
        except OSError as exc:
            held = None
            log.warning("cannot re-read %s before deleting it: %s", path, exc.strerror or exc)
        if held is None or held[0] != sha:
            # not the verified content (replaced just now, or unreadable): put it back, never delete it
            where = _put_back(tmp, path)
            with self.store.write() as conn:
                catalog.add_event(conn, "delete_aborted", path=path, sha256=sha,
                                  detail="content changed before the delete" + ("" if where == path else f"; kept as {where}"))
                catalog.mark_rehash(conn, path)
            return False
        try:
            lst = os.lstat(tmp)
            if (lst.st_ino, lst.st_dev) != (held[1].st_ino, held[1].st_dev):
                raise OSError(errno.ESTALE, "the hidden file was replaced")
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot delete original %s: %s", path, exc.strerror or exc)
            where = _put_back(tmp, path)
            with self.store.write() as conn:
                catalog.add_event(conn, "delete_failed", path=path, sha256=sha,
                                  detail=str(exc) + ("" if where == path else f"; kept as {where}"))
            return False
        fsync_dir(folder)
        faults.point("originals.after-unlink")
        with self.store.write() as conn:
            catalog.mark_deleted(conn, path, sha)
        log.info("deleted original %s (bitstream stored and verified)", path)
        return True


def _hash_pinned(tmp: str) -> tuple[str, os.stat_result] | None:
    """SHA-256 of the regular file at ``tmp`` (opened without following a symlink) and its fstat;
    None when it is not a regular file or changed while being read."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        os.set_blocking(fd, True)
        h = hashlib.sha256()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return None
    return h.hexdigest(), after


def _put_back(tmp: str, path: str) -> str:
    """Move the hidden file ``tmp`` back to ``path`` without ever overwriting anything there.
    Returns where the file is now: ``path``, or a visible recovery name next to it when the path is taken."""
    try:
        os.link(tmp, path, follow_symlinks=False)  # the hidden entry itself, even a symlink
    except FileExistsError:
        pass
    except OSError:
        # no hard links on this filesystem: rename when nothing is there (tiny window, logged below if lost)
        if not os.path.lexists(path):
            try:
                os.rename(tmp, path)
                fsync_dir(os.path.dirname(path))
                return path
            except OSError:
                pass
    else:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fsync_dir(os.path.dirname(path))
        return path
    recovery = _recovery_name(path)
    try:
        os.rename(tmp, recovery)
    except OSError as exc:
        log.error("%s is taken: its previous file is kept as %s (%s)", path, tmp, exc.strerror or exc)
        return tmp
    fsync_dir(os.path.dirname(path))
    log.error("%s was taken by a new file while nicd held the previous one: that one is kept as %s", path, recovery)
    return recovery


def _recovery_name(path: str) -> str:
    for _ in range(100):
        cand = f"{path}{RECOVERED_INFIX}{secrets.token_hex(4)}"
        if not os.path.lexists(cand):
            return cand
    return f"{path}{RECOVERED_INFIX}{secrets.token_hex(16)}"


def repair(store: Store) -> int:
    """At start: finish deletes interrupted between intent and outcome. Returns the number repaired.

    Events pair by order: an intent is open when no applied/failed/aborted event for its path follows
    it. A hidden ``.nicd-del-*`` file left by an open intent is always put back (to its path when that
    is free, else under a visible recovery name): whether it was verified is not known, so it is never
    deleted here. A path that is gone with no hidden file left was unlinked after the check: done.
    """
    with store.read() as conn:
        events = conn.execute(
            select(Event.id, Event.kind, Event.path, Event.content_sha256, Event.detail)
            .where(Event.kind.in_(("delete_intent",) + _RESOLVING)).order_by(Event.id)
        ).all()
    open_intents: dict[str, tuple] = {}
    for ev in events:
        if ev.kind == "delete_intent":
            open_intents[ev.path] = ev
        else:
            open_intents.pop(ev.path, None)
    n = 0
    for path, ev in open_intents.items():
        sha = ev.content_sha256
        tmp = None
        if ev.detail and ev.detail.startswith(DEL_PREFIX) and "/" not in ev.detail:
            tmp = os.path.join(os.path.dirname(path), ev.detail)
        if tmp is not None and os.path.lexists(tmp):
            where = _put_back(tmp, path)
            with store.write() as conn:
                catalog.add_event(conn, "delete_aborted", path=path, sha256=sha,
                                  detail="interrupted; put back at start" + ("" if where == path else f"; kept as {where}"))
                catalog.mark_rehash(conn, path)
            log.warning("interrupted delete of %s: the file was put back%s", path, "" if where == path else f" as {where}")
            n += 1
        elif os.path.lexists(path):
            with store.write() as conn:  # never renamed: the normal policy pass will look at it again
                catalog.add_event(conn, "delete_aborted", path=path, sha256=sha, detail="interrupted before the delete")
            n += 1
        else:
            with store.write() as conn:
                catalog.mark_deleted(conn, path, sha, detail="repaired at start")
            n += 1
    return n
