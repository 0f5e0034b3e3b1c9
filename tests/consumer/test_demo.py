"""`loram demo`: the stage cache (fast), the report's verdicts (fast), and the quick demo end to end
as a user runs it, re-run and resumed after an interruption (slow: real SmolLM2)."""

import ast
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import loram.demo
from loram.demo_report import LORA, LORAM, ORIGINAL, PRUNED, SMALL, UNALIGNED, render, verdicts
from loram.shared.errors import LoramError
from loram.stages import RECORD, Stages

LORAM_CLI = str(Path(sys.executable).parent / "loram")


def _demo_stages() -> list[str]:
    """The stages `run_demo` runs, in order, read from consumer/demo.py's source (nothing is run): the name
    given to each `stages.run(NAME, ...)` call; a NAME that is the loop variable of a comprehension over
    `DICT.items()` stands for the keys of the dict literal assigned to DICT (the three trainings)."""
    tree = ast.parse(Path(loram.demo.__file__).read_text(encoding="utf-8"))
    run_demo = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_demo")
    dicts = {t.id: [k.value for k in node.value.keys] for node in ast.walk(run_demo)
             if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
             and all(isinstance(k, ast.Constant) for k in node.value.keys) for t in node.targets
             if isinstance(t, ast.Name)}
    loops = {}  # loop variable -> the dict it iterates
    for node in ast.walk(run_demo):
        for gen in getattr(node, "generators", []):
            it, target = gen.iter, gen.target
            first = target.elts[0] if isinstance(target, ast.Tuple) else target
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "items" \
                    and isinstance(it.func.value, ast.Name) and isinstance(first, ast.Name):
                loops[first.id] = it.func.value.id
    calls = sorted((node for node in ast.walk(run_demo) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute) and node.func.attr == "run"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "stages"),
                   key=lambda c: (c.lineno, c.col_offset))
    names = []
    for call in calls:
        arg = call.args[0]
        if isinstance(arg, ast.Constant):
            names.append(arg.value)
        else:
            assert isinstance(arg, ast.Name) and arg.id in loops, f"cannot read the stage name {ast.unparse(arg)}"
            names += dicts[loops[arg.id]]
    return names


def _stage_lines(stderr: str, what: str) -> list[str]:
    """The stages the demo logged as `[name] running` or `[name] inputs unchanged: reusing ...`, in order."""
    return re.findall(rf"\[loram demo\] \[([\w-]+)\] {what}", stderr)


def test_the_demo_stage_list_is_read_from_its_source():
    names = _demo_stages()
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[\w-]+", n) for n in names), names
    assert {"recover", "evaluate"} <= set(names)  # the stages the end-to-end test interrupts
    assert names[-1] == "evaluate"  # its inputs are the keys of every stage before it
    assert len([n for n in names if n.startswith("train-")]) == 3  # LoRAM, LoRAM unaligned, LoRA


def test_stages_reuse_rerun_on_change_and_after_an_interruption(tmp_path):
    calls = []

    def body(tag):
        def run(folder):
            calls.append(tag)
            (folder / "out.txt").write_text(tag)
            return {"tag": tag}
        return run

    stages = Stages(tmp_path, log=lambda m: None)
    first = stages.run("a", {"x": 1}, body("a1"))
    assert not first.reused and first.result == {"tag": "a1"}
    again = Stages(tmp_path, log=lambda m: None).run("a", {"x": 1}, body("a2"))
    assert again.reused and again.result == {"tag": "a1"} and calls == ["a1"]
    changed = Stages(tmp_path, log=lambda m: None).run("a", {"x": 2}, body("a3"))
    assert not changed.reused and (tmp_path / "a" / "out.txt").read_text() == "a3"

    def interrupted(folder):
        (folder / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, log=lambda m: None).run("b", {"y": 1}, interrupted)
    assert not (tmp_path / "b" / RECORD).exists()  # incomplete: no record
    resumed = Stages(tmp_path, log=lambda m: None).run("b", {"y": 1}, body("b1"))
    assert not resumed.reused and not (tmp_path / "b" / "partial.txt").exists()
    assert Stages(tmp_path, log=lambda m: None).run("a", {"x": 2}, body("a4")).reused  # earlier stage kept


def test_a_copied_or_moved_run_reuses_its_stages_in_their_new_place(tmp_path):
    """stage.json held absolute paths: a demo folder copied elsewhere reused stages that pointed into the old
    folder, and once the old one was moved away the next stage failed on a path that no longer existed."""
    import shutil

    old = tmp_path / "old" / "stages"

    def made(folder):
        (folder / "model").mkdir()
        return {"model": str(folder / "model"), "parts": [folder / "model" / "a"], "elsewhere": "/opt/x"}

    first = Stages(old, log=lambda m: None).run("prune", {"base": "/opt/base"}, made)
    second = Stages(old, log=lambda m: None).run("align", {"pruned": first.result["model"]}, lambda f: {"n": 1})
    assert '"{stages}/prune/model"' in (old / "prune" / RECORD).read_text()
    shutil.move(tmp_path / "old", tmp_path / "new")
    new = tmp_path / "new" / "stages"
    again = Stages(new, log=lambda m: None).run("prune", {"base": "/opt/base"}, lambda f: pytest.fail("re-ran"))
    assert again.reused and again.result == {"model": str(new.resolve() / "prune" / "model"),
                                             "parts": [str(new.resolve() / "prune" / "model" / "a")],
                                             "elsewhere": "/opt/x"}
    aligned = Stages(new, log=lambda m: None).run("align", {"pruned": again.result["model"]},
                                                  lambda f: pytest.fail("re-ran"))
    assert aligned.reused and aligned.key == second.key  # the key does not depend on where the run lies


def _report(ppl: dict) -> dict:
    rows = [{"variant": v, "data": d, "perplexity": p, "tokens": 100} for (v, d), p in ppl.items()]
    training = {k: {"peak_memory_bytes": m * 2**20, "trainable_params": t, "losses": [{"step": 1, "loss": 2.0}]}
                for k, m, t in (("train-loram", 3000, 10), ("train-loram-unaligned", 3000, 10), ("train-lora", 4000, 12))}
    return {"config": {"ratio": 0.5, "quick": False}, "quant": "nf4", "results": rows, "training": training,
            "align": {"steps": 200, "perplexities": [{"step": 0, "perplexity": 150.0}, {"step": 200, "perplexity": 60.0}]},
            "selfgen": {"conversations": 48, "prompts": "math"},
            "prune": {"original_params": 100, "pruned_params": 70, "reduction": 1.43, "reduction_4bit": 5.71},
            "stages": {"prune": {"seconds": 30, "reused": False}}, "wall_time_s": 600, "eval_items": 32,
            "news_docs": 16}


@pytest.mark.parametrize("flags, message", [
    ({"ratio": 0.0}, r"--ratio must lie in \(0, 1\) for the demo \(0 prunes nothing: the demo would compare the "
                     r"original with itself\), got 0.0"),
    ({"news_limit": 0}, "--news-limit must be >= 1"),
    ({"eval_limit": -3}, "--eval-limit must be >= 1"),
    ({"seq_len": 1}, "--seq-len must be >= 2"),
    ({"out": "a-file"}, "--out .*a-file exists and is not a directory; choose another --out"),
    ({"publish_to": "notaurl"}, "--publish-to 'notaurl' is not a Hub endpoint URL; give one such as http"),
    ({"publish_to": "http://127.0.0.1:9", "repo_id": "no-org"}, "--repo-id 'no-org' is not a Hub repository id"),
])
def test_bad_settings_are_refused_before_any_stage(tmp_path, flags, message):
    (tmp_path / "a-file").write_text("x")
    flags = {"out": tmp_path / "demo", **flags}
    flags["out"] = tmp_path / flags["out"]
    with pytest.raises(LoramError, match=message):
        loram.demo.DemoConfig(**flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.slow
def test_a_sequence_longer_than_the_model_takes_is_refused_before_any_stage(tmp_path):
    with pytest.raises(LoramError, match=r"--seq-len 100000 exceeds the model's max_position_embeddings \(8192\)"):
        loram.demo.run_demo(loram.demo.DemoConfig(out=tmp_path / "demo", seq_len=100000))
    assert not (tmp_path / "demo").exists()


def test_verdicts_state_plainly_what_holds():
    base = {(ORIGINAL, "gsm8k-heldout"): 4.0, (LORAM, "gsm8k-heldout"): 3.7, (UNALIGNED, "gsm8k-heldout"): 3.8,
            (SMALL, "gsm8k-heldout"): 14.0, (PRUNED, "gsm8k-heldout"): 40.0, (LORA, "gsm8k-heldout"): 2.8}
    base |= {(v, "news"): p * 8 for (v, _), p in base.items()}
    assert all(holds for _, holds, _ in verdicts(_report(base)))
    text = render(_report(base), ["loss.png"])
    assert "Point 3 (gsm8k-heldout): holds: LoRAM with alignment 3.700 < without 3.800" in text
    assert "Point 3 (news): holds: LoRAM with alignment 29.600 < without 30.400" in text
    assert "![loss.png](loss.png)" in text and "150.00 (step 0) -> 60.00 (step 200)" in text
    assert ("aligned for 200 steps on the Wikipedia sample in the chat template and 48 worked math problems the "
            "original wrote itself") in text
    # the share of the original -> LoRA gap: (4.0 - 3.7) / (4.0 - 2.8) = 25%, unaligned (4.0 - 3.8) / 1.2 = 17%
    assert f"| {LORAM} | 25% | 25% |" in text and f"| {UNALIGNED} | 17% | 17% |" in text
    worse = {**base, (LORAM, "news"): 30.5}  # alignment helped in-domain only this time
    point3 = {v[0]: v[1] for v in verdicts(_report(worse)) if v[0].startswith("3")}
    assert point3 == {"3 (gsm8k-heldout)": True, "3 (news)": False} and "does NOT hold" in render(_report(worse), [])
    assert "no gap is left" not in render(_report(worse), [])  # unaligned closes 17% there: a real failure
    assert "Wall time 600 s." in text  # nothing reused: the run's own time
    assert "response-token perplexity on 32 held-out GSM8K items and 16 news documents." in text
    # --quick's 6 items at --seq-len 128: one keeps no response token and is dropped; the report said 6
    dropped = render({**_report(base), "eval_items": 5, "eval_items_asked": 6}, [])
    assert ("on 5 held-out GSM8K items (of the first 6: the others keep no response token within --seq-len) and 16 "
            "news documents.") in dropped
    rerun = {**_report(base), "stages": {"prune": {"seconds": 30, "reused": True}, "align": {"seconds": 12.4, "reused": True},
                                         "evaluate": {"seconds": 100, "reused": False}}}
    assert ("Wall time 600 s for this run, which reused 2 of 3 stages from an earlier one (they took 42 s then; the "
            "stage table below).") in render(rerun, [])
    # a failing point 3 on fewer records than the grid's sets points to re-evaluating that set on as many, which
    # reuses the trained stages
    more = "the same `loram demo` command with `--news-limit 50` re-evaluates these models on 50 news documents and"
    assert "on 32 GSM8K items and 16 news documents: " + more in render(_report(worse), [])
    assert more not in render(_report(base), [])  # nothing fails
    assert "re-evaluates" not in render({**_report(worse), "news_docs": 50}, [])  # already evaluated on that many
    both = {**worse, (LORAM, "gsm8k-heldout"): 3.9}  # point 3 fails on both sets
    assert ("with `--eval-limit 100 --news-limit 50` re-evaluates these models on 100 GSM8K items and 50 news "
            "documents") in render(_report(both), [])
    # unaligned LoRAM already at LoRA's level on news (the demo's case): the report says why point 3 fails there
    closed = {**worse, (UNALIGNED, "news"): 22.3, (LORAM, "news"): 22.4}  # news: original 32, LoRA 22.4
    text = render(_report(closed), [])
    assert ("Point 3 (news): LoRAM without alignment already closes 101% of the gap to LoRA on the original there "
            "(aligned: 100%), so no gap is left for alignment to close (aligned minus unaligned: +0.100).") in text


def test_gap_plot_is_written(tmp_path):
    from loram.demo_report import _plots

    base = {(ORIGINAL, "gsm8k-heldout"): 4.0, (LORAM, "gsm8k-heldout"): 3.7, (UNALIGNED, "gsm8k-heldout"): 3.8,
            (SMALL, "gsm8k-heldout"): 14.0, (PRUNED, "gsm8k-heldout"): 40.0, (LORA, "gsm8k-heldout"): 2.8}
    base |= {(v, "news"): p * 8 for (v, _), p in base.items()}
    assert _plots(_report(base), tmp_path) == ["loss.png", "gap.png"]
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_demo_end_to_end_rerun_and_resume(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([LORAM_CLI, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stage_names = _demo_stages()
    assert _stage_lines(proc.stderr, "running") == stage_names  # every stage ran, in order, once
    assert list(report["stages"]) == stage_names
    assert sorted(p.name for p in (out / "stages").iterdir() if (p / RECORD).is_file()) == sorted(stage_names)
    # every variant on both evaluation sets, each once
    variants, datasets = [ORIGINAL, LORAM, UNALIGNED, SMALL, PRUNED, LORA], ["gsm8k-heldout", "news"]
    assert sorted((r["variant"], r["data"]) for r in report["results"]) == \
        sorted(itertools.product(variants, datasets))
    ppl = {(r["variant"], r["data"]): r["perplexity"] for r in report["results"]}
    assert 2 < ppl[(ORIGINAL, "gsm8k-heldout")] < 8 and 15 < ppl[(ORIGINAL, "news")] < 60
    assert ppl[(SMALL, "gsm8k-heldout")] > 2 * ppl[(LORAM, "gsm8k-heldout")]  # even a smoke run shows point 2
    for name in ("loss.png", "gap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| variant |" in md and "Point 2:" in md and "peak training memory" in md
    assert "point 1 (gsm8k-heldout)" in proc.stdout and "GSM8K held-out" in proc.stdout  # the table is printed
    assert yaml.safe_load((out / "demo_config.yaml").read_text())["quick"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    # the published copy was verified against its manifest before training used it
    assert "every file matches the manifest" in proc.stderr
    # a re-run reuses every stage
    again = subprocess.run([LORAM_CLI, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _stage_lines(again.stderr, "inputs unchanged: reusing") == stage_names, again.stderr[-2000:]
    assert _stage_lines(again.stderr, "running") == []
    # an interrupted run continues from the last completed stage
    (out / "stages" / "evaluate" / RECORD).unlink()
    (out / "stages" / "recover" / RECORD).unlink()
    resumed = subprocess.run([LORAM_CLI, "demo", "--quick", "--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rerun = [n for n in stage_names if n in ("recover", "evaluate")]
    assert _stage_lines(resumed.stderr, "running") == rerun, resumed.stderr[-2000:]
    assert _stage_lines(resumed.stderr, "inputs unchanged: reusing") == [n for n in stage_names if n not in rerun]
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
def test_publish_stage_writes_a_verified_folder_repository_and_the_hub_copy_pulls_back(hub, tmp_path):
    from tiny_models import save_tiny_checkpoint

    from loram.demo import DemoConfig, _publish, _pull
    from loram.publisher.prune import prune
    from loram.shared.model_cards import card_metadata

    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    pruned = prune(base=str(tmp_path / "base"), out=tmp_path / "pruned", method="l2", ratio=0.5, layers="1:5").out
    cfg = DemoConfig(out=tmp_path / "demo", publish_to=hub.url, repo_id="demo/tiny-loram")
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    result = _publish(pruned, stage_dir, cfg)
    repo = Path(result["folder"])
    card = card_metadata((repo / "README.md").read_text())
    assert card["library_name"] == "transformers" and card["loram"]["method"]["criterion"] == "l2"
    assert result["hub"]["repo_id"] == "demo/tiny-loram" and len(result["hub"]["commit"]) == 40

    class Done:  # what Stages.run returns, as far as _pull reads it
        pass

    done = Done()
    done.result = result
    pulled = _pull(done, cfg)  # from the endpoint, at the pushed commit, verified
    assert (pulled / "loram_manifest.json").read_bytes() == (pruned / "loram_manifest.json").read_bytes()
    done.result = {k: v for k, v in result.items() if k != "hub"}
    assert _pull(done, cfg) == repo  # the local folder repository, verified
    (repo / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(LoramError, match="model.safetensors"):
        _pull(done, cfg)
