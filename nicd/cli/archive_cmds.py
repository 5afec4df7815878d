"""Operator commands over the store: restore, report, check. Thin: parse → load config → one library
call (nicd.archive.*) → render. They only read the database (read-only connection), so they are safe
to run while the daemon writes."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.markup import escape

from ..errors import ConfigError, NicdError
from . import app
from .output import EXIT_CONFIG, JSON_OPTION, fail, print_json, stderr, stdout, table

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", dir_okay=False,
    help="Config file (default: $NICD_CONFIG, ~/.config/nicd/config.toml, /etc/nicd/config.toml).",
)
EXIT_INTERRUPTED = 130


def _config(path: Optional[Path], as_json: bool):
    from ..config import load_config

    try:
        return load_config(path)
    except ConfigError as err:
        fail(err, as_json=as_json, exit_code=EXIT_CONFIG)


def _fail(err: NicdError, as_json: bool):
    from ..store.engine import SchemaError

    code = EXIT_CONFIG if isinstance(err, (ConfigError, SchemaError)) else 1
    fail(err, as_json=as_json, exit_code=code)


def _mb(n: float, sep: str = " ") -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{sep}{unit}" if unit == "B" else f"{n:.1f}{sep}{unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def _pct(v) -> str:
    return "" if v is None else f"{v:.0%}"


def _common_folder(folders: list) -> str:
    import os

    real = [f for f in folders if f.startswith("/")]
    if not real:
        return ""
    return os.path.commonpath(real)


def _relative_folder(folder: str, base: str) -> str:
    import os

    if base and folder.startswith("/"):
        rel = os.path.relpath(folder, base)
        return rel
    return folder


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


@contextlib.contextmanager
def _progress(label: str, enabled: bool) -> Iterator:
    """A rich progress bar on stderr when it is a terminal; yields ``update(done, total)`` or None."""
    if not enabled or not stderr.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), console=stderr, transient=True)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


@contextlib.contextmanager
def _library_call(interrupted: str, as_json: bool) -> Iterator[None]:
    """Ctrl-C: one line, exit 130. A NicdError: one line (or its JSON) and its exit code."""
    try:
        yield
    except KeyboardInterrupt:
        stderr.print(f"nicd: {interrupted}", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    except NicdError as err:
        _fail(err, as_json)


def _print_problems(header: str, problems: list) -> None:
    """The failures a command found, one per line on stderr: path, message, error code."""
    if not problems:
        return
    stderr.print(header, markup=False)
    for p in problems:
        where = f"{p.path}: " if p.path else ""
        stderr.print(f"  {where}{p.message or ''} [{p.code}]", markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- restore


@app.command()
def restore(
    paths: List[Path] = typer.Argument(..., help="Files or folders, as recorded in the database (made absolute)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", file_okay=False,
                                       help="Write under this folder, with the layout relative to each watch root "
                                            "(default: back to the original paths)."),
    fmt: str = typer.Option("original", "--format", "-f", help="original | png | jpeg | webp"),
    force: bool = typer.Option(False, "--force", help="Replace a file that is already at the target "
                                                      "(an unchanged original is never replaced)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List what would be written; write nothing."),
    config: Optional[Path] = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Decode stored images back to files, at their original paths or under --out.

    A file is written to its original path only where no file is there (--force replaces another
    file, never an unchanged original); with --out, under that folder with the layout relative to
    each watch root. Original format by default (PNG stays lossless, JPEG/WebP at quality 95),
    original size and mode (alpha), ICC profile and EXIF restored. Every file is written atomically.
    Exit 1 if any file fails; the failures are listed with their error codes.

    Example: nicd restore /srv/photos/2024 --out /tmp/restored
    """
    from ..archive.restore import FORMATS
    from ..archive.restore import restore as run_restore

    fmt = fmt.lower()
    if fmt not in FORMATS:
        fail(NicdError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}", code="E_ARGS"), as_json=as_json,
             exit_code=2)
    cfg = _config(config, as_json)
    stop = threading.Event()
    with _library_call("restore interrupted; the files written so far are complete, no partial file is left",
                       as_json), _progress("restore", not as_json and not dry_run) as update:
        cb = (lambda done, total, _item: update(done, total)) if update else None
        result = run_restore([str(p) for p in paths], cfg, out=str(out) if out else None, format=fmt,
                             force=force, dry_run=dry_run, progress=cb, stop_event=stop)
    code = 0 if result.ok else 1
    if as_json:
        print_json(result.to_dict())
        raise typer.Exit(code)

    if dry_run:
        rows = [(escape(i.path), escape(i.target), i.format, i.status.replace("_", " "),
                 escape((i.message or "") + (f" [{i.code}]" if i.code else ""))) for i in result.items]
        stdout.print(table("restore --dry-run: nothing written", ["file", "would be written to", "format", "action", "note"], rows))
    n_ok = result.count("restored")
    written = sum(i.bytes for i in result.items if i.status == "restored")
    where = f"under {result.out}" if result.out else "to their original paths"
    parts = [f"{result.count('would_restore')} files would be restored {where}" if dry_run
             else f"{n_ok} files restored {where} ({_mb(written)})"]
    if result.count("present"):
        parts.append(f"{result.count('present')} left alone (the original is there, unchanged)")
    if result.count("exists"):
        parts.append(f"{result.count('exists')} skipped (a file is already there; --force replaces it)")
    if result.failures:
        parts.append(f"{len(result.failures)} failed")
    stdout.print(", ".join(parts), markup=False, highlight=False, soft_wrap=True)
    _print_problems("failed:", result.failures)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- report


@app.command()
def report(
    path: Optional[Path] = typer.Argument(None, help="Only the files at or under this path (default: everything)."),
    plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False,
                                        help="Also draw bpp against SSIM per image (nicd and JPEG at equal SSIM) to this PNG."),
    config: Optional[Path] = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Savings per folder and in total, against the originals and against JPEG at equal SSIM.

    Per folder and in total: images, original bytes, nicd bytes, the bytes JPEG needs to reach the
    same SSIM on each image, the savings against both (fractions in --json), mean PSNR / SSIM /
    MS-SSIM. Read-only.

    Example: nicd report /srv/photos --plot /tmp/rd.png
    """
    from ..archive.report import plot as draw
    from ..archive.report import report as run_report

    cfg = _config(config, as_json)
    with _library_call("report interrupted", as_json):
        rep = run_report(cfg, str(path) if path is not None else None)
        plotted = draw(rep, str(plot)) if plot is not None else None
    if as_json:
        d = rep.to_dict()
        if plotted:
            d["plot"] = plotted
        print_json(d)
        return

    base = _common_folder([f["folder"] for f in rep.folders])
    t = rep.total
    groups = [(_relative_folder(f["folder"], base), f) for f in rep.folders]
    if len(groups) != 1:
        groups.append(("total", t))

    def render(title, cols, cells, caption=None):
        tab = table(escape(title), cols, [[escape(name), g["images"], *cells(g)] for name, g in groups])
        tab.caption = caption
        tab.columns[0].overflow = "fold"
        tab.columns[0].min_width = 10
        for c in tab.columns[1:]:
            c.justify = "right"
        stdout.print(tab)

    where = f"{rep.path or 'everything'}" + (f" (folders under {base})" if base else "")
    render(f"nicd report: {where}", ["folder", "images", "original", "nicd", "JPEG", "saved", "saved vs JPEG"],
           lambda g: [_mb(g["original_bytes"]), _mb(g["nicd_bytes"]),
                      _mb(g["jpeg_bytes_at_equal_ssim"]) if g["jpeg_images"] else "",
                      _pct(g["savings_vs_original"]), _pct(g["savings_vs_jpeg"])],
           "JPEG: the bytes JPEG needs to reach the same SSIM on each image")
    if t["images"]:
        render("quality (means per image)", ["folder", "images", "bpp", "PSNR (dB)", "SSIM", "MS-SSIM"],
               lambda g: [_num(g["bpp"], ".3f"), _num(g["mean_psnr"], ".2f"), _num(g["mean_ssim"], ".4f"),
                          _num(g["mean_ms_ssim"], ".4f")])
    if not t["images"]:
        stdout.print("no images stored yet" + (f" under {rep.path}" if rep.path else ""), markup=False, soft_wrap=True)
    if plotted:
        stdout.print(f"plot written to {plotted}", markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ check


@app.command()
def check(
    full: bool = typer.Option(False, "--full", help="Also decode every bitstream and compare with the original "
                                                    "(PSNR/SSIM as recorded) where it still exists."),
    config: Optional[Path] = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Verify every stored bitstream (checksums; with --full, decode and compare with the original).

    Checks each bitstream's length, SHA-256 and container checksums, its recorded size and that its
    model is installed; --full also decodes it and, where the original file still exists, compares
    PSNR / SSIM / MS-SSIM with the figures recorded at coding time. Read-only. Exit 1 when anything
    is wrong, naming each file and error code.

    Example: nicd check --full --json
    """
    from ..archive.check import check as run_check

    cfg = _config(config, as_json)
    with _library_call("check interrupted", as_json), _progress("check", not as_json) as update:
        result = run_check(cfg, full=full, progress=update)
    code = 0 if result.ok else 1
    if as_json:
        print_json(result.to_dict())
        raise typer.Exit(code)
    d = result.to_dict()
    what = "length, SHA-256, container checksums" + (", decoded" if full else "")
    line = f"{d['bitstreams_ok']} of {d['bitstreams']} bitstreams OK ({what})"
    if full:
        line += (f"; {d['compared_with_original']} compared with their originals, "
                 f"{d['originals_gone']} without an original left")
    stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    _print_problems(f"{len(result.problems)} problems:", result.problems)
    raise typer.Exit(code)
