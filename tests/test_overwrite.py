"""`--overwrite` never loses the old output: every command that takes it checks all its inputs and
finishes the new output before the old one goes (train and publish align: tests/shared/test_training.py)."""


import pytest
from tiny_models import assert_left_alone, existing_output, file_tree, run_loram, tiny_pruned_workspace

from loram.recover import recover
from loram.train import train


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tiny_pruned_workspace(tmp_path_factory.mktemp("overwrite"))
    train(model=str(root / "pruned"), data=str(root / "qa.jsonl"), out=root / "adapter", steps=1, seq_len=32,
          columns="prompt=question,response=answer", save_every=100)
    recover(adapter=str(root / "adapter"), out=root / "recovered")
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


# (command line with IN for the input that is also --out, what IN is, the phrase of the refusal)
INPUT_AS_OUT = {
    "recover: --out is the adapter": (["recover", "IN", "--out", "IN"], "adapter", "is the adapter"),
    "recover: --out holds the adapter": (["recover", "IN/adapter", "--out", "IN"], "adapter", "holds the adapter"),
    "merge: --out is --base": (["merge", "{root}/recovered", "--base", "IN", "--out", "IN"], "base", "is --base"),
    "merge: --out is the adapter": (["merge", "IN", "--out", "IN"], "recovered", "is the adapter"),
    "train: --out is the model": (["train", "IN", "--data", "{root}/qa.jsonl", "--columns",
                                   "prompt=question,response=answer", "--steps", "1", "--out", "IN"], "pruned",
                                  "is the model"),
    "train: --out holds --data": (["train", "{root}/pruned", "--data", "IN/qa.jsonl", "--columns",
                                   "prompt=question,response=answer", "--steps", "1", "--out", "IN"], "qa.jsonl",
                                  "holds --data"),
    "publish align: --out is the pruned model": (["publish", "align", "IN", "--data", "{root}/qa.jsonl", "--steps",
                                                  "1", "--seq-len", "16", "--out", "IN"], "pruned",
                                                 "is the pruned model"),
    "publish prune: --out is the model": (["publish", "prune", "IN", "--method", "l2", "--layers", "1:3", "--out",
                                           "IN"], "base", "is the model"),
}


@pytest.mark.parametrize("case", INPUT_AS_OUT)
def test_an_input_is_never_the_output(root, tmp_path, case):
    """--overwrite onto one of the command's own inputs (or a folder holding one) would delete the input."""
    import shutil

    argv, what, phrase = INPUT_AS_OUT[case]
    source = root / what
    inside = "IN/" + what in " ".join(argv)
    work = tmp_path / "in"
    if inside:  # the input sits inside the folder given as --out
        work.mkdir()
        (shutil.copytree if source.is_dir() else shutil.copy)(source, work / what)
    else:
        (shutil.copytree if source.is_dir() else shutil.copy)(source, work)
    before = file_tree(work)
    args = [a.replace("{root}", str(root)).replace("IN", str(work)) for a in argv]
    proc = run_loram(*args, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --out ") and phrase in proc.stderr, proc.stderr
    assert "writing there would replace it; choose another --out" in proc.stderr
    assert file_tree(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_cache_is_never_the_output(root, tmp_path):
    """`--out` onto the Hugging Face home (downloaded models, the token) or the LoRAM cache with --overwrite
    would delete it; `loram pull --out $HF_HOME --overwrite` did."""
    home, cache = tmp_path / "hf-home", tmp_path / "loram-cache"
    for folder in (home / "hub", cache):
        folder.mkdir(parents=True)
        (folder / "kept.txt").write_text("downloaded")
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "LORAM_CACHE": str(cache)}
    before = file_tree(tmp_path)
    for out, what in ((home, "is the Hugging Face home (HF_HOME)"), (tmp_path, "holds the Hugging Face home"),
                      (cache, "is the LoRAM cache (LORAM_CACHE)")):
        proc = run_loram("recover", root / "adapter", "--out", out, "--overwrite", cwd=tmp_path, **env)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: --out {out} {what}"), proc.stderr
        assert "writing there would delete it; choose another --out" in proc.stderr
    assert file_tree(tmp_path) == before


def test_the_working_folder_is_never_replaced(root, tmp_path):
    """`recover ... --out . --overwrite` in a folder with files deleted them and left the shell in a deleted
    folder; `--out ..` would have too. Refused, for train's run folders as for the atomic outputs; an empty working
    folder is filled in place, so the shell stays in the folder it sees."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    before = file_tree(tmp_path)
    train_args = ["train", root / "pruned", "--data", root / "qa.jsonl", "--columns", "prompt=question,response=answer",
                  "--steps", "1", "--seq-len", "32"]
    for args, out, where in ((["recover", root / "adapter"], ".", "is"), (["recover", root / "adapter"], "..", "holds"),
                             (train_args, ".", "is"), (["merge", root / "recovered"], ".", "is")):
        proc = run_loram(*args, "--out", out, "--overwrite", cwd=work)
        assert proc.returncode == 2, proc.stderr
        cwd = "" if where == "is" else f" {work.resolve()}"
        assert proc.stderr == (f"error: --out {out} {where} the working folder{cwd}: writing there would "
                               "replace it and leave the shell in a deleted folder; choose another --out, e.g. a new "
                               "folder inside it\n"), proc.stderr
    assert file_tree(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    proc = run_loram("recover", root / "adapter", "--out", ".", cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert empty.stat().st_ino == inode and (empty / "adapter_model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_is_read_as_a_shell_reads_it(root, tmp_path):
    """A quoted '~/x' is the home folder's x (it was a literal './~/x'); '.' is the working folder (its empty
    name had no sibling to write beside); a name too long for the file system is one line."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    proc = run_loram("recover", root / "adapter", "--out", "~/rec", cwd=work, HOME=str(home))
    assert proc.returncode == 0, proc.stderr
    assert (home / "rec" / "adapter_model.safetensors").is_file() and not any(work.iterdir())
    proc = run_loram("recover", root / "adapter", "--out", ".", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "adapter_model.safetensors").is_file() and not list(tmp_path.glob("*tmp-*"))
    proc = run_loram("recover", root / "adapter", "--out", work / ("n" * 300), cwd=work)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot use ") and "name too long" in proc.stderr
