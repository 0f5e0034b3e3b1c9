"""benchmarks/gpu_check.py at toy scale on the CPU: the prepared GPU check runs end to end and its table
holds every step (on a CUDA machine: `python benchmarks/gpu_check.py --scale full`)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_scale(tmp_path, monkeypatch):
    import _common
    import gpu_check

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    data = gpu_check.main(["--scale", "tiny", "--device", "cpu"])
    steps = [r["step"] for r in data["rows"]]
    assert len(steps) == 7 and steps[0].startswith("Taylor prune") and steps[-1].startswith("70B-shaped QLoRAM")
    train = next(r for r in data["rows"] if r["step"].startswith("train QLoRA"))
    assert train["peak_mib"] > 0 and "loram plan" in train["check"]
    evaluation = next(r for r in data["rows"] if r["step"].startswith("eval"))
    assert "original" in evaluation["check"] and "loram" in evaluation["check"]
    table = (tmp_path / "gpu_check_tiny.md").read_text()
    assert table.count("\n| ") == 8  # header + 7 steps
