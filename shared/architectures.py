"""Which model families LoRAM supports, and which module of a decoder layer is pruned along which axis.

This is the single place that knows module names and pruning axes. Everything else (pruning,
pruned-model classes, accounting, recovery) reads this table instead of branching on the family.

Structured pruning removes, per decoder layer, two coupled groups of units:
- `attn`: whole KV groups. A KV group g is KV head g plus the G = n_q / n_kv query heads that share
  it (HF `repeat_kv` order: query heads g*G .. g*G+G-1). Units are heads of `head_dim` rows/columns.
- `mlp`: intermediate channels, one row or column each.

Each entry of `PRUNED_MODULES` says: module path inside the decoder layer, group, which side of its
weight (`out` = rows of `W[out, in]`, `in` = columns) shrinks, and whether the unit is a query head
("q": G heads per KV group), a KV head ("kv") or an MLP channel ("mlp").
"""

from dataclasses import dataclass

from loram.shared.errors import LoramError


@dataclass(frozen=True)
class PrunedModule:
    path: str  # inside a decoder layer, e.g. "self_attn.q_proj"
    group: str  # "attn" or "mlp"
    axis: str  # "out" (rows of W, and bias) or "in" (columns of W)
    unit: str  # "q", "kv" or "mlp"


PRUNED_MODULES: tuple[PrunedModule, ...] = (
    PrunedModule("self_attn.q_proj", "attn", "out", "q"),
    PrunedModule("self_attn.k_proj", "attn", "out", "kv"),
    PrunedModule("self_attn.v_proj", "attn", "out", "kv"),
    PrunedModule("self_attn.o_proj", "attn", "in", "q"),
    PrunedModule("mlp.gate_proj", "mlp", "out", "mlp"),
    PrunedModule("mlp.up_proj", "mlp", "out", "mlp"),
    PrunedModule("mlp.down_proj", "mlp", "in", "mlp"),
)
# The seven linear projections of a decoder layer (LoRA's default targets, non-structured pruning's scope).
LINEAR_NAMES: tuple[str, ...] = tuple(m.path.rsplit(".", 1)[-1] for m in PRUNED_MODULES)


@dataclass(frozen=True)
class Family:
    """A supported stock architecture and the LoRAM model type that holds its pruned form."""

    model_type: str  # stock `config.model_type`
    pruned_model_type: str  # our per-layer model type, e.g. "loram_llama"
    config_class: str  # stock transformers class names
    causal_lm_class: str
    has_qkv_bias: bool | None  # None: read `attention_bias` from the config


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "loram_llama", "LlamaConfig", "LlamaForCausalLM", None),
        Family("mistral", "loram_mistral", "MistralConfig", "MistralForCausalLM", False),
        Family("qwen2", "loram_qwen2", "Qwen2Config", "Qwen2ForCausalLM", True),
    )
}
PRUNED_TO_STOCK = {f.pruned_model_type: f.model_type for f in FAMILIES.values()}


def family_of(config) -> Family:
    """The supported family of a (stock or LoRAM) config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    model_type = PRUNED_TO_STOCK.get(model_type, model_type)
    if model_type not in FAMILIES:
        raise LoramError(f"model type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class Shape:
    """The architecture numbers pruning and accounting need, read from a config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def group_size(self) -> int:
        """G: query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, config) -> "Shape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or get("hidden_size") // heads
        if heads % kv:
            raise LoramError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        return cls(get("num_hidden_layers"), get("hidden_size"), heads, kv, head_dim,
                   get("intermediate_size"), get("vocab_size"), bool(get("tie_word_embeddings", False)))


def kept_mlp_channels(intermediate: int, ratio: float) -> int:
    """The paper's rule: int(I * (1 - p))."""
    return int(intermediate * (1 - ratio))


def kept_kv_heads(shape: Shape, ratio: float) -> int:
    """KV groups kept at ratio p, by the paper's rounding rules.

    MHA (G = 1): int(n * (1 - p)). GQA: pruned = floor((n_kv*hd - int(n_kv*hd*(1 - p))) / hd).
    """
    if shape.group_size == 1:
        return int(shape.num_heads * (1 - ratio))
    width = shape.num_kv_heads * shape.head_dim
    pruned = (width - int(width * (1 - ratio))) // shape.head_dim
    return shape.num_kv_heads - pruned


def parse_layer_range(spec: str | None, num_layers: int) -> tuple[int, int]:
    """`"4:-2"` -> (4, L-2): a half-open range with Python-style negative ends; None -> the paper's [4, L-2)."""
    if spec is None or spec == "":
        start, stop = min(4, num_layers), max(min(4, num_layers), num_layers - 2)
        return start, stop
    try:
        a, b = (s.strip() for s in str(spec).split(":"))
        start = int(a) if a else 0
        stop = int(b) if b else num_layers
    except ValueError as e:
        raise LoramError(f"layer range {spec!r} must look like A:B (e.g. 4:-2)") from e
    start = start + num_layers if start < 0 else start
    stop = stop + num_layers if stop < 0 else stop
    if not (0 <= start <= stop <= num_layers):
        raise LoramError(f"layer range {spec!r} is out of bounds for a model with {num_layers} layers")
    return start, stop


def kept_index(shape: Shape, spec: PrunedModule, kept_kv, kept_mlp):
    """Rows (axis "out") or columns (axis "in") of `spec`'s weight that survive, as a sorted LongTensor.

    KV group g keeps KV rows [g*hd, (g+1)*hd) and query rows/columns of heads g*G .. g*G+G-1,
    i.e. [g*G*hd, (g+1)*G*hd). MLP channels map one to one.
    """
    import torch

    if spec.unit == "mlp":
        return torch.as_tensor(kept_mlp, dtype=torch.long)
    heads = torch.as_tensor(kept_kv, dtype=torch.long)
    if spec.unit == "q":
        heads = (heads[:, None] * shape.group_size + torch.arange(shape.group_size)).reshape(-1)
    return (heads[:, None] * shape.head_dim + torch.arange(shape.head_dim)).reshape(-1)
