"""Structured pruning end to end on tiny models: exactness, rounding, determinism, errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import KINDS, save_tiny_checkpoint, tiny_batch
from transformers import AutoModelForCausalLM

import loram
from loram.publisher.prune import SCORES_FILE, PruneConfig, prune
from loram.publisher.structured import KeptUnits, zero_pruned_contributions_
from loram.shared.errors import LoramError
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, Manifest
from loram.shared.pruned_model import save_pruned_checkpoint

loram.register()  # pruned checkpoints load with the Auto classes

CALIB_TEXT = ("LoRAM trains a low-rank adapter on a pruned model and recovers it for the original. " * 60)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


def _prune(tmp_path, base, out="pruned", **kwargs):
    kwargs.setdefault("samples", 4)
    kwargs.setdefault("seq_len", 32)
    return prune(PruneConfig(base=str(base), out=tmp_path / out, **kwargs))


def _kept_units(manifest: Manifest) -> dict[int, KeptUnits]:
    return {i: KeptUnits(manifest.kept_kv_heads[i], manifest.kept_mlp_channels[i]) for i in manifest.pruned_layers}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["random", "l1", "l2", "taylor"])
def test_pruned_logits_equal_original_with_pruned_units_zeroed(tmp_path, calib_file, kind, method):
    original = save_tiny_checkpoint(tmp_path / "base", kind)
    result = _prune(tmp_path, tmp_path / "base", method=method, ratio=0.5, layers="1:-1", calib=str(calib_file))
    pruned = AutoModelForCausalLM.from_pretrained(result.out).eval()
    manifest = Manifest.load(result.out, pruned.config)
    assert manifest.pruned_layers == [1, 2, 3, 4]
    zero_pruned_contributions_(original, _kept_units(manifest))
    x = tiny_batch()
    torch.testing.assert_close(pruned(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)
    assert result.pruned_params == sum(p.numel() for p in pruned.parameters()) < result.original_params


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_weights_are_exact_slices_of_the_original(tmp_path, calib_file, kind):
    original = save_tiny_checkpoint(tmp_path / "base", kind)
    result = _prune(tmp_path, tmp_path / "base", method="taylor", ratio=0.4, calib=str(calib_file), layers="0:6")
    pruned = AutoModelForCausalLM.from_pretrained(result.out)
    manifest = Manifest.load(result.out)
    for i in manifest.pruned_layers:
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            rows, cols = manifest.kept_indices(i, path)
            full = original.model.layers[i].get_submodule(path)
            mine = pruned.model.layers[i].get_submodule(path)
            expect = full.weight[rows] if rows is not None else full.weight[:, cols]
            assert torch.equal(mine.weight, expect), (i, path)
            if full.bias is not None and rows is not None:
                assert torch.equal(mine.bias, full.bias[rows])
    # save/load round trip of the pruned checkpoint is bit-exact
    again = save_pruned_checkpoint(pruned, tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    a, b = pruned.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if original.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_a_ratio_that_removes_nothing_is_refused_and_one_that_keeps_attention_whole_warns(tmp_path, calib_file,
                                                                                          loram_warnings):
    """--ratio 0 wrote an unpruned copy as a pruned checkpoint without a word; an attention ratio below one KV group
    (SmolLM2's 3 groups at --ratio 0.3) pruned only the MLP, silently."""
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")  # 2 KV groups of 6-dim heads: width 12
    with pytest.raises(LoramError, match=r"^attention ratio 0.0 and MLP ratio 0.0 remove nothing: the checkpoint "
                                         r"would be an unpruned copy; give a ratio above 0, e.g. --ratio 0.5$"):
        _prune(tmp_path, tmp_path / "base", method="l2", ratio=0.0, layers="1:5")
    assert not (tmp_path / "pruned").exists()
    loram_warnings()
    result = _prune(tmp_path, tmp_path / "base", method="l2", ratio=0.4, layers="1:5")
    assert set(result.kept.values()) == {(2, int(0.6 * AutoModelForCausalLM.from_pretrained(
        tmp_path / "base").config.intermediate_size))}
    assert ("attention ratio 0.4 removes no KV group (2 per layer, a whole group the smallest step): attention stays "
            "whole and only MLP channels are pruned; a ratio above 0.417 removes one group") in loram_warnings()
    assert _prune(tmp_path, tmp_path / "base", "p2", method="l2", ratio=0.5, layers="1:5").kept[1][0] == 1


def _brute_force_taylor(model, calib, layer, query_fold="strided"):
    """Per-unit Taylor importance computed independently: one autograd call over all tokens, explicit loops."""
    model.zero_grad()
    logits = model(input_ids=calib).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), calib[:, 1:].reshape(-1))
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
              mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    biases = [m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj) if m.bias is not None]
    grads = torch.autograd.grad(loss, params + biases)
    s = [(p * g).abs().double() for p, g in zip(params + biases, grads, strict=True)]
    cfg = model.config
    hd, n_kv = cfg.head_dim, cfg.num_key_value_heads
    G = cfg.num_attention_heads // n_kv
    kv_scores = []
    for g in range(n_kv):  # the query heads scored with group g: its own (coupled), or h mod n_kv == g (strided)
        heads = [h for h in range(G * n_kv) if (h // G if query_fold == "coupled" else h % n_kv) == g]
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        kv_rows = slice(g * hd, (g + 1) * hd)
        total = s[0][q_rows].sum() + s[1][kv_rows].sum() + s[2][kv_rows].sum() + s[3][:, q_rows].sum()
        if biases:
            total += s[7][q_rows].sum() + s[8][kv_rows].sum() + s[9][kv_rows].sum()
        kv_scores.append(total)
    mlp_scores = [s[4][c].sum() + s[5][c].sum() + s[6][:, c].sum() for c in range(cfg.intermediate_size)]
    return torch.stack(kv_scores), torch.stack(mlp_scores)


@pytest.mark.parametrize("kind, query_fold", [("llama-gqa", None), ("llama-gqa", "coupled"), ("llama-mha", None),
                                              ("qwen2", None), ("qwen2", "coupled")])
def test_taylor_importance_equals_brute_force(tmp_path, calib_file, kind, query_fold):
    original = save_tiny_checkpoint(tmp_path / "base", kind)
    result = _prune(tmp_path, tmp_path / "base", method="taylor", ratio=0.5, layers="2:4",
                    calib=str(calib_file), samples=6, seq_len=24, kv_score="taylor", query_fold=query_fold)
    scores = load_file(str(result.out / SCORES_FILE))
    from transformers import AutoTokenizer

    from loram.publisher.calibration import token_blocks

    calib = token_blocks(AutoTokenizer.from_pretrained(tmp_path / "base"), str(calib_file), 6, 24)
    for layer in (2, 3):
        kv, mlp = _brute_force_taylor(original, calib, layer, query_fold or "strided")
        torch.testing.assert_close(scores[f"layers.{layer}.kv"], kv, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores[f"layers.{layer}.mlp"], mlp, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 6), (4, 4, 12), (6, 3, 8), (12, 4, 4), (8, 8, 6)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.66, 0.75, 0.85])
def test_kept_counts_follow_the_paper_rounding(tmp_path, heads, kv_heads, head_dim, ratio):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa", num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, intermediate_size=37)
    if kv_heads == heads:
        expect_kv = math.floor(heads * (1 - ratio))
    else:
        width = kv_heads * head_dim
        expect_kv = kv_heads - math.floor((width - math.floor(width * (1 - ratio))) / head_dim)
    expect_mlp = math.floor(37 * (1 - ratio))
    if expect_kv == 0:
        with pytest.raises(LoramError, match="would remove every KV group"):
            _prune(tmp_path, tmp_path / "base", method="l1", ratio=ratio, layers="1:5")
        return
    result = _prune(tmp_path, tmp_path / "base", method="l1", ratio=ratio, layers="1:5")
    assert set(result.kept.values()) == {(expect_kv, expect_mlp)}
    config = AutoModelForCausalLM.from_pretrained(result.out).config
    q_heads = expect_kv * (heads // kv_heads)
    for i in result.kept:
        assert config.per_layer_config[i].num_attention_heads == q_heads or q_heads == heads


def test_separate_attention_and_mlp_ratios(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    # the paper's default range [4, L-2) is empty on 6 layers: refused, rather than "pruned" to the original
    with pytest.raises(LoramError, match=r"layer range 4:-2 \(the default\) selects no layer of this 6-layer model, "
                                         "so nothing would be pruned; pass --layers A:B"):
        _prune(tmp_path, tmp_path / "base", method="l2", ratio=0.5, attn_ratio=0.0, mlp_ratio=0.75)
    assert not (tmp_path / "pruned").exists()
    with pytest.raises(LoramError, match="layer range 3:3 selects no layer"):
        _prune(tmp_path, tmp_path / "base", method="l2", ratio=0.5, layers="3:3")
    result = _prune(tmp_path, tmp_path / "base", "p2", method="l2", ratio=0.5, attn_ratio=0.0, mlp_ratio=0.75,
                    layers="-5:-1")
    assert result.kept == {i: (2, 10) for i in (1, 2, 3, 4)}
    # without --ratio the manifest records the default 0.5 next to the explicit per-part ratios
    result = _prune(tmp_path, tmp_path / "base", "p3", method="l2", attn_ratio=0.25, mlp_ratio=0.75, layers="1:5")
    method = Manifest.load(result.out).method
    assert (method.ratio, method.attn_ratio, method.mlp_ratio) == (0.5, 0.25, 0.75)


@pytest.mark.parametrize("method", ["random", "taylor"])
def test_same_inputs_and_seed_give_an_identical_manifest(tmp_path, calib_file, method):
    save_tiny_checkpoint(tmp_path / "base", "mistral")
    a = _prune(tmp_path, tmp_path / "base", "a", method=method, ratio=0.5, layers="0:6", calib=str(calib_file), seed=3,
               overwrite=True)
    first = {name: (a.out / name).read_bytes() for name in (MANIFEST_JSON, MANIFEST_TENSORS, "model.safetensors")}
    b = _prune(tmp_path, tmp_path / "base", "a", method=method, ratio=0.5, layers="0:6", calib=str(calib_file), seed=3,
               overwrite=True)
    for name, content in first.items():
        assert (b.out / name).read_bytes() == content, name
    if method == "random":
        c = _prune(tmp_path, tmp_path / "base", "c", method=method, ratio=0.5, layers="0:6", seed=4)
        assert (c.out / MANIFEST_TENSORS).read_bytes() != first[MANIFEST_TENSORS]


def test_scores_file_reprunes_at_another_ratio_without_calibration(tmp_path, calib_file):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    first = _prune(tmp_path, tmp_path / "base", "p50", method="taylor", ratio=0.5, layers="0:6", calib=str(calib_file))
    direct = _prune(tmp_path, tmp_path / "base", "p30", method="taylor", ratio=0.3, layers="0:6", calib=str(calib_file))
    # The calibration source no longer exists: --scores must not need it.
    again = _prune(tmp_path, tmp_path / "base", "p30s", method="taylor", ratio=0.3, layers="0:6",
                   calib=str(tmp_path / "gone.txt"), scores=first.out / SCORES_FILE)
    m1, m2 = Manifest.load(direct.out), Manifest.load(again.out)
    assert all(torch.equal(m1.kept_mlp_channels[i], m2.kept_mlp_channels[i]) for i in m1.pruned_layers)
    assert all(torch.equal(m1.kept_kv_heads[i], m2.kept_kv_heads[i]) for i in m1.pruned_layers)
    assert m2.method.calibration.source == str(calib_file)  # provenance carried from the scores file
    with pytest.raises(LoramError, match="no scores for layer 0"):
        _prune(tmp_path, tmp_path / "base", "x", ratio=0.3, layers="0:6",
               scores=_prune(tmp_path, tmp_path / "base", "y", method="l1", ratio=0.5, layers="2:4").out / SCORES_FILE)
    with pytest.raises(LoramError, match="is not an importance scores file .it holds model.embed_tokens.weight"):
        _prune(tmp_path, tmp_path / "base", "x", ratio=0.3, layers="0:6", scores=tmp_path / "base" / "model.safetensors")
    bad = load_file(str(first.out / SCORES_FILE))
    bad["layers.1.kv"][0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(LoramError, match="the scores of layer 1 are not all finite numbers"):
        _prune(tmp_path, tmp_path / "base", "x", ratio=0.3, layers="0:6", scores=tmp_path / "nan.safetensors")
    assert not (tmp_path / "x").exists()


def test_manifest_records_base_method_and_files(tmp_path, calib_file):
    save_tiny_checkpoint(tmp_path / "base", "qwen2")
    result = _prune(tmp_path, tmp_path / "base", method="taylor", ratio=0.5, calib=str(calib_file), layers="1:5")
    data = json.loads((result.out / MANIFEST_JSON).read_text())
    assert data["base"]["id"] == str(tmp_path / "base")
    assert set(data["base"]["fingerprint"]) >= {"config.json", "model.safetensors"}
    assert data["method"]["layers"] == [1, 5] and data["method"]["ratio"] == 0.5
    assert data["method"]["kind"] == "structured" and data["method"]["criterion"] == "taylor"
    assert data["method"]["calibration"] == {"source": str(calib_file), "samples": 4, "seq_len": 32}
    on_disk = {p.name for p in result.out.iterdir()} - {MANIFEST_JSON, MANIFEST_TENSORS}
    assert set(data["files"]) == on_disk
    assert not [p for p in result.out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]


def test_pruned_checkpoint_loads_without_loram_and_generates(tmp_path, calib_file):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    result = _prune(tmp_path, tmp_path / "base", method="taylor", ratio=0.5, layers="0:6", calib=str(calib_file))
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(result.out)!r}, trust_remote_code=True)\n"
        "assert not any(k.startswith('loram') for k in sys.modules), 'loram was imported'\n"
        "out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)\n"
        "print(type(m).__name__, out.shape[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["LoramLlamaForCausalLM", "7"]


@pytest.mark.parametrize("kwargs,message", [
    ({"ratio": 1.0}, r"--ratio must lie in \[0, 1\)"),
    ({"ratio": -0.1}, r"--ratio must lie in \[0, 1\)"),
    ({"ratio": 0.5, "mlp_ratio": 1.2}, r"--mlp-ratio must lie in \[0, 1\)"),
    ({"ratio": 0.95}, "would remove every KV group"),
    ({"ratio": 0.5, "layers": "2:9"}, "out of bounds"),
    ({"ratio": 0.5, "layers": "two"}, "must look like A:B"),
    ({"ratio": 0.5, "method": "taylor", "samples": 500}, "fewer than --samples 500"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, calib_file, kwargs, message):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    kwargs.setdefault("method", "l1")
    kwargs.setdefault("layers", "1:5")
    with pytest.raises(LoramError, match=message):
        _prune(tmp_path, tmp_path / "base", calib=str(calib_file), **kwargs)
    assert not (tmp_path / "pruned").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    _prune(tmp_path, tmp_path / "base", method="l1", ratio=0.5, layers="1:5")
    with pytest.raises(LoramError, match="already exists"):
        _prune(tmp_path, tmp_path / "base", method="l1", ratio=0.25, layers="1:5")
    assert _prune(tmp_path, tmp_path / "base", method="l1", ratio=0.25, layers="1:5", overwrite=True).kept[4] == (2, 30)


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LoramError, match="'gpt2' is not supported; supported: llama, mistral, qwen2"):
        _prune(tmp_path, tmp_path / "gpt2", method="l1", ratio=0.5)


def test_pruning_a_pruned_checkpoint_is_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    first = _prune(tmp_path, tmp_path / "base", method="l1", ratio=0.5, layers="1:5")
    with pytest.raises(LoramError, match="already a LoRAM pruned checkpoint"):
        _prune(tmp_path, first.out, "again", method="l1", ratio=0.5)
