"""watchdog observers as hint sources (``shared/design/watcher.md``).

One :class:`watchdog.observers.Observer` for all roots (one inotify instance). The handler does nothing but
put paths on a queue, inside ``try/except``: no I/O, no decoding. ``created``/``modified``/``closed`` give
the path, ``moved`` gives both ends (the destination to look at, the source to re-check), a new or
moved-in directory is listed recursively by the consumer (inotify adds its watch late). Deletes are only
hints too: a file is marked missing only after checking the disk, and never when its root is
unavailable.

:meth:`Watcher.check` is the supervisor tick: a dead observer or emitter (watchdog swallows their errors),
or a root that came back, makes it rebuild the observer; the caller then runs a reconcile scan. When the
kernel refuses watches (``ENOSPC``/``EMFILE``: inotify limits) nicd falls back to scan-only.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("nicd.watcher")


@dataclass(frozen=True)
class Hint:
    path: str
    is_dir: bool = False
    gone: bool = False  # a delete, or the source of a move: re-check, maybe missing


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: "queue.Queue[Hint]"):
        super().__init__()
        self.sink = sink
        self.errors = 0

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            kind = event.event_type
            if kind in ("opened", "closed_no_write"):
                return
            src = os.fsdecode(event.src_path)
            if kind == "moved":
                dest = os.fsdecode(event.dest_path)
                self.sink.put_nowait(Hint(src, event.is_directory, gone=True))
                self.sink.put_nowait(Hint(dest, event.is_directory))
            elif kind == "deleted":
                self.sink.put_nowait(Hint(src, event.is_directory, gone=True))
            elif event.is_directory and kind != "created":
                return  # DirModifiedEvent is noise
            else:
                self.sink.put_nowait(Hint(src, event.is_directory))
        except Exception:  # noqa: BLE001 - an exception here would kill watchdog's dispatcher thread
            self.errors += 1
            log.exception("watch event handler failed (event ignored; the rescan will catch up)")


class Watcher:
    """Owns the observer; ``hints`` is the queue the discovery loop reads."""

    def __init__(self, roots, hints: "queue.Queue[Hint] | None" = None):
        self.roots = list(roots)
        self.hints: "queue.Queue[Hint]" = hints if hints is not None else queue.Queue()
        self.observer: Observer | None = None
        self.scheduled: set[str] = set()
        self.restarts = 0
        self.scan_only = False
        self.scan_only_reason: str | None = None
        self._lock = threading.Lock()
        self._handler = _Handler(self.hints)

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self.scan_only:
            return
        obs = Observer()
        obs.daemon = True
        scheduled = set()
        for root in self.roots:
            if not os.path.isdir(root):
                log.warning("root %s does not exist (yet): not watched; checked again every tick", root)
                continue
            try:
                obs.schedule(self._handler, root, recursive=True)
                scheduled.add(root)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EMFILE):
                    which = "max_user_watches" if exc.errno == errno.ENOSPC else "max_user_instances"
                    log.error("inotify limit reached while watching %s (%s). Raise it with "
                              "`sysctl fs.inotify.%s=...`; nicd goes on in scan-only mode", root, exc, which)
                    self.scan_only = True
                    self.scan_only_reason = f"inotify {which} reached"
                    try:
                        obs.stop()
                    except Exception:  # noqa: BLE001
                        pass
                    return
                log.warning("cannot watch %s: %s (scans still cover it)", root, exc)
        obs.start()
        self.observer = obs
        self.scheduled = scheduled

    def _stop_locked(self, timeout: float = 2.0) -> None:
        obs, self.observer = self.observer, None
        if obs is None:
            return
        try:
            obs.stop()
            obs.join(timeout)
        except Exception as exc:  # noqa: BLE001 - a vanished mount can make unschedule fail (#758)
            log.debug("observer stop: %s", exc)

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._stop_locked(timeout)

    def healthy(self) -> bool:
        obs = self.observer
        if obs is None:
            return False
        if not obs.is_alive():
            return False
        try:
            emitters = list(obs.emitters)
        except Exception:  # noqa: BLE001
            return True
        return all(e.is_alive() for e in emitters)

    def check(self) -> bool:
        """Supervisor tick. Returns True when the observer was (re)built: the caller should rescan."""
        if self.scan_only:
            return False
        with self._lock:
            wanted = {r for r in self.roots if os.path.isdir(r)}
            if self.observer is not None and self.healthy() and wanted == self.scheduled:
                return False
            if self.observer is not None:
                why = "died" if not self.healthy() else "roots changed"
                log.warning("watch observer %s: restarting it", why)
                self.restarts += 1
            self._stop_locked(1.0)
            self._start_locked()
            return True
