"""docs/cli.md is the generated CLI reference; it must match the current command line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import typer

from loram.cli import app
from loram.cli_reference import main, render

DOC = Path(__file__).parent.parent / "docs" / "cli.md"
# Leaf commands whose --help has no "Examples:" epilog: `loram assets list` takes no arguments or options.
NO_EXAMPLES = {"loram assets list"}


def _commands(command=None, path=("loram",)):
    """(command path, is a group) for the typer app and every command and subcommand it registers, walked
    through the click group typer builds (typer vendors its own click classes: groups have `.commands`)."""
    command = typer.main.get_command(app) if command is None else command
    subcommands = getattr(command, "commands", None)
    yield " ".join(path), subcommands is not None
    for name, sub in (subcommands or {}).items():
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


def _section(text: str, command: str) -> str:
    return text.split(f"## `{command}`\n")[1].split("\n## ")[0]


def test_cli_reference_is_in_sync():
    assert main(["--check", str(DOC)]) == 0, "run: python -m loram.cli_reference > docs/cli.md"


def test_the_command_walk_finds_every_command():
    commands = dict(_commands())
    expected_leaves = {"demo", "train", "recover", "merge", "eval", "plan", "generate", "pull", "push",
                       "publish prune", "publish align", "publish selfgen", "publish push", "assets fetch", "assets list",
                       "assets path"}
    assert {f"loram {c}" for c in expected_leaves} <= {c for c, group in commands.items() if not group}
    assert {"loram", "loram assets", "loram publish"} <= {c for c, group in commands.items() if group}


def test_every_command_is_documented_with_examples():
    doc = DOC.read_text(encoding="utf-8")
    commands = dict(_commands())
    headings = re.findall(r"^## `(.+)`$", doc, flags=re.MULTILINE)
    assert sorted(headings) == sorted(commands), "docs/cli.md sections differ from the command line's commands"
    assert len(headings) == len(set(headings))
    for command, group in commands.items():
        section = _section(doc, command)
        assert f"Usage: {command} [OPTIONS]" in section, command
        if not group and command not in NO_EXAMPLES:
            assert "Examples:" in section and f"$ {command}" in section, command
    assert NO_EXAMPLES.issubset(commands)  # the exemption names a real command


def test_rendering_does_not_depend_on_the_terminal_width():
    env = {**os.environ, "COLUMNS": "60"}
    proc = subprocess.run([sys.executable, "-m", "loram.cli_reference"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout == render()
