"""The publisher's memory, from a config alone: Taylor pruning of the stock model, and alignment (full-parameter
training) of the pruned model with DDP and with FSDP over N devices (docs/memory.md, "Publisher").

Every count comes from the model built on the meta device (exact shapes, biases, tied embeddings, per-layer
pruned sizes). Per token and decoder layer, with H the hidden size, q = n_q x head_dim, kv = n_kv x head_dim,
I the MLP channels, V the vocabulary, and a the bytes of the 16/32-bit activations (below):

    layer  = 8(H+1)                      two RMSNorms: fp32 input and 1/rms
           + [8H or 2aH]                 trained norm weights: each norm keeps its normalized input
           + a(2q + 2kv) + 4 n_q         SDPA: q, k (after RoPE), v, output; fp32 log-sum-exp per head
           + 3aI                         SiLU input and output, up_proj output
           + a(2H + I)                   inputs of trained linears: q/k/v share one, gate/up one, down its own,
                                         o_proj the SDPA output; under autocast each of q, k, v, gate, up keeps
                                         its own 16-bit cast of the fp32 norm output: 10H + 2I instead

Modes: fp32 (a = 4: CPU, or fp32 weights), 16-bit weights (a = 2: Taylor on a bf16 model, FSDP2 with bf16
mixed precision), and bf16 autocast over fp32 weights (a = 2, the residual stream and norms fp32: DDP on GPUs).
A test compares this with the bytes autograd saves on tiny models in each mode (tests/consumer/test_publisher_plan.py).

Taylor and alignment formulas: `taylor_memory` and `align_memory` (their docstrings).
"""

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from loram.memory_plan import (
    DTYPE_BYTES,
    LOGIT_COPIES_BYTES,
    SLACK,
    GiB,
    LayerDims,
    MiB,
    config_dtype,
    layer_dims,
    parse_bytes,
)
from loram.shared.architectures import PRUNED_MODULES, Shape
from loram.shared.errors import LoramError
from loram.shared.pruned_model import meta_model

HEAD_CHUNK = 128  # positions per vocabulary-projection chunk of Taylor (loram.publisher.importance.taylor; tested)
TAYLOR_MICRO_BATCH = 4  # samples per micro-batch of the Taylor code that accumulates every gradient
CALIBRATION = (32, 128)  # Taylor's calibration defaults of `loram publish prune`: samples x tokens
ADAM_BYTES = 8  # two fp32 moments per trained parameter (AdamW, fused: no per-step temporaries)
REDUCE_BYTES = 4  # FSDP2 reduce-scatters gradients in fp32
MAX_DEVICES = 1024
# The runtime outside any tensor. GPU: CUDA context, kernels, cuBLAS and NCCL workspaces (assumed, as for
# `loram train`). CPU: the measured peak RSS of a process that imported what the command imports and holds
# the tokenizer and the text stream (SmolLM2: prune 530 MiB, align 610 MiB; the slow tests measure them again).
OVERHEAD_BYTES = {"cuda": {"prune": 1 * GiB, "align": 1 * GiB}, "cpu": {"prune": 530 * MiB, "align": 610 * MiB}}


@dataclass(frozen=True)
class Estimate:
    """One per-device estimate: its terms (bytes) and their sum; `to_dict()` is its JSON object."""

    terms: dict[str, int]
    budget_bytes: int | None = None
    devices: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"devices": self.devices, **{f"{k}_bytes": v for k, v in self.terms.items()},
                "total_bytes": self.total_bytes, "fits": self.fits}


@dataclass(frozen=True)
class PublisherPlan:
    """Taylor pruning (None for a pruned checkpoint) and alignment; `to_dict()` is `publisher` in `--json`."""

    device: str
    taylor: Estimate | None
    taylor_options: dict
    align_options: dict
    ddp: list[Estimate]
    fsdp: list[Estimate]
    fsdp_min_devices: int | None  # smallest N in 1..MAX_DEVICES whose FSDP total fits (any integer)
    budget_bytes: int | None
    extra: dict = field(default_factory=dict)

    @property
    def ddp_fits(self) -> bool | None:
        return None if self.budget_bytes is None else any(e.fits for e in self.ddp)

    def to_dict(self) -> dict:
        n = self.fsdp_min_devices
        return {"device": self.device, "device_memory_bytes": self.budget_bytes,
                "taylor": None if self.taylor is None else {**self.taylor_options, **self.taylor.to_dict()},
                "align": {**self.align_options, **self.extra, "ddp": [e.to_dict() for e in self.ddp],
                          "fsdp": [e.to_dict() for e in self.fsdp], "ddp_fits": self.ddp_fits,
                          "fsdp_min_devices": n,
                          "fsdp_min_devices_pow2": None if n is None else 1 << (n - 1).bit_length()}}


def layer_activations_full(d: LayerDims, mode: str, *, trained_norms: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer whose seven linears train (module docstring).
    `mode`: "fp32", "bf16" (16-bit weights and activations) or "autocast" (fp32 weights, bf16 autocast)."""
    a = 4 if mode == "fp32" else 2
    norms = 8 * (d.hidden + 1)
    if trained_norms:
        norms += 2 * (2 if mode == "bf16" else 4) * d.hidden
    inputs = (10 * d.hidden + 2 * d.channels) if mode == "autocast" else a * (2 * d.hidden + d.channels)
    return norms + a * (2 * d.q + 2 * d.kv) + 4 * d.q_heads + 3 * a * d.channels + inputs


def _layers(model) -> list[LayerDims]:
    head_dim = Shape.of(model.config).head_dim
    return [layer_dims(layer, head_dim) for layer in model.get_decoder().layers]


def _linear_numel(layer) -> int:
    return sum(layer.get_submodule(m.path).weight.numel() for m in PRUNED_MODULES)


def _prunable_numel(layer) -> int:
    """Parameters Taylor needs gradients of in one layer: the seven projections, biases included."""
    return sum(p.numel() for m in PRUNED_MODULES for p in layer.get_submodule(m.path).parameters())


def taylor_memory(config, layers: range, *, samples: int = CALIBRATION[0], seq_len: int = CALIBRATION[1],
                  device: str = "cpu", budget=None, overhead_bytes: int | None = None,
                  micro_batch: int | None = None) -> Estimate:
    """Peak memory of structured Taylor pruning of the stock model `config` over `layers` (one device).

    The default (`micro_batch=None`) is the bound of the Taylor code that folds |W * dL/dW| into the scores as
    each weight's gradient completes (post-accumulate-grad hooks), in one backward over the whole calibration
    (T = samples x seq_len tokens) with gradient checkpointing; b = bytes of the stored dtype:

        weights      every parameter in the stored dtype (b)
        gradients    one pruned layer's seven projections (b): each is scored and freed as it completes
        activations  T (n H b  +  3 H b + 8(H+1))  +  max(HEAD_CHUNK x 12 V,  T x 2 max(layer))
                     n H b: the checkpointed input of every layer from the first pruned one on (earlier layers
                     need no gradient); 3 H b + 8(H+1): the last hidden states, their flat copy and gradient,
                     the final norm; then either one vocabulary-projection chunk (three fp32 copies of
                     HEAD_CHUNK x V logits) or one recomputed layer with its gradients (frozen norms)
        overhead     the runtime (OVERHEAD_BYTES); slack: SLACK x activations (memory_plan's allocator slack)

    `micro_batch=k` is the Taylor code that accumulates the gradients of k samples at a time: gradients of
    every pruned layer's projections, activations as above for T = k x seq_len.
    """
    model = meta_model(config)
    decoder = model.get_decoder().layers
    shape, b = Shape.of(model.config), DTYPE_BYTES[config_dtype(config)]
    mode = "fp32" if b == 4 else "bf16"
    pruned = [decoder[i] for i in layers]
    if not pruned:
        raise LoramError("Taylor pruning needs at least one layer in the pruned range")
    tokens = (samples if micro_batch is None else min(micro_batch, samples)) * seq_len
    weights = b * sum(p.numel() for p in model.parameters())
    grads = b * (max if micro_batch is None else sum)(_prunable_numel(layer) for layer in pruned)
    dims = _layers(model)
    recompute = 2 * max(layer_activations_full(dims[i], mode, trained_norms=False) for i in layers)
    kept = (len(decoder) - layers.start) * shape.hidden * b + 3 * shape.hidden * b + 8 * (shape.hidden + 1)
    activations = tokens * kept + max(HEAD_CHUNK * LOGIT_COPIES_BYTES * shape.vocab, tokens * recompute)
    return Estimate({"weights": weights, "gradients": grads, "activations": activations,
                     "overhead": OVERHEAD_BYTES[device]["prune"] if overhead_bytes is None else overhead_bytes,
                     "slack": int(SLACK[device] * activations)}, parse_bytes(budget))


def align_memory(config, *, batch: int = 4, seq_len: int = 512, gradient_checkpointing: bool = False,
                 freeze_lm_head: bool = True, device: str = "cuda", devices=(1, 2, 4, 8), budget=None,
                 overhead_bytes: int | None = None) -> tuple[list[Estimate], list[Estimate], int | None, dict]:
    """Per-device peak memory of `loram publish align` on the (pruned) model `config`: (DDP estimates, FSDP
    estimates, one per N in `devices`; the smallest N in 1..MAX_DEVICES for which FSDP fits `budget`; facts).

    P: parameters, P_t: trained ones (all but lm_head when frozen; with tied embeddings those too), T = batch x
    seq_len tokens per device. AdamW with fp32 moments. On a GPU the project trains fp32 weights under bf16
    autocast (DDP) and FSDP2 with bf16 parameters and fp32 gradient reduction; on a CPU everything is fp32.

        weights      DDP: 4 P (fp32, also the master copy); FSDP: 4 S(P, N)
        gradients    DDP: 4 P_t; FSDP: 4 S(P_t, N)           S(X, N): sum over those tensors of ceil(rows / N)
        optimizer    DDP: 8 P_t; FSDP: 8 S(P_t, N)              x columns (FSDP2 shards dim 0, padded)
        buckets      DDP with N > 1: 4 P_t (DDP's gradient buckets, gradient_as_bucket_view off)
        working      DDP on GPU: the bf16 autocast copies of the linear weights, saved for backward: every
                     decoder linear and lm_head (one layer's + lm_head's with checkpointing);
                     FSDP: unsharded parameters (p = 2 on GPU, 4 on CPU): the root unit (embeddings, final
                     norm, lm_head; FSDP2 keeps the root gathered from forward to backward) + two decoder
                     layers (the one computing, the one prefetched), and the largest unit's unsharded gradient
                     (p + 4 per trained parameter: the gradient and its fp32 reduce-scatter input)
        activations  no checkpointing: T (sum(layer) + max(outside, max(layer)));
                     checkpointing:    T (L H r + max(outside, 2 max(layer))), r: the residual's bytes
                     outside = 8(H+1) + 12 V (final norm; three fp32 copies of the logits)
        overhead     the runtime (OVERHEAD_BYTES); slack: SLACK x activations

    Gradients and activations are counted as alive together (an upper bound: at one micro-batch a step, the
    backward frees activations while it fills the gradients). Not modeled: the load (the fp32 model is read
    whole on every process before FSDP shards it), distillation's teacher, evaluation.
    """
    model = meta_model(config)
    shape = Shape.of(model.config)
    decoder = model.get_decoder().layers
    head = model.get_output_embeddings().weight
    params = list(model.parameters())  # tied embeddings once
    trained = [p for p in params if not (freeze_lm_head and p is head)]
    total, n_trained = sum(p.numel() for p in params), sum(p.numel() for p in trained)
    gpu = device == "cuda"
    ddp_mode, fsdp_mode = ("autocast", "bf16") if gpu else ("fp32", "fp32")

    def activations(mode: str) -> int:
        per_layer = [layer_activations_full(d, mode, trained_norms=True) for d in _layers(model)]
        outside = 8 * (shape.hidden + 1) + LOGIT_COPIES_BYTES * shape.vocab
        tokens = batch * seq_len
        if gradient_checkpointing:
            residual = 2 if mode == "bf16" else 4
            return tokens * (len(per_layer) * shape.hidden * residual + max(outside, 2 * max(per_layer)))
        return tokens * (sum(per_layer) + max(outside, max(per_layer)))

    overhead = OVERHEAD_BYTES[device]["align"] if overhead_bytes is None else overhead_bytes
    budget = parse_bytes(budget)
    ddp_act = activations(ddp_mode)
    casts = 0
    if gpu:  # bf16 autocast copies of fp32 linear weights, held by the graph until their backward
        linears = [_linear_numel(layer) for layer in decoder]
        casts = 2 * ((max(linears) if gradient_checkpointing else sum(linears)) + head.numel())
    ddp = [Estimate({"weights": 4 * total, "gradients": 4 * n_trained, "optimizer": ADAM_BYTES * n_trained,
                     "buckets": 4 * n_trained if n > 1 else 0, "working": casts, "activations": ddp_act,
                     "overhead": overhead, "slack": int(SLACK[device] * ddp_act)}, budget, n) for n in devices]

    # FSDP2: tensors grouped by (rows, columns, trained) so that S(X, N) is cheap for every N.
    trained_ids = {id(p) for p in trained}
    shapes = Counter((p.shape[0], p.numel() // p.shape[0], id(p) in trained_ids) for p in params)
    p_bytes = 2 if gpu else 4
    in_layers = {id(p) for layer in decoder for p in layer.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_layers)
    units = [(sum(p.numel() for p in layer.parameters()),
              sum(p.numel() for p in layer.parameters() if id(p) in trained_ids)) for layer in decoder]
    units.append((root, sum(p.numel() for p in params if id(p) not in in_layers and id(p) in trained_ids)))
    gathered = p_bytes * (root + 2 * max(u for u, _ in units[:-1]))
    gathered += (p_bytes + REDUCE_BYTES) * max(t for _, t in units)
    fsdp_act = activations(fsdp_mode)

    def fsdp(n: int) -> Estimate:
        local = sum(math.ceil(rows / n) * cols * count for (rows, cols, _), count in shapes.items())
        local_t = sum(math.ceil(rows / n) * cols * count for (rows, cols, t), count in shapes.items() if t)
        return Estimate({"weights": 4 * local, "gradients": 4 * local_t, "optimizer": ADAM_BYTES * local_t,
                         "buckets": 0, "working": gathered, "activations": fsdp_act, "overhead": overhead,
                         "slack": int(SLACK[device] * fsdp_act)}, budget, n)

    smallest = None
    if budget is not None:
        smallest = next((n for n in range(1, MAX_DEVICES + 1) if fsdp(n).fits), None)
    facts = {"params": total, "trained_params": n_trained, "frozen_params": total - n_trained}
    return ddp, [fsdp(n) for n in devices], smallest, facts


def publisher_plan(stock_config, aligned_config, layers: range | None, *, samples: int = CALIBRATION[0],
                   calib_seq_len: int = CALIBRATION[1], batch: int = 4, seq_len: int = 512,
                   gradient_checkpointing: bool = False, freeze_lm_head: bool = True, device: str = "cuda",
                   devices=(1, 2, 4, 8), device_memory=None) -> PublisherPlan:
    """Taylor pruning of `stock_config` over `layers` (skipped when `stock_config` is None: a pruned checkpoint)
    and alignment of `aligned_config` (the pruned model), per device, against `device_memory` each."""
    for name, value in (("calib-samples", samples), ("calib-seq-len", calib_seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if "len" in name else 1):
            raise LoramError(f"--{name} must be a whole number >= {2 if 'len' in name else 1}, got {value!r}")
    devices = check_devices(devices)
    taylor = None
    if stock_config is not None and layers is not None and len(layers):
        taylor = taylor_memory(stock_config, layers, samples=samples, seq_len=calib_seq_len, device=device,
                               budget=device_memory)
    ddp, fsdp, smallest, facts = align_memory(
        aligned_config, batch=batch, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        freeze_lm_head=freeze_lm_head, device=device, devices=devices, budget=device_memory)
    return PublisherPlan(
        device=device, taylor=taylor,
        taylor_options={"dtype": config_dtype(stock_config) if stock_config is not None else None,
                        "samples": samples, "seq_len": calib_seq_len,
                        "layers": None if layers is None else [layers.start, layers.stop]},
        align_options={"batch": batch, "seq_len": seq_len, "gradient_checkpointing": gradient_checkpointing,
                       "lm_head": "frozen" if freeze_lm_head else "trained",
                       "weights": "fp32, bf16 autocast (DDP) / bf16 FSDP2 mixed precision" if device == "cuda"
                       else "fp32"},
        ddp=ddp, fsdp=fsdp, fsdp_min_devices=smallest, budget_bytes=parse_bytes(device_memory), extra=facts)


def check_devices(devices) -> list[int]:
    """"1,2,4,8" or [1, "8"] -> [1, 2, 4, 8]: distinct counts in 1..MAX_DEVICES, in increasing order."""
    items = devices.split(",") if isinstance(devices, str) else devices
    out = set()
    for item in items:
        for text in str(item).split(","):
            try:
                n = int(text.strip())
            except ValueError:
                n = 0
            if not 1 <= n <= MAX_DEVICES:
                raise LoramError(f"--devices takes whole numbers in 1..{MAX_DEVICES}, e.g. 1,2,4,8; got {text!r}")
            out.add(n)
    if not out:
        raise LoramError("--devices: give at least one device count, e.g. --devices 8")
    return sorted(out)


def _unused() -> dict:  # pragma: no cover
    return asdict
