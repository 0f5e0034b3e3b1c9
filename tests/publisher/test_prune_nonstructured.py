"""`loram publish prune` with magnitude, Wanda and SparseGPT on tiny models: checkpoint, manifest,
layer-sequential calibration, determinism, stock loading, CLI and errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from loram.publisher.calibration import token_blocks
from loram.publisher.prune import prune
from loram.publisher.sparsity import Target, wanda_mask
from loram.shared.errors import LoramError
from loram.shared.manifest import Manifest

LORAM = str(Path(sys.executable).parent / "loram")
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonstructured")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    (root / "calib.txt").write_text(" ".join(f"The number {i} follows {i - 1} and precedes {i + 1}." for i in range(400)))
    return root


def _prune(root, name, **kwargs):
    args = dict(base=str(root / "base"), out=root / name, calib=str(root / "calib.txt"), samples=4, seq_len=32,
                overwrite=True)
    return prune(**{**args, **kwargs})


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("how", [{"sparsity": 0.5}, {"nm": "2:4"}], ids=["50%", "2:4"])
def test_checkpoint_has_exact_zeros_and_the_manifest_masks_them(base, method, how):
    result = _prune(base, f"{method}-{len(how)}", method=method, **how)
    out = result.out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and not (out / "modeling_loram.py").exists()  # stock architecture
    manifest = Manifest.load(out)
    assert manifest.method.kind == "non-structured" and manifest.method.criterion == method
    assert sorted(manifest.masks) == sorted(f"model.layers.{i}.{p}" for i in range(6) for p in PROJECTIONS)
    weights = load_file(str(out / "model.safetensors"))
    zeros = 0
    for name, packed in manifest.masks.items():
        mask, weight = packed.unpack(), weights[f"{name}.weight"]
        assert bool((weight[~mask] == 0).all()), name
        assert packed.sparsity == pytest.approx(0.5)
        zeros += int((~mask).sum())
        if "nm" in how:
            assert bool((mask.reshape(mask.shape[0], -1, 4).sum(dim=2) == 2).all()), name
    assert result.nonzero_params == result.pruned_params - zeros
    data = json.loads((out / "loram_manifest.json").read_text())
    assert data["masks"]["model.layers.0.mlp.down_proj"]["sparsity"] == 0.5
    assert data["method"]["nm"] == ([2, 4] if "nm" in how else None)
    original = load_file(str(base / "base" / "model.safetensors"))
    kept = manifest.masks["model.layers.2.mlp.up_proj"].unpack()
    same = torch.equal(weights["model.layers.2.mlp.up_proj.weight"][kept], original["model.layers.2.mlp.up_proj.weight"][kept])
    assert same == (method != "sparsegpt")  # only SparseGPT updates the surviving weights


def test_calibration_is_layer_sequential(base):
    """Each layer's Wanda mask comes from the inputs produced by the already-pruned layers before it.

    q_proj's input (the layer's input after its first norm) does not depend on the layer's own
    weights, so the final pruned model reproduces exactly what the pruner saw."""
    result = _prune(base, "wanda-seq", method="wanda", sparsity=0.5)
    pruned = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32)
    blocks = token_blocks(AutoTokenizer.from_pretrained(base / "base"), str(base / "calib.txt"), 4, 32)
    norms = {}

    def grab(name):
        def hook(_m, args):
            norms[name] = norms.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)
        return hook

    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(grab(i))
    with torch.no_grad():
        pruned(blocks)
    manifest = Manifest.load(result.out)
    for i in range(6):
        w = original.model.layers[i].self_attn.q_proj.weight
        expect = wanda_mask(w, norms[i].sqrt(), Target(sparsity=0.5))
        got = manifest.masks[f"model.layers.{i}.self_attn.q_proj"].unpack()
        assert (expect != got).float().mean() < 0.005, i  # equal up to float summation order
    # and they differ from masks computed on the dense model's activations beyond layer 0
    for i, layer in enumerate(original.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(grab(f"dense{i}"))
    with torch.no_grad():
        original(blocks)
    w = original.model.layers[5].self_attn.q_proj.weight
    assert not torch.equal(wanda_mask(w, norms["dense5"].sqrt(), Target(sparsity=0.5)),
                           manifest.masks["model.layers.5.self_attn.q_proj"].unpack())


def test_layer_range_and_determinism(base):
    a = _prune(base, "a", method="sparsegpt", nm="2:4", layers="2:4")
    b = _prune(base, "b", method="sparsegpt", nm="2:4", layers="2:4")
    manifest = Manifest.load(a.out)
    assert sorted({int(n.split(".")[2]) for n in manifest.masks}) == [2, 3] and manifest.method.layers == [2, 4]
    for name in ("model.safetensors", "loram_manifest.safetensors"):
        assert (a.out / name).read_bytes() == (b.out / name).read_bytes(), name
    ja, jb = (json.loads((r.out / "loram_manifest.json").read_text()) for r in (a, b))
    for j in (ja, jb):
        del j["files"]["prune_config.yaml"]  # it names the output folder
    assert ja == jb
    original = load_file(str(base / "base" / "model.safetensors"))
    weights = load_file(str(a.out / "model.safetensors"))
    assert torch.equal(weights["model.layers.1.self_attn.q_proj.weight"], original["model.layers.1.self_attn.q_proj.weight"])


def test_loads_with_stock_transformers_without_loram(base):
    out = _prune(base, "stock", method="magnitude", sparsity=0.5).out
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            "w = m.model.layers[0].mlp.up_proj.weight; "
            "assert 'loram' not in sys.modules; print(type(m).__name__, float((w == 0).float().mean()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LlamaForCausalLM", "0.5"]


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "wanda", "sparsity": 1.2}, "--sparsity must lie in (0, 1)"),
    ({"method": "wanda", "sparsity": 0.0}, "--sparsity must lie in (0, 1)"),
    ({"method": "sparsegpt", "nm": "4:4"}, "need 0 < N < M"),
    ({"method": "sparsegpt", "nm": "2:5"}, "M=5 does not divide the input width"),
    ({"method": "taylor", "nm": "2:4"}, "--sparsity and --nm apply to non-structured methods"),
    ({"method": "wanda", "ratio": 0.5}, "--ratio applies to structured methods"),
    ({"method": "wanda"}, "exactly one of --sparsity S or --nm N:M"),
    ({"method": "magnitude", "sparsity": 0.5, "nm": "2:4"}, "exactly one of"),
    ({"method": "wanda", "nm": "2:4", "layers": "0:9"}, "out of bounds"),
    ({"method": "wanda", "sparsity": 0.5, "seq_len": 4096},
     "calibration --seq-len 4096 exceeds the model's max_position_embeddings (128)"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(base, kwargs, message):
    with pytest.raises(LoramError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _prune(base, "bad", overwrite=False, **kwargs)
    assert not (base / "bad").exists()


def test_a_pruned_checkpoint_is_not_pruned_again(base):
    out = _prune(base, "once", method="magnitude", sparsity=0.5).out
    with pytest.raises(LoramError, match="already a LoRAM pruned checkpoint"):
        prune(base=str(out), out=base / "twice", method="magnitude", sparsity=0.5)


def test_command_prints_the_sparsity_table(base):
    proc = subprocess.run([LORAM, "publish", "prune", base / "base", "--method", "wanda", "--nm", "2:4",
                           "--calib", base / "calib.txt", "--samples", "2", "--seq-len", "16", "--out", base / "cli"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["layer", "q", "k", "v", "o", "gate", "up", "down"]
    assert lines[2].split() == ["0"] + ["50.0"] * 7 and len(lines) >= 8
    assert "mean over 42 modules: 50.00%" in proc.stdout and "non-zero" in proc.stdout
    bad = subprocess.run([LORAM, "publish", "prune", base / "base", "--method", "l2", "--sparsity", "0.5",
                          "--out", base / "cli2"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "takes --ratio" in bad.stderr


@pytest.mark.parametrize("kind", ["llama-mha", "mistral", "qwen2"])
def test_every_family_prunes_layer_by_layer(tmp_path, kind):
    save_tiny_checkpoint(tmp_path / "base", kind)
    (tmp_path / "c.txt").write_text("abc def ghi jkl mno pqr stu vwx yz. " * 200)
    result = prune(base=str(tmp_path / "base"), out=tmp_path / "out", method="sparsegpt", nm="2:4",
                   calib=str(tmp_path / "c.txt"), samples=3, seq_len=24)
    model = AutoModelForCausalLM.from_pretrained(result.out)
    assert model.config.model_type == kind.split("-")[0]
    for name, packed in Manifest.load(result.out, config=model.config).masks.items():
        assert bool((model.get_submodule(name).weight[~packed.unpack()] == 0).all()), name
    logits = model(torch.arange(1, 20).unsqueeze(0)).logits
    assert bool(torch.isfinite(logits).all())


def test_a_sparsity_that_zeroes_nothing_is_warned_about(base, loram_warnings):
    result = _prune(base, "none", method="magnitude", sparsity=1e-9)
    assert result.nonzero_params == result.original_params
    assert any(m.startswith("--sparsity 1e-09 zeroes no weight of these layers") for m in loram_warnings())
