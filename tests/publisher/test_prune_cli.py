"""`loram publish prune` as a user runs it."""

import subprocess
import sys
from pathlib import Path

import yaml
from tiny_models import save_tiny_checkpoint

LORAM = str(Path(sys.executable).parent / "loram")


def run(*args):
    return subprocess.run([LORAM, *map(str, args)], capture_output=True, text=True)


def test_prune_command_writes_a_checkpoint_and_prints_a_summary(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-mha")
    proc = run("publish", "prune", tmp_path / "base", "--method", "l2", "--ratio", "0.5", "--layers", "1:-1",
               "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept 2 KV groups + 20 channels per layer" in proc.stdout and "pruned layers [1, 5)" in proc.stdout
    saved = yaml.safe_load((tmp_path / "out" / "prune_config.yaml").read_text())
    assert saved["method"] == "l2" and saved["ratio"] == 0.5 and saved["layers"] == "1:-1"


def test_config_file_and_flag_override(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-mha")
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(f"base: {tmp_path / 'base'}\nmethod: l1\nratio: 0.75\nlayers: '2:4'\nout: {tmp_path / 'out'}\n")
    proc = run("publish", "prune", "--config", cfg, "--ratio", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "out" / "prune_config.yaml").read_text())
    assert (saved["method"], saved["ratio"], saved["layers"]) == ("l1", 0.5, "2:4")


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    cases = [
        (["--ratio", "1.5"], "--ratio must lie in [0, 1)"),
        (["--layers", "0:40"], "out of bounds"),
        (["--method", "magic"], "--method must be one of random, l1, l2, taylor, magnitude, wanda, sparsegpt; got 'magic'"),
    ]
    for extra, message in cases:
        proc = run("publish", "prune", tmp_path / "base", "--out", tmp_path / "out", *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = run("publish", "prune", tmp_path / "base", "--out", tmp_path / "out", "--method", "l1")
    assert proc.returncode == 2 and "already exists" in proc.stderr and proc.stderr.count("\n") == 1
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_help_has_examples():
    proc = run("publish", "prune", "--help")
    assert proc.returncode == 0 and "Examples:" in proc.stdout and "--scores" in proc.stdout
