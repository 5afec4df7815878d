"""docs/cli.md documents every registered `nicd` command and every option of it, and nothing that is not
a command; every command's help carries an example."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer

from conftest import REPO, nicd_env
from nicd.cli import app

DOC = REPO / "docs" / "cli.md"
HEADING = re.compile(r"^#{2,4}\s+`?nicd ([a-z][a-z0-9 -]*?)`?\s*$")


def _walk(t: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Command paths from typer's registries, recursively (groups are not commands themselves)."""
    out = []
    for info in t.registered_commands:
        if info.hidden:
            continue
        name = info.name or info.callback.__name__.lower().replace("_", "-")
        out.append(prefix + (name,))
    for group in t.registered_groups:
        if group.hidden:
            continue
        name = group.name or group.typer_instance.info.name
        out.extend(_walk(group.typer_instance, prefix + (name,)))
    return out


def _click_command(path: tuple[str, ...]):
    cmd = typer.main.get_command(app)
    for part in path:
        cmd = cmd.commands[part]
    return cmd


def _sections() -> dict[str, str]:
    """'restore' / 'db upgrade' → the text of its section (up to the next heading)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            m = HEADING.match(line)
            current = m.group(1).strip() if m else None
            if current is not None:
                assert current not in sections, f"docs/cli.md documents `nicd {current}` twice"
                sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


COMMANDS = [" ".join(p) for p in _walk(app)]


def test_the_registry_walk_sees_the_known_commands():
    for name in ("encode", "decode", "info", "models", "restore", "report", "check"):
        assert name in COMMANDS, name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented_with_its_options(command):
    sections = _sections()
    assert command in sections, f"docs/cli.md has no heading for `nicd {command}`"
    body = sections[command]
    assert f"nicd {command}" in body, f"no synopsis for `nicd {command}`"
    assert re.search(rf"Example: `nicd {re.escape(command)}\b", body), f"no example for `nicd {command}`"
    for param in _click_command(tuple(command.split())).params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", body), \
                    f"`nicd {command}`: option {opt} is not documented in its section"


def test_every_documented_command_exists():
    stale = sorted(set(_sections()) - set(COMMANDS))
    assert not stale, f"docs/cli.md documents commands that do not exist: {stale}"


def test_every_command_help_has_an_example():
    for command in COMMANDS:
        help_text = _click_command(tuple(command.split())).help or ""
        assert "Example: nicd " in help_text, f"`nicd {command} --help` has no example line"


def test_the_top_level_help_lists_the_same_commands():
    proc = subprocess.run([sys.executable, "-m", "nicd", "--help"], cwd=str(REPO), env={**nicd_env(), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"^│ ([a-z][a-z0-9-]*)\s{2,}", proc.stdout, flags=re.M))
    top = {c.split()[0] for c in COMMANDS}
    assert listed == top, (listed, top)
