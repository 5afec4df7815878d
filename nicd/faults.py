"""Deterministic crash points for the crash tests (shared/design/reliability.md, section A, after
SQLite's crash loop): with ``NICD_FAULT=<site>:<n>`` the process kills itself with SIGKILL at its n-th
arrival at ``site``, as ``kill -9`` would at that moment: no cleanup, no flush, no atexit.

Random kills rarely land in the narrow windows that matter (between a commit and the deletion of an
original); these points land there every time. Without the variable a point is one comparison.
"""

from __future__ import annotations

import os
import signal
import threading

SITES = frozenset({
    "worker.before-commit",  # a bitstream is encoded and verified, not committed
    "worker.after-commit",  # the done row is durable, the originals policy has not run
    "originals.after-intent",  # the delete intent is durable, the original not yet hidden
    "originals.hidden",  # the original is renamed to its hidden name, not unlinked
    "originals.after-unlink",  # the original is unlinked, the delete not yet recorded
    "write.temp-synced",  # an atomic write's temp file is complete and fsynced, not renamed
    "write.renamed",  # the temp file has its final name, the folder is not fsynced
})


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("NICD_FAULT")
    if not spec:
        return None
    site, _, n = spec.rpartition(":")
    if site not in SITES or not n.isdigit() or int(n) < 1:
        raise RuntimeError(f"NICD_FAULT={spec!r}: expected <site>:<n>, n ≥ 1, site one of {', '.join(sorted(SITES))}")
    return site, int(n)


_ARMED = _armed()
_arrivals = 0
_lock = threading.Lock()


def point(site: str) -> None:
    """A named crash point (one of `SITES`)."""
    global _arrivals
    if _ARMED is None or _ARMED[0] != site:
        return
    with _lock:
        _arrivals += 1
        if _arrivals == _ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)
