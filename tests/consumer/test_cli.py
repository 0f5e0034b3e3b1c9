"""CLI conventions: one typer app, one-line errors with exit code 2, --config files, help with examples."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from loram.cli import app

runner = CliRunner()
LORAM = str(Path(sys.executable).parent / "loram")


def test_help_lists_consumer_and_publisher_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "assets", "publish"):
        assert command in result.output


def test_command_help_shows_examples():
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "--config" in result.output


def test_user_error_is_one_line_exit_2_no_traceback():
    proc = subprocess.run([LORAM, "assets", "path", "no-such-split"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown asset 'no-such-split'; "
                                                                           "choose one of model, wiki,")
    assert "lm-eval-tasks" in proc.stderr
    proc = subprocess.run([LORAM, "assets", "fetch", "--no-model", "--no-data"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: --no-model --no-data leaves nothing to fetch; drop one of them\n"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_config_file_is_a_clean_error(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("quick: true\nwindows: 3\n")
    proc = subprocess.run([LORAM, "demo", "--config", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option(s) windows" in proc.stderr and "Traceback" not in proc.stderr
