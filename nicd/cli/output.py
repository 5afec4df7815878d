"""Rendering shared by every command: one `--json` option, rich tables on a terminal, and errors as
one readable line on stderr with a non-zero exit."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from ..errors import NicdError

JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of a table.")

stdout = Console()
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR = 1
EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keys on it


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def error_line(err: NicdError | Exception, path: str | None = None) -> str:
    code = getattr(err, "code", "E_INTERNAL")
    where = path or getattr(err, "path", None)
    if where and where in str(err):
        where = None  # the message already names the file
    return f"nicd: {where + ': ' if where else ''}{err} [{code}]"


def fail(err: NicdError | Exception, *, path: str | None = None, as_json: bool = False, exit_code: int = EXIT_ERROR) -> NoReturn:
    """Print one readable line (or a JSON error object) and exit non-zero."""
    if as_json:
        payload = err.to_dict() if isinstance(err, NicdError) else {"code": "E_INTERNAL", "message": str(err)}
        if path:
            payload["path"] = path
        print_json({"error": payload})
    else:
        stderr.print(error_line(err, path), markup=False)
    raise typer.Exit(exit_code)
