"""``nicd watch``: the long-running service.

Threads:

- the watchdog observer (hints only, see :mod:`nicd.daemon.watcher`);
- *discovery*: the reconcile scan at start and every ``rescan_minutes``, the settle gate for hinted
  paths, ingest (hash → job);
- *worker*: claims batches, encodes, stores (see :mod:`nicd.daemon.worker`);
- the main thread: waits for the stop event, supervises the others, speaks sd_notify (READY, STATUS,
  WATCHDOG only while the worker is alive and beating, STOPPING) and writes a heartbeat row for
  ``nicd status``.

Stopping (SIGTERM → ``stop_event``): intake stops at once, the worker gets a few seconds to finish the
image in hand; anything still held is released back to ``pending`` (a result that arrives later is
dropped by the lease check), the WAL is checkpointed, and ``run_watch`` returns 0 well within 10 s.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue as queue_mod
import socket
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import update

from ..config import Config
from ..errors import NicdError, StorageError
from ..store import migrate, queue
from ..store.engine import Store, redact
from ..store.models import Daemon, utcnow
from ..store.queue import new_owner
from . import originals
from .discovery import MAX_SETTLE_SECONDS, Ingestor, NameFilter, reconcile_root, root_for, walk
from .notify import Notifier
from .watcher import Hint, Watcher
from .worker import Worker

log = logging.getLogger("nicd.daemon")

STOP_GRACE_SECONDS = 6.0  # the worker may finish the image in hand; SIGTERM → exit stays < 10 s
TICK_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
WORKER_STALL_SECONDS = 300.0  # no WATCHDOG=1 while the worker has not beaten for this long
EXPIRED_LEASE_CHECK_SECONDS = 60.0


def load_codec_for(config: Config):
    from ..codec.api import load_codec

    return load_codec(config.codec.model, config.codec.device)


@dataclass(order=True)
class _Due:
    at: float
    path: str = field(compare=False)
    root: str = field(compare=False)
    first: float = field(compare=False)


class Discovery:
    """Reconcile scans + settle gate + ingest. Runs in its own thread in the daemon."""

    def __init__(self, store: Store, config: Config, watcher: Watcher | None, stop: threading.Event,
                 work_available: threading.Event, *, on_done_content=None):
        self.store = store
        self.config = config
        self.roots = list(config.watch.roots)
        self.names = NameFilter(config.watch.include, config.watch.exclude)
        self.settle = float(config.watch.settle_seconds)
        self.watcher = watcher
        self.stop = stop
        self.work_available = work_available
        self.ingestor = Ingestor(store)
        self.on_done_content = on_done_content
        self.rescan_requested = threading.Event()
        self.rescan_requested.set()  # the first scan at start
        self.last_scan: float | None = None
        self.scans = 0
        self.ingested = 0
        self._heap: list[_Due] = []
        self._due: dict[str, _Due] = {}
        self.beat = time.monotonic()

    @property
    def rescan_seconds(self) -> float:
        s = self.config.watch.rescan_minutes * 60.0
        if self.watcher is not None and self.watcher.scan_only:
            s = min(s, 300.0)
        return s

    def schedule(self, path: str, root: str, at: float) -> None:
        old = self._due.get(path)
        first = old.first if old else time.time()
        d = _Due(at, path, root, first)
        self._due[path] = d
        heapq.heappush(self._heap, d)

    def handle_hint(self, hint: Hint) -> None:
        root = root_for(hint.path, self.roots)
        if root is None:
            return
        if hint.is_dir:
            if hint.gone:
                return  # files inside are checked by the next scan (never deleted on an event)
            if os.path.isdir(hint.path) and not os.path.islink(hint.path):
                rel = os.path.relpath(hint.path, root)
                if rel != "." and not all(self.names.wants_dir(p) for p in rel.split(os.sep)):
                    return
                for cand in walk(hint.path, root, self.names, should_stop=self.stop.is_set):
                    self.schedule(cand.path, root, time.time() + self.settle)
            return
        if not self.names.wants_path(hint.path, root):
            return
        self.schedule(hint.path, root, time.time() + self.settle)  # quiet period: each event resets it

    def run(self) -> None:
        while not self.stop.is_set():
            self.beat = time.monotonic()
            now = time.time()
            if self.rescan_requested.is_set() or (self.last_scan is not None and now - self.last_scan >= self.rescan_seconds):
                self.rescan_requested.clear()
                self.full_scan()
                continue
            self._drain_hints(timeout=self._next_wait())
            self._process_due()

    def _next_wait(self) -> float:
        if self._heap:
            return max(0.0, min(TICK_SECONDS, self._heap[0].at - time.time()))
        return TICK_SECONDS

    def _drain_hints(self, timeout: float) -> None:
        hints = self.watcher.hints if self.watcher is not None else None
        if hints is None:
            self.stop.wait(timeout)
            return
        try:
            h = hints.get(timeout=timeout)
        except queue_mod.Empty:
            return
        self.handle_hint(h)
        for _ in range(10000):
            try:
                self.handle_hint(hints.get_nowait())
            except queue_mod.Empty:
                break

    def _process_due(self) -> None:
        now = time.time()
        while self._heap and self._heap[0].at <= now and not self.stop.is_set():
            d = heapq.heappop(self._heap)
            if self._due.get(d.path) is not d:
                continue  # superseded by a later hint
            del self._due[d.path]
            self._ingest(d)

    def _ingest(self, d: _Due) -> None:
        try:
            out = self.ingestor.ingest(d.path, d.root, settle=self.settle)
        except StorageError as exc:
            log.error("cannot record %s: %s [%s]; retrying later", d.path, exc, exc.code)
            self.schedule(d.path, d.root, time.time() + 30)
            return
        if out.kind == "unstable":
            if time.time() - d.first > MAX_SETTLE_SECONDS:
                self.ingestor.fail_unstable(d.path, d.root)
                return
            self.schedule(d.path, d.root, max(out.retry_at or 0, time.time() + 0.2))
        elif out.kind == "queued":
            self.ingested += 1
            if out.job_state == "pending":
                self.work_available.set()
            elif out.job_state == "done" and self.on_done_content is not None:
                self.on_done_content(out.sha256)

    def full_scan(self) -> None:
        t0 = time.time()
        total = 0
        for root in self.roots:
            if self.stop.is_set():
                return
            try:
                todo, summary = reconcile_root(self.store, root, self.names, should_stop=self.stop.is_set)
            except StorageError as exc:
                log.error("scan of %s failed: %s [%s]", root, exc, exc.code)
                continue
            for cand in todo:
                if cand.path not in self._due:
                    changed_at = max(cand.st.st_mtime_ns, cand.st.st_ctime_ns) / 1e9
                    self.schedule(cand.path, root, max(changed_at + self.settle, time.time()))
            total += len(todo)
            log.info("scan of %s: %d files, %d new or changed, %d missing%s", root, summary["seen"], summary["changed"],
                     summary["missing"], " (root unavailable)" if not summary["available"] else "")
        self.scans += 1
        self.last_scan = time.time()
        log.debug("full scan done in %.1f s (%d to ingest)", self.last_scan - t0, total)


class WorkerLoop:
    def __init__(self, worker: Worker, stop: threading.Event, work_available: threading.Event, store: Store,
                 sweep_seconds: float = 1800.0):
        self.worker = worker
        self.stop = stop
        self.work_available = work_available
        self.store = store
        self.backoff = 0.0
        self.sweep_seconds = sweep_seconds
        self.next_sweep = 0.0  # the first idle moment: originals left behind by a crash after a commit
        self.policy_due: queue_mod.SimpleQueue[str] = queue_mod.SimpleQueue()

    def request_policy(self, sha: str) -> None:
        """Discovery found a file whose content is already done: the policy runs on this (worker) thread."""
        self.policy_due.put(sha)
        self.work_available.set()

    def apply_requested(self) -> None:
        shas: set[str] = set()
        while True:
            try:
                shas.add(self.policy_due.get_nowait())
            except queue_mod.Empty:
                break
        policy = self.worker.policy
        if shas and policy is not None:
            try:
                policy.apply(sorted(shas), should_stop=self.stop.is_set)
            except StorageError as exc:
                log.error("originals policy: %s [%s]; retried on the next sweep", exc, exc.code)

    def sweep(self) -> None:
        """Apply the originals policy to every eligible file (idempotent)."""
        policy = self.worker.policy
        if policy is not None and policy.policy != "keep":
            n = policy.apply(None, should_stop=self.stop.is_set)
            if n:
                log.info("originals policy: %d files handled on the sweep", n)
        self.next_sweep = time.monotonic() + self.sweep_seconds

    def run(self) -> None:
        while not self.stop.is_set():
            self.worker.beat()
            self.apply_requested()
            try:
                verdicts = self.worker.run_batch()
                self.backoff = 0.0
            except StorageError as exc:
                self.backoff = min(60.0, max(1.0, self.backoff * 2))
                log.error("storage error: %s [%s]; pausing %.0f s", exc, exc.code, self.backoff)
                self.worker.stats.last_error = f"{exc.code}: {exc}"
                self.stop.wait(self.backoff)
                continue
            if verdicts is None:
                if time.monotonic() >= self.next_sweep:
                    try:
                        self.sweep()
                    except StorageError as exc:
                        log.error("originals sweep: %s [%s]", exc, exc.code)
                        self.next_sweep = time.monotonic() + 60
                    continue
                self.work_available.wait(2.0)
                self.work_available.clear()


def _status_line(counts: dict, stats, watcher: Watcher | None) -> str:
    s = (f"pending {counts['pending']}, running {counts['running']}, done {counts['done']}, "
         f"failed {counts['failed']}, skipped {counts['skipped']}")
    if watcher is not None and watcher.scan_only:
        s += " (scan-only: " + (watcher.scan_only_reason or "") + ")"
    if stats.last_error:
        s += f"; last error {stats.last_error[:120]}"
    return s


def open_store(config: Config) -> Store:
    """Writer store with the schema checked (a new empty database is created at head)."""
    store = Store(config.storage.database)
    try:
        migrate.ensure_schema(store, create_if_empty=True)
    except BaseException:
        store.close()
        raise
    return store


def run_watch(config: Config, stop_event: threading.Event, *, notifier: Notifier | None = None, codec=None) -> int:
    """Run the daemon until ``stop_event`` is set. Returns the process exit code (0 on a clean stop).

    Raises :class:`nicd.errors.NicdError` for start-up failures (config, schema, lock, model): the CLI
    maps them to exit codes (78 for configuration and schema problems).
    """
    notifier = notifier or Notifier()
    owner = new_owner()
    host, pid = socket.gethostname(), os.getpid()
    notifier.status("opening the database")
    store = open_store(config)
    try:
        with store.write() as conn:
            rec = queue.requeue_expired(conn, current_owner=owner, exclusive=store.exclusive)
            conn.execute(Daemon.__table__.delete().where(Daemon.host == host, Daemon.state != "running"))
            conn.execute(Daemon.__table__.insert().values(owner=owner, host=host, pid=pid, started_at=utcnow(),
                                                          heartbeat_at=time.time(), state="starting"))
        if rec["requeued"] or rec["failed"]:
            log.info("recovered %d interrupted jobs (%d over the attempt limit)", rec["requeued"] + rec["failed"], rec["failed"])
        repaired = originals.repair(store)
        if repaired:
            log.info("finished %d interrupted deletes of originals", repaired)
        notifier.extend_timeout(300)
        notifier.status("loading the model")
        codec = codec if codec is not None else load_codec_for(config)
        log.info("model %s on %s; database %s", getattr(codec, "model_id", "?"), getattr(codec, "device", "?"), redact(config.storage.database))
        return _serve(config, stop_event, notifier, store, codec, owner)
    finally:
        store.close()
        notifier.close()


def _serve(config: Config, stop_event: threading.Event, notifier: Notifier, store: Store, codec, owner: str) -> int:
    stop_intake = threading.Event()
    work_available = threading.Event()
    work_available.set()
    policy = originals.OriginalsPolicy(store, config.originals.policy, codec)
    watcher = Watcher(config.watch.roots) if config.watch.roots else None
    worker = Worker(store, config, codec, owner, stop=stop_intake, policy=policy)
    worker.keep_models()
    loop_box: list[WorkerLoop] = []
    discovery = Discovery(store, config, watcher, stop_intake, work_available,
                          on_done_content=lambda sha: loop_box[0].request_policy(sha))
    if not config.watch.roots:
        log.warning("no [watch] roots configured: only the queue is worked through")
    if watcher is not None:
        watcher.start()
    threads: dict[str, threading.Thread] = {}

    def start_thread(name: str, target) -> None:
        def guarded():
            try:
                target()
            except Exception:  # noqa: BLE001 - restarted by the supervisor
                log.exception("%s thread crashed; it will be restarted", name)

        t = threading.Thread(target=guarded, name=f"nicd-{name}", daemon=True)
        threads[name] = t
        t.start()

    loop = WorkerLoop(worker, stop_intake, work_available, store, sweep_seconds=max(60.0, discovery.rescan_seconds))
    loop_box.append(loop)
    start_thread("discovery", discovery.run)
    start_thread("worker", loop.run)
    _heartbeat(store, owner, "running", "ready", worker, watcher)
    notifier.ready(status="ready: scanning the roots")
    log.info("nicd watch ready (%d roots, policy %s)", len(config.watch.roots), config.originals.policy)
    try:  # the queue counts at once, not only from the first tick on (a short run may never see a tick)
        notifier.status(_heartbeat(store, owner, "running", None, worker, watcher))
    except NicdError as exc:
        log.error("status: %s [%s]", exc, exc.code)

    wd_interval = notifier.watchdog_interval(default=5.0)
    next_wd = next_hb = next_lease = 0.0
    while not stop_event.wait(TICK_SECONDS if not notifier.enabled else min(TICK_SECONDS, wd_interval)):
        now = time.monotonic()
        try:
            if watcher is not None and watcher.check():
                discovery.rescan_requested.set()
            for name, target in (("discovery", discovery.run), ("worker", loop.run)):
                if not threads[name].is_alive() and not stop_event.is_set():
                    start_thread(name, target)
            if now >= next_lease:
                next_lease = now + EXPIRED_LEASE_CHECK_SECONDS
                with store.write() as conn:
                    rec = queue.requeue_expired(conn, current_owner=owner)
                if rec["requeued"]:
                    work_available.set()
            if now >= next_hb:
                next_hb = now + HEARTBEAT_SECONDS
                text = _heartbeat(store, owner, "running", None, worker, watcher)
                notifier.status(text)
        except NicdError as exc:
            log.error("supervisor: %s [%s]", exc, exc.code)
        if now >= next_wd and now - worker.stats.last_beat < WORKER_STALL_SECONDS and threads["worker"].is_alive():
            notifier.watchdog()
            next_wd = now + wd_interval

    # ------------------------------------------------------------------------------------ stopping
    t_stop = time.monotonic()
    notifier.stopping(status="stopping")
    log.info("stopping: finishing the image in hand (at most %.0f s)", STOP_GRACE_SECONDS)
    stop_intake.set()
    work_available.set()
    if watcher is not None:
        watcher.stop(timeout=1.0)
    threads["worker"].join(max(0.0, STOP_GRACE_SECONDS - (time.monotonic() - t_stop)))
    threads["discovery"].join(max(0.1, STOP_GRACE_SECONDS + 0.5 - (time.monotonic() - t_stop)))
    try:
        with store.write() as conn:
            released = queue.release(conn, owner)
        if released:
            log.info("released %d unfinished jobs back to the queue", released)
        _heartbeat(store, owner, "stopped", "stopped", worker, watcher)
    except NicdError as exc:
        log.error("while stopping: %s [%s]", exc, exc.code)
    store.checkpoint()
    log.info("stopped in %.1f s", time.monotonic() - t_stop)
    return 0


def _heartbeat(store: Store, owner: str, state: str, text: str | None, worker: Worker, watcher: Watcher | None) -> str:
    with store.write() as conn:
        counts = queue.counts(conn)
        line = text or _status_line(counts, worker.stats, watcher)
        conn.execute(
            update(Daemon).where(Daemon.owner == owner).values(
                heartbeat_at=time.time(), state=state, status_text=line, processed=worker.stats.done,
                bytes_in=worker.stats.bytes_in, observer_restarts=watcher.restarts if watcher else 0)
        )
    return _status_line(counts, worker.stats, watcher) if text is None else text
