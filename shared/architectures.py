"""Which model families LoRAM supports, and which module of a decoder layer is pruned along which axis.

This is the single place that knows module names and pruning axes. Everything else (pruning,
pruned-model classes, accounting, recovery) reads this table instead of branching on the family.

Structured pruning removes, per decoder layer, two coupled groups of units:
- `attn`: whole KV groups. A KV group g is KV head g plus the G = n_q / n_kv query heads that share
  it (HF `repeat_kv` order: query heads g*G .. g*G+G-1). Units are heads of `head_dim` rows/columns.
- `mlp`: intermediate channels, one row or column each.

Each entry of `PRUNED_MODULES` says: module path inside the decoder layer, group, which side of its
weight (`out` = rows of `W[out, in]`, `in` = columns) shrinks, whether the unit is a query head
("q": G heads per KV group), a KV head ("kv") or an MLP channel ("mlp"), and which tensor the module
reads: linears that read the same tensor (q/k/v the normed hidden state, gate/up the normed
post-attention state) share input statistics in calibration and a saved input in LoRA's backward.
"""

import re
from dataclasses import dataclass

from loram.shared.errors import LoramError


@dataclass(frozen=True)
class PrunedModule:
    path: str  # inside a decoder layer, e.g. "self_attn.q_proj"
    group: str  # "attn" or "mlp"
    axis: str  # "out" (rows of W, and bias) or "in" (columns of W)
    unit: str  # "q", "kv" or "mlp"
    reads: str  # the input tensor: "attn_in", "attn_out", "mlp_in" or "mlp_hidden"

    @property
    def name(self) -> str:
        """The module's own name, e.g. "q_proj" (peft's target_modules, LoRA keys)."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def short(self) -> str:
        """The short target name, e.g. "q"."""
        return self.name.removesuffix("_proj")


PRUNED_MODULES: tuple[PrunedModule, ...] = (
    PrunedModule("self_attn.q_proj", "attn", "out", "q", "attn_in"),
    PrunedModule("self_attn.k_proj", "attn", "out", "kv", "attn_in"),
    PrunedModule("self_attn.v_proj", "attn", "out", "kv", "attn_in"),
    PrunedModule("self_attn.o_proj", "attn", "in", "q", "attn_out"),
    PrunedModule("mlp.gate_proj", "mlp", "out", "mlp", "mlp_in"),
    PrunedModule("mlp.up_proj", "mlp", "out", "mlp", "mlp_in"),
    PrunedModule("mlp.down_proj", "mlp", "in", "mlp", "mlp_hidden"),
)
# The seven linear projections of a decoder layer (LoRA's default targets, non-structured pruning's scope).
LINEAR_NAMES: tuple[str, ...] = tuple(m.name for m in PRUNED_MODULES)
# Modules that read the same input tensor, in table order: (q, k, v), (o,), (gate, up), (down,).
INPUT_GROUPS: tuple[tuple[PrunedModule, ...], ...] = tuple(
    tuple(m for m in PRUNED_MODULES if m.reads == reads) for reads in dict.fromkeys(m.reads for m in PRUNED_MODULES))


# A parameter or module name inside a decoder layer, e.g. "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight".
LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(m.path) for m in PRUNED_MODULES) + r")(?=\.|$)")
_BY_PATH = {m.path: m for m in PRUNED_MODULES}


def layer_module(name: str) -> tuple[int, PrunedModule] | None:
    """(layer index, table entry) of the projection a dotted name lies in, or None."""
    match = LAYER_MODULE.search(name)
    return (int(match.group(1)), _BY_PATH[match.group(2)]) if match else None


def parse_targets(targets) -> tuple[str, ...]:
    """LoRA targets from "q,v", "q_proj,v_proj" or a list of either -> module names in table order.

    >>> parse_targets("v,q_proj")
    ('q_proj', 'v_proj')
    """
    items = [targets] if isinstance(targets, str) else list(targets)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    by_name = {**{m.short: m.name for m in PRUNED_MODULES}, **{m.name: m.name for m in PRUNED_MODULES}}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise LoramError(f"--targets: unknown module(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{','.join(m.short for m in PRUNED_MODULES)} (or their full names, e.g. q_proj; "
                         "lm_head via --lm-head)")
    chosen = {by_name[n] for n in names}
    return tuple(n for n in LINEAR_NAMES if n in chosen)


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

    def width(self, unit: str) -> int:
        """Rows or columns of a unit axis: "q" n_q*hd, "kv" n_kv*hd, "mlp" I."""
        return {"q": self.num_heads * self.head_dim, "kv": self.num_kv_heads * self.head_dim,
                "mlp": self.intermediate}[unit]

    def weight_shape(self, module: PrunedModule) -> tuple[int, int]:
        """`[out, in]` of a projection's weight: its unit axis, and the hidden size on the other side."""
        return (self.width(module.unit), self.hidden) if module.axis == "out" else (self.hidden, self.width(module.unit))

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


DEFAULT_RATIO = 0.5  # the structured pruning ratio when none is given (`publish prune`, `plan`, `demo`)
# Taylor pruning's working sizes: `publish prune` computes with them, `plan` estimates the memory they take.
TAYLOR_CALIBRATION = (32, 128)  # default calibration: samples x tokens
TAYLOR_CALIB_BATCH = 4  # calibration rows per forward/backward chunk (the scores do not depend on it)
TAYLOR_HEAD_CHUNK = 64  # positions per vocabulary-projection chunk


def ratio_options():
    """The `--ratio`, `--attn-ratio` and `--mlp-ratio` options of every command that prunes or plans."""
    from loram.shared.configs import option

    return (option(None, f"Structured: pruning ratio p in [0, 1) for attention and MLP alike (default {DEFAULT_RATIO})."),
            option(None, "Structured: pruning ratio for attention (KV groups); default --ratio."),
            option(None, "Structured: pruning ratio for MLP channels; default --ratio."))


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
    if start > stop:
        raise LoramError(f"empty layer range {spec}; write A:B with A < B (layers A to B-1, e.g. 4:-2)")
    if not (0 <= start <= stop <= num_layers):
        raise LoramError(f"layer range {spec!r} is out of bounds for a model with {num_layers} layers")
    return start, stop


def check_positions(config, tokens: int, what: str) -> None:
    """Refuse `what` (e.g. "--seq-len 9000") when it needs `tokens` positions, more than the model's
    max_position_embeddings (`config`: a config object or a config.json dict; no limit when it names none)."""
    longest = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if longest is not None and tokens > longest:
        raise LoramError(f"{what} exceeds the model's max_position_embeddings ({longest})")


def pruned_layer_range(spec: str | None, num_layers: int, structured: bool = True) -> tuple[int, int]:
    """The layers a pruning touches: `spec` (see `parse_layer_range`), by default [4, L-2) for structured
    pruning and every layer otherwise. A range that selects no layer is refused: nothing would be pruned."""
    start, stop = parse_layer_range(spec if spec or structured else ":", num_layers)
    if start == stop:
        default = "4:-2 (the default)" if structured else ": (the default)"
        raise LoramError(f"layer range {spec or default} selects no layer of this {num_layers}-layer model, "
                         "so nothing would be pruned; pass --layers A:B")
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
