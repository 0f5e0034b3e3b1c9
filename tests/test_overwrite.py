"""`--overwrite` never loses the old output: every command that takes it checks all its inputs and
finishes the new output before the old one goes (train and publish align: tests/shared/test_training.py)."""


import pytest
from tiny_models import assert_left_alone, existing_output, run_loram, tiny_pruned_workspace

from loram.train import train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tiny_pruned_workspace(tmp_path_factory.mktemp("overwrite"))
    train(model=str(root / "pruned"), data=str(root / "qa.jsonl"), out=root / "adapter", steps=1, seq_len=32,
          columns="prompt=question,response=answer", save_every=100)
    return root


# (command line with OUT for the output folder, a phrase of its one-line error)
BAD = {
    "prune: unknown base": (["publish", "prune", "{root}/no-such-base", "--method", "l2", "--out", "OUT"],
                            "no-such-base"),
    "prune: bad calibration": (["publish", "prune", "{root}/base", "--method", "taylor", "--layers", "1:5",
                                "--calib", "{root}/none.txt", "--out", "OUT"], "none.txt"),
    "recover: not an adapter": (["recover", "{root}/pruned", "--out", "OUT"], "adapter"),
    "merge: not an adapter": (["merge", "{root}/pruned", "--out", "OUT"], "adapter"),
}


@pytest.mark.parametrize("case", BAD)
def test_overwrite_with_a_bad_input_keeps_the_old_output(root, tmp_path, case):
    argv, phrase = BAD[case]
    old = tmp_path / "out"
    before = existing_output(old)
    args = [a.replace("{root}", str(root)) if a != "OUT" else old for a in argv]
    proc = run_loram(*args, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and phrase in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert_left_alone(old, before)  # no temporary folder left behind


def test_overwrite_replaces_a_complete_output(root, tmp_path):
    old = tmp_path / "out"
    old.mkdir()
    (old / "precious.txt").write_text("old")
    proc = run_loram("recover", root / "adapter", "--out", old, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (old / "precious.txt").exists() and (old / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
