"""``nicd restore``: decode stored bitstreams back to image files.

What is selected: every file recorded in the ``files`` table at or under the given paths (a file path
or a folder prefix, made absolute) whose content has a stored bitstream — whatever the file's state
(``hashed``, ``deleted`` by the originals policy, ``missing``).

Where each one goes:

- without ``out``: to its original path, only where nothing is there. When the original file is still
  there, unchanged (same size and SHA-256 as the content that was coded), it is left alone — even with
  ``force``, since writing a lossy decode over the very original would only lose quality (status
  ``present``). Any other file there is kept too (status ``exists``, code ``E_EXISTS``) unless ``force``.
- with ``out``: to ``out/<path relative to its watch root>``, the same layout as under the root; an
  existing file there is replaced only with ``force``.

Format: ``original`` (default) writes the format the original file had (recorded by the daemon;
else the one its extension names; else PNG) — PNG, TIFF and other lossless formats stay lossless,
JPEG and WebP are written at quality 95 (JPEG 4:4:4). ``png`` / ``jpeg`` / ``webp`` force a format;
the file's suffix then becomes ``.png`` / ``.jpg`` / ``.webp`` when it named another format. The
decoded image comes back in the original size and Pillow mode (alpha, palette, 16-bit gray ...), with
its ICC profile and EXIF; the original modification time is put back when it is recorded.

Every file is written atomically (:func:`nicd.codec.imageio.save_image`: a temporary file in the
same folder, fsync, rename), so an interrupted or failed restore leaves either the whole file or
nothing — never a partial file and never a stray temporary file. Without ``force`` the finished file is
published with ``link``, which never overwrites: a file that appears at the target while decoding is
kept (status ``exists``). Only ``force`` replaces.

With the originals policy ``delete``, a restored file inside a watched root would be coded and then
deleted by the daemon. There, a file is restored only to its own recorded path, in its own format, and
only when nicd itself deleted the file at that path (the daemon never deletes at such a path again);
any other target inside a watched root fails with ``E_TARGET_WATCHED`` (restore with ``out`` outside
the watched roots instead).

Before decoding, each bitstream is checked against its recorded length and SHA-256 (``E_BITSTREAM_SIZE``,
``E_BITSTREAM_SHA256``); the container checks its own CRCs (``E_FORMAT_*``). Per-file problems are
items with ``status == "failed"`` and a code; set-up problems (no such path in the database, schema,
database errors) raise :class:`nicd.errors.NicdError`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from sqlalchemy import select

from ..config import Config
from ..errors import InputError, ModelError, NicdError, StorageError
from ..store.models import Bitstream, Event, File
from . import Reader, normalize_path, path_filter

__all__ = ["FORMATS", "RestoreItem", "RestoreResult", "Decoders", "restore", "fetch_bitstream", "verify_blob"]

FORMATS = ("original", "png", "jpeg", "webp")
_FORCED = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
# Formats Pillow reads but whose one-frame restore is better written as another.
_WRITE_AS = {"MPO": "JPEG", "JPEG2000": "PNG"}
LOSSY_QUALITY = 95

STATUSES = ("restored", "would_restore", "present", "exists", "failed")


@dataclass
class RestoreItem:
    path: str  # the original path, as recorded
    target: str  # where it is (or would be) written
    content_sha256: str
    format: str  # Pillow format name written (or to be written)
    status: str  # restored | would_restore | present | exists | failed
    code: str | None = None
    message: str | None = None
    bytes: int = 0  # size of the written file
    width: int | None = None
    height: int | None = None


@dataclass
class RestoreResult:
    paths: list[str]
    out: str | None
    format: str
    dry_run: bool
    force: bool
    items: list[RestoreItem] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for i in self.items if i.status == status)

    @property
    def failures(self) -> list[RestoreItem]:
        return [i for i in self.items if i.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "paths": self.paths,
            "out": self.out,
            "format": self.format,
            "dry_run": self.dry_run,
            "force": self.force,
            "counts": {s: self.count(s) for s in STATUSES},
            "ok": self.ok,
            "items": [asdict(i) for i in self.items],
        }


# ------------------------------------------------------------------------------------------- helpers


class Decoders:
    """One codec per model (by the full model hash in each header), loaded on first use, on the CPU
    (the reference decoder: the encoder verifies every bitstream with a CPU synthesis). A model that is
    not installed is taken from the archive's own copy (:mod:`nicd.store.kept_models`)."""

    def __init__(self, device: str = "cpu", reader: Reader | None = None):
        self.device = device
        self.reader = reader
        self._by_hash: dict[bytes, object] = {}

    def for_data(self, data: bytes):
        from ..codec import container

        model_hash = container.peek_header(data).model_hash
        codec = self._by_hash.get(model_hash)
        if codec is None:
            codec = self._by_hash[model_hash] = self._load(data, model_hash)
        return codec

    def _load(self, data: bytes, model_hash: bytes):
        from ..codec.api import codec_from_bytes, decoder_for
        from ..store import kept_models

        try:
            return decoder_for(data, self.device)
        except ModelError as err:
            if err.code != "E_MODEL_UNKNOWN" or self.reader is None:
                raise
            got = self.reader.run(lambda conn: kept_models.fetch(conn, model_hash.hex()))
            if got is None:
                raise ModelError(f"{err.message}, nor kept in the archive", code="E_MODEL_UNKNOWN") from None
            return codec_from_bytes(got[0], got[1], self.device)

    def decode(self, data: bytes):
        """The PIL image (original size and mode, ICC/EXIF in ``.info``)."""
        return self.for_data(data).decode(data)


def fetch_bitstream(reader: Reader, sha: str) -> tuple[bytes, str, int] | None:
    """(data, data_sha256, nicd_bytes) of one content's bitstream, in its own short read transaction."""

    def q(conn):
        return conn.execute(
            select(Bitstream.data, Bitstream.data_sha256, Bitstream.nicd_bytes).where(Bitstream.content_sha256 == sha)
        ).first()

    row = reader.run(q)
    return None if row is None else (bytes(row[0]), row[1], row[2])


def verify_blob(data: bytes, data_sha256: str | None, nicd_bytes: int | None) -> None:
    """Raise FormatError-like NicdError when the stored bytes are not the ones the daemon wrote."""
    from ..errors import FormatError

    if nicd_bytes is not None and len(data) != nicd_bytes:
        raise FormatError(
            f"the stored bitstream has {len(data)} bytes, {nicd_bytes} were recorded", code="E_BITSTREAM_SIZE")
    if data_sha256 and hashlib.sha256(data).hexdigest() != data_sha256:
        raise FormatError(
            "the stored bitstream does not match its recorded SHA-256 (altered in the database)",
            code="E_BITSTREAM_SHA256")


def file_holds(path: str, size: int, sha: str) -> bool:
    """True when ``path`` is a regular file of exactly that content."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    import stat as _stat

    if not _stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == sha


def _saveable(fmt: str | None) -> str | None:
    from PIL import Image

    if not fmt:
        return None
    fmt = _WRITE_AS.get(fmt.upper(), fmt.upper())
    Image.init()
    return fmt if fmt in Image.SAVE else None


def _format_of_extension(path: str) -> str | None:
    from PIL import Image

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    return Image.registered_extensions().get(ext) if ext else None


def _plan_format(path: str, original_format: str | None, choice: str) -> tuple[str, str]:
    """(Pillow format, target file name) for one file."""
    if choice == "original":
        fmt = _saveable(original_format) or _saveable(_format_of_extension(path)) or "PNG"
        return fmt, path
    fmt, suffix = _FORCED[choice]
    if _saveable(_format_of_extension(path)) == fmt:
        return fmt, path
    root, ext = os.path.splitext(path)
    return fmt, (root if ext else path) + suffix


def _relative(path: str, root: str | None) -> str:
    if root:
        root = root.rstrip(os.sep) or os.sep
        if path.startswith(root.rstrip(os.sep) + os.sep) and path != root:
            return os.path.relpath(path, root)
    return path.lstrip(os.sep)


@dataclass
class _Row:
    path: str
    root: str | None
    sha: str
    mtime_ns: int | None
    original_format: str | None
    original_bytes: int
    width: int
    height: int


def select_rows(reader: Reader, paths: list[str]) -> list[_Row]:
    """The recorded files at or under ``paths`` whose content has a bitstream, sorted by path.
    Raises InputError(E_NOT_FOUND) naming a path under which nothing is recorded."""

    def q(conn, p):
        return conn.execute(
            select(File.path, File.root, File.content_sha256, File.mtime_ns, Bitstream.original_format,
                   Bitstream.original_bytes, Bitstream.width, Bitstream.height)
            .join(Bitstream, Bitstream.content_sha256 == File.content_sha256)
            .where(path_filter(File.path, p, reader.dialect))
            .order_by(File.path)
        ).all()

    rows: dict[str, _Row] = {}
    for p in paths:
        found = reader.run(lambda conn: q(conn, p))
        if not found:
            real = os.path.realpath(p)
            if real != p:
                found = reader.run(lambda conn: q(conn, real))
        if not found:
            raise InputError(f"no stored image is recorded at or under {p} (database {reader.database})",
                             code="E_NOT_FOUND", path=p)
        for r in found:
            rows[r[0]] = _Row(*r)
    return [rows[k] for k in sorted(rows)]


# ---------------------------------------------------------------------------------------------- main


def restore(
    paths: Iterable[str | os.PathLike],
    config: Config,
    *,
    out: str | os.PathLike | None = None,
    format: str = "original",
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int, RestoreItem | None], None] | None = None,
    stop_event: threading.Event | None = None,
) -> RestoreResult:
    """Restore the images recorded at or under ``paths`` (see the module docstring).

    ``progress(done, total, item)`` is called once before the first item (``item`` None) and after each.
    Stops between files when ``stop_event`` is set (the files not reached are not listed).
    """
    if format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}", code="E_ARGS")
    wanted = [normalize_path(p) for p in paths]
    if not wanted:
        raise InputError("give at least one path to restore", code="E_ARGS")
    out_dir = normalize_path(out) if out is not None else None
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out is not a folder: {out_dir}", code="E_NOT_A_FOLDER", path=out_dir)
    result = RestoreResult(paths=wanted, out=out_dir, format=format, dry_run=dry_run, force=force)

    with Reader(config) as reader:
        if not reader.exists:
            raise StorageError(f"the database {reader.database} does not exist yet: nothing to restore",
                               code="E_NO_DATABASE")
        rows = select_rows(reader, wanted)
        total = len(rows)
        if progress:
            progress(0, total, None)

        # plan every target first: conflicts (two files mapping to one target) are failures, not overwrites
        plans: list[tuple[_Row, str, str]] = []
        claimed: dict[str, str] = {}
        for r in rows:
            fmt, name = _plan_format(r.path, r.original_format, format)
            target = os.path.join(out_dir, _relative(name, r.root)) if out_dir else name
            plans.append((r, fmt, target))

        refused: dict[str, str] = {}
        if config.originals.policy == "delete" and config.watch.roots:
            refused = _refuse_watched(reader, plans, config.watch.roots, out_dir, format)

        # decode each content once, even when several selected files hold it
        by_sha: dict[str, list[int]] = {}
        for i, (r, _, _) in enumerate(plans):
            by_sha.setdefault(r.sha, []).append(i)
        items: list[RestoreItem | None] = [None] * len(plans)
        decoders = Decoders("cpu", reader)
        done = 0
        stop = stop_event or threading.Event()
        for sha, idxs in sorted(by_sha.items(), key=lambda kv: plans[kv[1][0]][0].path):
            if stop.is_set():
                break
            image = None
            decode_error: NicdError | None = None
            for i in idxs:
                r, fmt, target = plans[i]
                item = RestoreItem(r.path, target, sha, fmt, "failed", width=r.width, height=r.height)
                items[i] = item
                other = claimed.get(target)
                if other is not None:
                    item.code, item.message = "E_TARGET_CONFLICT", f"{other} is restored to the same file {target}"
                else:
                    claimed[target] = r.path
                    _decide(item, r, target, out_dir, force, dry_run)
                    if target in refused and item.status in ("pending", "would_restore"):
                        item.status, item.code, item.message = "failed", "E_TARGET_WATCHED", refused[target]
                if item.status == "pending":  # to be written now
                    if image is None and decode_error is None:
                        try:
                            image = _decode(reader, decoders, sha)
                        except NicdError as err:
                            decode_error = err
                    if decode_error is not None:
                        item.status, item.code, item.message = "failed", decode_error.code, decode_error.message
                    else:
                        _write(item, image, fmt, target, r.mtime_ns, replace=force)
                done += 1
                if progress:
                    progress(done, total, item)
        result.items = [i for i in items if i is not None]
        result.items.sort(key=lambda i: i.path)
    return result


def _inside(path: str, roots) -> bool:
    from ..daemon.discovery import root_for

    if root_for(path, roots) is not None:
        return True
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    real_roots = [os.path.realpath(r) for r in roots]
    return root_for(real, real_roots) is not None


def _refuse_watched(reader: Reader, plans, roots, out_dir: str | None, choice: str) -> dict[str, str]:
    """Targets that would be coded and then deleted by the daemon (policy ``delete``): target → message."""
    own = [r.path for r, _, target in plans if out_dir is None and target == r.path]
    deleted_here: set[str] = set()
    for i in range(0, len(own), 500):
        chunk = own[i:i + 500]
        deleted_here |= set(reader.run(lambda conn: list(conn.execute(
            select(Event.path).where(Event.kind == "delete_applied", Event.path.in_(chunk))).scalars())))
    hint = "restore with --out outside the watched roots"
    refused: dict[str, str] = {}
    for r, fmt, target in plans:
        if not _inside(target, roots):
            continue
        if out_dir is not None or target != r.path:
            why = "inside a watched root with originals policy delete, the restored file would be coded and deleted"
        elif choice != "original" and fmt != _plan_format(r.path, r.original_format, "original")[0]:
            why = "a format change inside a watched root with originals policy delete would be coded and deleted"
        elif r.path not in deleted_here:
            why = "nicd did not delete this file: restored here with originals policy delete it would be coded and deleted"
        else:
            continue
        refused[target] = f"{why}; {hint}"
    return refused


def _decide(item: RestoreItem, r: _Row, target: str, out_dir: str | None, force: bool, dry_run: bool) -> None:
    """Set the item's status for what is at ``target`` now: ``pending`` when it is to be written now."""
    if os.path.lexists(target):
        if out_dir is None and target == r.path and file_holds(target, r.original_bytes, r.sha):
            item.status, item.message = "present", "the original is there, unchanged"
            return
        if os.path.isdir(target) and not os.path.islink(target):
            item.code, item.message = "E_NOT_REGULAR_FILE", f"a folder is in the way: {target}"
            return
        if not force:
            item.status, item.code = "exists", "E_EXISTS"
            item.message = "a file is already there (use --force to replace it)"
            return
    if dry_run:
        item.status = "would_restore"
        item.message = "would replace the file there" if os.path.lexists(target) else None
        return
    item.status = "pending"


def _decode(reader: Reader, decoders: Decoders, sha: str):
    from ..errors import FormatError

    got = fetch_bitstream(reader, sha)
    if got is None:  # deleted between the listing and now
        raise FormatError("the bitstream is no longer in the database", code="E_BITSTREAM_MISSING")
    data, data_sha, nbytes = got
    verify_blob(data, data_sha, nbytes)
    try:
        return decoders.decode(data)
    except NicdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder bug must fail one file, not the whole restore
        raise NicdError(f"decoding failed: {type(exc).__name__}: {exc}", code="E_DECODE") from exc


def _write(item: RestoreItem, image, fmt: str, target: str, mtime_ns: int | None, *, replace: bool = False) -> None:
    from ..codec.imageio import save_image

    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        item.status, item.code = "failed", "E_STORAGE"
        item.message = f"cannot create the folder {folder}: {exc.strerror or exc}"
        return
    try:
        save_image(image, target, format=fmt, quality=LOSSY_QUALITY, replace=replace)
    except NicdError as err:
        if err.code == "E_EXISTS":  # appeared while decoding: kept, never overwritten without force
            item.status, item.code = "exists", "E_EXISTS"
            item.message = "a file is already there (use --force to replace it)"
            return
        item.status, item.code, item.message = "failed", err.code, err.message
        return
    if mtime_ns is not None:
        try:
            os.utime(target, ns=(mtime_ns, mtime_ns))
        except OSError:
            pass
    try:
        item.bytes = os.path.getsize(target)
    except OSError:
        item.bytes = 0
    item.status, item.code, item.message = "restored", None, None
