"""The per-layer pruned model types: build, run, save/load (with and without `loram`), LoRA, 4-bit."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import KINDS, tiny_batch, tiny_config, tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GPT2Config
from transformers.integrations.heterogeneity import configuration_utils as heterogeneity

from loram.shared.architectures import LINEAR_NAMES, Shape
from loram.shared.errors import LoramError
from loram.shared.modeling_loram import LoramLlamaConfig
from loram.shared.pruned_model import (
    build_pruned_config,
    empty_model,
    is_pruned_config,
    layer_sizes,
    register,
    save_pruned_checkpoint,
)

register()


def hand_plan(config) -> dict[int, tuple[int, int]]:
    """Layer 1 keeps one KV group and a third of the channels; layer 3 drops one KV group (if it can)
    and half the channels; every other layer stays dense."""
    s = Shape.of(config)
    return {1: (1, s.intermediate // 3), 3: (max(1, s.num_kv_heads - 1), s.intermediate // 2)}


def pruned_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_pruned_config(tiny_config(kind), hand_plan(tiny_config(kind))),
                                             dtype=torch.float32)
    with torch.no_grad():  # zero-initialized biases would hide a bias that is lost or misplaced
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def expected_shapes(config, layer: int) -> dict[str, tuple[int, int]]:
    s = Shape.of(config)
    kv, mlp = hand_plan(config).get(layer, (s.num_kv_heads, s.intermediate))
    q = kv * s.group_size * s.head_dim
    return {"q_proj": (q, s.hidden), "k_proj": (kv * s.head_dim, s.hidden), "v_proj": (kv * s.head_dim, s.hidden),
            "o_proj": (s.hidden, q), "gate_proj": (mlp, s.hidden), "up_proj": (mlp, s.hidden),
            "down_proj": (s.hidden, mlp)}


@pytest.mark.parametrize("kind", KINDS)
def test_config_keeps_original_globals_and_sparse_per_layer_sizes(kind, monkeypatch):
    stock = tiny_config(kind)
    s = Shape.of(stock)
    monkeypatch.setattr(heterogeneity.logger, "warning_once", lambda *a, **k: pytest.fail(f"notice logged: {a}"))
    config = build_pruned_config(stock, hand_plan(stock))
    assert is_pruned_config(config) and not is_pruned_config(stock)
    assert Shape.of(config) == s  # global reads give the original sizes, without transformers' notice
    kv1, mlp1 = hand_plan(stock)[1]
    assert layer_sizes(config, 1) == (kv1 * s.group_size, kv1, mlp1)
    assert layer_sizes(config, 0) == (s.num_heads, s.num_kv_heads, s.intermediate)
    saved = json.loads(config.to_json_string())
    assert saved["model_type"] == f"loram_{stock.model_type}"
    assert set(saved["per_layer_config"]) == {"1", "3"}  # sparse: dense layers are not listed
    assert "allow_global_per_layer_attribute_access" not in saved
    assert saved["num_attention_heads"] == s.num_heads and saved["intermediate_size"] == s.intermediate


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_model_builds_runs_and_generates(kind):
    model = pruned_model(kind)
    config = model.config
    for i, layer in enumerate(model.model.layers):
        for name, shape in expected_shapes(config, i).items():
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert tuple(module.weight.shape) == shape, (i, name)
            if module.bias is not None:  # Qwen2: q/k/v biases sliced with their rows
                assert module.bias.shape[0] == shape[0], (i, name)
    ids = tiny_batch(Shape.of(config).vocab)
    assert model(ids).logits.shape == (*ids.shape, Shape.of(config).vocab)
    # Caches hold per-layer KV heads: dynamic and static caches must give the no-cache result.
    greedy = dict(max_new_tokens=5, do_sample=False)
    no_cache = model.generate(ids, use_cache=False, **greedy)
    assert torch.equal(model.generate(ids, **greedy), no_cache)
    assert torch.equal(model.generate(ids, cache_implementation="static", **greedy), no_cache)
    # Layers hold the model's config, so switching the attention implementation reaches every layer.
    model.set_attn_implementation("eager")
    heads = [layer_sizes(config, i)[0] for i in range(len(model.model.layers))]
    assert [a.shape[1] for a in model(ids, output_attentions=True).attentions] == heads


def test_nothing_pruned_is_the_stock_model():
    stock = AutoModelForCausalLM.from_config(tiny_config("qwen2"), dtype=torch.float32).eval()
    config = build_pruned_config(stock.config, {})
    assert not config.is_heterogeneous
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(stock.state_dict())  # same keys, same shapes
    ids = tiny_batch()
    assert torch.equal(model(ids).logits, stock(ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, tmp_path):
    model = pruned_model(kind)
    save_pruned_checkpoint(model, tmp_path, tokenizer=tiny_tokenizer())
    assert AutoTokenizer.from_pretrained(tmp_path)("ab").input_ids == tiny_tokenizer()("ab").input_ids
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "modeling_loram.py" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"].startswith("modeling_loram.Loram")
    assert saved["auto_map"]["AutoConfig"].startswith("modeling_loram.Loram")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = tiny_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    tied = Shape.of(model.config).tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tied)  # tied embeddings stored once


def test_loads_with_trust_remote_code_without_loram(tmp_path):
    """A fresh interpreter that never imports `loram` loads every kind through the checkpoint's own file."""
    ids = tiny_batch()
    expected = {}
    for kind in KINDS:
        model = pruned_model(kind)
        save_pruned_checkpoint(model, tmp_path / kind)
        expected[kind] = model(ids).logits
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        out = {{}}
        for kind in {list(KINDS)}:
            model = AutoModelForCausalLM.from_pretrained(r"{tmp_path}/" + kind, trust_remote_code=True,
                                                         dtype=torch.float32).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out[kind] = model(ids).logits
        assert not [m for m in sys.modules if m == "loram" or m.startswith("loram.")], "loram was imported"
        save_file(out, r"{tmp_path}/logits.safetensors")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(tmp_path / "logits.safetensors")
    for kind in KINDS:
        assert torch.equal(got[kind], expected[kind].detach()), kind


@pytest.mark.parametrize("kind", KINDS)
def test_lora_reaches_every_lora_b_with_gradient_checkpointing(kind):
    peft = pytest.importorskip("peft")
    model = pruned_model(kind)
    model.activation_checkpointing_enable({"use_reentrant": False})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LINEAR_NAMES)))
    lora.train()
    ids = tiny_batch()
    lora(input_ids=ids, labels=ids).loss.backward()
    lora_b = {n: p for n, p in lora.named_parameters() if "lora_B" in n}
    assert len(lora_b) == len(LINEAR_NAMES) * Shape.of(model.config).num_layers
    for name, p in lora_b.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # LoRA shapes follow the pruned layer: B of q_proj in layer 1 is [kept rows, r].
    q_rows = expected_shapes(model.config, 1)["q_proj"][0]
    assert lora.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.shape == (q_rows, 4)


def test_4bit_load_and_qlora(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig

    model = pruned_model("llama-gqa")
    save_pruned_checkpoint(model, tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    for module in q.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # CPU kernel path is unreliable on some builds
    for i, layer in enumerate(q.model.layers):
        for name, (out_f, in_f) in expected_shapes(q.config, i).items():
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert isinstance(module, bnb.nn.Linear4bit), (i, name)
            assert (module.out_features, module.in_features) == (out_f, in_f), (i, name)
    ids = tiny_batch()
    assert torch.isfinite(q(ids).logits).all()
    lora = peft.get_peft_model(q, peft.LoraConfig(r=4, target_modules=list(LINEAR_NAMES)))
    lora(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_build_pruned_config_errors():
    stock = tiny_config("llama-gqa")
    with pytest.raises(LoramError, match="supported: llama, mistral, qwen2"):
        build_pruned_config(GPT2Config(), {})
    with pytest.raises(LoramError, match="layer 6: out of range"):
        build_pruned_config(stock, {6: (1, 1)})
    with pytest.raises(LoramError, match="layer 2: kept KV heads 0"):
        build_pruned_config(stock, {2: (0, 1)})
    with pytest.raises(LoramError, match="layer 2: kept MLP channels 41"):
        build_pruned_config(stock, {2: (1, 41)})
    with pytest.raises(LoramError, match="already a pruned type"):
        build_pruned_config(build_pruned_config(stock, {}), {})


def test_config_refuses_per_layer_fields_it_cannot_build():
    base = tiny_config("llama-gqa").to_dict()
    for key in ("model_type", "transformers_version"):
        base.pop(key)
    with pytest.raises(ValueError, match="may only set"):
        LoramLlamaConfig(**base, per_layer_config={1: {"hidden_size": 24}})
    with pytest.raises(ValueError, match="layer 1: num_attention_heads=3 is not a multiple"):
        LoramLlamaConfig(**base, per_layer_config={1: {"num_attention_heads": 3}})


def test_register_is_idempotent_and_save_reads_back_config(tmp_path):
    register()
    register()
    config = build_pruned_config(tiny_config("mistral"), hand_plan(tiny_config("mistral")))
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is type(config)
    assert [layer_sizes(again, i) for i in range(6)] == [layer_sizes(config, i) for i in range(6)]


def test_many_layers_zero_padded_keys_and_base_model(tmp_path):
    stock = tiny_config("llama-gqa", num_hidden_layers=12)
    kept = {i: (1, 10 + i) for i in (4, 7, 11)}
    config = build_pruned_config(stock, kept)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["per_layer_config"]
    assert list(saved) == ["04", "07", "11"]  # transformers zero-pads layer keys so they sort numerically
    again = AutoConfig.from_pretrained(tmp_path)
    assert {i: layer_sizes(again, i)[1:] for i in kept} == kept
    base = AutoModel.from_config(again)
    assert type(base).__name__ == "LoramLlamaModel" and base.layers[11].mlp.down_proj.in_features == 21


def test_sharded_save_keeps_every_tensor(tmp_path):
    model = pruned_model("llama-mha")
    save_pruned_checkpoint(model, tmp_path, max_shard_size=20_000)
    shards = sorted(Path(tmp_path).glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    keys = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    assert keys == set(model.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tiny_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_model_then_its_rows_is_the_loaded_model(kind, tmp_path):
    """FSDP's load: parameters on the meta device, buffers and generation config real, then every tensor read
    from the safetensors (`materialize_`: all rows without a process group) equals from_pretrained."""
    from loram.shared.checkpoints import materialize_

    model = pruned_model(kind)
    model.generation_config.max_new_tokens = 7
    save_pruned_checkpoint(model, tmp_path)
    empty = empty_model(tmp_path, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert all(p.is_meta for p in empty.parameters())
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == Shape.of(model.config).tied
    buffers = dict(empty.named_buffers())
    assert buffers.keys() == dict(loaded.named_buffers()).keys() and buffers
    assert all(torch.equal(b, dict(loaded.named_buffers())[n]) for n, b in buffers.items())
    assert empty.generation_config.max_new_tokens == 7
    materialize_(empty, "cpu", tmp_path)
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == Shape.of(model.config).tied
    want, got = loaded.state_dict(), empty.eval().state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(empty(tiny_batch()).logits, loaded(tiny_batch()).logits)


def test_streamed_save_is_the_saved_model(tmp_path):
    """`save_pruned_checkpoint(..., tensors=...)` (one tensor at a time, a model on the meta device giving the
    config) writes what save_pretrained writes: same tensors, config and generation config; sharded alike."""
    from loram.shared.pruned_model import meta_model
    from loram.shared.safetensors_stream import LazyTensor, saved_tensors

    model = pruned_model("llama-gqa")
    save_pruned_checkpoint(model, tmp_path / "stock", max_shard_size=20_000)
    meta = meta_model(model.config)
    meta.tie_weights()
    meta.generation_config = model.generation_config
    items = [(n, LazyTensor(tuple(t.shape), t.dtype, t.clone) if t.dim() == 2 else t) for n, t in saved_tensors(model)]
    save_pruned_checkpoint(meta, tmp_path / "streamed", max_shard_size=20_000, tensors=items)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "generation_config.json"):
        want, got = (json.loads((tmp_path / d / name).read_text()) for d in ("stock", "streamed"))
        assert want == got, name
    shards = sorted(p.name for p in (tmp_path / "streamed").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert "modeling_loram.py" in {p.name for p in (tmp_path / "streamed").iterdir()}

    wrong = [(n, LazyTensor((1, 2), t.dtype, t.clone)) for n, t in saved_tensors(model)]
    with pytest.raises(LoramError, match="internal error: model.embed_tokens.weight was announced as"):
        save_pruned_checkpoint(meta, tmp_path / "wrong", tensors=wrong)
