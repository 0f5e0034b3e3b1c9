"""The pruning manifest: round trip, determinism, validation, masks, file hashes, index derivation."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_batch, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from loram.shared.architectures import PRUNED_MODULES, Shape
from loram.shared.errors import LoramError
from loram.shared.manifest import (
    MANIFEST_JSON,
    MANIFEST_TENSORS,
    BaseModelInfo,
    Calibration,
    Manifest,
    Method,
    PackedMask,
    fingerprint,
    pack_mask,
    unpack_mask,
    verify_files,
)
from loram.shared.pruned_model import build_pruned_config, register, save_pruned_checkpoint

register()


def structured(kind: str = "llama-gqa", seed: int = 0) -> Manifest:
    """Layers 1 and 3 pruned (one KV group, random sorted channels), range [1, 5)."""
    s = Shape.of(tiny_config(kind))
    g = torch.Generator().manual_seed(seed)
    channels = [torch.randperm(s.intermediate, generator=g)[:n].sort().values for n in (s.intermediate // 3, 7)]
    return Manifest(
        base=BaseModelInfo("org/tiny", "a" * 40, {"config.json": "0" * 64}), architecture=s,
        method=Method("structured", "taylor", ratio=0.5, layers=[1, 5], calibration=Calibration("wiki", 10, 64), seed=0),
        kept_kv_heads={1: torch.tensor([1]), 3: torch.tensor([0])},
        kept_mlp_channels={1: channels[0], 3: channels[1]},
        tool_version="0.1.0",
    )


def assert_same(a: Manifest, b: Manifest) -> None:
    for name in ("base", "architecture", "method", "files", "alignment", "tool_version", "format_version"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("kept_kv_heads", "kept_mlp_channels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        assert torch.equal(a.masks[k].bits, b.masks[k].bits) and a.masks[k].shape == b.masks[k].shape


def test_round_trip(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    m = structured()
    m.alignment.append({"steps": 10, "data": "wiki"})
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.files == {"config.json": hashlib.sha256(b"{}").hexdigest()}  # save recorded the checkpoint
    assert_same(loaded, m)
    data = json.loads((tmp_path / MANIFEST_JSON).read_text())
    assert data["pruned_layers"] == [{"layer": 1, "kept_kv_heads": 1, "kept_mlp_channels": 13},
                                     {"layer": 3, "kept_kv_heads": 1, "kept_mlp_channels": 7}]
    assert loaded.kept_counts() == {1: (1, 13), 3: (1, 7)}


def test_identical_inputs_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"x": 1}')
        structured().save(tmp_path / name)
    for file in (MANIFEST_JSON, MANIFEST_TENSORS):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


@pytest.mark.parametrize("group, layer, indices, problem", [
    ("kept_kv_heads", 1, [2], "layer 1: kept KV heads index out of range"),
    ("kept_mlp_channels", 3, [5, 40], "layer 3: kept MLP channels index out of range"),
    ("kept_mlp_channels", 1, [4, 2, 9], "layer 1: kept MLP channels is not sorted"),
    ("kept_mlp_channels", 3, [2, 2, 9], "layer 3: kept MLP channels has duplicate"),
    ("kept_kv_heads", 3, [-1], "layer 3: kept KV heads index out of range"),
    ("kept_kv_heads", 1, [], "layer 1: kept KV heads must be a non-empty"),
    ("kept_mlp_channels", 0, [1, 2], "layer 0: pruned but outside the layer range"),
])
def test_each_bad_plan_names_the_layer(tmp_path, group, layer, indices, problem):
    m = structured()
    getattr(m, group)[layer] = torch.tensor(indices, dtype=torch.int64)
    with pytest.raises(LoramError, match=problem):
        m.validate()
    with pytest.raises(LoramError, match=problem):
        m.save(tmp_path)  # never written


def test_load_validates_what_another_writer_produced(tmp_path):
    structured().save(tmp_path)
    bad = {"layers.1.kept_kv_heads": torch.tensor([1]), "layers.1.kept_mlp_channels": torch.arange(13).flip(0),
           "layers.3.kept_kv_heads": torch.tensor([0]), "layers.3.kept_mlp_channels": torch.arange(7)}
    save_file(bad, tmp_path / MANIFEST_TENSORS)
    data = json.loads((tmp_path / MANIFEST_JSON).read_text())
    data["tensors"]["sha256"] = hashlib.sha256((tmp_path / MANIFEST_TENSORS).read_bytes()).hexdigest()
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(data))
    with pytest.raises(LoramError, match="layer 1: kept MLP channels is not sorted"):
        Manifest.load(tmp_path)
    data["pruned_layers"][1]["kept_mlp_channels"] = 8
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(data))
    with pytest.raises(LoramError, match="layer 3: kept counts in"):
        Manifest.load(tmp_path)
    data["format_version"] = 99
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(data))
    with pytest.raises(LoramError, match="upgrade loram"):
        Manifest.load(tmp_path)
    del data["base"]
    data["format_version"] = 1
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(data))
    with pytest.raises(LoramError, match="malformed"):
        Manifest.load(tmp_path)


def test_load_refuses_unlisted_tensors(tmp_path):
    m = structured()
    m.save(tmp_path)
    m.kept_kv_heads[4] = torch.tensor([0])
    m.save(tmp_path)
    data = json.loads((tmp_path / MANIFEST_JSON).read_text())
    data["pruned_layers"] = data["pruned_layers"][:2]  # layer 4 dropped from the JSON only
    (tmp_path / MANIFEST_JSON).write_text(json.dumps(data))
    with pytest.raises(LoramError, match="does not list: layers.4.kept_kv_heads"):
        Manifest.load(tmp_path)


def test_consistency_with_the_checkpoint_config(tmp_path):
    m = structured("qwen2")
    stock = tiny_config("qwen2")
    m.validate(build_pruned_config(stock, m.kept_counts()))  # matches
    with pytest.raises(LoramError, match="layer 3: config has 2 query heads, 1 KV heads, 12 MLP channels"):
        m.validate(build_pruned_config(stock, {**m.kept_counts(), 3: (1, 12)}))
    with pytest.raises(LoramError, match="layer 1: config has 6 query heads"):
        m.validate(stock)  # a dense config for a structured plan
    with pytest.raises(LoramError, match="differs from the manifest's original architecture"):
        m.validate(tiny_config("qwen2", intermediate_size=44))
    m.save(tmp_path)
    with pytest.raises(LoramError, match="layer 1"):
        Manifest.load(tmp_path, config=stock)


def test_pack_unpack_round_trip_and_non_structured_manifest(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 13, generator=g) > 0.5  # 65 entries: the last byte is partly padding
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 9
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    s = Shape.of(tiny_config("mistral"))
    mask = torch.rand(s.hidden, s.intermediate, generator=g) > 0.25
    m = Manifest(BaseModelInfo("org/tiny"), s, Method("non-structured", "wanda", sparsity=0.5, nm=[2, 4]),
                 masks={"model.layers.0.mlp.down_proj": PackedMask.of(mask)})
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path, config=tiny_config("mistral"))  # shapes unchanged: a stock config fits
    assert torch.equal(loaded.masks["model.layers.0.mlp.down_proj"].unpack(), mask)
    assert loaded.method.nm == [2, 4] and loaded.kept_indices(1, "mlp.up_proj") == (None, None)
    with pytest.raises(LoramError, match="must not list kept indices"):
        Manifest(BaseModelInfo("x"), s, Method("non-structured", "wanda"), kept_kv_heads={1: torch.tensor([0])}).validate()
    assert json.loads((tmp_path / "loram_manifest.json").read_text())["masks"]["model.layers.0.mlp.down_proj"][
        "sparsity"] == pytest.approx(float((~mask).float().mean()), abs=1e-6)
    with pytest.raises(LoramError, match="must be one of"):
        Method("semi", "wanda")


@pytest.mark.parametrize("name,shape,message", [
    ("model.layers.0.mlp.down_proj", (5, 13), "differs from the weight's"),
    ("model.layers.9.mlp.down_proj", None, "outside the layer range"),
    ("layers.0.mlp.down_proj", None, "not a projection name"),
    ("model.layers.0.mlp.act_fn", None, "not a projection name"),
])
def test_masks_are_checked_against_the_architecture(name, shape, message):
    s = Shape.of(tiny_config("mistral"))
    mask = torch.ones(shape or (s.hidden, s.intermediate), dtype=torch.bool)
    m = Manifest(BaseModelInfo("x"), s, Method("non-structured", "magnitude", sparsity=0.5),
                 masks={name: PackedMask.of(mask)})
    with pytest.raises(LoramError, match=message):
        m.validate()


def test_verify_files_detects_tampering(tmp_path):
    model = AutoModelForCausalLM.from_config(build_pruned_config(tiny_config(), structured().kept_counts()))
    save_pruned_checkpoint(model, tmp_path)
    structured().save(tmp_path)
    files = json.loads((tmp_path / MANIFEST_JSON).read_text())["files"]
    assert {"config.json", "model.safetensors", "modeling_loram.py", "generation_config.json"} <= set(files)
    verify_files(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(LoramError, match="model.safetensors: sha256 does not match"):
        verify_files(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoramError, match="model.safetensors: listed in the manifest but missing"):
        verify_files(tmp_path)


def test_fingerprint_and_check_base(tmp_path):
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    fp = fingerprint(base)
    assert set(fp) == {"config.json", "model.safetensors"}
    assert fp["config.json"] == hashlib.sha256((base / "config.json").read_bytes()).hexdigest()
    m = structured()
    m.base.fingerprint = fp
    m.check_base(base)
    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)
    with pytest.raises(LoramError, match="not the base model .*model.safetensors"):
        m.check_base(other)
    # A Hub cache snapshot links each weight file to a blob named by its sha256: the name is used as is.
    blob = tmp_path / "blobs" / ("f" * 64)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "config.json").write_text("{}")
    (tmp_path / "snap" / "model.safetensors").symlink_to(blob)
    assert fingerprint(tmp_path / "snap")["model.safetensors"] == "f" * 64


def brute_force_kept(m: Manifest, layer: int, module) -> list[int]:
    """Every row (axis out) or column (axis in) index, kept iff its unit survives."""
    a = m.architecture
    kv, mlp = m.kept_kv_heads[layer].tolist(), m.kept_mlp_channels[layer].tolist()
    size = {"q": a.num_heads * a.head_dim, "kv": a.num_kv_heads * a.head_dim, "mlp": a.intermediate}[module.unit]
    keep = {"q": lambda r: (r // a.head_dim) // a.group_size in kv,  # query head -> its KV group
            "kv": lambda r: r // a.head_dim in kv, "mlp": lambda r: r in mlp}[module.unit]
    return [r for r in range(size) if keep(r)]


def test_kept_indices_match_brute_force_on_gqa():
    m = structured("llama-gqa")  # G = 4: one kept KV group keeps 4 query heads
    m.kept_kv_heads[3] = torch.tensor([1])
    for layer in (1, 3):
        for module in PRUNED_MODULES:
            rows, cols = m.kept_indices(layer, module.path)
            got, other = (rows, cols) if module.axis == "out" else (cols, rows)
            assert other is None and got.tolist() == brute_force_kept(m, layer, module), (layer, module.path)
    assert m.kept_indices(2, "self_attn.q_proj") == (None, None)  # dense layer
    with pytest.raises(LoramError, match="unknown module"):
        m.kept_indices(1, "self_attn.qkv_proj")


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_sliced_model_equals_stock_with_removed_units_silenced(kind):
    """Slicing by `kept_indices` into the pruned class computes what the stock model computes when the
    removed heads and channels contribute nothing (their o_proj / down_proj columns zeroed)."""
    stock = tiny_model(kind)
    m = structured(kind)
    pruned = AutoModelForCausalLM.from_config(build_pruned_config(stock.config, m.kept_counts()), dtype=torch.float32)
    sliced = {}
    with torch.no_grad():
        for name, tensor in stock.state_dict().items():
            parts = name.split(".")  # model.layers.{i}.{self_attn|mlp}.{proj}.{weight|bias}
            path = ".".join(parts[3:5])
            if parts[1] == "layers" and int(parts[2]) in m.pruned_layers and path in {p.path for p in PRUNED_MODULES}:
                rows, cols = m.kept_indices(int(parts[2]), path)
                tensor = tensor[rows] if rows is not None else tensor[:, cols] if parts[-1] == "weight" else tensor
                if cols is not None:  # silence what was removed in the stock model
                    kept = torch.zeros(stock.state_dict()[name].shape[-1], dtype=torch.bool)
                    kept[cols] = True
                    stock.get_parameter(name)[:, ~kept] = 0
            sliced[name] = tensor
    pruned.load_state_dict(sliced)
    ids = tiny_batch()
    torch.testing.assert_close(pruned.eval()(ids).logits, stock(ids).logits, rtol=1e-5, atol=1e-5)
