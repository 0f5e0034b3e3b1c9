import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

LORAM = str(Path(sys.executable).parent / "loram")


@pytest.mark.slow
def test_quick_demo_runs_as_a_user_would(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([LORAM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ppl = {r["data"]: r["perplexity"] for r in report["results"]}
    assert 15 < ppl["wiki-heldout"] < 40 and 20 < ppl["news"] < 50
    assert "news" in proc.stdout and "perplexity" in proc.stdout  # the table is printed
    saved = yaml.safe_load((out / "demo_config.yaml").read_text())
    assert saved["quick"] is True and saved["out"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.slow
def test_rerun_reuses_the_completed_stage(tmp_path):
    out = tmp_path / "demo"
    first = subprocess.run([LORAM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([LORAM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert second.returncode == 0 and "inputs unchanged: reusing" in second.stderr
    table = [line for line in first.stdout.splitlines() if "original" in line]
    assert table and table == [line for line in second.stdout.splitlines() if "original" in line]
    changed = subprocess.run([LORAM, "demo", "--quick", "--seq-len", "128", "--out", str(out)],
                             capture_output=True, text=True)
    assert changed.returncode == 0 and "reusing" not in changed.stderr
    assert json.loads((out / "report.json").read_text())["config"]["seq_len"] == 128
