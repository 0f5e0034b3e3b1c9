"""Every user-facing failure is one line `error: ...` on stderr with exit code 2 (the Python API raises the
same LoramError); anything else is one line `error: unexpected ...` with exit code 1 (docs/conventions.md).

The CLI cases run the real `loram` command in subprocesses (two at a time: each one pays the import of torch
and transformers) on tiny models built once for the module.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_checkpoint
from typer.testing import CliRunner

from loram.shared.errors import LoramError

LORAM = str(Path(sys.executable).parent / "loram")
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}
      for a in range(3) for b in range(3)]
COLUMNS = ["--columns", "prompt=question,response=answer"]


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A base, its pruned checkpoint, a 2-step pruned-space adapter and its recovered adapter, plus one broken
    copy per case."""
    from loram.publisher.prune import prune
    from loram.recover import recover
    from loram.train import train

    r = tmp_path_factory.mktemp("errors")
    save_tiny_checkpoint(r / "base", "llama-gqa")
    prune(base=str(r / "base"), method="l2", ratio=0.5, layers="1:3", out=r / "pruned")
    (r / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in QA))
    train(model=str(r / "pruned"), data=str(r / "qa.jsonl"), out=r / "adapter", columns=COLUMNS[1], seq_len=32,
          batch=2, steps=2, save_every=1, dropout=0.0)
    recover(adapter=str(r / "adapter"), out=r / "recovered")

    shutil.copytree(r / "base", r / "badjson")
    (r / "badjson" / "config.json").write_text('{"model_type": "llama",\n')  # cut short
    shutil.copytree(r / "pruned", r / "badjson-pruned")
    (r / "badjson-pruned" / "config.json").write_text("not json\n")
    shutil.copytree(r / "adapter", r / "adapter-on-badjson", ignore=shutil.ignore_patterns("checkpoints"))
    _edit_adapter_base(r / "adapter-on-badjson", r / "badjson-pruned")
    shutil.copytree(r / "base", r / "truncated")
    weights = (r / "base" / "model.safetensors").read_bytes()
    (r / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(r / "pruned", r / "tampered")  # per-layer sizes that no longer match the weights
    _edit_config(r / "tampered", lambda c: c["per_layer_config"]["1"].update(intermediate_size=7))
    shutil.copytree(r / "pruned", r / "tampered-invalid")  # per-layer sizes the config class refuses
    _edit_config(r / "tampered-invalid", lambda c: c["per_layer_config"]["1"].update(num_key_value_heads=3))
    shutil.copytree(r / "base", r / "remote")
    _edit_config(r / "remote", lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    (r / "remote" / "modeling_x.py").write_text('raise SystemExit("remote code ran")\n')
    shutil.copytree(r / "base", r / "remote-type")
    _edit_config(r / "remote-type", lambda c: c.update(model_type="x_custom", auto_map={
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    (r / "pickle").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(r / "base" / name, r / "pickle" / name)
    from safetensors.torch import load_file

    torch.save(load_file(str(r / "base" / "model.safetensors")), r / "pickle" / "pytorch_model.bin")
    save_tiny_checkpoint(r / "other-shape", "llama-mha")
    save_tiny_checkpoint(r / "fewer-layers", "llama-gqa", num_hidden_layers=4)
    (r / "a-file").write_text("not a folder\n")
    for adapter in ("adapter", "recovered"):  # a download cut short: the adapter's weights end mid-header
        shutil.copytree(r / adapter, r / f"{adapter}-truncated", ignore=shutil.ignore_patterns("checkpoints"))
        (r / f"{adapter}-truncated" / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    return r


def _edit_adapter_base(adapter: Path, base: Path) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": str(base)}))


def _resume_copy(r: Path, name: str, pinned: bool = True) -> Path:
    """A copy of the trained adapter folder to resume; `pinned=False` drops checkpoints/run_config.json, as
    for a run made before the options were pinned (then the checkpoint's adapter_config.json is compared)."""
    out = r / name
    if not out.exists():
        shutil.copytree(r / "adapter", out)
    if not pinned:
        (out / "checkpoints" / "run_config.json").unlink(missing_ok=True)
    return out


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")} if folder.exists() else {}


TRAIN = ["--data", "{r}/qa.jsonl", *COLUMNS, "--seq-len", "32", "--batch", "2", "--steps", "1"]
ALIGN = ["--data", "{r}/qa.jsonl", "--steps", "1", "--seq-len", "16"]
EVAL = ["--data", "{r}/qa.jsonl", *COLUMNS, "--limit", "2"]
GEN = ["--prompt", "hi", "--max-new-tokens", "2"]

# One case per kind of mistake (each subprocess pays seconds of imports; the API tests below cover the other
# commands). name: (argv after `loram`, {r} = the fixture folder; a phrase of the error line; the --out or None)
CASES = {
    "config-not-json": (["train", "{r}/badjson", *TRAIN, "--out", "{r}/o-1"], "is not valid JSON", "o-1"),
    "truncated-safetensors": (["generate", "{r}/truncated", *GEN], "truncated", None),
    "out-is-a-file": (["merge", "{r}/recovered", "--out", "{r}/a-file"], "not a directory", "a-file"),
    "out-cannot-be-created": (["train", "{r}/pruned", *TRAIN, "--out", "{r}/a-file/adapter"], "is a file", "a-file"),
    "warmup-negative": (["publish", "align", "{r}/pruned", *ALIGN, "--warmup", "-5", "--out", "{r}/o-2"],
                        "--warmup must be >= 0", "o-2"),
    "eval-batch-0": (["eval", "{r}/base", *EVAL, "--batch", "0"], "--batch must be >= 1", None),
    "generate-max-new-tokens-0": (["generate", "{r}/base", "--prompt", "hi", "--max-new-tokens", "0"],
                                  "--max-new-tokens must be >= 1", None),
    "generate-past-positions": (["generate", "{r}/base", "--prompt", "hi", "--max-new-tokens", "200"],
                                "plus --max-new-tokens 200 exceeds the model's max_position_embeddings (128)", None),
    "generate-seed-too-large": (["generate", "{r}/base", *GEN, "--seed", "99999999999999999999"],
                                "--seed must lie in [0, 2^32)", None),
    "tampered-per-layer-config": (["eval", "{r}/tampered", *EVAL], "config.json", None),
    "resume-other-rank": (["train", "{r}/pruned", *TRAIN, "--steps", "3", "--rank", "4", "--resume", "--out",
                           "{r}/resume-cli"], "--rank", "resume-cli"),
    "unrecovered-adapter": (["eval", "{r}/base+{r}/adapter", *EVAL], "run `loram recover", None),
    "merge-other-shape": (["merge", "{r}/recovered", "--base", "{r}/other-shape", "--ignore-fingerprint", "--out",
                           "{r}/o-3"], "does not fit", "o-3"),
    "merge-shard-size": (["merge", "{r}/recovered", "--max-shard-size", "-5GB", "--out", "{r}/o-7"],
                         "--max-shard-size '-5GB' is not a size above zero", "o-7"),
    "merge-fewer-layers": (["merge", "{r}/recovered", "--base", "{r}/fewer-layers", "--ignore-fingerprint", "--out",
                            "{r}/o-6"], "adapter tensors have no module in the model", "o-6"),
    "remote-code": (["generate", "{r}/remote", *GEN], "needs remote code", None),
    "pickle-only": (["generate", "{r}/pickle", *GEN], "pytorch_model.bin", None),
    "truncated-adapter": (["recover", "{r}/adapter-truncated", "--out", "{r}/o-4"],
                          "adapter_model.safetensors is not a complete safetensors file", "o-4"),
    "truncated-recovered-adapter": (["merge", "{r}/recovered-truncated", "--out", "{r}/o-5"],
                                    "it is truncated or corrupted; re-download or re-create the adapter", "o-5"),
}


@pytest.fixture(scope="module")
def cli(fx):
    """Every CLI case, run by the real `loram` command two at a time; case name -> (result, --out before)."""
    _resume_copy(fx, "resume-cli")
    env = {**os.environ, "LORAM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    env.pop("LORAM_DEBUG", None)
    before = {name: _listing(fx / out) for name, (_, _, out) in CASES.items() if out}

    def run(name):
        argv = [a.format(r=fx) for a in CASES[name][0]]
        return subprocess.run([LORAM, *argv], capture_output=True, text=True, env=env, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CASES, pool.map(run, CASES), strict=True))
    return results, before


@pytest.mark.parametrize("name", list(CASES))
def test_a_user_mistake_is_one_line_and_exit_code_2(fx, cli, name):
    results, before = cli
    result = results[name]
    _, phrase, out = CASES[name]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(errors) == 1, result.stderr[-3000:]
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout[-2000:]
    assert "remote code ran" not in result.stderr + result.stdout
    if out:  # nothing written to --out, nor next to it
        assert _listing(fx / out) == before[name]
        parent = (fx / out).parent
        assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{Path(out).name}.")]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders: permissions are not enforced")
def test_out_in_a_folder_without_write_permission_is_one_line(fx, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        env = {**os.environ, "LORAM_THREADS": "1"}
        result = subprocess.run([LORAM, "merge", str(fx / "recovered"), "--out", str(locked / "merged")],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
            f"error: cannot write to {locked} (permission denied); choose another --out"]
        from loram.train import train

        with pytest.raises(LoramError, match="permission denied"):
            train(model=str(fx / "pruned"), data=str(fx / "qa.jsonl"), out=locked / "a", columns=COLUMNS[1])
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- the Python API raises the same LoramError

def _train_args(fx, **kwargs):
    return {"model": str(fx / "pruned"), "data": str(fx / "qa.jsonl"), "columns": COLUMNS[1], "seq_len": 32,
            "batch": 2, "steps": 1, "dropout": 0.0, **kwargs}


@pytest.mark.parametrize("command", ["train", "prune", "align", "merge", "eval", "generate", "recover"])
def test_api_config_not_json(fx, tmp_path, command):
    from loram.evaluate import evaluate
    from loram.generate import generate
    from loram.merge import merge
    from loram.publisher.align import align
    from loram.publisher.prune import prune
    from loram.recover import recover
    from loram.train import train

    calls = {
        "train": lambda: train(**_train_args(fx, model=str(fx / "badjson"), out=tmp_path / "o")),
        "prune": lambda: prune(base=str(fx / "badjson"), method="l2", out=tmp_path / "o"),
        "align": lambda: align(pruned=str(fx / "badjson-pruned"), data=[str(fx / "qa.jsonl")], steps=1, seq_len=16,
                               out=tmp_path / "o"),
        "merge": lambda: merge(adapter=str(fx / "recovered"), base=str(fx / "badjson"), ignore_fingerprint=True,
                               out=tmp_path / "o"),
        "eval": lambda: evaluate(models=[str(fx / "badjson")], data=str(fx / "qa.jsonl"), columns=COLUMNS[1]),
        "generate": lambda: generate(model=str(fx / "badjson"), prompt="hi", max_new_tokens=2),
        "recover": lambda: recover(adapter=str(fx / "adapter-on-badjson"), out=tmp_path / "o"),
    }
    with pytest.raises(LoramError, match="config.json"):
        calls[command]()
    assert not (tmp_path / "o").exists()


def test_api_loader_refuses_broken_and_unsafe_folders(fx, monkeypatch):
    from loram.shared.pruned_model import from_pretrained, load_config

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(LoramError, match=r"pytorch_model\.bin, not safetensors; .*convert it to safetensors"):
        from_pretrained(fx / "pickle")
    with pytest.raises(LoramError, match=r"model\.safetensors is not a complete safetensors file .*truncated"):
        from_pretrained(fx / "truncated")
    with pytest.raises(LoramError, match=r"gate_proj\.weight is \[20, 48\] in the weights but config\.json makes it "
                                         r"\[7, 48\]"):
        from_pretrained(fx / "tampered")
    with pytest.raises(LoramError, match="not a multiple of num_key_value_heads=3"):
        load_config(fx / "tampered-invalid")
    for folder in ("remote", "remote-type"):
        with pytest.raises(LoramError, match="needs remote code: config.json's auto_map names .*modeling_x"):
            from_pretrained(fx / folder)
    with pytest.raises(LoramError, match=r"config\.json is not valid JSON \(.* at line 2, column 1\)"):
        load_config(fx / "badjson")


def test_api_adapter_that_does_not_fit(fx, tmp_path):
    from loram.generate import generate
    from loram.merge import merge

    with pytest.raises(LoramError, match=r"has the pruned model's shapes .*run `loram recover .* --out DIR` first"):
        generate(model=str(fx / "base"), adapter=str(fx / "adapter"), prompt="hi", max_new_tokens=2)
    with pytest.raises(LoramError, match=r"trained on the pruned checkpoint .* run `loram recover .* --out DIR` first"):
        merge(adapter=str(fx / "adapter"), out=tmp_path / "o")
    with pytest.raises(LoramError, match="has the pruned model's shapes"):
        merge(adapter=str(fx / "adapter"), base=str(fx / "base"), out=tmp_path / "o")
    with pytest.raises(LoramError, match="does not fit"):
        merge(adapter=str(fx / "recovered"), base=str(fx / "other-shape"), ignore_fingerprint=True, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_api_resume_with_other_lora_options(fx):
    from loram.train import train

    out = _resume_copy(fx, "resume-api", pinned=False)  # the checkpoint's adapter_config.json is what differs
    before = _listing(out)
    with pytest.raises(LoramError, match=r"--resume: the adapter in .*checkpoint-2 was trained with other LoRA "
                                         r"options \(--rank 8 -> 4\)"):
        train(**_train_args(fx, steps=3, rank=4, resume=True, out=out))
    assert _listing(out) == before


def test_api_values_out_of_range():
    from loram.evaluate import EvalConfig
    from loram.generate import GenerateConfig
    from loram.publisher.align import AlignConfig
    from loram.train import TrainConfig

    with pytest.raises(LoramError, match="--warmup must be >= 0"):
        TrainConfig(model="m", data="d", out=Path("o"), warmup=-5)
    with pytest.raises(LoramError, match="--warmup must be >= 0"):
        AlignConfig(pruned="m", data=["wiki"], steps=1, seq_len=16, out=Path("o"), warmup=-5)
    with pytest.raises(LoramError, match="--batch must be >= 1"):
        EvalConfig(models=["m"], batch=0)
    for n in (0, -5):
        with pytest.raises(LoramError, match="--max-new-tokens must be >= 1"):
            GenerateConfig(model="m", prompt="hi", max_new_tokens=n)


@pytest.mark.parametrize("command", ["train", "merge", "recover", "prune"])
@pytest.mark.parametrize("where,message", [("a-file", "exists and is not a directory"),
                                           ("a-file/out", "a-file is a file, not a folder")])
def test_api_out_that_cannot_be_written(fx, command, where, message):
    from loram.merge import merge
    from loram.publisher.prune import prune
    from loram.recover import recover
    from loram.train import train

    out = fx / where
    calls = {"train": lambda: train(**_train_args(fx, out=out)),
             "merge": lambda: merge(adapter=str(fx / "recovered"), out=out),
             "recover": lambda: recover(adapter=str(fx / "adapter"), out=out),
             "prune": lambda: prune(base=str(fx / "base"), method="l2", out=out)}
    with pytest.raises(LoramError, match=message):
        calls[command]()
    assert (fx / "a-file").read_text() == "not a folder\n"


# ---------------------------------------------------------------- anything else: one line, exit code 1

def _train_argv(tmp_path):
    return ["train", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")]


def test_an_unexpected_error_is_one_line_exit_1_and_loram_debug_shows_the_traceback(tmp_path, monkeypatch):
    import loram.train
    from loram.cli import app

    def boom(cfg):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(loram.train, "train", boom)
    monkeypatch.delenv("LORAM_DEBUG", raising=False)
    result = CliRunner().invoke(app, _train_argv(tmp_path))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == ["error: unexpected RuntimeError: boom second line (set LORAM_DEBUG=1 for "
                                          "the traceback; please report it)"]
    monkeypatch.setenv("LORAM_DEBUG", "1")
    result = CliRunner().invoke(app, _train_argv(tmp_path))
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and 'raise RuntimeError("boom' in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: unexpected RuntimeError: boom")


def test_ctrl_c_is_130_and_a_multi_line_loram_error_is_one_line(tmp_path, monkeypatch):
    import loram.train
    from loram.cli import app

    def interrupted(cfg):
        raise KeyboardInterrupt

    def mistake(cfg):
        raise LoramError("first\n  second")

    monkeypatch.delenv("LORAM_DEBUG", raising=False)
    monkeypatch.setattr(loram.train, "train", interrupted)
    assert CliRunner().invoke(app, _train_argv(tmp_path)).exit_code == 130
    monkeypatch.setattr(loram.train, "train", mistake)
    result = CliRunner().invoke(app, _train_argv(tmp_path))
    assert result.exit_code == 2 and result.stderr.splitlines() == ["error: first second"]


def test_an_interrupt_a_child_process_already_said_is_not_said_twice(monkeypatch, capsys):
    """`loram demo` runs stages as child processes: on Ctrl-C the child said "interrupted" and so did the demo."""
    from loram.shared.cli_support import report_error

    monkeypatch.delenv("RANK", raising=False)
    assert report_error(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted; completed outputs are intact\n"
    said = KeyboardInterrupt()
    said.already_said = True
    assert report_error(said) == 130 and capsys.readouterr().err == ""


def test_the_entry_point_turns_errors_outside_commands_into_one_line(monkeypatch, capsys):
    import typer

    from loram.shared.cli_support import run_app

    monkeypatch.delenv("LORAM_DEBUG", raising=False)
    broken = typer.Typer(pretty_exceptions_enable=False)

    @broken.callback()
    def startup():
        raise ValueError("bad start")

    @broken.command()
    def hello():
        pass

    with pytest.raises(SystemExit) as exit_info:
        run_app(broken, ["hello"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: unexpected ValueError: bad start (set LORAM_DEBUG=1 for the traceback; please report it)"]
    from loram.cli import app

    # click's usage errors were its four-line usage block ("Usage: ...", "Try ...", "Error: ..."): one line too
    for argv, line in ((["train", "m", "--stepz", "3"], "error: No such option: --stepz (Possible options: --help, "
                        "--seed, --steps); see loram train --help"),
                       (["recovr"], "error: No such command 'recovr'. Did you mean 'recover'?; see loram --help"),
                       (["recover", "a", "b"], "error: Got unexpected extra argument(s) (b); see loram recover --help"),
                       (["assets", "path"], "error: Missing argument 'name'; see loram assets path --help")):
        with pytest.raises(SystemExit) as exit_info:
            run_app(app, argv, prog_name="loram")
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(SystemExit) as exit_info:  # no command at all: the help, as before
        run_app(app, [], prog_name="loram")
    assert exit_info.value.code == 2 and "Commands:" in capsys.readouterr().err


def test_ctrl_c_while_the_command_line_loads_is_one_line(tmp_path):
    """Ctrl-C in the first seconds (importing torch and transformers) printed a 30-line KeyboardInterrupt
    traceback. The entry point imports the command line under the commands' own rule: one line, exit 130."""
    import signal
    import time

    code = ("import sys, time; sys.argv = ['loram', '--help']; time.sleep(0.5)\n"  # Ctrl-C lands in the imports
            "import builtins; real = builtins.__import__\n"
            "def slow(name, *a, **k):\n"
            "    if name == 'loram.cli': time.sleep(5)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = slow\n"
            "from loram.command import main; main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted; completed outputs are intact\n" and out == "", err


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """`loram plan ... | head -1`: the pipe's reader is gone before the command writes; it ends with 141 (128 +
    SIGPIPE, as `git log | head` does) and says nothing (it said "unexpected BrokenPipeError ... please report it")."""
    from tiny_models import tiny_config

    tiny_config().save_pretrained(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([LORAM, "plan", str(tmp_path), "--layers", "1:3"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "error" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_each_rank_reports_only_what_is_its_own(monkeypatch, capsys):
    """Before a torchrun job's processes connect, every rank ran the same checks: rank 0 alone says the error (and
    Ctrl-C's line). Once connected, an error may be one rank's own (a missing rng_state_1.json): each says it,
    naming its rank."""
    import torch.distributed as dist

    from loram.shared.cli_support import report_error

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "1")  # a stray RANK outside a job: a lone process always says its error
    assert report_error(LoramError("bad flag")) == 2 and capsys.readouterr().err == "error: bad flag\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, connected, shown in (("0", False, "error: bad flag\n"), ("1", False, ""),
                                   ("1", True, "error: [rank 1] bad flag\n"), ("0", True, "error: bad flag\n")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(dist, "is_initialized", lambda connected=connected: connected)
        assert report_error(LoramError("bad flag")) == 2
        assert capsys.readouterr().err == shown, (rank, connected)
    monkeypatch.setenv("RANK", "1")
    assert report_error(KeyboardInterrupt()) == 130 and capsys.readouterr().err == ""


def test_a_collective_that_lost_another_process_says_so(monkeypatch, capsys):
    """A worker killed mid-run: the others' next collective fails inside gloo. That is one line saying another
    process stopped and how to go on, not an internal error to report."""
    import torch.distributed as dist

    from loram.shared.cli_support import report_error

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: "
                        "Connection reset by peer")
    assert report_error(gloo) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: another process of this run stopped (the connection to it was lost: ")
    assert "rerun the same command with --resume" in err and "please report" not in err and err.count("\n") == 1
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # one process: no peer to lose
    report_error(RuntimeError("Connection reset by peer"))
    assert "unexpected RuntimeError" in capsys.readouterr().err
