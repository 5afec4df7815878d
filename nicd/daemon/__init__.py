"""The nicd service: folder watcher, durable queue worker, systemd integration, and the one-shot scan.

Library code: it logs (``logging``), never prints, and imports neither rich nor typer.

- :func:`run_watch` — ``nicd watch`` (runs until a stop event is set, returns the exit code);
- :func:`scan` — ``nicd scan DIR...`` (one pass over folders, through the same queue and store);
- :func:`status` — ``nicd status`` (read-only).
"""

from __future__ import annotations

from .oneshot import FileVerdict, ScanProgress, ScanResult, scan
from .service import run_watch
from .status import status

__all__ = ["run_watch", "scan", "status", "ScanProgress", "ScanResult", "FileVerdict"]
