"""Parameter and memory accounting: what the original holds, and what LoRAM training holds (docs/method.md §7).

Counts come from shapes only: the stock model is instantiated on the meta device (no weights are read
or allocated; a 70B model takes under a second), so the numbers are exact for any supported config.

    original_params = sum of numel over the stock model's parameters (tied embeddings counted once)

Structured pruning (docs/method.md §2) removes, in every layer of the pruned range and for every entry of
`PRUNED_MODULES`, a slice of the module's weight (and of its bias when the rows go):

    axis "out" (rows):     removed = units * width * (in_features + has_bias)
    axis "in"  (columns):  removed = units * width * out_features     (the bias, indexed by rows, stays)
    width = G*hd for a query slice per KV group, hd for a KV head, 1 for an MLP channel

    training_params = original_params - sum of removed
    reduction       = original_params / training_params
    reduction_4bit  = original_params / (training_params / 4)     (the paper: a 4-bit parameter is 1/4)
    HBM GiB         = params * 2 / 2^30                            (the paper's 16-bit count)

Non-structured pruning (docs/method.md §3) keeps every shape, so `training_params == original_params`; it
zeroes `int(numel * s)` entries of each decoder linear weight in the range (biases are kept), which
`nonzero_params` reports. N:M at N/M gives the same count.

Real bitsandbytes storage (QLoRA: NF4, blocksize 64, double quantization) is reported next to the
paper's convention: every decoder linear weight is 4-bit (`nf4_bytes`), while embeddings, lm_head,
norms and biases stay 16-bit (2 bytes a parameter).
"""

import math
from dataclasses import asdict, dataclass

import torch

from loram.shared.architectures import (
    PRUNED_MODULES,
    PRUNED_TO_STOCK,
    Shape,
    family_of,
    kept_kv_heads,
    kept_mlp_channels,
    pruned_layer_range,
)
from loram.shared.errors import LoramError
from loram.shared.manifest import KINDS

NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize (QLoRA and transformers' default)
NESTED_BLOCK = 256  # double quantization: blocks of first-level absmax values
NF4_CODE_BYTES = 16 * 4  # the 16-entry fp32 NF4 code table each quantization state holds
NESTED_CODE_BYTES = 256 * 4  # the 256-entry fp32 dynamic (8-bit) code table of the nested state


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes holds for one weight of `numel` entries in NF4 with double quantization.

        packed codes       ceil(n / 2)                      two 4-bit codes per uint8
        absmax (8-bit)     nb = ceil(n / 64)                one quantized absmax per 64-block
        nested absmax      4 * ceil(nb / 256)               fp32 absmax per 256 first-level blocks
        offset             4                                fp32 mean subtracted from the absmax
        code tables        64 + 1024                        16 fp32 (NF4) + 256 fp32 (dynamic) entries

    Matches `QuantState` of `bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    return (math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4
            + NF4_CODE_BYTES + NESTED_CODE_BYTES)


def gib(num_bytes: int) -> float:
    return num_bytes / 2**30


@dataclass(frozen=True)
class LayerCount:
    """One decoder layer as training holds it."""

    layer: int
    pruned: bool  # inside the layer range (structurally pruned or sparsified)
    q_heads: int
    kv_heads: int
    channels: int
    params: int  # nominal parameters of the layer as training holds it
    nonzero: int  # params minus the zeros of non-structured pruning
    bytes_4bit_bnb: int  # linear weights in NF4, everything else 16-bit


@dataclass(frozen=True)
class ParamPlan:
    """Parameter and memory counts of one pruning plan; `to_dict()` is the JSON of `loram plan --json`."""

    model_type: str
    kind: str  # "structured" or "non-structured"
    attn_ratio: float | None
    mlp_ratio: float | None
    sparsity: float | None
    shape: Shape
    layer_range: tuple[int, int]
    kept_q_heads: int
    kept_kv_heads: int
    kept_channels: int
    per_layer: tuple[LayerCount, ...]
    original_params: int
    original_bytes_4bit_bnb: int
    training_params: int
    nonzero_params: int
    training_bytes_4bit_bnb: int

    @property
    def reduction(self) -> float:
        return self.original_params / self.training_params

    @property
    def reduction_4bit(self) -> float:
        """The paper's QLoRAM ratio: every training parameter counted as 1/4 of one."""
        return self.original_params / (self.training_params / 4)

    @property
    def original_bytes_16bit(self) -> int:
        return 2 * self.original_params

    @property
    def training_bytes_16bit(self) -> int:
        return 2 * self.training_params

    @property
    def reduction_4bit_bnb(self) -> float:
        """16-bit original bytes over the bytes bitsandbytes really holds for the 4-bit training model."""
        return self.original_bytes_16bit / self.training_bytes_4bit_bnb

    def to_dict(self) -> dict:
        start, stop = self.layer_range
        return {
            "model_type": self.model_type,
            "kind": self.kind,
            "attn_ratio": self.attn_ratio,
            "mlp_ratio": self.mlp_ratio,
            "sparsity": self.sparsity,
            "shape": asdict(self.shape),
            "layers": {"start": start, "stop": stop, "pruned": stop - start, "total": self.shape.num_layers},
            "dense": {"q_heads": self.shape.num_heads, "kv_heads": self.shape.num_kv_heads,
                      "channels": self.shape.intermediate},
            "kept": {"q_heads": self.kept_q_heads, "kv_heads": self.kept_kv_heads, "channels": self.kept_channels},
            "original_params": self.original_params,
            "training_params": self.training_params,
            "nonzero_params": self.nonzero_params,
            "reduction": self.reduction,
            "reduction_4bit": self.reduction_4bit,
            "reduction_4bit_bnb": self.reduction_4bit_bnb,
            "original_bytes_16bit": self.original_bytes_16bit,
            "training_bytes_16bit": self.training_bytes_16bit,
            "original_bytes_4bit_bnb": self.original_bytes_4bit_bnb,
            "training_bytes_4bit_bnb": self.training_bytes_4bit_bnb,
            "hbm_gib_original": gib(self.original_bytes_16bit),
            "hbm_gib_training": gib(self.training_bytes_16bit),
            "hbm_gib_training_4bit": gib(self.training_bytes_16bit) / 4,
            "per_layer": [asdict(c) for c in self.per_layer],
        }


def check_fraction(name: str, value: float | None) -> None:
    """Ratios and sparsities live in [0, 1): 1 would remove everything."""
    if value is not None and not 0 <= value < 1:
        raise LoramError(f"{name} must lie in [0, 1), got {value}")


def stock_config(config):
    """A transformers config of a supported stock family, from a config object or a config.json dict."""
    family = family_of(config)
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    if model_type in PRUNED_TO_STOCK:
        raise LoramError(f"model type {model_type!r} is already a LoRAM pruned model; plan from the original's config")
    if isinstance(config, dict):
        import transformers

        values = {k: v for k, v in config.items() if k != "quantization_config"}  # shapes only
        return getattr(transformers, family.config_class).from_dict(values)
    return config


def plan_params(config, kind: str = "structured", ratio: float | None = None, *,
                attn_ratio: float | None = None, mlp_ratio: float | None = None,
                layers: str | None = None, sparsity: float | None = None) -> ParamPlan:
    """Count the original and the training model for one plan.

    `config`: a stock Llama/Mistral/Qwen2 config (object or config.json dict). Structured: `ratio`
    is the default of `attn_ratio` (KV groups) and `mlp_ratio` (channels). Non-structured: `sparsity`
    (default `ratio`). `layers`: a half-open range like "4:-2"; default [4, L-2) for structured, as in
    the paper, and every layer for non-structured (which the paper prunes everywhere).
    """
    from transformers import AutoModelForCausalLM

    if kind not in KINDS:
        raise LoramError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    config = stock_config(config)
    shape = Shape.of(config)
    structured = kind == "structured"
    if structured:
        if sparsity is not None:
            raise LoramError("sparsity applies to the non-structured method; use ratio/attn_ratio/mlp_ratio")
        attn_ratio = ratio if attn_ratio is None else attn_ratio
        mlp_ratio = ratio if mlp_ratio is None else mlp_ratio
        if attn_ratio is None or mlp_ratio is None:
            raise LoramError("structured pruning needs a ratio (or both attn_ratio and mlp_ratio)")
    else:
        if attn_ratio is not None or mlp_ratio is not None:
            raise LoramError("attn_ratio/mlp_ratio apply to the structured method; use sparsity")
        sparsity = ratio if sparsity is None else sparsity
        if sparsity is None:
            raise LoramError("non-structured pruning needs a sparsity (or a ratio)")
    for name, value in (("ratio", ratio), ("attn_ratio", attn_ratio), ("mlp_ratio", mlp_ratio),
                        ("sparsity", sparsity)):
        check_fraction(name, value)
    start, stop = pruned_layer_range(layers, shape.num_layers, structured)

    kv, channels = shape.num_kv_heads, shape.intermediate
    if structured:
        kv, channels = kept_kv_heads(shape, attn_ratio), kept_mlp_channels(shape.intermediate, mlp_ratio)
        if kv < 1:
            raise LoramError(f"attn ratio {attn_ratio} removes every KV group ({shape.num_kv_heads}); use a smaller one")
        if channels < 1:
            raise LoramError(f"mlp ratio {mlp_ratio} removes every MLP channel ({shape.intermediate}); "
                             "use a smaller one")

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    original = sum(p.numel() for p in model.parameters())
    decoder_layers = model.get_decoder().layers
    dense = [_count_layer(i, layer, shape, False, shape.num_kv_heads, shape.intermediate, 0.0)
             for i, layer in enumerate(decoder_layers)]
    outside = original - sum(c.params for c in dense)  # embeddings, final norm, lm_head: 16-bit always
    counts = tuple(
        _count_layer(i, layer, shape, True, kv, channels, 0.0 if structured else sparsity) if start <= i < stop
        else dense[i] for i, layer in enumerate(decoder_layers))
    return ParamPlan(
        model_type=config.model_type, kind=kind, attn_ratio=attn_ratio, mlp_ratio=mlp_ratio,
        sparsity=sparsity, shape=shape, layer_range=(start, stop),
        kept_q_heads=kv * shape.group_size, kept_kv_heads=kv, kept_channels=channels, per_layer=counts,
        original_params=original,
        original_bytes_4bit_bnb=2 * outside + sum(c.bytes_4bit_bnb for c in dense),
        training_params=outside + sum(c.params for c in counts),
        nonzero_params=outside + sum(c.nonzero for c in counts),
        training_bytes_4bit_bnb=2 * outside + sum(c.bytes_4bit_bnb for c in counts),
    )


def _count_layer(index: int, layer: torch.nn.Module, shape: Shape, in_range: bool, kv: int, channels: int,
                 sparsity: float) -> LayerCount:
    """Count one decoder layer keeping `kv` KV groups and `channels` MLP channels, `sparsity` zeroed."""
    kept = {"q": kv * shape.group_size * shape.head_dim, "kv": kv * shape.head_dim, "mlp": channels}
    table = {m.path: m for m in PRUNED_MODULES}
    params = sum(p.numel() for p in layer.parameters())
    weights = zeros = nf4 = 0  # linear weight entries, their zeros, their NF4 bytes
    for path, module in layer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        rows, cols = module.out_features, module.in_features
        if path in table:
            entry = table[path]
            side = rows if entry.axis == "out" else cols
            if side != shape.width(entry.unit):
                raise LoramError(f"layer {index} {path}: {entry.axis} size {side} does not match the config "
                                 f"({shape.width(entry.unit)}); the config is inconsistent")
            removed = shape.width(entry.unit) - kept[entry.unit]
            if entry.axis == "out":  # rows go, with their bias entries
                rows -= removed
                params -= removed * (cols + (module.bias is not None))
            else:  # columns go; the bias is indexed by rows and stays
                cols -= removed
                params -= removed * rows
        weights += rows * cols
        zeros += int(rows * cols * sparsity)
        nf4 += nf4_bytes(rows * cols)
    return LayerCount(index, in_range, kv * shape.group_size, kv, channels, params, params - zeros,
                      nf4 + 2 * (params - weights))
