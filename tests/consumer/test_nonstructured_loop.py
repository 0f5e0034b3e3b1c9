"""The whole loop on a non-structured pruned model: Wanda 2:4 -> nf4 training -> recovery (identity) ->
the adapter applied to the original model."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from loram.publisher.prune import prune
from loram.recover import recover
from loram.train import train

QA = [{"question": f"What is {a} times {b}?", "answer": f"{a} times {b} is {a * b}. #### {a * b}"}
      for a in range(6) for b in range(6)]


def test_wanda_2_4_through_nf4_training_recovery_and_the_original(tmp_path, loram_warnings):
    pytest.importorskip("bitsandbytes")
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    (tmp_path / "calib.txt").write_text(" ".join(f"{a} times {b} is {a * b}." for a in range(30) for b in range(9)))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    prune(base=str(tmp_path / "base"), out=tmp_path / "w24", method="wanda", nm="2:4",
          calib=str(tmp_path / "calib.txt"), samples=4, seq_len=32)
    result = train(model=str(tmp_path / "w24"), data=str(tmp_path / "qa.jsonl"), out=tmp_path / "adapter",
                   columns="prompt=question,response=answer", quant="nf4", steps=2, batch=4, seq_len=48, lr=1e-2,
                   dropout=0.0)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    rec = recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "recovered")
    assert rec.expanded == 0 and rec.original == str(tmp_path / "base")
    trained = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    recovered = load_file(str(tmp_path / "recovered" / "adapter_model.safetensors"))
    assert trained.keys() == recovered.keys()
    assert all(torch.equal(trained[k], recovered[k]) for k in trained)  # identity: shapes never changed
    assert any(float(v.abs().sum()) > 0 for k, v in recovered.items() if "lora_B" in k)  # it learned something
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    ids = torch.arange(3, 30).unsqueeze(0)
    with torch.no_grad():
        before = original(ids).logits
    model = PeftModel.from_pretrained(original, tmp_path / "recovered").eval()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the adapter is applied to the dense original
    assert json.loads((tmp_path / "recovered" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "base")
    # nothing is filled: the record says so, and --fill normal (accepted and recorded before) warns that it does not apply
    assert json.loads((tmp_path / "recovered" / "loram_recovery.json").read_text())["fill"] == "none"
    loram_warnings()
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "normal", fill="normal")
    assert loram_warnings() == ["--fill normal applies to structured checkpoints: a non-structured adapter already has "
                                "the original's shapes and is copied unchanged (recorded as fill: none)"]
    sidecar = json.loads((tmp_path / "normal" / "loram_recovery.json").read_text())
    assert (sidecar["fill"], sidecar["seed"]) == ("none", None)
