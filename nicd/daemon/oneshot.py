"""``nicd scan DIR...``: the daemon's work, once, over the given folders — same ingest, queue, batches,
store and originals policy — with progress reported through a callback (the CLI draws the bar).

Every file found gets a verdict: ``done`` (coded now or before), ``failed`` / ``skipped`` with an error code
and a one-line message. The scan is complete when every file has one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from sqlalchemy import select

from ..config import Config
from ..errors import InputError
from ..store import queue
from ..store.models import Bitstream, File, Job
from ..store.queue import new_owner
from . import originals
from .discovery import Candidate, Ingestor, NameFilter, walk
from .service import load_codec_for, open_store
from .worker import Worker

log = logging.getLogger("nicd.scan")

CHUNK_FILES = 32


@dataclass
class FileVerdict:
    path: str
    state: str  # done | failed | skipped
    code: str | None = None
    message: str | None = None
    size: int = 0
    already: bool = False  # coded by an earlier run


@dataclass
class ScanProgress:
    total_files: int
    total_bytes: int
    done_files: int
    done_bytes: int
    verdict: FileVerdict | None = None
    phase: str = "coding"  # listing | coding | finished


@dataclass
class ScanResult:
    roots: list[str]
    files: int = 0
    done: int = 0
    already: int = 0
    failed: int = 0
    skipped: int = 0
    no_verdict: int = 0
    original_bytes: int = 0
    nicd_bytes: int = 0
    jpeg_bytes_at_equal_ssim: int = 0
    seconds: float = 0.0
    deleted_originals: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every file got a verdict (failures included)."""
        return self.no_verdict == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d


def _roots_of(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(top, root) pairs: a folder is its own root; a single file's root is its folder."""
    out = []
    for p in paths:
        a = os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(p))))
        if os.path.isdir(a):
            out.append((a, a))
        elif os.path.lexists(a):
            out.append((a, os.path.dirname(a)))
        else:
            raise InputError(f"no such file or folder: {a}", code="E_NOT_FOUND", path=a)
    return out


def scan(roots: Iterable[str], config: Config, progress_callback: Callable[[ScanProgress], None] | None = None, *,
         stop_event: threading.Event | None = None, codec=None) -> ScanResult:
    """Code every image under ``roots`` through the queue. Raises NicdError for set-up problems (missing
    folder, schema, lock held by the daemon, model); per-file problems are verdicts in the result."""
    t0 = time.monotonic()
    stop = stop_event or threading.Event()
    pairs = _roots_of(roots)
    names = NameFilter(config.watch.include, config.watch.exclude)
    result = ScanResult(roots=[p[0] for p in pairs])

    def report(p: ScanProgress) -> None:
        if progress_callback is not None:
            progress_callback(p)

    # 1. list (cheap: stat only), so the progress bar has a total
    cands: list[Candidate] = []
    seen: set[str] = set()
    for top, root in pairs:
        if os.path.isdir(top):
            it = walk(top, root, names, should_stop=stop.is_set)
        else:
            it = iter([Candidate(top, root, os.lstat(top))])
        for c in it:
            if c.path not in seen:
                seen.add(c.path)
                cands.append(c)
    total_bytes = sum(c.st.st_size for c in cands)
    result.files = len(cands)
    report(ScanProgress(len(cands), total_bytes, 0, 0, phase="listing"))

    store = open_store(config)
    try:
        owner = new_owner()
        with store.write() as conn:
            queue.requeue_expired(conn, current_owner=owner, exclusive=store.exclusive)
        codec = codec if codec is not None else load_codec_for(config)
        policy = originals.OriginalsPolicy(store, config.originals.policy, codec)
        originals.repair(store)
        worker = Worker(store, config, codec, owner, stop=stop, policy=policy)
        worker.keep_models()
        ingestor = Ingestor(store)
        done_files = done_bytes = 0

        for i in range(0, len(cands), CHUNK_FILES):
            if stop.is_set():
                break
            chunk = cands[i:i + CHUNK_FILES]
            by_job: dict[int, list[Candidate]] = {}
            verdicts: dict[str, FileVerdict] = {}
            for c in chunk:
                out = ingestor.ingest(c.path, c.root, settle=0.0)
                if out.kind == "unstable":  # changed while being read: one more try after a short pause
                    time.sleep(0.2)
                    out = ingestor.ingest(c.path, c.root, settle=0.0)
                if out.kind == "known" and out.sha256:
                    with store.read() as conn:
                        row = conn.execute(select(Job.id, Job.state).where(Job.content_sha256 == out.sha256)).first()
                    if row is not None:
                        by_job.setdefault(row.id, []).append(c)
                        continue
                if out.kind in ("known", "failed") and out.code:
                    verdicts[c.path] = FileVerdict(c.path, "failed", out.code, out.message or _file_message(store, c.path), c.st.st_size)
                elif out.kind == "queued":
                    by_job.setdefault(out.job_id, []).append(c)
                elif out.kind == "gone":
                    verdicts[c.path] = FileVerdict(c.path, "skipped", "E_VANISHED", "the file vanished before it could be read", c.st.st_size)
                elif out.kind == "unstable":
                    verdicts[c.path] = FileVerdict(c.path, "failed", "E_UNSTABLE", "the file kept changing while it was read", c.st.st_size)
                else:
                    verdicts[c.path] = FileVerdict(c.path, "failed", "E_INTERNAL", f"no verdict ({out.kind})", c.st.st_size)
            # jobs already finished before this chunk
            with store.read() as conn:
                before = {r.id: r.state for r in conn.execute(select(Job.id, Job.state).where(Job.id.in_(list(by_job))))}
            pending = [j for j, s in before.items() if s == "pending"]
            newly: set[int] = set()
            while pending and not stop.is_set():
                verdict_list = worker.run_batch(job_ids=pending)
                if verdict_list is None:
                    break
                newly.update(v.job_id for v in verdict_list)
                with store.read() as conn:
                    pending = list(conn.execute(select(Job.id).where(Job.id.in_(pending), Job.state == "pending")).scalars())
            with store.read() as conn:
                rows = {r.id: r for r in conn.execute(
                    select(Job.id, Job.state, Job.error_code, Job.error_message, Job.content_sha256,
                           Bitstream.nicd_bytes, Bitstream.original_bytes, Bitstream.jpeg_bytes_at_equal_ssim)
                    .outerjoin(Bitstream, Bitstream.content_sha256 == Job.content_sha256)
                    .where(Job.id.in_(list(by_job))))}
            for job_id, files in by_job.items():
                r = rows.get(job_id)
                for k, c in enumerate(files):
                    if r is None or r.state in ("pending", "running"):
                        continue  # no verdict (stopped)
                    already = before.get(job_id) == "done" or job_id not in newly
                    v = FileVerdict(c.path, r.state, r.error_code, r.error_message, c.st.st_size,
                                    already=already and r.state == "done")
                    verdicts[c.path] = v
                    if r.state == "done" and k == 0 and not already:
                        result.nicd_bytes += r.nicd_bytes or 0
                        result.original_bytes += r.original_bytes or 0
                        result.jpeg_bytes_at_equal_ssim += r.jpeg_bytes_at_equal_ssim or 0
            done_shas = [r.content_sha256 for r in rows.values() if r.state == "done"]
            if done_shas:  # also the files whose content was coded before (a copy, or an earlier run)
                policy.apply(done_shas)
            for c in chunk:
                v = verdicts.get(c.path)
                if v is None:
                    result.no_verdict += 1
                    continue
                if v.state == "done":
                    if v.already:
                        result.already += 1
                    else:
                        result.done += 1
                elif v.state == "skipped":
                    result.skipped += 1
                    result.failures.append({"path": v.path, "state": v.state, "code": v.code, "message": v.message})
                else:
                    result.failed += 1
                    result.failures.append({"path": v.path, "state": v.state, "code": v.code, "message": v.message})
                done_files += 1
                done_bytes += c.st.st_size
                report(ScanProgress(len(cands), total_bytes, done_files, done_bytes, verdict=v))
        result.no_verdict = len(cands) - (result.done + result.already + result.failed + result.skipped)
        result.deleted_originals = policy.deleted
        with store.write() as conn:
            queue.release(conn, owner)
        store.checkpoint()
    finally:
        store.close()
    result.seconds = time.monotonic() - t0
    report(ScanProgress(len(cands), total_bytes, result.files - result.no_verdict, total_bytes, phase="finished"))
    return result


def _file_message(store, path: str) -> str | None:
    with store.read() as conn:
        return conn.execute(select(File.error_message).where(File.path == path)).scalar()
