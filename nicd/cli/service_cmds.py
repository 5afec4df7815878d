"""Service commands: watch, scan, status, db upgrade. Thin: parse → load config → one library call → render.

(restore / report / check register here later.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError, NicdError
from . import app
from .output import EXIT_CONFIG, JSON_OPTION, fail, print_json, stderr, stdout, table

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Config file (default: $NICD_CONFIG, ~/.config/nicd/config.toml, /etc/nicd/config.toml).",
    dir_okay=False,
)

EXIT_LOCKED = 75  # EX_TEMPFAIL: another nicd process writes to the database


def _exit_code(err: NicdError) -> int:
    from ..store.engine import LockedError, SchemaError

    # a read-only or damaged database is fixed by the operator, not by a restart: EX_CONFIG
    if isinstance(err, (ConfigError, SchemaError)) or err.code in ("E_MODEL_NOT_FOUND", "E_DB_READONLY", "E_DB_CORRUPT"):
        return EXIT_CONFIG
    if isinstance(err, LockedError):
        return EXIT_LOCKED
    from ..errors import ModelError

    if isinstance(err, ModelError):
        return EXIT_CONFIG
    return 1


def _config(path: Optional[Path], as_json: bool = False):
    from ..config import load_config

    try:
        return load_config(path)
    except ConfigError as err:
        fail(err, as_json=as_json, exit_code=EXIT_CONFIG)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


@app.command()
def watch(
    config: Optional[Path] = CONFIG_OPTION,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG | INFO | WARNING | ERROR"),
) -> None:
    """Run the daemon in the foreground: watch the configured roots and compress every new image.

    Logs to stderr (journald-friendly under systemd), speaks sd_notify when NOTIFY_SOCKET is set, and
    stops cleanly on SIGTERM or Ctrl-C (exit 0). Exit 78 on a configuration or schema problem.

    Example: nicd watch --config /etc/nicd/config.toml
    """
    from ..daemon.logs import setup_logging
    from ..daemon.service import run_watch

    setup_logging(log_level)
    cfg = _config(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        code = run_watch(cfg, stop)
    except NicdError as err:
        fail(err, exit_code=_exit_code(err))
    _exit_now_if_still_encoding(code)
    raise typer.Exit(code)


def _exit_now_if_still_encoding(code: int) -> None:
    """A worker still inside torch after the stop's grace period (its job already released to the queue,
    the database closed) must not meet the interpreter's shutdown: tearing down torch's thread pool
    under a running kernel aborts the process ("terminate called without an active exception",
    SIGABRT), and systemd would record a failed stop. Leave without finalizing instead."""
    if any(t.name == "nicd-worker" and t.is_alive() for t in threading.enumerate()):
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@app.command()
def scan(
    dirs: List[Path] = typer.Argument(..., help="Folders (or files) to compress, recursively."),
    config: Optional[Path] = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Compress every image under the folders once, through the same queue and store as the daemon.

    Shows a progress bar (images, MB/s, ETA). Exit 0 when every file got a verdict; the files that
    failed are listed at the end with their error codes. Runs on the embedded defaults when there is
    no config file (SQLite under ~/.local/share/nicd, CPU, the shipped model).

    Example: nicd scan ~/Pictures/2024 --json
    """
    from ..daemon.oneshot import scan as run_scan

    cfg = _config(config, as_json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    progress_cb = None
    progress = None
    if not as_json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]scan"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=stderr, transient=False,
        )
        task = None
        t0 = time.monotonic()

        def progress_cb(p):
            nonlocal task
            if task is None:
                task = progress.add_task("scan", total=max(p.total_files, 0), rate="")
            elapsed = max(time.monotonic() - t0, 1e-6)
            progress.update(task, completed=p.done_files, total=p.total_files,
                            rate=f"{p.done_bytes / 1e6 / elapsed:.1f} MB/s")

        progress.start()
    try:
        try:
            result = run_scan([str(d) for d in dirs], cfg, progress_cb, stop_event=stop)
        except KeyboardInterrupt:
            stop.set()
            raise typer.Exit(130)
    except NicdError as err:
        if progress is not None:
            progress.stop()
        fail(err, as_json=as_json, exit_code=_exit_code(err))
    finally:
        if progress is not None:
            progress.stop()
    code = 0 if result.complete else 1
    if as_json:
        print_json(result.to_dict())
        raise typer.Exit(code)
    saved = 1 - result.nicd_bytes / result.original_bytes if result.original_bytes else 0.0
    stdout.print(
        f"{result.files} images: {result.done} coded, {result.already} already done, "
        f"{result.failed} failed, {result.skipped} skipped"
        + (f", {result.no_verdict} without verdict" if result.no_verdict else "")
        + f" in {result.seconds:.1f} s"
    )
    if result.done:
        stdout.print(f"{_human_bytes(result.original_bytes)} → {_human_bytes(result.nicd_bytes)} ({saved:.0%} smaller)"
                     + (f"; JPEG at equal SSIM would need {_human_bytes(result.jpeg_bytes_at_equal_ssim)}"
                        if result.jpeg_bytes_at_equal_ssim else ""))
    if result.deleted_originals:
        stdout.print(f"{result.deleted_originals} originals deleted (policy delete; `nicd restore` brings them back)")
    if result.failures:
        stdout.print(f"{len(result.failures)} without a bitstream:")
        for f in result.failures:
            stdout.print(f"  {f['path']}: {f['message']} [{f['code']}]", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def status(config: Optional[Path] = CONFIG_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Show the daemon's state, the queue counts and throughput (read-only; safe while the daemon runs).

    Example: nicd status --json
    """
    from ..daemon.status import status as get_status

    cfg = _config(config, as_json)
    try:
        st = get_status(cfg)
    except NicdError as err:
        fail(err, as_json=as_json, exit_code=_exit_code(err))
    if as_json:
        print_json(st)
        return
    d = st["daemon"]
    line = f"daemon: {d['state']}"
    if d["state"] == "running":
        line += f" (pid {d['pid']} on {d['host']}, since {d['since']})"
    stdout.print(line)
    if d.get("status"):
        stdout.print(f"status: {d['status']}")
    stdout.print(f"database: {st['database']}" + ("" if st["database_exists"] else " (not created yet)"))
    j = st["jobs"]
    stdout.print(table("jobs", list(j), [list(j.values())]))
    t = st["totals"]
    if t["images"]:
        stdout.print(f"stored: {t['images']} images, {_human_bytes(t['original_bytes'])} → {_human_bytes(t['nicd_bytes'])}; "
                     f"last hour {st['throughput']['images_last_hour']} images")
    for f in st["recent_failures"]:
        stdout.print(f"failed: {f.get('path') or f.get('content_sha256', '')[:12]} [{f['code']}] {f['message']}", markup=False)


db_app = typer.Typer(help="Database schema: `nicd db upgrade` applies the migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(config: Optional[Path] = CONFIG_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Create the database, or bring its schema up to this nicd's revision (a backup is made first).

    Refused while the daemon runs (stop it first). Example: nicd db upgrade --config /etc/nicd/config.toml
    """
    from ..store import migrate
    from ..store.engine import Store, redact

    cfg = _config(config, as_json)
    try:
        with Store(cfg.storage.database) as store:
            res = migrate.upgrade(store)
    except NicdError as err:
        fail(err, as_json=as_json, exit_code=_exit_code(err))
    res["database"] = redact(cfg.storage.database)
    if as_json:
        print_json(res)
    elif res["changed"]:
        stdout.print(f"database {res['database']}: upgraded from {res['from'] or 'empty'} to {res['to']}"
                     + (f" (backup: {res['backup']})" if res["backup"] else ""))
    else:
        stdout.print(f"database {res['database']}: already at {res['to']}")
