"""``nicd check``: verify every stored bitstream, and the few database invariants that protect the
originals. Read-only.

For every row of ``bitstreams`` (each blob read in its own short read transaction):

1. its length equals the recorded ``nicd_bytes`` (``E_BITSTREAM_SIZE``) and its SHA-256 the recorded
   ``data_sha256`` (``E_BITSTREAM_SHA256``): the bytes are the ones the daemon stored;
2. the container parses: magic, version, header CRC, file CRC, structure (``E_FORMAT_*`` from
   :func:`nicd.codec.container.parse`);
3. the header's size is the recorded one (``E_CHECK_GEOMETRY``) and the model it names is installed or
   kept in the archive (``E_MODEL_UNKNOWN``: such a bitstream could not be restored).

With ``full``, each bitstream is also decoded (on the CPU, the reference decoder) and its side data
applied, which checks every tile's symbol checksum and the alpha/palette/ICC side data; then:

- when an original file still holds the content (a recorded path whose bytes still hash to it), the
  decoded image is measured against it and PSNR / SSIM / MS-SSIM must equal the figures recorded at
  coding time (to ``PSNR_TOLERANCE_DB`` / ``SSIM_TOLERANCE``): decoding is deterministic, so any
  difference means the decoder, the model files or the stored figures changed (``E_CHECK_FIGURES``);
- when no original is left (deleted by the policy, moved, edited), the figures cannot be measured
  again: the check is that the whole bitstream decodes to the recorded size (``original: "gone"``
  in the item; the recorded figures are reported as they are).

Database-level checks: ``PRAGMA quick_check`` (``integrity_check`` with ``full``) on SQLite
(``E_DB_CORRUPT``); a ``done`` job must have its bitstream (``E_CHECK_NO_BITSTREAM``); a file deleted by
the originals policy must have its content's bitstream (``E_CHECK_LOST``); the archive keeps the file of
every model its bitstreams name (``E_CHECK_MODEL_NOT_KEPT``: they rely on the installed file, which an
upgrade replaces), and each kept file still hashes to its name (``E_MODEL_HASH``).

Every problem names a path (the first file recorded with the content, or None for database-level
problems) and a code. Set-up problems (schema, database errors) raise :class:`nicd.errors.NicdError`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable

from sqlalchemy import select, text

from ..config import Config
from ..errors import FormatError, NicdError
from ..store import kept_models
from ..store.models import Bitstream, File, Job
from . import Reader
from .restore import Decoders, fetch_bitstream, verify_blob

__all__ = ["PSNR_TOLERANCE_DB", "SSIM_TOLERANCE", "CheckItem", "CheckResult", "Problem", "check"]

PSNR_TOLERANCE_DB = 0.05
SSIM_TOLERANCE = 5e-4


@dataclass
class Problem:
    path: str | None
    code: str
    message: str
    content_sha256: str | None = None
    paths: list[str] = field(default_factory=list)


@dataclass
class CheckItem:
    content_sha256: str
    path: str | None
    ok: bool
    decoded: bool = False
    original: str | None = None  # with full: "compared" | "gone"
    recorded: dict | None = None  # psnr / ssim / ms_ssim stored at coding time
    measured: dict | None = None  # the same, measured now against the original (full, original present)


@dataclass
class CheckResult:
    database: str
    full: bool
    bitstreams: int = 0
    problems: list[Problem] = field(default_factory=list)
    items: list[CheckItem] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "database": self.database,
            "full": self.full,
            "ok": self.ok,
            "bitstreams": self.bitstreams,
            "bitstreams_ok": sum(1 for i in self.items if i.ok),
            "compared_with_original": sum(1 for i in self.items if i.original == "compared"),
            "originals_gone": sum(1 for i in self.items if i.original == "gone"),
            "integrity": self.integrity,
            "problems": [asdict(p) for p in self.problems],
            "items": [asdict(i) for i in self.items],
        }


def check(config: Config, *, full: bool = False,
          progress: Callable[[int, int], None] | None = None, stop_event: threading.Event | None = None) -> CheckResult:
    """Verify the stored bitstreams (see the module docstring). A database not created yet is fine
    (nothing to check)."""
    stop = stop_event or threading.Event()
    with Reader(config) as reader:
        result = CheckResult(database=reader.database, full=full)
        if not reader.exists:
            if progress:
                progress(0, 0)
            return result

        def listing(conn):
            bits = conn.execute(
                select(Bitstream.content_sha256, Bitstream.width, Bitstream.height, Bitstream.original_bytes,
                       Bitstream.psnr, Bitstream.ssim, Bitstream.ms_ssim).order_by(Bitstream.id)).all()
            files = conn.execute(select(File.content_sha256, File.path, File.state)
                                 .where(File.content_sha256.is_not(None)).order_by(File.id)).all()
            no_bits = conn.execute(
                select(Job.content_sha256).outerjoin(Bitstream, Bitstream.content_sha256 == Job.content_sha256)
                .where(Job.state == "done", Bitstream.id.is_(None))).scalars().all()
            lost = conn.execute(
                select(File.path, File.content_sha256).outerjoin(Bitstream, Bitstream.content_sha256 == File.content_sha256)
                .where(File.state == "deleted", Bitstream.id.is_(None)).order_by(File.path)).all()
            integrity = []
            if conn.dialect.name == "sqlite":
                pragma = "integrity_check" if full else "quick_check"
                integrity = [r[0] for r in conn.execute(text(f"PRAGMA {pragma}")).fetchall()]
            return bits, files, no_bits, lost, integrity, kept_models.unkept_in_use(conn), kept_models.kept(conn)

        bits, files, no_bits, lost, integrity, unkept, kept = reader.run(listing)
        result.integrity = integrity
        paths: dict[str, list[tuple[str, str]]] = {}
        for sha, path, state in files:
            paths.setdefault(sha, []).append((path, state))

        def first_path(sha):
            got = paths.get(sha)
            return got[0][0] if got else None

        if integrity and integrity != ["ok"]:
            result.problems.append(Problem(None, "E_DB_CORRUPT",
                                           "database integrity check failed: " + "; ".join(integrity[:5])))
        for sha in no_bits:
            result.problems.append(Problem(first_path(sha), "E_CHECK_NO_BITSTREAM",
                                           "the job is done but its bitstream is not in the database", sha,
                                           [p for p, _ in paths.get(sha, [])]))
        for path, sha in lost:
            result.problems.append(Problem(path, "E_CHECK_LOST",
                                           "the original was deleted but no bitstream of its content is stored", sha, [path]))

        for model_id in unkept:
            result.problems.append(Problem(None, "E_CHECK_MODEL_NOT_KEPT",
                                           f"bitstreams written with model {model_id} rely on its installed file: the "
                                           "archive keeps no copy (start the daemon once while it is installed)"))
        for model_id, sha, _ in kept:
            got = reader.run(lambda conn, sha=sha: kept_models.fetch(conn, sha))
            if got is None or hashlib.sha256(got[1]).hexdigest() != sha:
                result.problems.append(Problem(None, "E_MODEL_HASH", f"the archive's copy of model {model_id} is damaged"))

        decoders = Decoders("cpu", reader)
        total = len(bits)
        result.bitstreams = total
        if progress:
            progress(0, total)
        for n, b in enumerate(bits, 1):
            if stop.is_set():
                break
            item = CheckItem(b.content_sha256, first_path(b.content_sha256), ok=True,
                             recorded={"psnr": b.psnr, "ssim": b.ssim, "ms_ssim": b.ms_ssim})
            try:
                _check_one(reader, decoders, b, item, full, paths.get(b.content_sha256, []))
            except NicdError as err:
                item.ok = False
                result.problems.append(Problem(item.path, err.code, err.message, b.content_sha256,
                                               [p for p, _ in paths.get(b.content_sha256, [])]))
            result.items.append(item)
            if progress:
                progress(n, total)
    result.problems.sort(key=lambda p: (p.path is not None, p.path or "", p.code))
    return result


def _check_one(reader: Reader, decoders: Decoders, b, item: CheckItem, full: bool, files: list[tuple[str, str]]) -> None:
    from ..codec import container

    got = fetch_bitstream(reader, b.content_sha256)
    if got is None:
        raise FormatError("the bitstream is no longer in the database", code="E_BITSTREAM_MISSING")
    data, data_sha, nbytes = got
    verify_blob(data, data_sha, nbytes)
    c = container.parse(data)
    if (c.width, c.height) != (b.width, b.height):
        raise NicdError(f"the bitstream is {c.width}×{c.height}, {b.width}×{b.height} was recorded",
                        code="E_CHECK_GEOMETRY")
    codec = decoders.for_data(data)  # ModelError E_MODEL_UNKNOWN: neither installed nor kept
    if not full:
        return
    from ..codec.imageio import restore_image

    try:
        rgb = codec.decode_rgb(data)
        image = restore_image(rgb, c.mode, dict(c.metadata))
    except NicdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder failure is this bitstream's problem
        raise NicdError(f"decoding failed: {type(exc).__name__}: {exc}", code="E_DECODE") from exc
    item.decoded = True
    if image.size != (b.width, b.height):
        raise NicdError(f"decoded to {image.size[0]}×{image.size[1]}, {b.width}×{b.height} was recorded",
                        code="E_CHECK_GEOMETRY")
    original = _find_original(files, b.original_bytes, b.content_sha256)
    if original is None:
        item.original = "gone"
        return
    from ..codec import metrics
    from ..codec.imageio import load_image

    item.original = "compared"
    try:
        ref = load_image(original).rgb
    except NicdError as err:  # changed between the hash and the load: cannot compare
        item.original = "gone"
        item.measured = {"error": err.code}
        return
    m = metrics.quality(ref, rgb)
    item.measured = {k: (None if v is None or not math.isfinite(v) else v) for k, v in m.items()}
    bad = []
    for key, tol in (("psnr", PSNR_TOLERANCE_DB), ("ssim", SSIM_TOLERANCE), ("ms_ssim", SSIM_TOLERANCE)):
        rec, now = item.recorded.get(key), item.measured.get(key)
        if rec is None and now is None:
            continue
        if rec is None or now is None or abs(rec - now) > tol:
            bad.append(f"{key} {_fmt(now)} now, {_fmt(rec)} recorded")
    if bad:
        raise NicdError(f"the decoded image differs from what was recorded against {original}: " + ", ".join(bad),
                        code="E_CHECK_FIGURES")


def _fmt(v) -> str:
    return "none" if v is None else f"{v:.4f}"


def _find_original(files: list[tuple[str, str]], size: int, sha: str) -> str | None:
    from .restore import file_holds

    for path, state in files:
        if state in ("hashed", "new") and file_holds(path, size, sha):
            return path
    return None
