"""The publisher's memory, from a config alone: Taylor pruning of the stock model, and alignment (full-parameter
training) of the pruned model with DDP and with FSDP over N devices (docs/memory.md, "The publisher's memory").

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
from dataclasses import dataclass, field

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
from loram.shared.architectures import (
    PRUNED_MODULES,
    TAYLOR_CALIB_BATCH,
    TAYLOR_CALIBRATION,
    TAYLOR_HEAD_CHUNK,
    Shape,
)
from loram.shared.errors import LoramError
from loram.shared.pruned_model import meta_model

# Taylor's chunking and calibration defaults, as `loram publish prune` uses them.
HEAD_CHUNK, CALIB_BATCH, CALIBRATION = TAYLOR_HEAD_CHUNK, TAYLOR_CALIB_BATCH, TAYLOR_CALIBRATION
ADAM_BYTES = 8  # two fp32 moments per trained parameter (AdamW, fused: no per-step temporaries)
REDUCE_BYTES = 4  # FSDP2 reduce-scatters gradients in fp32
MAX_DEVICES = 1024
# The runtime outside any tensor. GPU: CUDA context, kernels, cuBLAS and NCCL workspaces (assumed, as for
# `loram train`). CPU: the measured peak RSS of a process that imported what the command imports and holds
# the tokenizer and the text stream (SmolLM2: prune 400 MiB, align 620 MiB; the slow tests measure them again).
OVERHEAD_BYTES = {"cuda": {"prune": 1 * GiB, "align": 1 * GiB}, "cpu": {"prune": 400 * MiB, "align": 620 * MiB}}


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


def hidden_tensors(n: int) -> int:
    """Most [samples, seq_len, hidden] tensors Taylor holds at once over n = layers from the first scored one on:
    m + 1, m the smallest with m (m + 1) / 2 >= n. The n layers are cut into recomputation segments of m, m - 1,
    ..., 1 layers; while one is backpropagated, the stored inputs of the segments below it, its own recomputed
    inputs and dL/dh (written over the input it belongs to) are alive."""
    return math.ceil((math.sqrt(8 * n + 1) - 1) / 2) + 1


def taylor_memory(config, layers: range, *, samples: int = CALIBRATION[0], seq_len: int = CALIBRATION[1],
                  calib_batch: int = CALIB_BATCH, device: str = "cpu", budget=None, overhead_bytes: int | None = None,
                  accumulate: bool = False) -> Estimate:
    """Peak memory of structured Taylor pruning of the stock model `config` over `layers`, on one device.

    The default is the Taylor code that backpropagates layer by layer from the top, `calib_batch` calibration
    rows at a time, keeps the hidden states entering the first layer of each recomputation segment (segments
    of m, m - 1, ..., 1 layers over the n layers from the first scored one to the end) and recomputes the
    others, and folds each layer's float32 gradient sums into its scores before going down
    (loram.publisher.importance.taylor). S x t = samples x seq_len calibration
    tokens, b = bytes of the stored dtype, H the hidden size, V the vocabulary:

        weights      every parameter in the stored dtype (b)
        gradients    4 x one scored layer's projections (the float32 sums, biases included)
                     + b x its largest weight (one chunk's gradient, before its hook adds it to the sum)
        activations  m S t H b  +  max(HEAD_CHUNK x V x (4 + b if b < 4),  calib_batch t x 2 max(layer))
                     m = hidden_tensors(n), about sqrt(2 n) + 1: stored segment inputs, one segment's
                     recomputed inputs, dL/dh; then one vocabulary-projection chunk (its float32 probabilities,
                     and the 16-bit logits they came from), or one chunk through one layer with its gradients
                     (frozen norms, trained projections: `layer_activations_full`)
        overhead     the runtime (OVERHEAD_BYTES); slack: SLACK x activations (memory_plan's allocator slack)

    `accumulate=True` is the earlier Taylor code: one backward per `calib_batch` samples through the
    gradient-checkpointed model, every gradient of every scored layer kept until the end (b each), and the
    checkpointed input of every layer from the first scored one, the last hidden states (their flat copy and
    gradient), the final norm, and three fp32 copies of HEAD_CHUNK x V logits or one recomputed layer.
    """
    model = meta_model(config)
    decoder = model.get_decoder().layers
    shape, b = Shape.of(model.config), DTYPE_BYTES[config_dtype(config)]
    mode = "fp32" if b == 4 else "bf16"
    if not len(layers):
        raise LoramError("Taylor pruning needs at least one layer in the pruned range")
    n, chunk = len(decoder) - layers.start, min(calib_batch, samples) * seq_len
    weights = b * sum(p.numel() for p in model.parameters())
    layer = 2 * max(layer_activations_full(d, mode, trained_norms=False) for d in _layers(model)[layers.start:])
    if accumulate:
        grads = b * sum(_prunable_numel(decoder[i]) for i in layers)
        kept = n * shape.hidden * b + 3 * shape.hidden * b + 8 * (shape.hidden + 1)
        activations = chunk * kept + max(HEAD_CHUNK * LOGIT_COPIES_BYTES * shape.vocab, chunk * layer)
    else:
        largest = max(decoder[i].get_submodule(m.path).weight.numel() for i in layers for m in PRUNED_MODULES)
        grads = 4 * max(_prunable_numel(decoder[i]) for i in layers) + b * largest
        head = HEAD_CHUNK * shape.vocab * (4 + (b if b < 4 else 0))
        activations = hidden_tensors(n) * samples * seq_len * shape.hidden * b + max(head, chunk * layer)
    return Estimate({"weights": weights, "gradients": grads, "activations": activations,
                     "overhead": OVERHEAD_BYTES[device]["prune"] if overhead_bytes is None else overhead_bytes,
                     "slack": int(SLACK[device] * activations)}, parse_bytes(budget))


def align_memory(config, *, batch: int = 4, seq_len: int = 512, gradient_checkpointing: bool = False,
                 grad_accum: int = 1, freeze_lm_head: bool = True, device: str = "cuda", devices=(1, 2, 4, 8),
                 budget=None, overhead_bytes: int | None = None, teacher=None,
                 matched_layers: int | None = None) -> tuple[list[Estimate], list[Estimate], int | None, dict]:
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
                     outside = 8(H+1) + 12 V (final norm; three fp32 copies of the logits), 8(H+1) with
                     `teacher` (the default objective projects only the last position onto the vocabulary)
        checkpoint   FSDP on a CPU: 8 S(P_t, N), the copy of this rank's optimizer state that the checkpoint
                     save (torch.distributed.checkpoint) makes on top of the heap training left (on a GPU the
                     copy is in host memory)
        overlap      at `grad_accum` 1: -min(gradients, freed), freed = the activations less the last layer's
                     (T max(layer), or T 2 max(layer) recomputed with checkpointing), plus DDP's autocast
                     copies without checkpointing: the backward frees what the forward saved while it fills
                     the gradients. With gradient accumulation the gradients stay alive through the next
                     micro-batches' forward: 0, both count.
        teacher      with `teacher` (the original's config; the default alignment distills hidden states from
                     it): its weights (p bytes: bf16 on GPUs, fp32 on CPUs), DDP p P_o, FSDP p (S(P_o, N) + one
                     gathered teacher layer),
                     plus its outputs of the matched layers (the pruned ones by default), 4 T H L_m (the student's are
                     saved for backward anyway; no teacher logits: the default matches hidden states only)
        overhead     the runtime (OVERHEAD_BYTES); slack: SLACK x activations

    Not modeled: the load (the fp32 model is read whole on every process before FSDP shards it),
    logit distillation's two [T, V] fp32 tensors (--kd-weight > 0), evaluation.
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

    def activations(mode: str) -> tuple[int, int]:
        """(activations, what of them is freed before the last gradients appear)."""
        per_layer = [layer_activations_full(d, mode, trained_norms=True) for d in _layers(model)]
        # the default objective (hidden-state distillation, `teacher`) projects only the last position onto
        # the vocabulary: no [T, V] logits then
        outside = 8 * (shape.hidden + 1) + (0 if teacher is not None else LOGIT_COPIES_BYTES * shape.vocab)
        tokens = batch * seq_len
        if gradient_checkpointing:
            residual = 2 if mode == "bf16" else 4
            kept = tokens * (len(per_layer) * shape.hidden * residual + max(outside, 2 * max(per_layer)))
            return kept, kept - tokens * 2 * max(per_layer)  # the last recomputed layer stays to the end
        kept = tokens * (sum(per_layer) + max(outside, max(per_layer)))
        return kept, kept - tokens * max(per_layer)

    overhead = OVERHEAD_BYTES[device]["align"] if overhead_bytes is None else overhead_bytes
    budget = parse_bytes(budget)
    ddp_act, ddp_freed = activations(ddp_mode)
    casts = 0
    if gpu:  # bf16 autocast copies of fp32 linear weights, held by the graph until their backward
        linears = [_linear_numel(layer) for layer in decoder]
        casts = 2 * ((max(linears) if gradient_checkpointing else sum(linears)) + head.numel())
        ddp_freed += 0 if gradient_checkpointing else casts
    accumulating = grad_accum > 1
    ddp_overlap = 0 if accumulating else -min(4 * n_trained, ddp_freed)
    teacher_ddp, teacher_fsdp = _teacher_memory(teacher, batch * seq_len, 2 if gpu else 4, matched_layers)
    ddp = [Estimate({"weights": 4 * total, "gradients": 4 * n_trained, "optimizer": ADAM_BYTES * n_trained,
                     "buckets": 4 * n_trained if n > 1 else 0, "working": casts, "checkpoint": 0,
                     "teacher": teacher_ddp, "activations": ddp_act,
                     "overlap": ddp_overlap, "overhead": overhead, "slack": int(SLACK[device] * ddp_act)}, budget, n)
           for n in devices]

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
    fsdp_act, fsdp_freed = activations(fsdp_mode)

    trained_shapes = {key: count for key, count in shapes.items() if key[2]}

    def fsdp(n: int) -> Estimate:
        local, local_t = _sharded_numel(shapes, n), _sharded_numel(trained_shapes, n)
        return Estimate({"weights": 4 * local, "gradients": 4 * local_t, "optimizer": ADAM_BYTES * local_t,
                         "buckets": 0, "working": gathered, "checkpoint": 0 if gpu else ADAM_BYTES * local_t,
                         "teacher": teacher_fsdp(n), "activations": fsdp_act, "overlap": 0 if accumulating else -min(4 * local_t, fsdp_freed),
                         "overhead": overhead, "slack": int(SLACK[device] * fsdp_act)}, budget, n)

    smallest = None
    if budget is not None:
        smallest = next((n for n in range(1, MAX_DEVICES + 1) if fsdp(n).fits), None)
    facts = {"params": total, "trained_params": n_trained, "frozen_params": total - n_trained}
    return ddp, [fsdp(n) for n in devices], smallest, facts


def _teacher_memory(config, tokens: int, p_bytes: int, matched_layers: int | None = None):
    """(DDP bytes, FSDP bytes as a function of N) of the distillation teacher `config` (None: no teacher), its
    weights in p_bytes (bf16 on GPUs, fp32 on CPUs, as `loram publish align` loads it), and the outputs of the
    `matched_layers` whose hidden states are matched (None: every layer)."""
    if config is None:
        return 0, lambda n: 0
    model = meta_model(config)
    shape = Shape.of(model.config)
    params = list(model.parameters())
    matched = len(model.get_decoder().layers) if matched_layers is None else matched_layers
    outputs = 4 * tokens * shape.hidden * matched
    shapes = Counter((p.shape[0], p.numel() // p.shape[0]) for p in params)
    layer = max(sum(p.numel() for p in block.parameters()) for block in model.get_decoder().layers)

    def fsdp(n: int) -> int:
        return p_bytes * (_sharded_numel(shapes, n) + layer) + outputs
    return p_bytes * sum(p.numel() for p in params) + outputs, fsdp


def _sharded_numel(shapes, n: int) -> int:
    """S(X, N): this rank's elements of the tensors counted in `shapes` ({(rows, columns, ...): count}) when
    FSDP2 shards dim 0 over `n` ranks (padded: ceil(rows / n) rows each)."""
    return sum(math.ceil(rows / n) * cols * count for (rows, cols, *_), count in shapes.items())


def publisher_plan(stock_config, aligned_config, layers: range | None, *, samples: int = CALIBRATION[0],
                   calib_seq_len: int = CALIBRATION[1], calib_batch: int = CALIB_BATCH, batch: int = 4, seq_len: int = 512,
                   gradient_checkpointing: bool = False, grad_accum: int = 1, freeze_lm_head: bool = True,
                   device: str = "cuda", devices=(1, 2, 4, 8), device_memory=None, teacher=None,
                   matched_layers: int | None = None) -> PublisherPlan:
    """Taylor pruning of `stock_config` over `layers` (skipped when `stock_config` is None: a pruned checkpoint)
    and alignment of `aligned_config` (the pruned model), per device, against `device_memory` each; with
    `teacher` (the original's config) the alignment holds it for distillation, as by default, matching the hidden
    states of `layers` (or of `matched_layers` of them, for a pruned checkpoint; neither: every layer)."""
    check_calibration(samples, calib_seq_len, calib_batch)
    if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
        raise LoramError(f"--grad-accum must be a whole number >= 1, got {grad_accum!r}")
    devices = check_devices(devices)
    taylor = None
    if stock_config is not None and layers is not None and len(layers):
        taylor = taylor_memory(stock_config, layers, samples=samples, seq_len=calib_seq_len, calib_batch=calib_batch,
                               device=device, budget=device_memory)
    ddp, fsdp, smallest, facts = align_memory(
        aligned_config, batch=batch, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        grad_accum=grad_accum, freeze_lm_head=freeze_lm_head, device=device, devices=devices, budget=device_memory,
        teacher=teacher, matched_layers=len(layers) if layers is not None and len(layers) else matched_layers)
    return PublisherPlan(
        device=device, taylor=taylor,
        taylor_options={"dtype": config_dtype(stock_config) if stock_config is not None else None,
                        "samples": samples, "seq_len": calib_seq_len, "calib_batch": calib_batch,
                        "layers": None if layers is None else [layers.start, layers.stop]},
        align_options={"batch": batch, "seq_len": seq_len, "grad_accum": grad_accum,
                       "gradient_checkpointing": gradient_checkpointing,
                       "lm_head": "frozen" if freeze_lm_head else "trained",
                       "teacher": "original (hidden-state distillation)" if teacher is not None else None,
                       "weights": "fp32, bf16 autocast (DDP) / bf16 FSDP2 mixed precision" if device == "cuda"
                       else "fp32"},
        ddp=ddp, fsdp=fsdp, fsdp_min_devices=smallest, budget_bytes=parse_bytes(device_memory), extra=facts)


def check_calibration(samples: int, seq_len: int, batch: int = CALIB_BATCH) -> None:
    """At least one calibration sample of at least two tokens, chunks of at least one (as `loram publish prune`)."""
    for name, value, least in (("calib-samples", samples, 1), ("calib-seq-len", seq_len, 2), ("calib-batch", batch, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise LoramError(f"--{name} must be a whole number >= {least}, got {value!r}")


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
