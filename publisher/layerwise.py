"""Layer-sequential non-structured pruning: one decoder layer on the compute device at a time.

As the reference implementations of Wanda and SparseGPT do:
1. run the calibration blocks through the embeddings and capture what decoder layer 0 receives
   (hidden states plus the keyword arguments the model passes every layer: rotary position
   embeddings, attention mask, ...);
2. for each layer in turn: move it to the device, run the captured inputs through it while hooks
   collect the statistics of the inputs of its linears (Wanda: ||X_j||_2; SparseGPT: H = 2/n X^T X),
   prune its seven projections, run the inputs through the *pruned* layer again, and use those
   outputs as the next layer's inputs; move it back.

So each layer is calibrated on the outputs of the already-pruned layers before it. Layers outside
the range are run (dense) but not pruned. q/k/v read the same input, as do gate/up: their statistics
are collected once. Memory beyond the weights: one layer, the calibration activations (inputs and
outputs, [samples, seq_len, hidden] each) and the statistics of one layer.
"""

import contextlib
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from loram.publisher.sparsity import Target, magnitude_mask, sparsegpt_, wanda_mask
from loram.shared.architectures import INPUT_GROUPS, PRUNED_MODULES
from loram.shared.manifest import PackedMask

NONSTRUCTURED_CRITERIA = ("magnitude", "wanda", "sparsegpt")
NEEDS_INPUTS = ("wanda", "sparsegpt")
# Input statistics are collected on the first linear of each group that reads one tensor; the others reuse them.
_STATS_OF = {m.path: group[0].path for group in INPUT_GROUPS for m in group}


@dataclass
class LayerwiseResult:
    # "model.layers.{i}.{path}" -> keep-mask, bit-packed at once (a bool mask per weight would cost
    # as many bytes as the model has weights)
    masks: dict[str, PackedMask] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # layer -> wall time to calibrate and prune it


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, calib: torch.Tensor, device: torch.device, batch: int):
    """[(hidden_states, layer kwargs)] per chunk of `batch` calibration rows, as decoder layer 0 sees them."""
    decoder = model.model
    moved = [decoder.embed_tokens, *( [decoder.rotary_emb] if hasattr(decoder, "rotary_emb") else [])]
    for m in moved:
        m.to(device)
    chunks = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        chunks.append((hidden, kwargs))
        raise _Captured

    handle = decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for rows in calib.split(batch):
            with contextlib.suppress(_Captured):
                decoder(input_ids=rows.to(device), use_cache=False)
    finally:
        handle.remove()
        if device.type != "cpu":
            for m in moved:
                m.to("cpu")
    return chunks


def _run(layer, chunks) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in chunks:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def _collect(layer, chunks, criterion: str) -> dict[str, torch.Tensor]:
    """Input statistics of the linears of `layer` over all chunks: ||X_j||_2 (wanda) or 2/n X^T X (sparsegpt)."""
    stats, tokens = {}, {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            tokens[name] = tokens.get(name, 0) + x.shape[0]
            if criterion == "wanda":
                stats[name] = stats.get(name, 0) + x.pow(2).sum(dim=0)
            else:
                stats[name] = stats.get(name, 0) + x.T @ x
        return record

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook(name)) for name in set(_STATS_OF.values())]
    try:
        _run(layer, chunks)
    finally:
        for h in handles:
            h.remove()
    if criterion == "wanda":
        return {name: s.sqrt() for name, s in stats.items()}
    return {name: s * (2.0 / tokens[name]) for name, s in stats.items()}


def prune_layerwise(model, layers: range, criterion: str, target: Target, calib: torch.Tensor | None = None,
                    device: str | torch.device = "cpu", batch: int = 8) -> LayerwiseResult:
    """Zero weights of the seven projections of every layer in `layers` in place; see the module docstring."""
    device = torch.device(device)
    decoder_layers = model.model.layers
    result = LayerwiseResult()
    chunks = capture_layer_inputs(model, calib, device, batch) if criterion in NEEDS_INPUTS else None
    for i in tqdm(range(layers.stop), desc=f"{criterion} pruning", unit="layer", leave=False):
        started = time.perf_counter()
        layer = decoder_layers[i]
        if device.type != "cpu":
            layer.to(device)
        if i in layers:
            stats = _collect(layer, chunks, criterion) if chunks is not None else {}
            for spec in PRUNED_MODULES:
                linear = layer.get_submodule(spec.path)
                weight = linear.weight.data
                if criterion == "sparsegpt":  # zeroes and updates the weight itself
                    mask = sparsegpt_(weight, stats[_STATS_OF[spec.path]], target)
                else:
                    mask = (magnitude_mask(weight, target) if criterion == "magnitude"
                            else wanda_mask(weight, stats[_STATS_OF[spec.path]], target))
                    weight.mul_(mask.to(weight.device, weight.dtype))
                result.masks[f"model.layers.{i}.{spec.path}"] = PackedMask.of(mask)
            del stats
        if chunks is not None and i < layers.stop - 1:  # the next layer's inputs
            with torch.no_grad():
                outs = _run(layer, chunks)
            chunks = [(out, kwargs) for out, (_, kwargs) in zip(outs, chunks, strict=True)]
        if device.type != "cpu":
            layer.to("cpu")
        if i in layers:
            result.seconds[i] = time.perf_counter() - started
    return result
