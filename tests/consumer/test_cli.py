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


def test_assets_list_and_fetch_cover_the_lm_eval_tasks(tmp_path, monkeypatch):
    """The BIG-bench data and the lm-eval task folder are assets too: listed, and fetched on request (one can
    fetch everything before going offline)."""
    import loram.harness

    monkeypatch.setenv("LORAM_CACHE", str(tmp_path))
    rows = {line.split()[0]: line.split() for line in runner.invoke(app, ["assets", "list"]).stdout.splitlines()[2:]}
    assert rows["bigbench"][1:4] == ["data", "no", "bigbench==1.0.0"] and rows["bigbench"][4] == str(tmp_path / "bigbench")
    assert rows["lm-eval-tasks"][2] == "no" and rows["lm-eval-tasks"][-1] == str(tmp_path / "lm_eval_tasks")
    (tmp_path / "bigbench").mkdir()
    assert runner.invoke(app, ["assets", "list"]).stdout.split("bigbench")[1].split()[1] == "yes"

    monkeypatch.setattr(loram.harness, "task_dir", lambda: tmp_path / "lm_eval_tasks")  # no 358 MB download here
    result = runner.invoke(app, ["assets", "fetch", "--no-model", "--no-data", "--lm-eval-tasks"])
    assert result.exit_code == 0 and result.stdout == f"tasks  {tmp_path / 'lm_eval_tasks'}\n"
