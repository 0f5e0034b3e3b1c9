"""What a user should be told, through the real `loram` command: a `warning: ...` line where the run goes
on, one `error: ...` line (exit code 2) where it is refused."""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_checkpoint

from loram.publisher.prune import prune
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, sha256_file

LORAM = str(Path(sys.executable).parent / "loram")
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(4) for b in range(3)]
TEXT = "\n\n".join(f"paragraph {i} " + "words " * 30 for i in range(30))
TRAIN = ["--columns", "prompt=question,response=answer", "--seq-len", "32", "--batch", "2"]
ALIGN = ["--seq-len", "16", "--batch", "2"]


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([LORAM, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _refused(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _out_of_range(folder: Path) -> None:
    """Every kept MLP channel of layer 1 beyond the original width, the JSON's tensors sha256 updated."""
    tensors = load_file(str(folder / MANIFEST_TENSORS))
    tensors["layers.1.kept_mlp_channels"] = tensors["layers.1.kept_mlp_channels"] + 1000
    save_file(tensors, str(folder / MANIFEST_TENSORS), metadata={"format": "pt"})
    data = json.loads((folder / MANIFEST_JSON).read_text())
    data["tensors"]["sha256"] = sha256_file(folder / MANIFEST_TENSORS)
    (folder / MANIFEST_JSON).write_text(json.dumps(data))


REFUSED = {  # command -> what its one error line says (a regular expression)
    ("generate", "pruned", "--prompt", ""): "--prompt is empty",
    ("generate", "pruned", "--prompt", "  "): "--prompt is empty",
    ("generate", "pruned", "--prompt", "hi", "--temperature", "-1"): "--temperature must be a number >= 0",
    ("publish", "align", "pruned", "--data", "empty.jsonl", *ALIGN, "--steps", "1", "--out", "never"):
        "data source empty.jsonl holds no text records",
    ("publish", "prune", "base", "--layers", "10:5", "--out", "never"): "empty layer range 10:5; write A:B with A < B",
    ("publish", "push", "bad-indices", "--repo-id", "org/never"):
        r"layer 1: kept MLP channels index out of range \[0, 40\): 10\d\d(, 10\d\d){4} \(and \d+ more\)$",
}
EVAL = ("eval", "lr=1e-4/pruned", "--data", "qa.jsonl", "--columns", "prompt=question,response=answer", "--limit", "2",
        "--seq-len", "32", "--json")
FIRST_TRAIN = ("train", "pruned", "--data", "no-answers.jsonl", *TRAIN, "--steps", "1", "--save-every", "1",
               "--out", "run")
FIRST_ALIGN = ("publish", "align", "pruned", "--data", "text.txt", *ALIGN, "--steps", "1", "--save-every", "1",
               "--out", "aligned")
RESUMED = {
    "train-other": ("train", "pruned", "--data", "qa.jsonl", *TRAIN, "--lr", "1e-3", "--steps", "2", "--out", "run",
                    "--resume"),
    "align-other": ("publish", "align", "pruned", "--data", "other.txt", *ALIGN, "--steps", "2", "--out", "aligned",
                    "--resume"),
    "align-same": ("publish", "align", "./pruned", "--data", "{root}/text.txt", *ALIGN, "--steps", "2",
                   "--save-every", "2", "--out", "aligned", "--resume"),  # the same files, spelled differently
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command of this module, run once, independent ones side by side: {command: CompletedProcess}."""
    root = tmp_path_factory.mktemp("warnings")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    prune(base=str(root / "base"), method="l2", ratio=0.5, layers="1:3", out=root / "pruned")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (root / "no-answers.jsonl").write_text("".join(json.dumps({**r, "answer": ""}) + "\n" for r in QA))
    (root / "text.txt").write_text(TEXT)
    (root / "other.txt").write_text(TEXT.upper())
    (root / "empty.jsonl").write_text("")
    (root / "lr=1e-4").mkdir()
    shutil.copytree(root / "pruned", root / "lr=1e-4" / "pruned")
    shutil.copytree(root / "pruned", root / "bad-indices")
    _out_of_range(root / "bad-indices")

    def run(*commands):  # one after the other
        return [_run(*(str(a).format(root=root) for a in args), cwd=root) for args in commands]

    chains = {(FIRST_TRAIN, "train-other"): (FIRST_TRAIN, RESUMED["train-other"]),
              (FIRST_ALIGN, "align-other", "align-same"): (FIRST_ALIGN, RESUMED["align-other"], RESUMED["align-same"]),
              **{(args,): (args,) for args in (*REFUSED, EVAL)}}
    with ThreadPoolExecutor(3) as pool:
        futures = {names: pool.submit(run, *commands) for names, commands in chains.items()}
        done = {name: proc for names, future in futures.items() for name, proc in zip(names, future.result(),
                                                                                      strict=True)}
    done["root"] = root
    return done


def test_train_with_only_empty_responses_warns_in_one_line(runs):
    proc = runs[FIRST_TRAIN]
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "every response of the 12 examples is empty" in warnings[0], proc.stderr
    assert "'answer'" in warnings[0] and "end-of-turn" in warnings[0]
    assert (runs["root"] / "run" / "checkpoints" / "run_config.json").is_file()
    assert "Warning" not in proc.stderr, proc.stderr  # peft's deprecation noise is not shown (console_warnings)


def test_resume_with_other_data_or_lr_is_refused_naming_them(runs):
    line = _refused(runs["train-other"])
    assert "--resume: --data, --lr differ from the run being resumed" in line, line
    assert "no-answers.jsonl" in line and "0.0002 -> 0.001" in line
    line = _refused(runs["align-other"])
    assert "--resume: --data differs from the run being resumed" in line and "other.txt" in line, line


def test_resume_may_change_steps_and_save_every(runs):
    assert runs[FIRST_ALIGN].returncode == 0, runs[FIRST_ALIGN].stderr
    proc = runs["align-same"]
    assert proc.returncode == 0, proc.stderr
    assert json.loads((runs["root"] / "aligned" / "align_report.json").read_text())["steps"] == 2


@pytest.mark.parametrize("args", list(REFUSED), ids=[" ".join(a[:2]) + f"-{i}" for i, a in enumerate(REFUSED)])
def test_refusals_are_one_clear_line(runs, args):
    line = _refused(runs[args])
    assert re.search(REFUSED[args], line), line
    assert "StopIteration" not in line and len(line) < 400
    assert not (runs["root"] / "never").exists()


def test_eval_takes_a_path_with_an_equals_sign_as_a_model(runs):
    proc = runs[EVAL]
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["results"]
    assert row["name"] == row["model"] == "lr=1e-4/pruned" and row["adapter"] is None


def test_the_cli_shows_loram_warnings_as_one_line_and_hides_known_noise(capsys, monkeypatch):
    import warnings

    from loram.sft_format import TruncationWarning
    from loram.shared.cli_support import console_warnings

    monkeypatch.delenv("RANK", raising=False)
    passed_on = []  # what console_warnings hands to the display it found (Python's, here pytest's)
    with warnings.catch_warnings():  # restores Python's filters and display afterwards
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *args, **kwargs: passed_on.append((category, str(message)))
        console_warnings()
        warnings.warn("3 of 8 examples were longer than seq_len=32 tokens\nand were cut", TruncationWarning, stacklevel=2)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2)
        warnings.warn("something a library wants said", FutureWarning, stacklevel=2)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: 3 of 8 examples were longer than seq_len=32 tokens and were cut"], err
    assert passed_on == [(FutureWarning, "something a library wants said")]  # the deprecation noise nowhere


def test_the_cli_hides_the_trainers_checkpoint_ordering_note_only(caplog):
    """Two checkpoints saved within a second (short runs): the Trainer's note that it orders them by step is
    hidden; the same logger's other warnings still show."""
    import logging

    from transformers.trainer_utils import sort_checkpoints

    from loram.shared.cli_support import console_warnings

    console_warnings()
    caplog.set_level(logging.WARNING, logger="transformers.trainer_utils")
    logger = logging.getLogger("transformers.trainer_utils")
    logger.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
    logger.warning("something the trainer wants said")
    shown = [r.getMessage() for r in caplog.records if r.name == "transformers.trainer_utils"]
    assert shown == ["something the trainer wants said"]
    assert sort_checkpoints.__module__ == "transformers.trainer_utils"  # it logs through the filtered logger


def test_a_stray_rank_outside_a_job_does_not_silence_a_lone_process(monkeypatch, capsys):
    """RANK alone (left in a shell, not set by torchrun with a WORLD_SIZE above 1) makes no process a second one."""
    from loram.shared.errors import say

    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    say("warning: said")
    assert capsys.readouterr().err == "warning: said\n"
    monkeypatch.setenv("WORLD_SIZE", "4")
    say("warning: not said")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_third_party_bars_are_not_drawn_into_a_log(monkeypatch, terminal):
    """Off a terminal the Hub client's and transformers' bars ("Fetching 13 files", "Upload 0 LFS files", "Loading
    weights") were carriage-return noise in logs; on a terminal they stay."""
    import io

    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    from loram.shared.cli_support import quiet_bars_off_a_terminal

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    hub_utils.enable_progress_bars()
    transformers_logging.enable_progress_bar()
    monkeypatch.setattr(sys, "stderr", Stderr())
    try:
        quiet_bars_off_a_terminal()
        assert hub_utils.are_progress_bars_disabled() is not terminal
        assert transformers_logging.is_progress_bar_enabled() is terminal
    finally:
        hub_utils.enable_progress_bars()
        transformers_logging.enable_progress_bar()
