"""Logging for a service: plain lines on stderr, with ``<N>`` syslog priority prefixes under journald.

When stderr is connected to the journal, systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` of that stream;
journald parses the ``<N>`` prefix (``SyslogLevelPrefix=yes``, the default), strips it and adds time,
unit and PID itself, so the lines carry none. On a terminal the lines carry a timestamp and a level.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, TextIO

PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<6>nicd.daemon: message`` — one line per record (tracebacks folded into the same entry)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{priority(record.levelno)}>" + text.replace("\n", "\n  ")


def journal_connected(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(v) for v in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return True  # set but not checkable: trust it
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str | int = "INFO", stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the ``nicd`` logger tree for a foreground service (called by the CLI, never the library)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if journal_connected(stream, env):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger("nicd")
    for h in list(root.handlers):
        if getattr(h, "_nicd_service", False):
            root.removeHandler(h)
    handler._nicd_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO))
    root.propagate = False
    return handler
