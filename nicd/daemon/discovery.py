"""Finding images and turning them into jobs: name filters, the reconcile scan, the settle gate, ingest.

The reconcile scan (``os.scandir``, no symlinks followed) is the truth about what exists; filesystem
events only say where to look sooner (``shared/design/watcher.md``). A file is ingested — read, hashed,
linked to its content, given a job — only once it has not changed for ``settle_seconds`` (by its
mtime/ctime, and by an unchanged stat across the read), so a half-copied file is never coded.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import logging
import os
import stat
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import InputError
from ..store import catalog
from ..store.catalog import Signature
from ..store.engine import Store

log = logging.getLogger("nicd.discovery")

MAX_FILE_BYTES = 2 << 30  # 2 GiB: larger files are refused before being read into memory
MAX_SETTLE_SECONDS = 600.0  # a file still changing after this gets E_UNSTABLE (retried when it changes)
MISSING_GUARD_FRACTION = 0.2  # a scan that would mark more of a root missing is not trusted
MISSING_GUARD_MIN = 10

# Temporary and partial names, always ignored (watcher.md §2.4). Dotfiles include rsync's .name.XXXXXX
# and nicd's own .nicd-tmp-*.
TEMP_FILE_GLOBS = ("*.part", "*.partial", "*.crdownload", "*.tmp", "*.temp", "*.swp", "*.swx", "*~", "~$*",
                   ".*", "*.nicd-tmp-*", "*.download", "*.opdownload")
TEMP_DIR_GLOBS = (".*", "@eaDir", ".Trash-*", "$RECYCLE.BIN", "lost+found")


class NameFilter:
    """Which names are images to take: include globs, minus excludes, minus temporary names."""

    def __init__(self, include, exclude=()):
        self.include = tuple(g.lower() for g in include)
        self.exclude = tuple(exclude)

    def wants_file(self, name: str, rel: str | None = None) -> bool:
        low = name.lower()
        if any(fnmatch.fnmatchcase(low, g) for g in TEMP_FILE_GLOBS):
            return False
        if not any(fnmatch.fnmatchcase(low, g) for g in self.include):
            return False
        return not self._excluded(name, rel)

    def wants_dir(self, name: str, rel: str | None = None) -> bool:
        if any(fnmatch.fnmatchcase(name, g) for g in TEMP_DIR_GLOBS):
            return False
        return not self._excluded(name, rel)

    def _excluded(self, name: str, rel: str | None) -> bool:
        for g in self.exclude:
            if "/" in g:
                if rel is not None and fnmatch.fnmatch(rel, g.strip("/")):
                    return True
            elif fnmatch.fnmatch(name, g):
                return True
        return False

    def wants_path(self, path: str, root: str) -> bool:
        """For event paths: every component below the root must pass too (no temp dirs on the way)."""
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            return False
        parts = rel.split(os.sep)
        for i, part in enumerate(parts[:-1]):
            if not self.wants_dir(part, "/".join(parts[: i + 1])):
                return False
        return self.wants_file(parts[-1], "/".join(parts))


@dataclass(frozen=True)
class Candidate:
    path: str
    root: str
    st: os.stat_result  # from lstat


def root_for(path: str, roots) -> str | None:
    best = None
    for r in roots:
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            if best is None or len(r) > len(best):
                best = r
    return best


def root_available(root: str) -> bool:
    """The root exists, is a directory and can be listed (an unmounted disk or a stalled share cannot)."""
    try:
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):
            return False
        with os.scandir(root) as it:
            next(it, None)
        return True
    except OSError:
        return False


def walk(top: str, root: str, names: NameFilter, *, should_stop: Callable[[], bool] = lambda: False,
         errors: list | None = None) -> Iterator[Candidate]:
    """Every candidate image under ``top`` (recursive, symlinks not followed; non-regular files included so
    they get a verdict). Unreadable folders are reported in ``errors`` and skipped."""
    stack = [top]
    while stack:
        if should_stop():
            return
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if errors is not None:
                errors.append((d, exc))
            log.warning("cannot list %s: %s", d, exc.strerror or exc)
            continue
        subdirs = []
        for e in entries:
            rel = os.path.relpath(e.path, root).replace(os.sep, "/")
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if names.wants_dir(e.name, rel):
                    subdirs.append(e.path)
                continue
            if not names.wants_file(e.name, rel):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:
                continue
            yield Candidate(e.path, root, st)
        stack.extend(reversed(subdirs))


def read_regular_file(path: str, expect: os.stat_result | None = None) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file without ever blocking (FIFO) or following a symlink.

    Returns the bytes and the ``fstat`` taken after reading. Raises InputError: E_VANISHED,
    E_PERMISSION, E_NOT_REGULAR_FILE, E_TOO_LARGE, E_READ.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError("the file vanished before it could be read", code="E_VANISHED", path=path) from None
    except PermissionError:
        raise InputError("permission denied", code="E_PERMISSION", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError("a symbolic link (links are not followed)", code="E_NOT_REGULAR_FILE", path=path) from None
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise InputError("not a regular file", code="E_NOT_REGULAR_FILE", path=path) from None
        raise InputError(f"cannot open: {exc.strerror or exc}", code="E_READ", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"not a regular file ({_kind(st.st_mode)})", code="E_NOT_REGULAR_FILE", path=path)
        if st.st_size > MAX_FILE_BYTES:
            raise InputError(f"file too large ({st.st_size} bytes > {MAX_FILE_BYTES})", code="E_TOO_LARGE", path=path)
        os.set_blocking(fd, True)
        chunks = []
        total = 0
        while True:
            try:
                b = os.read(fd, 1 << 20)
            except OSError as exc:
                raise InputError(f"read error: {exc.strerror or exc}", code="E_READ", path=path) from None
            if not b:
                break
            total += len(b)
            if total > MAX_FILE_BYTES:
                raise InputError("file grew too large while reading", code="E_TOO_LARGE", path=path)
            chunks.append(b)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return b"".join(chunks), after


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the header only (for batching); None when Pillow cannot tell."""
    try:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return (int(w), int(h)) if w > 0 and h > 0 else (None, None)
    except Exception:  # noqa: BLE001 - any header problem is the decoder's verdict to give later
        return None, None


@dataclass
class IngestOutcome:
    """``queued`` (content has a job: see job_state), ``known`` (nothing changed), ``failed`` (file-level
    verdict recorded), ``unstable`` (changed too recently: try again at ``retry_at``), ``gone``."""

    kind: str
    path: str
    job_id: int | None = None
    job_state: str | None = None
    sha256: str | None = None
    code: str | None = None
    message: str | None = None
    retry_at: float | None = None
    size: int = 0


class Ingestor:
    """Turns a candidate path into a database record: a job for its content, or a file-level verdict."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock

    def ingest(self, path: str, root: str, *, settle: float, force: bool = False) -> IngestOutcome:
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            return self._gone(path, root)
        except OSError as exc:
            return self._fail(path, root, None, "E_READ", f"cannot stat: {exc.strerror or exc}")
        sig = Signature.of(lst)
        if not stat.S_ISREG(lst.st_mode):
            with self.store.read() as conn:
                known = catalog.get_file(conn, path)
            if known and known.state == "failed" and known.signature == sig and not force:
                return IngestOutcome("known", path, code=known.error_code)
            return self._fail(path, root, sig, "E_NOT_REGULAR_FILE", f"not a regular file ({_kind(lst.st_mode)})")
        with self.store.read() as conn:
            known = catalog.get_file(conn, path)
        if known is not None and not force:
            if known.state in ("hashed", "deleted") and sig.same_content_hint(known.signature):
                return IngestOutcome("known", path, sha256=known.content_sha256, size=sig.size)
            if known.state == "failed" and known.signature == sig:
                return IngestOutcome("known", path, code=known.error_code, size=sig.size)
        now = self.clock()
        changed_at = max(lst.st_mtime_ns, lst.st_ctime_ns) / 1e9
        if settle > 0 and now - changed_at < settle:
            return IngestOutcome("unstable", path, retry_at=changed_at + settle, size=sig.size)
        try:
            data, after = read_regular_file(path)
        except InputError as err:
            if err.code == "E_VANISHED":
                return self._gone(path, root)
            return self._fail(path, root, sig, err.code, err.message)
        after_sig = Signature.of(after)
        if after_sig != sig:
            return IngestOutcome("unstable", path, retry_at=now + max(settle, 0.5), size=after_sig.size)
        sha = hashlib.sha256(data).hexdigest()
        w, h = image_size(data)
        with self.store.write() as conn:
            job_id, job_state = catalog.record_hashed(conn, path, root, sig, sha, width=w, height=h)
        log.debug("ingested %s (%s, job %s %s)", path, sha[:12], job_id, job_state)
        return IngestOutcome("queued", path, job_id=job_id, job_state=job_state, sha256=sha, size=sig.size)

    def fail_unstable(self, path: str, root: str) -> IngestOutcome:
        try:
            sig = Signature.of(os.lstat(path))
        except OSError:
            return IngestOutcome("gone", path)
        return self._fail(path, root, sig, "E_UNSTABLE", f"still changing after {MAX_SETTLE_SECONDS:.0f} s; retried when it changes again")

    def _gone(self, path: str, root: str) -> IngestOutcome:
        """Seen, then gone before it could be read: recorded (E_VANISHED) unless its root is unavailable."""
        if root_available(root) and not os.path.lexists(path):
            with self.store.write() as conn:
                catalog.record_vanished(conn, path, root)
            log.info("%s: vanished before it could be read [E_VANISHED]", path)
        return IngestOutcome("gone", path, code="E_VANISHED", message="the file vanished before it could be read")

    def _fail(self, path: str, root: str, sig: Signature | None, code: str, message: str) -> IngestOutcome:
        with self.store.write() as conn:
            catalog.record_failure(conn, path, root, sig, code, message)
        log.info("%s: %s [%s]", path, message, code)
        return IngestOutcome("failed", path, code=code, message=message, size=sig.size if sig else 0)


def reconcile_root(store: Store, root: str, names: NameFilter, *, should_stop: Callable[[], bool] = lambda: False
                   ) -> tuple[list[Candidate], dict]:
    """Compare one root with the database. Returns the candidates that need ingesting (new or changed) and
    a summary. Files the database knows but the disk does not are marked ``missing`` — unless the root is
    unavailable, or so many would go missing at once that the root is more likely unmounted or stalled."""
    summary = {"root": root, "available": True, "seen": 0, "changed": 0, "missing": 0, "guarded": False}
    if not root_available(root):
        summary["available"] = False
        log.warning("root %s is unavailable (missing, unmounted or unreadable): skipped; its files are not marked missing", root)
        return [], summary
    with store.read() as conn:
        known = catalog.files_under(conn, root)
    seen: set[str] = set()
    todo: list[Candidate] = []
    errors: list = []
    for cand in walk(root, root, names, should_stop=should_stop, errors=errors):
        seen.add(cand.path)
        k = known.get(cand.path)
        sig = Signature.of(cand.st)
        if k is not None:
            if k.state in ("hashed", "deleted") and sig.same_content_hint(k.signature):
                continue
            if k.state == "failed" and k.signature == sig:
                continue
        todo.append(cand)
    summary["seen"] = len(seen)
    summary["changed"] = len(todo)
    if should_stop():
        return todo, summary
    live = [p for p, k in known.items() if k.state in ("new", "hashed", "failed")]
    missing = [p for p in live if p not in seen]
    if missing:
        if not seen and not errors:
            # nothing at all where files are known: an empty mount point, not a user's delete
            summary["guarded"] = True
            summary["available"] = False
            log.warning("root %s: none of its %d known files is there; not trusting this scan (unmounted?)", root, len(live))
            return todo, summary
        moved_fs = _on_other_filesystem(missing, known, root)
        if moved_fs:
            summary["guarded"] = True
            log.warning("root %s: %d files were on a filesystem that is no longer mounted there; not marking them missing",
                        root, len(moved_fs))
            missing = [p for p in missing if p not in moved_fs]
    if missing:
        if not root_available(root) or errors:
            summary["guarded"] = True
            log.warning("root %s changed during the scan or had unreadable folders: not marking %d files missing", root, len(missing))
        elif len(missing) >= MISSING_GUARD_MIN and len(missing) > MISSING_GUARD_FRACTION * len(live):
            summary["guarded"] = True
            log.warning("root %s: %d of %d known files are gone at once; not trusting this scan (unmounted?)",
                        root, len(missing), len(live))
        else:
            with store.write() as conn:
                summary["missing"] = catalog.mark_missing(conn, missing)
    return todo, summary


def _on_other_filesystem(missing: list[str], known: dict, root: str) -> set[str]:
    """The missing files whose recorded device is not the device of the nearest folder still there:
    the filesystem they lived on (the root's own, or one mounted below it) is not mounted any more."""
    dev_of: dict[str, int | None] = {}

    def nearest_dev(path: str) -> int | None:
        d = os.path.dirname(path)
        chain = []
        dev = None
        while True:
            if d in dev_of:
                dev = dev_of[d]
                break
            chain.append(d)
            try:
                dev = os.lstat(d).st_dev
                break
            except OSError:
                pass
            parent = os.path.dirname(d)
            if parent == d or not (d + os.sep).startswith(root.rstrip(os.sep) + os.sep):
                break
            d = parent
        for c in chain:
            dev_of[c] = dev
        return dev

    out = set()
    for p in missing:
        k = known.get(p)
        rec = k.signature.dev if k is not None and k.signature is not None else 0
        if not rec:
            continue
        dev = nearest_dev(p)
        if dev is not None and dev != rec:
            out.add(p)
    return out
