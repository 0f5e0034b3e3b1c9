"""lm-evaluation-harness on LoRAM's models (loram.harness): exact scores on tiny models, offline tasks,
`loram eval --tasks` and lm-eval's own CLI (`loram-lm-eval`) on pruned checkpoints and recovered adapters."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

import loram
from loram import harness
from loram.recover import recover
from loram.shared.errors import LoramError
from loram.shared.pruned_model import from_pretrained, load_tokenizer

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).parent))
from test_recover import _adapter_on_pruned  # noqa: E402

loram.register()

# A multiple-choice task of 6 items whose scores are computed independently below.
ITEMS = [{"q": f"{a} and {b} make", "choices": [str(a + b), str(a * b + 1), str(a + b + 3)], "gold": 0}
         for a, b in ((1, 2), (2, 3), (4, 1), (3, 3), (5, 2), (6, 1))]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """base (tiny Qwen2), pruned, adapter (on the pruned model), rec (recovered) and `tasks/` with the
    multiple-choice task `tiny_mc` over local data."""
    root = tmp_path_factory.mktemp("harness")
    _adapter_on_pruned(root, "qwen2")
    recover(adapter=str(root / "adapter"), out=root / "rec")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "items.jsonl")}}, "test_split": "test",
        "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}]}))
    return root


def _choice_logprob(model, tok, context: str, choice: str) -> float:
    """log p(" choice" | context), summed over the choice's tokens, from one full forward."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _expected_accuracy(model, tok) -> float:
    hits = [max(range(3), key=lambda c: _choice_logprob(model, tok, it["q"], it["choices"][c])) == it["gold"]
            for it in ITEMS]
    return sum(hits) / len(hits)


def _acc(out) -> tuple[float, float]:
    return out["results"]["tiny_mc"]["acc"], out["results"]["tiny_mc"]["acc_stderr"]


@pytest.mark.parametrize("which", ["original", "pruned", "original+recovered", "merged"])
def test_multiple_choice_scores_are_exact(workspace, which):
    if which == "merged":
        from loram.merge import merge

        if not (workspace / "merged").is_dir():
            merge(adapter=str(workspace / "rec"), out=workspace / "merged", dtype="fp32")
        model = from_pretrained(workspace / "merged").eval()
    elif which == "original+recovered":
        model = PeftModel.from_pretrained(from_pretrained(workspace / "base"), workspace / "rec").eval()
    else:
        model = from_pretrained(workspace / ("base" if which == "original" else "pruned")).eval()
    tok = load_tokenizer(workspace / "base")
    out = harness.run_tasks(model, tok, ["tiny_mc"], include_path=[str(workspace / "tasks")], batch=2)
    acc, stderr = _acc(out)
    expected = _expected_accuracy(model, tok)
    assert acc == pytest.approx(expected, abs=1e-12)
    assert stderr == pytest.approx(math.sqrt(expected * (1 - expected) / (len(ITEMS) - 1)), abs=1e-12)
    assert out["n"]["tiny_mc"] == len(ITEMS)


def test_recovered_adapter_changes_the_choices_it_should(workspace):
    """The adapter really is applied: per-item choice log-likelihoods of the peft model differ from the base's."""
    tok = load_tokenizer(workspace / "base")
    base = from_pretrained(workspace / "base").eval()
    with_adapter = PeftModel.from_pretrained(from_pretrained(workspace / "base"), workspace / "rec").eval()
    run = {name: harness.run_tasks(m, tok, ["tiny_mc"], include_path=[str(workspace / "tasks")], log_samples=True)
           for name, m in (("base", base), ("adapter", with_adapter))}
    loglik = {name: [r[0][0] for s in out["samples"]["tiny_mc"] for r in s["resps"]] for name, out in run.items()}
    assert len(loglik["base"]) == 3 * len(ITEMS)
    assert max(abs(a - b) for a, b in zip(loglik["base"], loglik["adapter"], strict=True)) > 1e-3
    direct = _choice_logprob(with_adapter, tok, ITEMS[0]["q"], ITEMS[0]["choices"][0])
    assert loglik["adapter"][0] == pytest.approx(direct, abs=1e-4)


def test_shipped_gsm8k_tasks_read_the_embedded_assets(workspace):
    from loram.shared import assets

    folder = harness.task_dir(["gsm8k", "gsm8k_cot", "gsm8k_chat"])
    for name in ("gsm8k", "gsm8k_cot", "gsm8k_chat"):
        text = (folder / f"loram_{name}.yaml").read_text()
        config = yaml.safe_load(text.replace("!function", ""))
        assert config["dataset_path"] == "json" and config["test_split"] == "test"
        assert config["dataset_kwargs"]["data_files"]["test"] == str(assets.data_path("gsm8k-heldout"))
        assert "openai/gsm8k" not in text
    model, tok = from_pretrained(workspace / "base").eval(), load_tokenizer(workspace / "base")
    out = harness.run_tasks(model, tok, ["gsm8k"], limit=2, num_fewshot=1, max_new_tokens=4, log_samples=True)
    held_out, train = assets.read_records("gsm8k-heldout"), assets.read_records("gsm8k-train")
    prompt = out["samples"]["gsm8k"][0]["arguments"][0][0]
    assert prompt.endswith(f"Question: {held_out[0]['question']}\nAnswer:")
    assert any(f"Question: {t['question']}" in prompt for t in train)  # the shot comes from gsm8k-train
    assert out["n"]["gsm8k"] == 2 and out["results"]["gsm8k"]["exact_match,strict-match"] == 0.0


@pytest.mark.parametrize("reply, gold, hit", [("so 12 - 4 = 8\n#### 8", "... #### 8", 1),
                                              ("The answer is 1,200.", "#### 1200", 1),
                                              ("#### 7", "#### 8", 0), ("no number", "#### 8", 0)])
def test_gsm8k_chat_scoring(reply, gold, hit):
    assert harness.gsm8k_chat_results({"answer": gold}, [reply]) == {"exact_match": hit}


def test_the_run_is_offline_for_modules_imported_before_it(monkeypatch, tmp_path):
    """huggingface_hub and datasets read HF_HUB_OFFLINE when imported (here: long before the run): inside the
    run a Hub download is refused without a request, and afterwards the constants are as they were."""
    import datasets.config
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with harness._offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True
        with pytest.raises(Exception) as refused:
            huggingface_hub.hf_hub_download("openai/gsm8k", "README.md", repo_type="dataset",
                                            cache_dir=tmp_path / "hub")
        chain, error = [], refused.value
        while error is not None:
            chain.append(error)
            error = error.__cause__ or error.__context__
        # the request was stopped before it left: offline mode, not a failed connection
        assert any(isinstance(e, huggingface_hub.errors.OfflineModeIsEnabled) for e in chain), chain
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_DATASETS_OFFLINE is False


def test_tasks_that_would_download_are_refused_in_one_line():
    with pytest.raises(LoramError, match=r"downloads its data from the Hub \(.*hellaswag.*--include-path"):
        harness.task_manager(["hellaswag"])
    with pytest.raises(LoramError, match="has no task 'no_such_task'"):
        harness.task_manager(["no_such_task"])
    with pytest.raises(LoramError, match="names no task"):
        harness.parse_tasks(" , ")
    assert harness.parse_tasks("loram_gsm8k_cot, strategyqa,gsm8k_cot") == ["gsm8k_cot", "strategyqa"]


def test_loram_eval_tasks_table(workspace, capfd, monkeypatch, tmp_path):
    """`loram eval --tasks`: original vs original + recovered adapter, lm-eval's metrics per row and a table with
    the score and its 95% interval; run outside a git repository, lm-eval's `git describe` prints nothing."""
    from loram.evaluate import EvalConfig, evaluate, print_rows

    monkeypatch.chdir(tmp_path)
    specs = [f"original={workspace / 'base'}", f"loram={workspace / 'base'}+{workspace / 'rec'}"]
    rows = evaluate(EvalConfig(models=specs, tasks="tiny_mc", include_path=str(workspace / "tasks"),
                               perplexity=False))
    assert "not a git repository" not in capfd.readouterr().err
    base = from_pretrained(workspace / "base").eval()
    tok = load_tokenizer(workspace / "base")
    assert rows[0]["tasks"]["tiny_mc"]["acc"] == pytest.approx(_expected_accuracy(base, tok), abs=1e-12)
    assert "perplexity" not in rows[0] and rows[1]["n"] == {"tiny_mc": len(ITEMS)}
    assert rows[1]["scores"]["tiny_mc"].startswith(f"{rows[1]['tasks']['tiny_mc']['acc']:.3f} ± ")
    print_rows(rows, as_json=False)
    table = capfd.readouterr().out
    assert "tiny_mc" in table.splitlines()[0] and rows[1]["scores"]["tiny_mc"] in table and "95% confidence" in table
    with pytest.raises(LoramError, match="--no-perplexity leaves nothing"):
        EvalConfig(models=specs, perplexity=False).check()

def _lm_eval_cli(workspace, model_args: str, out: Path):
    cli = str(Path(sys.executable).parent / "loram-lm-eval")
    return subprocess.run([cli, "--model", "hf", "--model_args", model_args, "--device", "cpu", "--tasks", "tiny_mc",
                           "--include_path", str(workspace / "tasks"), "--batch_size", "2", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def _cli_acc(out: Path) -> float:
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]


def test_lm_eval_cli_on_a_pruned_checkpoint_and_a_recovered_adapter(workspace, tmp_path):
    """lm-eval's own CLI: a pruned checkpoint loads without remote code (loram-lm-eval registers the types),
    and `peft=RECOVERED` on the original is a standard peft adapter; both score as in-process."""
    tok = load_tokenizer(workspace / "base")
    for name, model_args, model in (
            ("pruned", f"pretrained={workspace / 'pruned'},dtype=float32",
             from_pretrained(workspace / "pruned").eval()),
            ("recovered", f"pretrained={workspace / 'base'},peft={workspace / 'rec'},dtype=float32",
             PeftModel.from_pretrained(from_pretrained(workspace / "base"), workspace / "rec").eval())):
        proc = _lm_eval_cli(workspace, model_args, tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _cli_acc(tmp_path / name) == pytest.approx(_expected_accuracy(model, tok), abs=1e-9)
    config = json.loads((workspace / "pruned" / "config.json").read_text())
    assert config["model_type"].startswith("loram_")  # not a stock type: plain lm_eval would need remote code


@pytest.mark.slow
def test_smollm2_original_and_pruned_on_a_shipped_bigbench_task(smollm2_pruned):
    """The real model and a real pruned checkpoint on the shipped `strategyqa` (BIG-bench, from the sdist):
    lm-eval's accuracy equals the choice log-likelihoods computed here, item by item."""
    from loram.shared import assets
    from loram.shared.assets.bigbench import bigbench_path

    try:
        path = bigbench_path("strategyqa")
    except LoramError as e:  # the sdist comes from the package registry, once; some registries do not carry it
        if "could not fetch bigbench==" not in str(e):
            raise
        pytest.skip(f"the BIG-bench sdist is neither cached nor offered by this package registry: {e}")
    docs = [json.loads(line) for line in path.read_text().splitlines()[:12]]
    tok = load_tokenizer(assets.model_dir())
    for folder in (assets.model_dir(), smollm2_pruned):
        model = from_pretrained(folder).eval()
        out = harness.run_tasks(model, tok, ["strategyqa"], limit=len(docs), batch=4)
        hits = [max(range(len(d["multiple_choice_targets"])),
                    key=lambda c, d=d: _choice_logprob(model, tok, d["inputs"].strip(), d["multiple_choice_targets"][c]))
                == d["multiple_choice_scores"].index(1) for d in docs]
        assert out["results"]["strategyqa"]["acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
        assert out["n"]["strategyqa"] == len(docs)


def test_chat_task_needs_a_chat_template(workspace):
    model, tok = from_pretrained(workspace / "base").eval(), load_tokenizer(workspace / "base")
    with pytest.raises(LoramError, match="gsm8k_chat prompts through the chat template"):
        harness.run_tasks(model, tok, ["gsm8k_chat"], limit=1)
