"""The CLI reference (docs/cli.md), generated from the typer app so it can never drift.

    python -m loram.cli_reference > docs/cli.md      # regenerate
    python -m loram.cli_reference --check docs/cli.md  # exit 1 if out of date

Every command's `--help` text, in the order a user meets them, under one heading per command.
"""

import sys
from pathlib import Path

import typer

HEADER = """# CLI reference

Generated from the `loram` command line by `python -m loram.cli_reference > docs/cli.md`; a test
fails when it is out of date. Each section is the command's `--help`.
"""


def _walk(command, path: list[str], parent=None):
    """(path, command, context) for `command` and every subcommand, depth first in listing order."""
    ctx = command.context_class(command, info_name=path[-1], parent=parent, terminal_width=100,
                                max_content_width=100)
    yield path, command, ctx
    if hasattr(command, "list_commands"):  # a group (typer vendors its own click classes)
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), [*path, name], ctx)


def render() -> str:
    from loram.cli import app

    parts = [HEADER]
    for path, command, ctx in _walk(typer.main.get_command(app), ["loram"]):
        text = command.get_help(ctx).rstrip()
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv[:1] == ["--check"]:
        current = Path(argv[1]).read_text(encoding="utf-8") if len(argv) > 1 else ""
        if current != text:
            print(f"{argv[1]} is out of date; run: python -m loram.cli_reference > {argv[1]}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
