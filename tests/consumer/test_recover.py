"""`loram recover`: exactness of the recovered adapter, vanilla peft loading, errors."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_checkpoint, tiny_batch
from transformers import AutoModelForCausalLM

import loram
from loram.publisher.prune import prune
from loram.publisher.structured import KeptUnits, zero_pruned_contributions_
from loram.recover import RecoverConfig, recover
from loram.shared.errors import LoramError
from loram.shared.manifest import Manifest

loram.register()  # pruned checkpoints load with the Auto classes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter_on_pruned(root, kind, lm_head=False):
    """Prune a tiny model, put a LoRA adapter with random (non-zero) A and B on it, save it."""
    save_tiny_checkpoint(root / "base", kind)
    prune(base=str(root / "base"), out=root / "pruned", method="l2", ratio=0.5, layers="1:5")
    pruned = AutoModelForCausalLM.from_pretrained(root / "pruned")
    torch.manual_seed(1)
    peft_model = get_peft_model(pruned, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS + (["lm_head"] if lm_head else []),
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(root / "adapter")
    return peft_model.eval()


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "qwen2", "mistral"])
def test_recovered_adapter_is_exact(tmp_path, kind):
    pruned_model = _adapter_on_pruned(tmp_path, kind, lm_head=True)
    result = recover(RecoverConfig(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec"))
    manifest = Manifest.load(tmp_path / "pruned")
    small = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    big = load_file(str(tmp_path / "rec" / "adapter_model.safetensors"))
    assert small.keys() == big.keys() and result.expanded > 0
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for key, a in small.items():
        b = big[key]
        if ".lora_" not in key:  # e.g. a tied lm_head weight peft saves alongside: copied unchanged
            assert torch.equal(a, b), key
            continue
        # original shapes
        layer_path, which = key.split(".lora_")[0].replace("base_model.model.", ""), key.split(".lora_")[1][0]
        module = original.get_submodule(layer_path)
        expect = (a.shape[0], module.in_features) if which == "A" else (module.out_features, a.shape[1])
        assert tuple(b.shape) == expect, key
    # slicing back with the manifest gives the pruned adapter bit for bit; dW is exact on the kept block, zero elsewhere
    for i in manifest.pruned_layers:
        for group, path in [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                           [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]:
            prefix = f"base_model.model.model.layers.{i}.{group}.{path}"
            rows, cols = manifest.kept_indices(i, f"{group}.{path}")
            A, B = big[f"{prefix}.lora_A.weight"], big[f"{prefix}.lora_B.weight"]
            a, b = small[f"{prefix}.lora_A.weight"], small[f"{prefix}.lora_B.weight"]
            sliced_A = A if cols is None else A[:, cols]
            sliced_B = B if rows is None else B[rows]
            assert torch.equal(sliced_A, a) and torch.equal(sliced_B, b), prefix
            dW, dw = B @ A, b @ a
            block = dW if rows is None else dW[rows]
            block = block if cols is None else block[:, cols]
            assert torch.equal(block, dw), prefix
            # outside the kept rows x kept columns block, dW is exactly zero
            kept_rows = torch.zeros(dW.shape[0], dtype=torch.bool)
            kept_rows[slice(None) if rows is None else rows] = True
            kept_cols = torch.zeros(dW.shape[1], dtype=torch.bool)
            kept_cols[slice(None) if cols is None else cols] = True
            outside = ~(kept_rows[:, None] & kept_cols[None, :])
            assert int(outside.sum()) == dW.numel() - dw.numel(), prefix  # the mask is the block's complement
            if rows is not None or cols is not None:
                assert outside.any(), prefix  # this module is pruned: the check below is not vacuous
            assert torch.count_nonzero(dW[outside]) == 0, prefix
            assert torch.count_nonzero(dW[~outside]) == torch.count_nonzero(dw), prefix
    # the original model with the recovered adapter and the pruned units zeroed == the pruned model with its adapter
    kept = {i: KeptUnits(manifest.kept_kv_heads[i], manifest.kept_mlp_channels[i]) for i in manifest.pruned_layers}
    zero_pruned_contributions_(original, kept)
    big_model = PeftModel.from_pretrained(original, tmp_path / "rec").eval()
    x = tiny_batch()
    torch.testing.assert_close(big_model(x).logits, pruned_model(x).logits, rtol=1e-5, atol=1e-5)


def test_recovered_adapter_points_at_the_original_with_card_and_sidecar(tmp_path):
    _adapter_on_pruned(tmp_path, "llama-gqa")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec")
    cfg = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    sidecar = json.loads((tmp_path / "rec" / "loram_recovery.json").read_text())
    assert sidecar["fill"] == "zero" and len(sidecar["source_adapter"]["sha256"]) == 64
    assert len(sidecar["pruned_model"]["manifest_sha256"]) == 64 and sidecar["tool_version"]
    card = (tmp_path / "rec" / "README.md").read_text()
    assert "base_model_relation: adapter" in card and f"base_model: {tmp_path / 'base'}" in card
    assert "library_name: peft" in card


def test_vanilla_peft_loads_the_recovered_adapter_without_loram(tmp_path):
    _adapter_on_pruned(tmp_path, "llama-gqa")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec")
    code = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM, PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"a = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'rec')!r})\n"
        f"b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}), "
        f"{str(tmp_path / 'rec')!r})\n"
        "assert not any(k.startswith('loram') for k in sys.modules)\n"
        "x = torch.tensor([[5, 6, 7, 8]])\n"
        "assert torch.equal(a(x).logits, b(x).logits)\n"
        "print('ok', type(a.base_model.model).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "LlamaForCausalLM"]


def test_normal_fill_changes_only_the_new_a_columns(tmp_path):
    _adapter_on_pruned(tmp_path, "llama-gqa")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "z")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "n", fill="normal", seed=3)
    z = load_file(str(tmp_path / "z" / "adapter_model.safetensors"))
    n = load_file(str(tmp_path / "n" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"
    changed = (z[key] != n[key]).any(dim=0)
    assert changed.sum() == z[key].shape[1] - 20  # exactly the 20 pruned channels' columns
    assert 0.3 < n[key][:, changed].std() < 0.8  # N(0, 1/r) with r = 4: std 0.5
    for k in z:
        if "lora_B" in k or "q_proj.lora_A" in k:
            assert torch.equal(z[k], n[k]), k


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    _adapter_on_pruned(tmp_path, "llama-gqa")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(30, 4)
    save_file(tensors, str(path))
    with pytest.raises(LoramError, match=r"layers\.2\.self_attn\.q_proj\.lora_B.*\(30, 4\).*expects \(24, 4\)"):
        recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec")
    assert not (tmp_path / "rec").exists()


def test_missing_manifest_and_other_adapter_types_are_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(LoramError, match="has no loram_manifest.json"):
        recover(adapter=str(tmp_path / "plain"), out=tmp_path / "rec")
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LoramError, match="IA3 adapter; LoRAM recovers LoRA adapters only"):
        recover(adapter=str(tmp_path / "plain"), out=tmp_path / "rec")


def test_wrong_original_is_refused_unless_overridden(tmp_path):
    _adapter_on_pruned(tmp_path, "llama-gqa")
    save_tiny_checkpoint(tmp_path / "other", "llama-gqa", seed=5)  # same shapes, other weights
    with pytest.raises(LoramError, match="is not the base model this pruned checkpoint was made from"):
        recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec", original=str(tmp_path / "other"))
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec", original=str(tmp_path / "other"),
            ignore_fingerprint=True)
    cfg = json.loads((tmp_path / "rec" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "other")


def test_recover_cli(tmp_path):
    _adapter_on_pruned(tmp_path, "qwen2")
    loram_bin = str(__import__("pathlib").Path(sys.executable).parent / "loram")
    proc = subprocess.run([loram_bin, "recover", str(tmp_path / "adapter"), "--out", str(tmp_path / "rec")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recovered 28 tensors" in proc.stdout
    proc = subprocess.run([loram_bin, "recover", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_an_adapter_is_used_only_on_the_pruned_checkpoint_it_was_trained_on(tmp_path):
    """A checkpoint re-pruned into the same folder (or another one of the same shapes) keeps other channels: the
    adapter loaded on it without a word and gave perplexity 268 instead of 9. `loram train` records the manifest's
    sha256; recover, and eval / generate / merge's loading, refuse another checkpoint unless told to ignore it."""
    from tiny_models import tiny_pruned_workspace

    from loram.merge import load_with_adapter
    from loram.shared.manifest import sha256_file
    from loram.train import train

    root = tiny_pruned_workspace(tmp_path)
    train(model=str(root / "pruned"), data=str(root / "qa.jsonl"), out=root / "adapter", steps=1, seq_len=32,
          columns="prompt=question,response=answer", save_every=100)
    report = json.loads((root / "adapter" / "training_report.json").read_text())
    assert report["model"]["manifest_sha256"] == sha256_file(root / "pruned" / "loram_manifest.json")
    load_with_adapter(root / "adapter", str(root / "pruned"))  # its own checkpoint: fine
    prune(base=str(root / "base"), out=root / "pruned", method="random", ratio=0.5, layers="1:3", seed=3,
          overwrite=True)  # same shapes, other channels, same folder
    with pytest.raises(LoramError, match=r"is not the pruned checkpoint the adapter .* was trained on: its "
                                         r"manifest's sha256 differs .*--ignore-fingerprint"):
        recover(adapter=str(root / "adapter"), out=root / "rec")
    with pytest.raises(LoramError, match="is not the pruned checkpoint the adapter"):
        load_with_adapter(root / "adapter", str(root / "pruned"))
    assert not (root / "rec").exists()
    recover(adapter=str(root / "adapter"), out=root / "rec", ignore_fingerprint=True)
    load_with_adapter(root / "adapter", str(root / "pruned"), ignore_fingerprint=True)


def test_an_original_missing_from_this_machine_is_said_at_recovery_and_at_merge(tmp_path, loram_warnings):
    """A pruned model made from a local copy of the original names that folder; a consumer without it got a
    recovered adapter pointing nowhere, and merge's error named neither the adapter's record nor the fix."""
    import shutil

    from loram.merge import merge

    _adapter_on_pruned(tmp_path, "llama-gqa")
    shutil.move(tmp_path / "base", tmp_path / "elsewhere")
    loram_warnings()
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec")
    assert loram_warnings() == [f"the original model the pruned checkpoint's manifest names, {tmp_path / 'base'}, is "
                                "not on this machine: merge, eval and generate look for it there; recover again with "
                                "--original PATH or ORG/NAME (a copy of the original)"]
    with pytest.raises(LoramError, match=r"^the base model .*rec names \(base_model_name_or_path\), .*/base, is not on "
                                         r"this machine; pass --base PATH or ORG/NAME"):
        merge(adapter=str(tmp_path / "rec"), out=tmp_path / "merged")
    merge(adapter=str(tmp_path / "rec"), out=tmp_path / "merged", base=str(tmp_path / "elsewhere"), dtype="fp32")
    (tmp_path / "pruned" / "README.md").write_text("---\nbase_model: org/tiny-original\n---\n# a published card\n")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec", overwrite=True)
    assert any("recover again with --original org/tiny-original (the base_model its model card names)" in m
               for m in loram_warnings())
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec2", original=str(tmp_path / "elsewhere"))
    assert not loram_warnings()


def test_misleading_hints_are_gone(tmp_path):
    """A recovered adapter on a pruned base was told to pass --ignore-fingerprint (the shapes would then fail); a
    recovered adapter given to recover again was asked whether it had been trained on the original; a missing
    adapter was called a model; a wrong --original's message read '@unknown revision ... differ(s)'."""
    from loram.merge import load_with_adapter
    from loram.shared.hub import resolve_model

    _adapter_on_pruned(tmp_path, "llama-gqa")
    recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "rec")
    for ignore in (False, True):
        with pytest.raises(LoramError, match=r"pruned is a LoRAM pruned checkpoint, but .*rec is a recovered adapter, "
                                             r"shaped for the original model; use it with the original "
                                             r"\(\S+/base\) in place of \S+/pruned$"):  # no flag: eval has none
            load_with_adapter(tmp_path / "rec", str(tmp_path / "pruned"), ignore_fingerprint=ignore)
    with pytest.raises(LoramError, match=r"rec is a recovered adapter already \(loram_recovery.json\): it has the "
                                         r"original model's shapes; use it as it is"):
        recover(adapter=str(tmp_path / "rec"), out=tmp_path / "again")
    with pytest.raises(LoramError, match=r"^adapter 'nope-adapter' is neither an existing folder"):
        resolve_model("nope-adapter", required="adapter_config.json", kind="peft adapter")
    save_tiny_checkpoint(tmp_path / "other", "llama-gqa", seed=5)
    with pytest.raises(LoramError, match=r"made from \(\S+/base\): model.safetensors differs or is missing$"):
        recover(adapter=str(tmp_path / "adapter"), out=tmp_path / "x", original=str(tmp_path / "other"))
