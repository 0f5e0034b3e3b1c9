"""merge, eval and generate on tiny models with a recovered adapter."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import save_tiny_checkpoint, tiny_batch
from transformers import AutoModelForCausalLM

import loram
from loram.evaluate import EvalConfig, evaluate, parse_spec
from loram.generate import generate
from loram.harness import gsm8k_answer as extract_answer
from loram.merge import merge
from loram.recover import recover
from loram.shared.errors import LoramError

sys.path.insert(0, str(Path(__file__).parent))
from test_recover import _adapter_on_pruned  # noqa: E402

loram.register()  # pruned checkpoints load with the Auto classes

LORAM = str(Path(sys.executable).parent / "loram")


def _logits_perplexity(model, tokenizer_dir, data, seq_len):
    """(exp(mean NLL over the response tokens), token count), straight from full-forward logits, one record at
    a time: an independent check of loram.perplexity's masked, batched computation."""
    from transformers import AutoTokenizer

    from loram.sft_format import tokenize_sft
    from loram.shared.records import load_records

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in tokenize_sft(load_records(str(data)), tok, seq_len):
            ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
            logprobs = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), dim=-1)
            targets = labels[1:]
            keep = targets != -100
            total -= logprobs[keep].gather(1, targets[keep][:, None]).sum().item()
            count += int(keep.sum())
    assert count > 0
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    _adapter_on_pruned(root, "qwen2")
    recover(adapter=str(root / "adapter"), out=root / "rec")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i} twice.", "response": f"{i} {i}"}) + "\n"
                            for i in range(12)))
    return root


def test_merged_logits_equal_the_unmerged_adapter(recovered):
    merge(adapter=str(recovered / "rec"), out=recovered / "m32", dtype="fp32", max_shard_size="64KiB")
    shards = sorted((recovered / "m32").glob("model-*.safetensors"))
    assert len(shards) > 2 and (recovered / "m32" / "model.safetensors.index.json").is_file()
    assert all(f.stat().st_size < 2 * 2**16 for f in shards)  # at most one tensor past the limit
    merged = AutoModelForCausalLM.from_pretrained(recovered / "m32")  # stock transformers, no adapter
    base = AutoModelForCausalLM.from_pretrained(recovered / "base")
    unmerged = PeftModel.from_pretrained(base, recovered / "rec").eval()
    x = tiny_batch()
    torch.testing.assert_close(merged(x).logits, unmerged(x).logits, rtol=1e-5, atol=1e-5)
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    assert not list((recovered / "m32").glob("*.bin"))


def test_merge_keeps_the_originals_dtype_by_default_and_takes_bf16(recovered):
    """The default was bf16: on a checkpoint stored in fp32 (the embedded SmolLM2) it rounded away most of a small
    adapter's update (perplexity 4.1319 against 4.1224 unmerged, 4.1345 without the adapter)."""
    merge(adapter=str(recovered / "rec"), out=recovered / "mauto")
    assert json.loads((recovered / "base" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((recovered / "mauto" / "config.json").read_text())["dtype"] == "float32"
    merge(adapter=str(recovered / "rec"), out=recovered / "mbf", dtype="bf16")
    config = json.loads((recovered / "mbf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(recovered / "mbf", dtype=torch.float32)
    base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recovered / "base"), recovered / "rec")
    x = tiny_batch()
    torch.testing.assert_close(merged(x).logits, base.eval()(x).logits, rtol=0.05, atol=0.05)


def test_merge_takes_torch_dtype_names_too(recovered):
    # `loram plan --dtype` says bfloat16, merge said bf16: each takes both spellings
    merge(adapter=str(recovered / "rec"), out=recovered / "m16", dtype="float16")
    assert json.loads((recovered / "m16" / "config.json").read_text())["dtype"] == "float16"


def test_merge_refuses_a_base_with_another_fingerprint(recovered):
    save_tiny_checkpoint(recovered / "impostor", "qwen2", seed=9)
    with pytest.raises(LoramError, match="is not the original model this adapter was recovered for"):
        merge(adapter=str(recovered / "rec"), out=recovered / "bad", base=str(recovered / "impostor"))
    assert not (recovered / "bad").exists()
    merge(adapter=str(recovered / "rec"), out=recovered / "forced", base=str(recovered / "impostor"),
          ignore_fingerprint=True)


def test_eval_compares_models_and_matches_a_manual_perplexity(recovered):
    rows = evaluate(models=[f"orig={recovered / 'base'}", f"loram={recovered / 'base'}+{recovered / 'rec'}",
                            f"small={recovered / 'pruned'}+{recovered / 'adapter'}", str(recovered / "m32")],
                    data=str(recovered / "qa.jsonl"), seq_len=32)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"orig", "loram", "small", str(recovered / "m32")}
    # LoRAM with zero fill == the merged model; the pruned model with its adapter differs
    assert math.isclose(by["loram"]["perplexity"], by[str(recovered / "m32")]["perplexity"], rel_tol=1e-4)
    # manual: exp(mean NLL over the response tokens) with the stock model's loss
    from transformers import AutoTokenizer

    from loram.sft_format import tokenize_sft
    from loram.shared.records import load_records

    tok = AutoTokenizer.from_pretrained(recovered / "base")
    model = AutoModelForCausalLM.from_pretrained(recovered / "base").eval()
    total = count = 0
    for ex in tokenize_sft(load_records(str(recovered / "qa.jsonl")), tok, 32):
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    assert by["orig"]["tokens"] == count
    assert math.isclose(by["orig"]["perplexity"], math.exp(total / count), rel_tol=1e-4)
    # and from the logits directly, with and without an adapter
    ppl, n = _logits_perplexity(model, recovered / "base", recovered / "qa.jsonl", 32)
    assert n == count and math.isclose(by["orig"]["perplexity"], ppl, rel_tol=1e-4)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recovered / "base"),
                                             recovered / "rec").eval()
    ppl, n = _logits_perplexity(with_adapter, recovered / "base", recovered / "qa.jsonl", 32)
    assert by["loram"]["tokens"] == n and math.isclose(by["loram"]["perplexity"], ppl, rel_tol=1e-4)
    assert not math.isclose(by["loram"]["perplexity"], by["orig"]["perplexity"], rel_tol=1e-3)  # the adapter acts


def test_eval_refuses_an_adapter_on_the_wrong_base(recovered):
    save_tiny_checkpoint(recovered / "impostor2", "qwen2", seed=11)
    with pytest.raises(LoramError, match="is not the original model"):
        evaluate(models=[f"{recovered / 'impostor2'}+{recovered / 'rec'}"], data=str(recovered / "qa.jsonl"))


def test_eval_refuses_a_seq_len_past_the_models_positions(recovered):
    with pytest.raises(LoramError, match=r"--seq-len 100000 exceeds the model's max_position_embeddings \(128\)"):
        evaluate(models=[str(recovered / "base")], data=str(recovered / "qa.jsonl"), seq_len=100000,
                 columns="prompt=question,response=answer")


def test_eval_cli_json(recovered):
    proc = subprocess.run([LORAM, "eval", f"a={recovered / 'base'}", "--data", str(recovered / "qa.jsonl"),
                           "--seq-len", "32", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)["results"]
    assert [r["name"] for r in rows] == ["a"]
    ppl, n = _logits_perplexity(AutoModelForCausalLM.from_pretrained(recovered / "base").eval(),
                                recovered / "base", recovered / "qa.jsonl", 32)
    assert rows[0]["tokens"] == n and math.isclose(rows[0]["perplexity"], ppl, rel_tol=1e-4), (rows, ppl)


def test_parse_spec():
    assert parse_spec("m") == ("m", "m", None)
    assert parse_spec("x=m+a") == ("x", "m", "a")
    assert parse_spec("org/model+ad") == ("org/model+ad", "org/model", "ad")
    for bad, message in (("x=+a", "names no model"), ("m+", "names no adapter after '+'"),
                         ("x=m+", "names no adapter"), ("=m", "has an empty NAME before '='")):
        with pytest.raises(LoramError, match=re.escape(message)):
            parse_spec(bad)
    with pytest.raises(LoramError, match="two models are named 'm'; give each its own name"):
        EvalConfig.resolve(models=["m", "x=a", "m"])
    with pytest.raises(LoramError, match="two models are named 'x'"):
        EvalConfig.resolve(models=["x=a", "x=b+c"])


@pytest.mark.parametrize("text,answer", [
    ("so she has 72 clips.\n#### 72", "72"), ("#### 1,234", "1234"), ("The answer is 5.0", "5"),
    ("we get -3 and then 18", "18"), ("no number", None), ("#### 0.5", "0.5"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def _greedy(model, tokenizer, prompt, max_new_tokens):
    """Greedy continuation by a plain argmax loop over the model's logits (the tiny tokenizer has no chat
    template, so the prompt is tokenized as is)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_generate_streams_with_the_adapter(recovered, capsys):
    from transformers import AutoTokenizer

    prompt, n = "Say 3 twice.", 8
    text = generate(model=str(recovered / "base"), adapter=str(recovered / "rec"), prompt=prompt, max_new_tokens=n)
    printed = capsys.readouterr().out
    assert printed.strip() == text.strip() and len(text) > 0
    plain = generate(model=str(recovered / "base"), prompt=prompt, max_new_tokens=n)
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(recovered / "base")
    base = AutoModelForCausalLM.from_pretrained(recovered / "base").eval()
    assert plain == _greedy(base, tok, prompt, n)
    with_adapter = PeftModel.from_pretrained(base, recovered / "rec").eval()
    assert text == _greedy(with_adapter, tok, prompt, n)  # generation used the adapter...
    assert text != plain, (text, plain)  # ...which changes the output (its lora_B is non-zero)
