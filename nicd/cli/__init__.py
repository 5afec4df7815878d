"""The `nicd` command line: thin typer commands over library calls (parse → load config → one
library call → render). Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="nicd",
    help="nicd — neural image compression daemon: learned-codec encode/decode, a folder-watching service, an archive CLI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from . import codec_cmds  # noqa: E402,F401  (registers encode/decode/info/models/train/bench)

from . import service_cmds  # noqa: E402,F401  (registers watch/scan/status/db)
from . import archive_cmds  # noqa: E402,F401  (registers restore/report/check)


def main() -> None:
    app(prog_name="nicd")
