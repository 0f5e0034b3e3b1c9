"""docs/cli.md is the generated CLI reference; it must match the current command line."""

import os
import subprocess
import sys
from pathlib import Path

from loram.cli_reference import main, render

DOC = Path(__file__).parent.parent / "docs" / "cli.md"


def test_cli_reference_is_in_sync():
    assert main(["--check", str(DOC)]) == 0, "run: python -m loram.cli_reference > docs/cli.md"


def test_every_command_is_documented_with_examples():
    text = render()
    for command in ("loram demo", "loram train", "loram recover", "loram merge", "loram eval", "loram plan",
                    "loram publish prune"):
        section = text.split(f"## `{command}`")[1].split("\n## ")[0]
        assert "Usage:" in section and "Examples:" in section, command


def test_rendering_does_not_depend_on_the_terminal_width():
    env = {**os.environ, "COLUMNS": "60"}
    proc = subprocess.run([sys.executable, "-m", "loram.cli_reference"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout == render()
