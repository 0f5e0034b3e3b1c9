"""Peak memory of LoRA training, from the config of the model training holds (docs/memory.md).

The model is built on the meta device (no weight is read or allocated), so every shape is exact for
any supported config, pruned layers included. With T = batch * seq_len tokens and, per decoder layer,
H = hidden, q = n_q*hd, kv = n_kv*hd, I = MLP channels (the pruned sizes where the layer is pruned):

    total = weights + lora + gradients + optimizer + activations + overhead + slack + mapped

    weights      every parameter in the compute dtype (b bytes); with int8/nf4 the decoder linears are
                 quantized (int8: 1 byte + an fp32 scale per row; nf4: `accounting.nf4_bytes`) while
                 embeddings, lm_head, norms and biases stay in the compute dtype, as bitsandbytes does
    lora         4 * r * (in + out) per targeted linear (peft keeps adapters in fp32)
    gradients    4 bytes per LoRA parameter (the base is frozen)
    optimizer    adamw: 8 bytes (two fp32 moments), adamw_8bit: 2 + 8/256 bytes, sgd: 0, per LoRA parameter
    activations  what autograd keeps, per token (below), plus the largest dequantized weight (int8/nf4)
    overhead     the runtime: CUDA context and kernels (GPU, assumed), the Python/torch process (CPU, measured)
    slack        the allocator's reserve beyond the live peak, a fraction of the activations
    mapped       CPU only: the 16/32-bit pages of the quantized linears, read through mmap at load and kept
                 resident while unquantized tensors in the stored dtype still map the checkpoint

Activations kept per token (a = 4 bytes for the fp32 LoRA path, SDPA attention):

    layer  = 8(H+1)                      two RMSNorms: fp32 input and 1/rms
           + b(2q + 2kv) + 4 n_q          SDPA: q, k (after RoPE), v, output; fp32 log-sum-exp per head
           + 3bI                          SiLU input and output, up_proj output
           + LoRA inputs + a r per target (below)
    outside = 8(H+1) [+ LoRA on lm_head] + 12 V    final norm; logits as three fp32 copies of T x V
              (log-softmax output, its incoming and its outgoing gradient, alive together at the start
              of backward)

    no checkpointing:  sum(layer) + max(outside, max(layer))         (logits phase vs a layer's gradients)
    checkpointing:     L H b + max(outside, 2 max(layer))            (layer inputs kept; one layer recomputed
                                                                       with its gradients during backward)

A LoRA target saves its input for dA: once per shared input (q/k/v share one, gate/up another) when the
input is already fp32 and there is no dropout; otherwise one fp32 copy per target, plus with dropout a
mask per element (1 byte on GPU, 4 on CPU). o_proj's input is the SDPA output, counted once when no copy
is made. Tests check this against the tensors autograd really saves (tests/shared/test_memory_plan.py).
"""

import math
import re
from dataclasses import asdict, dataclass

import torch

from loram.accounting import ParamPlan, nf4_bytes, stock_config
from loram.loading import QUANTS
from loram.lora_options import check_lora_options
from loram.shared import architectures
from loram.shared.architectures import PRUNED_MODULES, Shape
from loram.shared.errors import LoramError
from loram.shared.pruned_model import build_pruned_config, is_pruned_config, meta_model

OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
DEVICES = ("cuda", "cpu")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_SHORT = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}  # `plan` and `merge` take either spelling
DTYPE_CHOICES = (*DTYPE_SHORT, *DTYPE_BYTES)
TARGETS = tuple(m.short for m in PRUNED_MODULES)  # q, k, v, o, gate, up, down
ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 (autocast_adapter_dtype), whatever the base dtype
# LoRA dropout keeps a mask per element: bool on GPU (fused native_dropout), a float noise tensor on CPU.
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": ADAPTER_BYTES}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2 + 8 / 256, "sgd": 0.0}  # per trainable parameter
LOGIT_COPIES_BYTES = 12  # three fp32 copies of the T x V logits at the start of backward
MiB, GiB = 2**20, 2**30
# The runtime, outside any tensor. GPU: CUDA context, cuBLAS workspaces and the loaded kernels
# (an assumption: typically 0.5-1 GiB, not measured here). CPU: peak RSS of a process that imported
# torch, transformers and peft (torch 2.13 CPU, measured: 390 MiB).
OVERHEAD_BYTES = {"cuda": 1 * GiB, "cpu": 390 * MiB}
# Memory the allocator holds beyond the live peak, as a fraction of the activations. CPU: glibc keeps
# freed activation memory in its heap (measured 0.3-1.1 on SmolLM2, 0.6 typical); GPU: the caching
# allocator's fragmentation (an assumption).
SLACK = {"cuda": 0.1, "cpu": 0.6}
# Which LoRA targets read the same input tensor (a shared fp32 input is saved once).
INPUT_GROUPS = tuple(tuple(m.short for m in group) for group in architectures.INPUT_GROUPS)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str | int | None) -> int | None:
    """"20GiB" -> 21474836480. Binary units: K, M, G, T with optional "i"/"iB"; decimal: KB, MB, GB, TB."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if not match or (match[3] and not match[2]):
        raise LoramError(f"cannot read {text!r} as a size; write e.g. 20GiB, 512MiB or 24GB")
    number, prefix, binary, b = match.groups()
    unit = _UNITS[prefix + ("b" if b and prefix and not binary else "")]
    return int(float(number) * unit)


def parse_targets(targets) -> tuple[str, ...]:
    """"q,k,v" or ["q_proj", "v"] -> ("q", "k", "v"): short names in the canonical order."""
    return tuple(name.removesuffix("_proj") for name in architectures.parse_targets(targets))


def dtype_name(name: str) -> str:
    """A dtype as torch names it: bf16 -> bfloat16 (fp32, fp16 likewise); torch's names pass through."""
    return DTYPE_SHORT.get(name, name)


def config_dtype(config) -> str:
    """The dtype a config declares (`dtype`, or the older `torch_dtype`), float32 when absent."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    value = get("dtype") or get("torch_dtype") or "float32"
    name = dtype_name(str(value).removeprefix("torch."))
    if name not in DTYPE_BYTES:
        raise LoramError(f"dtype {name!r} is not supported; choose from {', '.join(DTYPE_BYTES)}")
    return name


@dataclass(frozen=True)
class LayerDims:
    """Widths of one decoder layer as training holds it."""

    hidden: int
    q: int  # n_q * head_dim
    kv: int  # n_kv * head_dim
    q_heads: int
    channels: int  # MLP intermediate
    linears: tuple[tuple[str, int, int], ...]  # (target, in, out) of the seven projections


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory of one training setup; `to_dict()` is the `memory` object of `loram plan --json`."""

    device: str
    quant: str
    dtype: str
    rank: int
    targets: tuple[str, ...]
    lm_head: bool
    lora_dropout: float
    batch: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    training_params: int
    lora_params: int
    weights_bytes: int
    lora_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    overhead_bytes: int
    slack_bytes: int
    mapped_bytes: int
    budget_bytes: int | None

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.lora_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes + self.overhead_bytes + self.slack_bytes + self.mapped_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets), "total_bytes": self.total_bytes, "fits": self.fits}


def training_config(config, plan: ParamPlan | None = None):
    """The config of the model training holds: a LoRAM pruned config as it is; a stock config (object or
    dict) pruned as the structured `plan` says, or as it is (no plan, non-structured: shapes are kept)."""
    if is_pruned_config(config) or plan is None or plan.kind != "structured":
        return config
    kept = {c.layer: (c.kv_heads, c.channels) for c in plan.per_layer if c.pruned}
    return build_pruned_config(stock_config(config), kept)


def plan_memory(config, *, quant: str = "none", rank: int = 8, targets=TARGETS, lm_head: bool = False,
                lora_dropout: float = 0.05, batch: int = 4, seq_len: int = 512,
                gradient_checkpointing: bool = False, optimizer: str = "adamw", dtype: str | None = None,
                device: str = "cuda", budget: str | int | None = None,
                overhead_bytes: int | None = None) -> MemoryPlan:
    """Estimate the peak memory of LoRA training on the model `config` describes, as it is (no pruning);
    defaults are those of `loram train`.

    `config`: a config object or config.json dict of a stock or a LoRAM pruned model. `dtype`: the
    compute dtype (default: the config's). `overhead_bytes` replaces the device's runtime constant
    (e.g. a measured baseline).
    """
    check_options(quant=quant, rank=rank, lora_dropout=lora_dropout, batch=batch, seq_len=seq_len,
                  optimizer=optimizer, device=device)
    targets = parse_targets(targets)
    stored = config_dtype(config)
    dtype = stored if dtype in (None, "auto") else config_dtype({"dtype": dtype})
    b, a = DTYPE_BYTES[dtype], ADAPTER_BYTES
    model = meta_model(config)
    shape = Shape.of(model.config)
    layers = [layer_dims(layer, shape.head_dim) for layer in model.get_decoder().layers]
    tokens = batch * seq_len

    # Weights: decoder linears (maybe quantized) and everything else in the compute dtype.
    linear_weights = [m.weight for layer in model.get_decoder().layers for m in layer.modules()
                      if isinstance(m, torch.nn.Linear)]
    params = {id(p): p.numel() for p in model.parameters()}  # tied embeddings counted once
    linear_numel = sum(w.numel() for w in linear_weights)
    if quant == "none":
        weights = b * sum(params.values())
    else:
        weights = sum(quantized_bytes(quant, w.shape) for w in linear_weights)
        weights += b * (sum(params.values()) - linear_numel)

    # LoRA: A (r x in) and B (out x r) per targeted linear.
    lora_params = sum(rank * (i + o) for dims in layers for t, i, o in dims.linears if t in targets)
    if lm_head:
        lora_params += rank * (shape.hidden + shape.vocab)

    mask = DROPOUT_MASK_BYTES[device] if lora_dropout > 0 else 0
    per_layer = [layer_activations(d, targets, rank, b, mask) for d in layers]
    outside = 8 * (shape.hidden + 1) + LOGIT_COPIES_BYTES * shape.vocab
    if lm_head:
        outside += lora_input_bytes(shape.hidden, 1, b, mask) + a * rank
    if gradient_checkpointing:
        activations = tokens * (len(layers) * shape.hidden * b + max(outside, 2 * max(per_layer)))
    else:
        activations = tokens * (sum(per_layer) + max(outside, max(per_layer)))
    if quant != "none":  # frozen int8/nf4 weights are dequantized one at a time for forward and backward
        activations += b * max(w.numel() for w in linear_weights)

    # CPU: safetensors are read through mmap, and a page read stays in RSS while the file is mapped. A
    # quantized load reads every linear's pages; embeddings and norms kept in the stored dtype are views
    # of the file (already counted in weights) and keep it mapped. Once everything is cast, it is unmapped.
    mapped = 0
    if device == "cpu" and quant != "none" and dtype == stored:
        mapped = DTYPE_BYTES[stored] * linear_numel

    return MemoryPlan(
        device=device, quant=quant, dtype=dtype, rank=rank, targets=targets, lm_head=lm_head,
        lora_dropout=lora_dropout, batch=batch, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer, training_params=sum(params.values()), lora_params=lora_params,
        weights_bytes=weights, lora_bytes=a * lora_params, gradient_bytes=a * lora_params,
        optimizer_bytes=math.ceil(OPTIMIZER_BYTES[optimizer] * lora_params), activation_bytes=activations,
        overhead_bytes=OVERHEAD_BYTES[device] if overhead_bytes is None else overhead_bytes,
        slack_bytes=int(SLACK[device] * activations), mapped_bytes=mapped, budget_bytes=parse_bytes(budget))


def check_options(*, quant="none", rank=8, lora_dropout=0.0, batch=1, seq_len=1, optimizer="adamw",
                  device="cuda") -> None:
    """Refuse options no training run could have (LoramError)."""
    for name, value, choices in (("quant", quant, QUANTS), ("optimizer", optimizer, OPTIMIZERS),
                                 ("device", device, DEVICES)):
        if value not in choices:
            raise LoramError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    check_lora_options(rank=rank, dropout=lora_dropout)
    for name, value in (("batch", batch), ("seq-len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoramError(f"--{name} must be a whole number >= 1, got {value!r}")


def layer_activations(d: LayerDims, targets: tuple[str, ...], rank: int, b: int, mask: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring); `b` bytes per
    element of the compute dtype, `mask` bytes per element of a LoRA dropout mask (0: no dropout)."""
    norms = 2 * 4 * (d.hidden + 1)
    attention = b * (2 * d.q + 2 * d.kv) + 4 * d.q_heads
    mlp = 3 * b * d.channels
    widths = {"q": d.hidden, "o": d.q, "gate": d.hidden, "down": d.channels}
    lora = 0
    for group in INPUT_GROUPS:
        hit = sum(t in targets for t in group)
        if not hit:
            continue
        shared = group == ("o",) and not mask and b == ADAPTER_BYTES  # o_proj reads the SDPA output as is
        lora += (0 if shared else lora_input_bytes(widths[group[0]], hit, b, mask)) + hit * ADAPTER_BYTES * rank
    return norms + attention + mlp + lora


def quantized_bytes(quant: str, shape: tuple[int, int]) -> int:
    """Bytes bitsandbytes holds for one frozen `out x in` weight: nf4 (double quantization), or int8 codes
    with one fp32 scale per row (LLM.int8's SCB)."""
    rows, cols = shape
    return nf4_bytes(rows * cols) if quant == "nf4" else rows * cols + 4 * rows


def lora_input_bytes(width: int, targets: int, b: int, mask: int = 0) -> int:
    """Bytes per token that `targets` LoRA layers reading one `width`-wide input keep for their dA."""
    if mask:  # each target keeps its dropped-out fp32 input and the dropout mask
        return targets * width * (ADAPTER_BYTES + mask)
    if b == ADAPTER_BYTES:  # the input itself, shared
        return ADAPTER_BYTES * width
    return targets * ADAPTER_BYTES * width  # one fp32 cast per target


def layer_dims(layer: torch.nn.Module, head_dim: int) -> LayerDims:
    linears = tuple((m.path.rsplit(".", 1)[-1].removesuffix("_proj"), layer.get_submodule(m.path).in_features,
                     layer.get_submodule(m.path).out_features) for m in PRUNED_MODULES)
    size = {t: (i, o) for t, i, o in linears}
    return LayerDims(hidden=size["q"][0], q=size["q"][1], kv=size["k"][1], q_heads=size["q"][1] // head_dim,
                     channels=size["gate"][1], linears=linears)
