"""Parameter accounting: the paper's 70B numbers exactly, rounding, biases, tying, and a brute-force
cross-check against physically sliced tiny models."""

import json

import pytest
import torch
from tiny_models import KINDS, tiny_config, tiny_model

from loram.accounting import nf4_bytes, plan_params
from loram.shared.architectures import PRUNED_MODULES, Shape
from loram.shared.errors import LoramError

# Public config.json numbers (rope etc. do not change any count).
LLAMA2_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000,
              "tie_word_embeddings": False}
LLAMA31_70B = {**LLAMA2_70B, "vocab_size": 128256,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
LLAMA2_13B = {"model_type": "llama", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "intermediate_size": 13824, "vocab_size": 32000,
              "tie_word_embeddings": False}


@pytest.mark.parametrize("config, original, training, reduction, reduction_4bit", [
    (LLAMA2_70B, 68_976_648_192, 16_272_924_672, 4.24, 16.95),
    (LLAMA31_70B, 70_553_706_496, 17_849_982_976, 3.95, 15.81),
])
def test_paper_70b_counts_exactly(config, original, training, reduction, reduction_4bit):
    p = plan_params(config, "structured", 0.85)
    assert p.original_params == original
    assert p.training_params == training == p.nonzero_params
    assert round(p.reduction, 2) == reduction and round(p.reduction_4bit, 2) == reduction_4bit
    assert p.layer_range == (4, 78)
    assert (p.kept_q_heads, p.kept_kv_heads, p.kept_channels) == (16, 2, 4300)
    by_layer = {c.layer: c for c in p.per_layer}
    assert (by_layer[3].q_heads, by_layer[3].kv_heads, by_layer[3].channels, by_layer[3].pruned) == (64, 8, 28672, False)
    assert (by_layer[4].q_heads, by_layer[4].kv_heads, by_layer[4].channels, by_layer[4].pruned) == (16, 2, 4300, True)
    assert not by_layer[78].pruned and by_layer[77].pruned
    assert p.training_bytes_16bit == 2 * training and p.original_bytes_16bit == 2 * original
    # 4-bit bitsandbytes is heavier than the paper's 1/4 (embeddings and lm_head stay 16-bit) but
    # lighter than 16-bit.
    assert training / 2 < p.training_bytes_4bit_bnb < 2 * training
    d = json.loads(json.dumps(p.to_dict()))
    assert d["original_params"] == original and d["training_params"] == training
    assert d["kept"] == {"q_heads": 16, "kv_heads": 2, "channels": 4300}
    assert d["layers"] == {"start": 4, "stop": 78, "pruned": 74, "total": 80} and len(d["per_layer"]) == 80


def test_original_matches_closed_form():
    """embed + lm_head + final norm + L * (q, k, v, o, 3 MLP matrices, two norms)."""
    s = Shape.of(LLAMA2_70B)
    attn = 2 * s.hidden * s.num_heads * s.head_dim + 2 * s.hidden * s.num_kv_heads * s.head_dim
    layer = attn + 3 * s.hidden * s.intermediate + 2 * s.hidden
    assert plan_params(LLAMA2_70B, "structured", 0.85).original_params == \
        2 * s.vocab * s.hidden + s.hidden + s.num_layers * layer


def test_mha_rounds_heads_down():
    """MHA keeps int(n * (1 - p)) heads: 40 * 0.67 = 26.8 -> 26 (the GQA rule would give 27)."""
    p = plan_params(LLAMA2_13B, "structured", 0.33)
    s = p.shape
    assert (p.kept_q_heads, p.kept_kv_heads, p.kept_channels) == (26, 26, int(s.intermediate * 0.67))
    assert p.layer_range == (4, 38)
    removed_heads = (s.num_heads - 26) * s.head_dim
    removed = 4 * removed_heads * s.hidden + 3 * (s.intermediate - p.kept_channels) * s.hidden
    assert p.training_params == p.original_params - (38 - 4) * removed


def _bias_entries(plan) -> int:
    """q/k/v biases sliced with their rows, o_proj bias (hidden) always whole."""
    s = plan.shape
    return sum(c.q_heads * s.head_dim + 2 * c.kv_heads * s.head_dim + s.hidden for c in plan.per_layer)


def test_attention_bias_counted_with_rows():
    cfg = {**tiny_config("llama-gqa").to_dict(), "attention_bias": False}
    without = plan_params(cfg, "structured", 0.5, layers="1:5")
    with_bias = plan_params({**cfg, "attention_bias": True}, "structured", 0.5, layers="1:5")
    assert with_bias.training_params - without.training_params == _bias_entries(with_bias)


def test_qwen2_qkv_biases_counted():
    p = plan_params(tiny_config("qwen2"), "structured", 0.5, layers="1:5")
    s = p.shape
    no_o_bias = _bias_entries(p) - s.num_layers * s.hidden  # Qwen2 has q/k/v biases, no o_proj bias
    weights = sum(2 * c.q_heads * s.head_dim * s.hidden + 2 * c.kv_heads * s.head_dim * s.hidden
                  + 3 * c.channels * s.hidden + 2 * s.hidden for c in p.per_layer)
    assert p.training_params == s.vocab * s.hidden + s.hidden + weights + no_o_bias  # tied: one embedding


def test_tied_embeddings_counted_once():
    tied = plan_params(tiny_config("llama-gqa", tie_word_embeddings=True), "structured", 0.5, layers="1:5")
    untied = plan_params(tiny_config("llama-gqa", tie_word_embeddings=False), "structured", 0.5,
                         layers="1:5")
    s = tied.shape
    assert untied.original_params - tied.original_params == s.vocab * s.hidden
    assert untied.training_params - tied.training_params == s.vocab * s.hidden
    model = tiny_model("llama-gqa")
    assert tied.original_params == sum(p.numel() for p in model.parameters())


def _slice_pruned(model, start, stop, kv, channels, gen) -> int:
    """Physically slice layers [start, stop) of a real model to random kept subsets; sum of numel."""
    s = Shape.of(model.config)
    groups = {i: torch.randperm(s.num_kv_heads, generator=gen)[:kv].sort().values for i in range(start, stop)}
    chans = {i: torch.randperm(s.intermediate, generator=gen)[:channels].sort().values for i in range(start, stop)}
    total = 0
    for name, param in model.named_parameters():
        t = param.detach()
        for i in range(start, stop):
            for m in PRUNED_MODULES:
                if not name.startswith(f"model.layers.{i}.{m.path}."):
                    continue
                if m.unit == "mlp":
                    index = chans[i]
                else:
                    heads = groups[i] if m.unit == "kv" else \
                        (groups[i][:, None] * s.group_size + torch.arange(s.group_size)).reshape(-1)
                    index = (heads[:, None] * s.head_dim + torch.arange(s.head_dim)).reshape(-1)
                if m.axis == "out":
                    t = t.index_select(0, index)
                elif t.dim() == 2:  # axis "in": columns of the weight; the bias keeps its rows
                    t = t.index_select(1, index)
        total += t.numel()
    return total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn_ratio, mlp_ratio, layers", [(0.5, 0.3, "1:-1"), (0.2, 0.75, "2:-1"), (0.0, 0.5, "0:6")])
def test_training_params_match_a_sliced_model(kind, attn_ratio, mlp_ratio, layers):
    p = plan_params(tiny_config(kind), "structured", attn_ratio=attn_ratio, mlp_ratio=mlp_ratio, layers=layers)
    sliced = _slice_pruned(tiny_model(kind), *p.layer_range, p.kept_kv_heads, p.kept_channels,
                           torch.Generator().manual_seed(0))
    assert sliced == p.training_params
    assert p.original_params == sum(t.numel() for t in tiny_model(kind).parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_non_structured_nominal_and_nonzero(kind):
    model = tiny_model(kind)
    p = plan_params(model.config, "non-structured", sparsity=0.55, layers="2:5")
    assert p.training_params == p.original_params and p.reduction == 1.0
    linears = {m.path.rsplit(".", 1)[-1] for m in PRUNED_MODULES}
    zeros_before = sum(int((t == 0).sum()) for t in model.parameters())  # e.g. the padding embedding row
    with torch.no_grad():  # magnitude pruning per weight, as a pruner at this sparsity would
        for name, param in model.named_parameters():
            parts = name.split(".")
            if parts[-1] == "weight" and parts[-2] in linears and 2 <= int(parts[2]) < 5:
                k = int(param.numel() * 0.55)
                param.view(-1)[param.abs().view(-1).argsort()[:k]] = 0
    zeros = sum(int((t == 0).sum()) for t in model.parameters()) - zeros_before
    assert p.nonzero_params == p.original_params - zeros
    default = plan_params(model.config, "non-structured", 0.5)
    assert default.layer_range == (0, p.shape.num_layers) and default.sparsity == 0.5


def test_bnb_bytes_per_tensor():
    """Linear weights of decoder layers in NF4, everything else (embeddings, norms, biases) 2 bytes."""
    p = plan_params(tiny_config("qwen2"), "structured", 0.0, layers=":")
    model = tiny_model("qwen2")
    expected = sum(nf4_bytes(t.numel()) if ".layers." in n and n.endswith("proj.weight") else 2 * t.numel()
                   for n, t in model.named_parameters())
    assert p.training_bytes_4bit_bnb == p.original_bytes_4bit_bnb == expected


@pytest.mark.parametrize("shape", [(48, 40), (256, 8192), (37, 64), (100, 3)])
def test_nf4_bytes_match_bitsandbytes(shape):
    F = pytest.importorskip("bitsandbytes.functional")
    packed, state = F.quantize_4bit(torch.randn(*shape, dtype=torch.bfloat16), blocksize=64,
                                    compress_statistics=True, quant_type="nf4")
    held = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert nf4_bytes(shape[0] * shape[1]) == sum(t.numel() * t.element_size() for t in held)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, "ratio must lie in [0, 1)"),
    ({"ratio": -0.1}, "ratio must lie in [0, 1)"),
    ({"ratio": 0.5, "layers": "0:7"}, "out of bounds"),
    ({"ratio": 0.5, "layers": "x"}, "must look like A:B"),
    ({"attn_ratio": 0.8, "mlp_ratio": 0.1, "layers": "1:5"}, "removes every KV group"),
    ({"ratio": 0.1, "mlp_ratio": 0.99, "layers": "1:5"}, "removes every MLP channel"),
    ({"ratio": 0.5}, "layer range 4:-2 (the default) selects no layer of this 6-layer model"),
    ({"ratio": 0.5, "layers": "3:3"}, "layer range 3:3 selects no layer"),
    ({"ratio": 0.5, "sparsity": 0.5}, "sparsity applies to the non-structured"),
    ({}, "needs a ratio"),
])
def test_bad_input_is_a_loram_error(kwargs, message):
    with pytest.raises(LoramError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        plan_params(tiny_config("llama-mha"), "structured", **kwargs)


def test_unsupported_and_pruned_model_types():
    with pytest.raises(LoramError, match="supported: llama, mistral, qwen2"):
        plan_params({**LLAMA2_70B, "model_type": "gpt2"}, "structured", 0.5)
    with pytest.raises(LoramError, match="already a LoRAM pruned model"):
        plan_params({**LLAMA2_70B, "model_type": "loram_llama"}, "structured", 0.5)
    with pytest.raises(LoramError, match="--kind must be one of"):
        plan_params(LLAMA2_70B, "semi", 0.5)
    with pytest.raises(LoramError, match="apply to the structured method"):
        plan_params(LLAMA2_70B, "non-structured", 0.5, mlp_ratio=0.5)
