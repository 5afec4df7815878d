"""sd_notify in-tree (stdlib only): one datagram to ``$NOTIFY_SOCKET``.

The protocol is stable and documented in sd_notify(3); see ``shared/design/systemd.md`` for why nicd does
not link libsystemd for it. Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Mapping

log = logging.getLogger("nicd.daemon")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address: str | bytes | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]  # Linux abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        self._sock: socket.socket | None = None
        self._warned = False
        self.dropped = 0
        self._lock = threading.Lock()
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_usec: int | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self, default: float = 5.0) -> float:
        """Seconds between WATCHDOG=1 pings: half the unit's WatchdogSec=, else ``default``."""
        if self.watchdog_usec:
            return max(0.5, min(default, self.watchdog_usec / 2e6))
        return default

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        msg = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # Never block: a receiver that stopped reading (its queue holds only
                    # net.unix.max_dgram_qlen datagrams) must not wedge the daemon, nor its SIGTERM path.
                    self._sock.setblocking(False)
                self._sock.sendto(msg, self.address)
                return True
            except BlockingIOError:
                self.dropped += 1
                log.debug("sd_notify queue full: %r dropped", lines)
                return False
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
                    self._warned = True
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
