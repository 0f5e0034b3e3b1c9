"""The SDK's side of the pruned-model types in `modeling_loram.py`: build their configs, save checkpoints.

A structured plan keeps, in each pruned layer i, `kv_i` KV groups and `m_i` MLP channels. The pruned
config keeps the original global sizes and records per layer
    num_key_value_heads = kv_i,  num_attention_heads = kv_i * G,  intermediate_size = m_i
(G = n_q / n_kv of the original model; whole KV groups go, so G is unchanged). Which heads and
channels were kept is the manifest's business (`loram.shared.manifest`), not the config's.
"""

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedConfig

from loram.shared.architectures import PRUNED_TO_STOCK, Shape, family_of
from loram.shared.errors import LoramError, first_line

if TYPE_CHECKING:
    from loram.shared.manifest import Manifest

__all__ = ["build_pruned_config", "check_model_folder", "check_pruned_checkpoint", "check_weights", "empty_model",
           "from_pretrained", "is_pruned_config", "layer_sizes", "load_config", "load_tokenizer", "meta_model",
           "original_config", "param_count", "read_config_json", "register", "save_pruned_checkpoint", "weight_files"]

# Keys of a stock config dict that must not be copied into the pruned type's config.
_NOT_COPIED = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's customary shard size; many tools download shards in parallel
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
# Weight formats the loader refuses: pickle (.bin/.pt/.pth/.ckpt can run code when read) and other frameworks'
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack")
TO_SAFETENSORS = ("convert it to safetensors first, in an environment you trust: "
                  "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` writes model.safetensors")


def register() -> None:
    """Make transformers' Auto classes know the LoRAM model types (idempotent). The model code is imported
    here, not at import time, so that modules that only read configs and manifests stay light."""
    from loram.shared.modeling_loram import register as _register

    _register()


def from_pretrained(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` for stock and LoRAM checkpoints alike.

    The one model loader of the project: it registers the LoRAM types first (explicitly, not as a side
    effect of an import), so a pruned checkpoint never needs remote code, and it never runs any
    (`trust_remote_code=False`: a folder that needs it is refused, never prompted for). It reads safetensors
    only (`use_safetensors=True`): a folder whose weights are pickle (`pytorch_model.bin`) is refused. A
    local folder is checked first (`check_model_folder`), so a broken one is one LoramError naming the file.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    register()
    folder = Path(path)
    if folder.is_dir():
        config = load_config(folder)
        check_weights(folder, config)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **{"trust_remote_code": False, **kwargs,
                                                             "use_safetensors": True})
    except SafetensorError as e:
        raise LoramError(f"{path}: a weight file is not a complete safetensors file ({first_line(e)}): it is "
                         "truncated or corrupted; re-download the model") from e
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise LoramError(f"{path}: the weights do not match config.json (size mismatch); the checkpoint is "
                         "corrupted or its config.json was edited: re-download it") from e
    except (OSError, ValueError) as e:
        raise LoramError(f"cannot load the model in {path}: {first_line(e)}") from e


def empty_model(path, dtype):
    """The model of checkpoint folder `path` with its parameters on the meta device (no weight read or
    allocated), its buffers (rotary frequencies) real, its generation config read: for FSDP, where every
    process shards this and then reads only its shards' rows (`checkpoints.materialize_`) instead
    of loading the whole model first. The folder's weights are checked as `from_pretrained` checks them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(path)
    config = load_config(folder)
    check_weights(folder, config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: tied embeddings are one parameter, stored once
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def load_config(path, **kwargs) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained` for stock and LoRAM checkpoints alike (registers the LoRAM types first).
    A local folder's config.json must be JSON, need no remote code, and hold sizes its model type accepts:
    otherwise one LoramError naming the file."""
    from transformers import AutoConfig

    register()
    folder = Path(path)
    if not folder.is_dir():
        return AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    if not (folder / "config.json").is_file():
        raise LoramError(f"{folder} has no config.json; is it a model checkpoint?")
    model_type = check_model_folder(folder).get("model_type")
    from transformers import CONFIG_MAPPING, __version__

    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise LoramError(f"{folder}: model type {model_type!r} is not one transformers {__version__} provides, and "
                         "LoRAM runs no remote code; upgrade transformers or use a model of an architecture it "
                         "provides")
    try:
        return AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # the config class's own checks
        raise LoramError(f"{folder / 'config.json'} is not a config this model type accepts "
                         f"({first_line(e)}); re-download the model or repair the file") from e


def load_tokenizer(path, **kwargs):
    """`AutoTokenizer.from_pretrained` for stock and LoRAM checkpoints alike: it reads the config too, which
    for an unregistered LoRAM type would ask for remote code, so the LoRAM types are registered first."""
    from transformers import AutoTokenizer

    register()
    if Path(path).is_dir():
        check_model_folder(Path(path))
    return AutoTokenizer.from_pretrained(path, **{"trust_remote_code": False, **kwargs})


def read_config_json(folder: str | Path) -> dict:
    """A model folder's config.json as a dict; a file that is not a JSON object is one LoramError."""
    import json

    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LoramError(f"{path} is not valid JSON (not UTF-8 text); re-download the model or repair the file") from e
    except json.JSONDecodeError as e:
        raise LoramError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); re-download "
                         "the model or repair the file") from e
    if not isinstance(data, dict):
        raise LoramError(f"{path} must hold a JSON object, not {type(data).__name__}; re-download the model")
    return data


def check_model_folder(folder: str | Path) -> dict:
    """Refuse, as one LoramError, a local model folder LoRAM would not load safely: a config.json that is not
    JSON, or one that needs remote code (an `auto_map` of a model type that is not LoRAM's: LoRAM never runs
    code shipped in a model folder). Returns config.json as a dict ({} for a folder without one)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return {}
    data = read_config_json(folder)
    auto_map = data.get("auto_map")
    if auto_map and data.get("model_type") not in PRUNED_TO_STOCK:
        classes = sorted({str(v[0] if isinstance(v, list | tuple) and v else v) for v in
                          (auto_map.values() if isinstance(auto_map, dict) else [auto_map])})
        files = sorted(p.name for p in folder.glob("*.py"))
        shipped = f" ({', '.join(files)} in the folder)" if files else ""
        raise LoramError(f"{folder} needs remote code: config.json's auto_map names {', '.join(classes)}{shipped}; "
                         "LoRAM never runs code shipped with a model: use a checkpoint of an architecture "
                         "transformers provides (without auto_map)")
    return data


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files the loader reads from a model folder (the shards its index names, or
    model.safetensors); refuses a folder with only pickle or other frameworks' weights, or none, naming the
    files and the fix, and an index that names a missing shard."""
    import json

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LoramError(f"{index} is not a valid safetensors index ({first_line(e)}); re-download the "
                             "model") from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LoramError(f"{folder} lacks {missing[0]}, a weight shard {WEIGHTS_INDEX} names"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; re-download the model")
        return [folder / s for s in shards]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    others = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.name in OTHER_WEIGHTS
                                        or p.name.endswith(".bin.index.json")))
    if others:
        raise LoramError(f"{folder} holds its weights only as {', '.join(others)}, not safetensors; LoRAM reads "
                         f"safetensors only (pickle files can run code when loaded): {TO_SAFETENSORS}")
    raise LoramError(f"{folder} has no model weights ({WEIGHTS} or {WEIGHTS_INDEX}); is it a model checkpoint?")


def safetensors_shapes(file: str | Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the header alone; a file that is not complete safetensors (cut
    short, overwritten) is one LoramError naming it and ending in `fix`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise LoramError(f"{file} is not a complete safetensors file ({first_line(e)}): it is truncated or "
                         f"corrupted; {fix}") from e


def check_weights(folder: str | Path, config) -> None:
    """Every weight file is a readable safetensors file, and each tensor has the shape `config` gives it
    (a truncated file, or a config.json edited after saving, is one LoramError naming the file)."""
    import torch
    from transformers import AutoModelForCausalLM

    files = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file, "re-download the model"))
    if getattr(config, "quantization_config", None):
        return  # a pre-quantized checkpoint stores packed shapes
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise LoramError(f"{Path(folder) / 'config.json'} does not describe a model transformers can build "
                         f"({first_line(e)}); re-download the model or repair the file") from e
    for name, tensor in model.state_dict().items():
        if name in shapes and shapes[name] != tuple(tensor.shape):
            raise LoramError(f"{Path(folder)}: {name} is {list(shapes[name])} in the weights but config.json makes "
                             f"it {list(tensor.shape)}; the checkpoint is corrupted or its config.json was edited: "
                             "re-download it")


def check_pruned_checkpoint(folder, *, verify: bool = True) -> "Manifest | None":
    """The validated `Manifest` of a LoRAM pruned checkpoint folder, or None for a folder without one (a
    stock model: nothing to check). Every command that reads a pruned checkpoint calls this first.

    Cheapest first: the manifest (parsed; indices in range, sorted, unique; its tensors file's sha256),
    then `config.json` (its sha256, then its per-layer sizes against the kept counts), then every other
    file the manifest lists, stream-hashed. Weight files the loader would read must be listed. Any problem
    is one LoramError naming the file or field and the fix. `verify=False` skips the sha256 of the
    checkpoint's files (`--no-verify`, or a Hub snapshot `resolve_model` has just verified); the manifest
    is still validated against `config.json`.
    """
    from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, REFETCH, Manifest, verify_hashes

    root = Path(folder)
    if not (root / MANIFEST_JSON).is_file():
        return None
    manifest = Manifest.load(root, fix=REFETCH)
    listed = dict(manifest.files)
    read = ["config.json", WEIGHTS_INDEX,
            *(p.name for p in root.glob("*.safetensors") if p.name != MANIFEST_TENSORS)]
    unlisted = sorted(name for name in read if (root / name).is_file() and name not in listed)
    if unlisted:
        raise LoramError(f"{root / unlisted[0]}: not listed in {MANIFEST_JSON}'s files, so it cannot be verified; "
                         f"{REFETCH}")
    if verify and "config.json" in listed:
        verify_hashes(root, {"config.json": listed.pop("config.json")}, REFETCH)
    try:
        config = load_config(root)
    except (OSError, ValueError) as e:
        raise LoramError(f"{root / 'config.json'} cannot be read ({type(e).__name__}: {first_line(e)}); "
                         f"{REFETCH}") from e
    manifest.check_config(config, root, REFETCH)
    if verify:
        verify_hashes(root, listed, REFETCH)
    return manifest


def is_pruned_config(config) -> bool:
    """True for a config of one of our per-layer model types (`loram_llama`, ...), loaded either way."""
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    return model_type in PRUNED_TO_STOCK


def layer_sizes(config: PreTrainedConfig, layer: int) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP channels) of decoder layer `layer`, for a stock or a pruned config."""
    layer_config = config.per_layer_config[layer]
    shape = Shape.of(layer_config)
    return shape.num_heads, shape.num_kv_heads, shape.intermediate


def build_pruned_config(stock_config: PreTrainedConfig, kept: dict[int, tuple[int, int]]) -> PreTrainedConfig:
    """The pruned type's config for `stock_config` with `kept[layer] = (kept_kv_heads, kept_mlp_channels)`.

    Layers absent from `kept` stay dense. Every global field keeps the original value; `head_dim` is
    written explicitly because pruned layers no longer satisfy hidden = heads * head_dim.
    """
    if is_pruned_config(stock_config):
        raise LoramError(f"config is already a pruned type ({stock_config.model_type}); start from the stock config")
    family = family_of(stock_config)
    shape = Shape.of(stock_config)
    per_layer = {}
    for layer, (kv, mlp) in sorted(kept.items()):
        if not 0 <= layer < shape.num_layers:
            raise LoramError(f"layer {layer}: out of range for a model with {shape.num_layers} layers")
        if not 1 <= kv <= shape.num_kv_heads:
            raise LoramError(f"layer {layer}: kept KV heads {kv} must be in [1, {shape.num_kv_heads}]")
        if not 1 <= mlp <= shape.intermediate:
            raise LoramError(f"layer {layer}: kept MLP channels {mlp} must be in [1, {shape.intermediate}]")
        per_layer[int(layer)] = {"num_attention_heads": int(kv) * shape.group_size,
                                 "num_key_value_heads": int(kv), "intermediate_size": int(mlp)}
    from loram.shared.modeling_loram import MODEL_CLASSES

    config_class, _, lm_class = MODEL_CLASSES[family.pruned_model_type]
    values = {k: v for k, v in stock_config.to_dict().items() if k not in _NOT_COPIED}
    values.update(head_dim=shape.head_dim, architectures=[lm_class.__name__], per_layer_config=per_layer)
    try:
        return config_class.from_dict(values)
    except ValueError as e:  # the config's own per-layer checks
        raise LoramError(f"cannot build a {family.pruned_model_type} config: {e}") from e


def save_pruned_checkpoint(model, out_dir: str | Path, tokenizer=None,
                           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, tensors=None, writer: bool = True) -> Path:
    """Write `model` (and `tokenizer`) as a checkpoint that loads with or without the `loram` package.

    safetensors weights (sharded above `max_shard_size`, tied embeddings stored once), `config.json`
    with an `auto_map` for `trust_remote_code=True`, and a copy of `modeling_loram.py`. A stock model
    (non-structured pruning keeps the stock architecture) is saved as is. The manifest is the caller's.

    With `tensors` (name, tensor) pairs in `save_pretrained`'s order, the weights are those, written one at
    a time (`safetensors_stream`): `model` then only gives the config (it may live on the meta device), a
    tensor may be a DTensor (every rank calls this; only `writer` writes) or a LazyTensor (structured
    pruning's slices, made as they are written).
    """
    out = Path(out_dir)
    config = model.config
    family_of(config)  # refuses unsupported families with the list of supported ones
    pruned = is_pruned_config(config)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    if pruned:
        from loram.shared import modeling_loram

        config.auto_map = modeling_loram.auto_map(config.model_type)
    if tensors is None:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        from transformers.utils.hub import convert_file_size_to_int

        from loram.shared.safetensors_stream import write_safetensors_streamed

        write_safetensors_streamed(tensors, out, max_shard_bytes=convert_file_size_to_int(max_shard_size),
                                   writer=writer)
        if writer:  # what save_pretrained writes next to the weights
            config.architectures = [type(model).__name__]
            config.dtype = str(model.dtype).split(".")[1]
            config.save_pretrained(out)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(out)
    if not writer:
        return out
    if pruned:
        # save_pretrained already copies the file that defines the model's class; copying ours makes the
        # checkpoint carry this SDK's version even when the model itself was loaded as remote code.
        shutil.copyfile(modeling_loram.__file__, out / Path(modeling_loram.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    pickles = sorted(p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoramError(f"refusing a checkpoint with pickle files: {', '.join(pickles)}")
    return out


def original_config(pruned: dict) -> dict:
    """The stock config.json dict a LoRAM config.json dict was pruned from: a pruned config keeps every
    original global size, so dropping the per-layer sizes and using the stock model type gives it back."""
    stock = {k: v for k, v in pruned.items()
             if k not in ("per_layer_config", "auto_map", "architectures", "transformers_version")}
    stock["model_type"] = PRUNED_TO_STOCK.get(pruned["model_type"], pruned["model_type"])
    return stock


def meta_model(config):
    """The causal LM of a stock or LoRAM config (object or config.json dict), on the meta device: exact
    shapes and parameter counts, no weight read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    family_of(config)  # refuses unsupported families with the list of supported ones
    register()
    if isinstance(config, dict):
        values = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
        try:
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        except (ValueError, TypeError) as e:
            raise LoramError(f"cannot read the model config: {str(e).splitlines()[0]}") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def param_count(config) -> int:
    """Parameters of the model of `config` (tied embeddings counted once)."""
    return sum(p.numel() for p in meta_model(config).parameters())
