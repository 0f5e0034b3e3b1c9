"""The SDK's side of the pruned-model types in `modeling_loram.py`: build their configs, save checkpoints.

A structured plan keeps, in each pruned layer i, `kv_i` KV groups and `m_i` MLP channels. The pruned
config keeps the original global sizes and records per layer
    num_key_value_heads = kv_i,  num_attention_heads = kv_i * G,  intermediate_size = m_i
(G = n_q / n_kv of the original model; whole KV groups go, so G is unchanged). Which heads and
channels were kept is the manifest's business (`loram.shared.manifest`), not the config's.
"""

import shutil
from pathlib import Path

from transformers import PreTrainedConfig

from loram.shared import modeling_loram
from loram.shared.architectures import PRUNED_TO_STOCK, Shape, family_of
from loram.shared.errors import LoramError
from loram.shared.modeling_loram import MODEL_CLASSES, register

__all__ = ["build_pruned_config", "from_pretrained", "is_pruned_config", "layer_sizes", "load_config", "load_tokenizer", "meta_model",
           "original_config", "param_count", "register", "save_pruned_checkpoint"]

# Keys of a stock config dict that must not be copied into the pruned type's config.
_NOT_COPIED = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's customary shard size; many tools download shards in parallel


def from_pretrained(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` for stock and LoRAM checkpoints alike.

    The one model loader of the project: it registers the LoRAM types first (explicitly, not as a side
    effect of an import), so a pruned checkpoint never needs remote code, and it never runs any
    (`trust_remote_code=False`: a folder that needs it is refused, never prompted for).
    """
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(path, **{"trust_remote_code": False, **kwargs})


def load_config(path, **kwargs) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained` for stock and LoRAM checkpoints alike (registers the LoRAM types first)."""
    from transformers import AutoConfig

    register()
    return AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})


def load_tokenizer(path, **kwargs):
    """`AutoTokenizer.from_pretrained` for stock and LoRAM checkpoints alike: it reads the config too, which
    for an unregistered LoRAM type would ask for remote code, so the LoRAM types are registered first."""
    from transformers import AutoTokenizer

    register()
    return AutoTokenizer.from_pretrained(path, **{"trust_remote_code": False, **kwargs})


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
    config_class, _, lm_class = MODEL_CLASSES[family.pruned_model_type]
    values = {k: v for k, v in stock_config.to_dict().items() if k not in _NOT_COPIED}
    values.update(head_dim=shape.head_dim, architectures=[lm_class.__name__], per_layer_config=per_layer)
    try:
        return config_class.from_dict(values)
    except ValueError as e:  # the config's own per-layer checks
        raise LoramError(f"cannot build a {family.pruned_model_type} config: {e}") from e


def save_pruned_checkpoint(model, out_dir: str | Path, tokenizer=None,
                           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` (and `tokenizer`) as a checkpoint that loads with or without the `loram` package.

    safetensors weights (sharded above `max_shard_size`, tied embeddings stored once), `config.json`
    with an `auto_map` for `trust_remote_code=True`, and a copy of `modeling_loram.py`. A stock model
    (non-structured pruning keeps the stock architecture) is saved as is. The manifest is the caller's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    family_of(config)  # refuses unsupported families with the list of supported ones
    pruned = is_pruned_config(config)
    if pruned:
        config.auto_map = modeling_loram.auto_map(config.model_type)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if pruned:
        # save_pretrained already copies the file that defines the model's class; copying ours makes the
        # checkpoint carry this SDK's version even when the model itself was loaded as remote code.
        shutil.copyfile(modeling_loram.__file__, out / Path(modeling_loram.__file__).name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    pickles = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
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
