"""`loram train` on tiny pruned models: outputs, nf4 gradients, resume, errors."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_checkpoint

import loram
from loram.publisher.prune import prune
from loram.shared.errors import LoramError
from loram.train import TrainConfig, train

loram.register()  # pruned checkpoints load with the Auto classes

LORAM = str(Path(sys.executable).parent / "loram")
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}
      for a in range(7) for b in range(5)]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    prune(base=str(root / "base"), out=root / "pruned", method="l2", ratio=0.5, layers="1:5")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return root


def _train(root, out, **kwargs):
    args = dict(model=str(root / "pruned"), data=str(root / "qa.jsonl"), out=root / out,
                columns="prompt=question,response=answer", seq_len=64, batch=4, steps=6, lr=1e-2,
                dropout=0.0, save_every=3)
    return train(TrainConfig(**{**args, **kwargs}))


def test_train_writes_a_peft_adapter_on_the_pruned_model_and_a_report(pruned):
    result = _train(pruned, "a", eval_data=str(pruned / "qa.jsonl"), eval_every=3)
    out = result.out
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(pruned / "pruned") and adapter_cfg["r"] == 8
    assert sorted(adapter_cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    report = json.loads((out / "training_report.json").read_text())
    assert [r["step"] for r in report["losses"]] == [1, 2, 3, 4, 5, 6]
    assert report["losses"][-1]["loss"] < report["losses"][0]["loss"]  # it learns
    assert [e["step"] for e in report["evals"]] == [3, 6]  # the last step is evaluated once
    assert report["tokens_per_second"] > 0 and report["peak_memory_bytes"] > 2**20 and report["wall_time_s"] > 0
    assert report["config"]["columns"] == "prompt=question,response=answer"
    # vanilla peft loads it onto the pruned model, with pruned shapes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pruned / "pruned")
    model = PeftModel.from_pretrained(base, out)
    q = model.base_model.model.model.layers[2].self_attn.q_proj
    assert q.lora_B["default"].weight.shape == (q.base_layer.out_features, 8) == (24, 8)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in out.rglob("*"))


def test_the_built_in_gsm8k_split_needs_no_columns(pruned, capsys):
    """`loram eval` mapped question/answer of the built-in GSM8K splits itself; `loram train --data gsm8k-train`
    said "cannot tell the record format" and needed --columns."""
    from loram.sft_format import builtin_columns

    assert builtin_columns("gsm8k-train") == builtin_columns("gsm8k-heldout") == "prompt=question,response=answer"
    assert builtin_columns("news") is builtin_columns(str(pruned / "qa.jsonl")) is None
    result = _train(pruned, "gsm", data="gsm8k-train", columns=None, steps=1, save_every=10, seq_len=128)
    assert result.steps == 1
    assert "records of gsm8k-train (prompt/response format)" in capsys.readouterr().err
    assert json.loads((result.out / "training_report.json").read_text())["config"]["columns"] is None


def test_the_report_holds_this_runs_peak_and_step_throughput(pruned):
    """In one Python process, a train after heavier work reported that work's peak as its own (the process's
    high-water mark); and tokens/s counted the evaluations' time as training time."""
    from loram.shared.progress import process_peak_rss_bytes

    held = torch.ones(400 * 2**20 // 4)  # 400 MiB, then freed: the process's peak is above it from here on
    del held
    before = process_peak_rss_bytes()
    result = _train(pruned, "peak", steps=2, save_every=10, eval_data=str(pruned / "qa.jsonl"), eval_every=1,
                    eval_limit=3)
    assert result.peak_memory_bytes < before - 200 * 2**20, (result.peak_memory_bytes, before)
    steps = result.report["step_seconds"]
    assert len(steps) == 2 and result.tokens_per_second == pytest.approx(
        result.report["tokens_seen"] / sum(steps), rel=0.02)


def test_eval_limit_evaluates_the_first_records_only(pruned):
    """train had no --eval-limit (align has): every evaluation ran over the whole --eval-data (all 319 held-out
    GSM8K items, about 100 s each on CPU in NF4)."""
    lines = (pruned / "qa.jsonl").read_text().splitlines(keepends=True)
    (pruned / "qa3.jsonl").write_text("".join(lines[:3]))
    limited = _train(pruned, "lim", steps=2, save_every=10, eval_data=str(pruned / "qa.jsonl"), eval_every=1,
                     eval_limit=3)
    first3 = _train(pruned, "first3", steps=2, save_every=10, eval_data=str(pruned / "qa3.jsonl"), eval_every=1)
    whole = _train(pruned, "whole", steps=2, save_every=10, eval_data=str(pruned / "qa.jsonl"), eval_every=1)
    assert limited.eval_losses == first3.eval_losses != whole.eval_losses and len(limited.eval_losses) == 2
    with pytest.raises(LoramError, match="--eval-limit must be >= 1, got 0"):
        _train(pruned, "bad", eval_data=str(pruned / "qa.jsonl"), eval_limit=0)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(pruned, capfd):
    full = _train(pruned, "full")
    # An interrupted run: keep what existed after step 3 (checkpoint-3), drop later state.
    shutil.copytree(full.out, pruned / "cut")
    for p in (pruned / "cut").iterdir():
        if p.name != "checkpoints":
            p.unlink()
    shutil.rmtree(pruned / "cut" / "checkpoints" / "checkpoint-6")
    capfd.readouterr()
    resumed = _train(pruned, "cut", resume=True)
    assert f"resuming from {pruned / 'cut' / 'checkpoints' / 'checkpoint-3'} (step 3)" in capfd.readouterr().err
    # Steps 1-3 come from checkpoint-3's history, steps 4-6 are recomputed: all equal, exactly.
    assert resumed.steps == 6 and resumed.losses == full.losses
    from loram.consumer_commands import train_summary

    assert train_summary(full).startswith("trained 6 steps in ")
    assert train_summary(resumed).startswith("trained steps 4-6 of 6 (resumed at step 3) in ")  # said "6 steps"
    a = json.loads((full.out / "training_report.json").read_text())["losses"]
    b = json.loads((resumed.out / "training_report.json").read_text())["losses"]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and b == a
    with pytest.raises(LoramError, match="already reached step 6"):  # the Trainer would train a seventh
        _train(pruned, "cut", resume=True)
    assert json.loads((resumed.out / "training_report.json").read_text())["losses"] == a


def test_nf4_after_evaluation_every_lora_matrix_still_gets_a_gradient(pruned):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from loram.loading import load_causal_lm

    model = load_causal_lm(pruned / "pruned", "nf4")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                             "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    x = torch.randint(3, 97, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # the evaluation pass that triggers the CPU packed-weight path if enabled
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero, which would zero A's gradient
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert len(grads) == 2 * 7 * 6
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                             if g is None or g.abs().sum() == 0]


def test_nf4_training_through_the_command(pruned):
    pytest.importorskip("bitsandbytes")
    result = _train(pruned, "q", quant="nf4", steps=2, eval_data=str(pruned / "qa.jsonl"), eval_every=1)
    assert len(result.losses) == 2 and len(result.eval_losses) == 2  # steps 1 and 2 (the last one evaluated once)
    assert all(math.isfinite(loss) for loss in result.losses + result.eval_losses), result
    # a randomly initialised tiny model starts near the uniform-prediction loss ln(vocab)
    assert abs(result.losses[0] - math.log(97)) < 0.5, result.losses
    # and it learns: the loss on the same held-out records drops from step 1 to step 2
    assert result.eval_losses[1] < result.eval_losses[0], result.eval_losses


@pytest.mark.parametrize("kwargs,message", [
    ({"data": "missing.jsonl"}, re.escape("missing.jsonl' does not exist and is not a built-in split")),
    ({"columns": "prompt=q,response=a"},
     re.escape("column mapping prompt=q: the dataset has no column 'q'; its columns are question, answer")),
    ({"columns": None}, re.escape("cannot tell the record format from the columns question, answer; accepted:")
     + ".*" + re.escape("mapped with --columns prompt=<column>,response=<column>")),
    ({"targets": ["q_proj", "attn_out"]}, re.escape("--targets: unknown module(s) attn_out; choose from "
                                                    "q,k,v,o,gate,up,down")),
    ({"rank": 0}, re.escape("--rank must be a whole number >= 1, got 0")),
    ({"lr": float("inf")}, "--lr must be a finite number > 0"),
    ({"alpha": float("nan")}, "--alpha must be a finite number > 0, got nan"),
    ({"alpha": 0.0}, "--alpha must be a finite number > 0, got 0.0"),
    ({"seed": -1}, r"--seed must lie in \[0, 2\^32\)"),
    ({"epochs": float("inf"), "steps": None}, "--epochs must be a finite number > 0"),
    ({"seq_len": 10**7}, re.escape("--seq-len 10000000 exceeds the model's max_position_embeddings (128)")),
])
def test_bad_input_is_a_clear_error(pruned, kwargs, message):
    if "data" in kwargs:
        kwargs["data"] = str(pruned / kwargs["data"])
    with pytest.raises(LoramError, match=message):
        _train(pruned, "bad", **kwargs)


def test_existing_output_needs_resume_or_overwrite(pruned):
    (pruned / "exists").mkdir()
    (pruned / "exists" / "x").write_text("x")
    with pytest.raises(LoramError, match="already exists; choose another --out, or pass --overwrite"):  # no checkpoint: no --resume
        _train(pruned, "exists")
    with pytest.raises(LoramError, match="no complete checkpoint"):
        _train(pruned, "exists", resume=True)


def test_quantization_without_bitsandbytes_is_a_clear_error(pruned, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(LoramError, match="needs bitsandbytes; install it with"):
        _train(pruned, "nobnb", quant="nf4")


def test_cli_prints_a_summary(pruned):
    proc = subprocess.run([LORAM, "train", str(pruned / "pruned"), "--data", str(pruned / "qa.jsonl"),
                           "--columns", "prompt=question,response=answer", "--steps", "2", "--seq-len", "64",
                           "--out", str(pruned / "cli")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 2 steps" in proc.stdout and "tokens/s" in proc.stdout
    # the logged count of trainable parameters is the LoRA count for r = 8 on every linear layer's pruned shape
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned / "pruned")
    linears = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert len(linears) == 7 * 6
    expected = sum(8 * (m.in_features + m.out_features) for m in linears)
    logged = re.search(r"\[loram train\] training ([\d,]+) LoRA parameters on \S+ \(weights in the model's own "
                       r"dtype\)\n", proc.stderr)  # --quant none, said in words
    assert logged and int(logged.group(1).replace(",", "")) == expected, proc.stderr[-2000:]
    assert re.search(r"training: 100%\|.*\| 2/2 ", proc.stderr), proc.stderr[-2000:]  # the progress bar, finished


@pytest.mark.parametrize("lm_head", [False, True])
def test_the_loss_projects_only_labelled_positions_and_trains_exactly_as_the_stock_loss(pruned, monkeypatch, lm_head):
    """`loram train` hands lm_head only the positions whose next token is labelled; losses, evaluation and
    the adapter are those of the stock causal-LM loss over full logits, with gradient accumulation too, and
    with a LoRA on lm_head itself (the hook sits on peft's wrapper)."""
    import loram.labelled_loss as labelled
    from loram.shared.checkpoints import SafeCheckpointTrainer

    rows = []
    real_gather = labelled.project_labelled_only

    def counting(head, keep):
        rows.append(int(keep.sum()))
        return real_gather(head, keep)

    monkeypatch.setattr(labelled, "project_labelled_only", counting)
    kwargs = dict(eval_data=str(pruned / "qa.jsonl"), eval_every=3, grad_accum=2, steps=4, lm_head=lm_head)
    ours = _train(pruned, f"labelled-{lm_head}", **kwargs)
    assert rows and all(r > 0 for r in rows)
    monkeypatch.setattr(labelled, "LabelledLossTrainer", SafeCheckpointTrainer)  # the stock loss
    stock = _train(pruned, f"stock-{lm_head}", **kwargs)
    assert ours.losses == pytest.approx(stock.losses, rel=1e-5)
    assert ours.eval_losses == pytest.approx(stock.eval_losses, rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(r.out / "adapter_model.safetensors") for r in (ours, stock))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_the_output_embedding_sees_only_labelled_hidden_states():
    from tiny_models import tiny_batch, tiny_model

    from loram.labelled_loss import labelled_loss, project_labelled_only
    from loram.perplexity import IGNORE, next_token_targets

    model = tiny_model("llama-mha")
    ids = tiny_batch(batch=3, seq=12)
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[1, 9:] = IGNORE
    labels[2, :] = IGNORE
    keep, targets = next_token_targets(labels)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with project_labelled_only(model.get_output_embeddings(), keep):
            kept = model(input_ids=ids).logits
        assert kept.shape == (int(keep.sum()), 97) == (targets.numel(), 97) == (7 + 8, 97)
        torch.testing.assert_close(kept, full[:, :-1][keep])
        assert model(input_ids=ids).logits.shape == full.shape  # the hook is gone after the block
        with (pytest.raises(LoramError, match="output embedding got hidden states of shape"),
              project_labelled_only(model.get_output_embeddings(), keep)):
            model(input_ids=ids, logits_to_keep=1)
        assert not model.get_output_embeddings()._forward_pre_hooks  # removed on the error too
        with pytest.raises(LoramError, match=r"logits of shape \(3, 12, 97\) for 15 labelled tokens"):
            labelled_loss({"logits": full}, labels)


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_processes_match_one_process_with_the_same_global_batch(pruned):
    """`torchrun -m loram train` (gloo DDP): the labelled-token count is summed over the processes and the
    gradients averaged, so two processes of batch 2 train exactly as one of batch 4."""
    common = [str(pruned / "pruned"), "--data", str(pruned / "qa.jsonl"), "--columns", "prompt=question,response=answer",
              "--seq-len", "64", "--steps", "4", "--lr", "1e-2", "--dropout", "0", "--save-every", "10",
              "--eval-data", str(pruned / "qa.jsonl"), "--eval-every", "2"]
    env = {**os.environ, "LORAM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "loram", "train", *common,
                           "--batch", "2", "--out", str(pruned / "ddp")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1 and proc.stdout.count("trained 4 steps") == 1  # rank 0 alone
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-2000:]  # DDP is told every parameter is used
    single = _train(pruned, "single-b4", steps=4, save_every=10, eval_data=str(pruned / "qa.jsonl"), eval_every=2)
    report = json.loads((pruned / "ddp" / "training_report.json").read_text())
    assert report["world_size"] == 2
    assert [r["loss"] for r in report["losses"]] == pytest.approx(single.losses, rel=1e-5)
    # Evaluation runs in both processes and gathers losses only (the per-process [labelled, vocab] logits differ in
    # length and are never kept). The Trainer averages per-batch losses, and each process evaluates batches of 2
    # of its half of the set, so the figure is close to one process's, not equal.
    assert [e["step"] for e in report["evals"]] == [2, 4]
    assert [e["eval_loss"] for e in report["evals"]] == pytest.approx(single.eval_losses, rel=5e-3)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_a_mistake_under_torchrun_is_said_once_not_once_per_process(pruned):
    env = {**os.environ, "LORAM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "loram", "train",
                           str(pruned / "pruned"), "--data", str(pruned / "missing.jsonl"), "--seq-len", "64",
                           "--out", str(pruned / "never")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and not (pruned / "never").exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0], proc.stderr[-2000:]


def test_several_gpus_in_one_process_are_refused_with_the_torchrun_command(pruned, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from loram.labelled_loss import LabelledLossTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(pruned / "pruned"),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args._setup_devices  # noqa: B018 (computes the device count, which a machine with 2 GPUs would set to 2)
    args._n_gpu = 2  # the Trainer would wrap the model in nn.DataParallel and split every batch
    with pytest.raises(LoramError, match=r"2 GPUs are visible to one process: .*torchrun --nproc_per_node 2"):
        LabelledLossTrainer(model=model, args=args)
