"""The worker: claim a batch of jobs, encode it on the device, store each result in one transaction.

One batch = up to ``batch_megapixels`` of images (the first one is always taken, however big). For each
claimed job the worker reads the content back from one of its paths and checks its SHA-256 (the file may
have changed since it was hashed), prepares it, and hands the batch to ``Codec.encode_batch``, which
decodes what it wrote on the CPU path and compares before it reports success. The bitstream, its figures
(including the bytes JPEG needs for the same SSIM), the ``done`` state and, the first time, the model's
file (:mod:`nicd.store.kept_models`) are committed together; no database transaction is ever held across
the encoding. The originals policy runs only after that commit, from the stored bytes (see
:mod:`nicd.daemon.originals`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import faults
from ..config import Config
from ..errors import NicdError, StorageError
from ..codec import registry
from ..store import catalog, kept_models, queue
from ..store.engine import Store
from .discovery import read_regular_file

log = logging.getLogger("nicd.worker")

MAX_BATCH_ITEMS = 16
MAX_PIXELS = 100_000_000
MAX_BUSY_SECONDS = 4 * 3600.0  # past this, one batch is taken as hung: no more renewals or beats
# Storage errors that say nothing about the images in hand (the batch is given back with no attempt counted).
TRANSIENT_STORAGE_ERRORS = frozenset({"E_NO_SPACE", "E_DB_BUSY"})


@dataclass
class Verdict:
    job_id: int
    sha256: str
    state: str  # done | failed | skipped | released
    code: str | None = None
    message: str | None = None
    original_bytes: int = 0
    nicd_bytes: int = 0


@dataclass
class WorkerStats:
    batches: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    last_error: str | None = None
    last_beat: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, store: Store, config: Config, codec, owner: str, *,
                 stop: threading.Event | None = None, policy=None,
                 on_verdict: Callable[[Verdict], None] | None = None):
        self.store = store
        self.config = config
        self.codec = codec
        self.owner = owner
        self.stop = stop or threading.Event()
        self.policy = policy
        self.on_verdict = on_verdict
        self.stats = WorkerStats()
        self.current: list[int] = []  # job ids held right now (released by the service on a hard stop)
        self.busy_since: float | None = None
        self.lease_seconds = queue.LEASE_SECONDS
        self.max_busy_seconds = MAX_BUSY_SECONDS
        self._kept: set[str] = set()  # model hashes known to be in the archive
        self._storing: int | None = None  # the job whose verdict is being written

    def keep_models(self) -> list[str]:
        """At start: keep in the archive the installed models that stored bitstreams name but it does
        not keep yet (bitstreams written before it kept models). Returns the ids of those that are not
        installed either: their bitstreams cannot be decoded until that model is installed again."""
        with self.store.read() as conn:
            wanted = kept_models.unkept_in_use(conn)
        missing = []
        for model_id in wanted:
            try:
                data, sha = registry.installed_bytes(model_id)
            except NicdError as err:  # not installed, unreadable, or not matching its name's hash
                log.warning("bitstreams name model %s, which is not kept and cannot be kept now: %s", model_id, err)
                missing.append(model_id)
                continue
            with self.store.write() as conn:
                kept_models.keep(conn, model_id, sha, data)
            log.info("model %s kept in the archive (%d bytes)", model_id, len(data))
        return missing

    def beat(self) -> None:
        self.stats.last_beat = time.monotonic()

    # ------------------------------------------------------------------------------------------ batch
    def run_batch(self, job_ids=None) -> list[Verdict] | None:
        """Claim and process one batch. None when there was nothing to claim."""
        self.beat()
        with self.store.write() as conn:
            jobs = queue.claim(conn, self.owner, limit=MAX_BATCH_ITEMS, lease_seconds=self.lease_seconds,
                               max_megapixels=self.config.codec.batch_megapixels, job_ids=job_ids)
        if not jobs:
            return None
        self.current = [j.id for j in jobs]
        self.busy_since = time.monotonic()
        done = threading.Event()
        renewer = threading.Thread(target=self._keep_alive, args=(list(self.current), done),
                                   name="nicd-lease-renew", daemon=True)
        renewer.start()
        try:
            return self._process(jobs)
        except StorageError as exc:
            # Give back what is still held rather than leave it leased for LEASE_SECONDS (finished jobs
            # are not touched), with no attempt counted: a full disk or a busy database is not the
            # images' fault, and eight such hiccups would fail a good image as a crash loop. Any other
            # storage error counts against the one job whose verdict was being stored, so that an
            # error that recurs on one image ends in a verdict instead of a loop.
            culprit = next((j for j in jobs if j.id == self._storing), None)
            if exc.code in TRANSIENT_STORAGE_ERRORS:
                culprit = None
            self._release([j.id for j in jobs if j is not culprit])
            if culprit is not None:
                self._charge(culprit, exc)
            raise
        finally:
            done.set()
            renewer.join(5.0)
            self.current = []
            self._storing = None
            self.busy_since = None
            self.stats.batches += 1
            self.beat()

    def _keep_alive(self, job_ids: list[int], done: threading.Event) -> None:
        """While a batch is in hand (a big image can take many minutes on a CPU): renew its leases every
        third of the lease and beat, so neither the lease check nor the watchdog takes it for dead.
        A batch busy for longer than ``max_busy_seconds`` is taken as hung: the beats stop."""
        interval = max(0.05, min(60.0, self.lease_seconds / 3.0))
        started = time.monotonic()
        while not done.wait(interval):
            if time.monotonic() - started > self.max_busy_seconds:
                log.error("batch busy for more than %.0f s: leases no longer renewed", self.max_busy_seconds)
                return
            try:
                with self.store.write() as conn:
                    n = queue.renew(conn, self.owner, job_ids, lease_seconds=self.lease_seconds)
            except StorageError as exc:
                log.warning("cannot renew the leases of the batch in hand: %s [%s]", exc, exc.code)
                continue
            except Exception:  # noqa: BLE001 - never let the renewer die silently
                log.exception("lease renewal failed")
                continue
            if done.is_set():
                return
            if n < len(job_ids):
                log.debug("renewed %d of %d leases (the others are finished)", n, len(job_ids))
            self.beat()

    def _process(self, jobs: list[queue.ClaimedJob]) -> list[Verdict]:
        from ..codec.imageio import load_image

        verdicts: list[Verdict] = []
        ready: list[tuple[queue.ClaimedJob, object, int]] = []  # (job, prepared, original size)
        for job in jobs:
            if self.stop.is_set():
                break
            self._storing = job.id
            try:
                data = self._read_content(job)
                if data is None:
                    verdicts.append(self._finish_fail(job, "E_VANISHED", "no file holds this content any more", state="skipped"))
                    continue
                prepared = load_image(data, max_pixels=MAX_PIXELS)
                ready.append((job, prepared, len(data)))
            except NicdError as err:
                verdicts.append(self._finish_fail(job, err.code, err.message))
            except MemoryError:
                verdicts.append(self._finish_fail(job, "E_TOO_LARGE", "not enough memory to read the image"))
            self.beat()
        self._storing = None
        if self.stop.is_set():
            self._release([j.id for j in jobs if j.id not in {v.job_id for v in verdicts}])
            return verdicts
        if ready:
            results = self._encode([p for _, p, _ in ready])
            with self.store.write() as conn:
                queue.renew(conn, self.owner, [j.id for j, _, _ in ready], lease_seconds=self.lease_seconds)
            for (job, prepared, nbytes), res in zip(ready, results):
                self._storing = job.id
                if isinstance(res, NicdError):
                    verdicts.append(self._finish_fail(job, res.code, res.message))
                elif isinstance(res, BaseException):
                    verdicts.append(self._finish_fail(job, "E_INTERNAL", f"{type(res).__name__}: {res}"))
                else:
                    verdicts.append(self._finish_done(job, prepared, nbytes, res))
                self.beat()
        self._storing = None
        done_shas = [v.sha256 for v in verdicts if v.state == "done"]
        if done_shas and self.policy is not None:
            self.policy.apply(done_shas)
        return verdicts

    def _encode(self, prepared: list) -> list:
        kw = self.config.codec.encode_kwargs()
        try:
            return list(self.codec.encode_batch(prepared, **kw))
        except NicdError as err:
            if len(prepared) == 1:
                return [err]
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory on the device: retry one by one
            log.warning("batch of %d failed (%s: %s); encoding one by one", len(prepared), type(exc).__name__, exc)
            if len(prepared) == 1:
                return [exc]
        out = []
        for p in prepared:
            try:
                out.append(self.codec.encode(p, **kw))
            except NicdError as err:
                out.append(err)
            except Exception as exc:  # noqa: BLE001
                log.exception("encoding failed")
                out.append(exc)
            self.beat()
        return out

    def _read_content(self, job: queue.ClaimedJob) -> bytes | None:
        """The bytes of the job's content, from the first path that still holds exactly that content."""
        with self.store.read() as conn:
            paths = catalog.paths_for_content(conn, job.content_sha256)
        for path in paths:
            try:
                data, _ = read_regular_file(path)
            except NicdError as err:
                log.debug("%s: %s", path, err)
                data = None
            if data is not None and hashlib.sha256(data).hexdigest() == job.content_sha256:
                return data
            with self.store.write() as conn:  # it changed or went: discovery will look at it again
                catalog.mark_rehash(conn, path)
        return None

    # ------------------------------------------------------------------------------------- verdicts
    def _finish_done(self, job: queue.ClaimedJob, prepared, nbytes: int, res) -> Verdict:
        from ..baselines import jpeg_bytes_at_ssim

        t0 = time.perf_counter()
        try:
            jpeg = jpeg_bytes_at_ssim(prepared.rgb, res.ssim)
        except Exception as exc:  # noqa: BLE001 - a missing baseline figure must not lose the bitstream
            log.warning("JPEG baseline failed for %s: %s", job.content_sha256[:12], exc)
            jpeg = None
        baseline_seconds = time.perf_counter() - t0
        info = self.codec.info
        model_file = None
        if info.sha256 not in self._kept:
            try:
                model_file = registry.file_bytes(info)
            except NicdError as err:  # the installed file changed under a running daemon
                return self._finish_fail(job, err.code, err.message)
        codec_cfg = self.config.codec
        row = {
            "content_sha256": job.content_sha256,
            "data": res.data,
            "data_sha256": hashlib.sha256(res.data).hexdigest(),
            "original_format": (getattr(prepared, "format", None) or None),
            "width": res.width,
            "height": res.height,
            "original_bytes": nbytes,
            "nicd_bytes": len(res.data),
            "bpp": res.bpp,
            "psnr": _finite(res.psnr),
            "ssim": _finite(res.ssim),
            "ms_ssim": _finite(res.ms_ssim),
            "jpeg_bytes_at_equal_ssim": jpeg,
            "model": res.model_id,
            "quality": res.quality,
            "target_ssim": codec_cfg.target_ssim,
            "target_psnr": codec_cfg.target_psnr,
            "refine_steps": codec_cfg.refine_steps,
            "encode_seconds": res.encode_seconds,
            "decode_seconds": res.decode_seconds,
            "baseline_seconds": baseline_seconds,
        }
        faults.point("worker.before-commit")
        try:
            with self.store.write() as conn:
                ok = queue.complete(conn, job.id, self.owner, row)
                if not ok:
                    raise _LeaseLost()
                if model_file is not None:  # never a bitstream in the archive without its model
                    kept_models.keep(conn, info.model_id, info.sha256, model_file)
            self._kept.add(info.sha256)
            faults.point("worker.after-commit")
        except _LeaseLost:
            log.warning("job %d: lease lost before its result was stored; result dropped", job.id)
            return Verdict(job.id, job.content_sha256, "released")
        self.stats.done += 1
        self.stats.bytes_in += nbytes
        self.stats.bytes_out += len(res.data)
        v = Verdict(job.id, job.content_sha256, "done", original_bytes=nbytes, nicd_bytes=len(res.data))
        log.info("coded %s: %d → %d bytes (%.3f bpp, PSNR %.2f dB, SSIM %.4f)", job.content_sha256[:12], nbytes,
                 len(res.data), res.bpp, res.psnr, res.ssim)
        self._emit(v)
        return v

    def _finish_fail(self, job: queue.ClaimedJob, code: str, message: str, *, state: str = "failed") -> Verdict:
        with self.store.write() as conn:
            ok = queue.fail(conn, job.id, self.owner, code, message, state=state)
        if not ok:
            return Verdict(job.id, job.content_sha256, "released")
        if state == "failed":
            self.stats.failed += 1
            self.stats.last_error = f"{code}: {message}"
        else:
            self.stats.skipped += 1
        log.info("job %d (%s) %s: %s [%s]", job.id, job.content_sha256[:12], state, message, code)
        v = Verdict(job.id, job.content_sha256, state, code, message)
        self._emit(v)
        return v

    def _emit(self, v: Verdict) -> None:
        if self.on_verdict is not None:
            try:
                self.on_verdict(v)
            except Exception:  # noqa: BLE001
                log.exception("verdict callback failed")

    def _charge(self, job: queue.ClaimedJob, exc: StorageError) -> None:
        """Storing this job's verdict failed: retried later, the attempt counted; failed with the
        storage error's code once it has had its attempts."""
        if job.attempts >= queue.MAX_ATTEMPTS:
            try:
                self._finish_fail(job, exc.code, f"storing the result failed {job.attempts} times: {exc.message}")
                return
            except StorageError:
                pass
        self._release([job.id], count_attempt=True)

    def _release(self, ids: list[int], *, count_attempt: bool = False) -> None:
        if not ids:
            return
        try:
            with self.store.write() as conn:
                queue.release(conn, self.owner, ids, count_attempt=count_attempt)
        except StorageError as exc:
            log.warning("could not release jobs %s: %s (their leases will expire)", ids, exc)


class _LeaseLost(Exception):
    pass


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if x == x and x not in (float("inf"), float("-inf")) else None
