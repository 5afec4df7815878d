"""Durable file writes: temp file in the same folder, fsync, rename, fsync of the folder."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from . import faults
from .errors import StorageError

TEMP_PREFIX = ".nicd-tmp-"


def error_reason(err: BaseException) -> str:
    """An exception's reason on one line: the OS's text for an OSError (without errno and path)."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def write_error(path: str | os.PathLike, err: BaseException) -> StorageError:
    """A failed write as one readable line: ``E_NO_SPACE`` when the disk or the quota is full (the
    daemon's database reports the same code), else ``E_STORAGE``."""
    reason = error_reason(err)
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return StorageError(f"cannot write {os.fspath(path)}: {reason}", code="E_NO_SPACE" if full else "E_STORAGE",
                        path=os.fspath(path))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable. Filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("write.temp-synced")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    faults.point("write.renamed")
    fsync_dir(path.parent)
