"""One meaning per flag: a flag that several commands take has the same help and default in each."""

import os
import re
from collections import defaultdict

import pytest
import typer
from typer.testing import CliRunner

import loram.publisher
from loram.cli import app
from loram.shared.errors import LoramError
from loram.shared.runtime import free_cores

# Flags whose meaning is the same in every command that takes them (docs/conventions.md).
SHARED = ("--revision", "--endpoint", "--targets", "--ratio", "--attn-ratio", "--mlp-ratio", "--rank", "--dropout",
          "--lm-head", "--overwrite", "--verify")


def _leaves(command=None, path=("loram",)):
    command = typer.main.get_command(app) if command is None else command
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield " ".join(path), command
    for name, sub in (subcommands or {}).items():
        yield from _leaves(sub, (*path, name))


def _options() -> dict[str, dict[str, tuple]]:
    """flag -> {command: (help, default)}."""
    found: dict[str, dict[str, tuple]] = defaultdict(dict)
    for name, command in _leaves():
        for param in command.params:
            for flag in getattr(param, "opts", []):
                found[flag][name] = (param.help, getattr(param, "show_default", None))
    return found


def test_shared_flags_read_the_same_everywhere():
    options = _options()
    assert len(options["--endpoint"]) >= 10 and len(options["--revision"]) >= 7  # they are really shared
    for flag in SHARED:
        by_command = options[flag]
        assert by_command, flag
        # --revision names the argument it applies to ("of MODEL", "of BASE", ...): compare the rest
        texts = {re.sub(r" of (?:each )?[A-Z_]+,", " of ARG,", help) for help, _ in by_command.values()}
        assert len(texts) == 1, (flag, by_command)
        assert len({default for _, default in by_command.values()}) == 1, (flag, by_command)


def test_every_hub_command_takes_revision_and_endpoint():
    options = _options()
    hub_readers = {"loram train", "loram recover", "loram merge", "loram eval", "loram generate", "loram plan",
                   "loram pull", "loram publish prune", "loram publish align"}
    for command in hub_readers:
        assert command in options["--revision"] and command in options["--endpoint"], command
    assert {"loram push", "loram publish push"} <= set(options["--branch"])  # a push commits to a branch


def test_method_and_kind_are_distinct_flags():
    options = _options()
    assert set(options["--method"]) == {"loram publish prune"}
    assert "loram plan" in options["--kind"]


def test_list_defaults_are_shown_in_help():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert "[default:(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)]" in "".join(result.stdout.split())


def test_short_and_full_target_names_work_in_train_and_plan():
    from loram.plan import PlanConfig
    from loram.train import TrainConfig

    train = TrainConfig(model="m", data="d", out="o", targets=["v,q"])
    assert train.targets == ["q_proj", "v_proj"]
    assert TrainConfig(model="m", data="d", out="o", targets="q_proj,v_proj").targets == ["q_proj", "v_proj"]
    assert PlanConfig(model="m", targets="q,v_proj").targets == ["q", "v"]


def test_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAM_THREADS", "3")
    assert free_cores() == 3
    for bad in ("x", "0", "-2", "1.5"):
        monkeypatch.setenv("LORAM_THREADS", bad)
        with pytest.raises(LoramError, match=f"LORAM_THREADS='{bad}' is not a whole number >= 1"):
            free_cores()


def test_threads_honour_omp_and_count_what_runs_now(monkeypatch, tmp_path):
    import subprocess
    import sys

    from loram.shared.runtime import busy_cores

    monkeypatch.delenv("LORAM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert free_cores() == 4
    monkeypatch.setenv("LORAM_THREADS", "1")
    assert free_cores() == 1  # LORAM_THREADS first
    monkeypatch.delenv("LORAM_THREADS")
    for unread in ("", "x", "0"):
        monkeypatch.setenv("OMP_NUM_THREADS", unread)
        assert 1 <= free_cores() <= (os.cpu_count() or 1)

    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    assert busy_cores(samples=2, interval=0, stat=str(stat)) == 2  # this process is one of the 3
    stat.write_text("cpu  1 2 3\n")
    assert busy_cores(samples=1, stat=str(stat)) == 0
    assert busy_cores(samples=1, stat=str(tmp_path / "missing")) == 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cores() >= 1  # a process spinning on a core now is counted
    finally:
        spinner.kill()
        spinner.wait()


def test_the_publisher_package_exports_its_recipes():
    from loram.publisher import align, prune, push

    assert callable(prune) and prune.__name__ == "prune" and prune is loram.publisher.prune
    assert callable(align) and align.__name__ == "align" and callable(push)


def test_a_pad_id_of_zero_is_a_pad_id():
    from types import SimpleNamespace

    from loram.generate import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
