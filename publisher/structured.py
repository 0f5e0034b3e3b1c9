"""Structured pruning: choose the kept units from importance scores and slice the layers as they are written.

Per pruned layer i (docs/method.md §2): keep the top-scoring KV groups and MLP channels, by the paper's
rounding rules, with the kept indices sorted. Slicing follows `PRUNED_MODULES`: q/k/v rows (and
their biases) and o columns of whole KV groups; gate/up rows and down columns of channels. The
slices are made one at a time as the checkpoint is written, on the device each weight is on, so the
peak is the model plus one slice (slicing in place first would hold every pruned layer's kept rows
next to the originals, which stay resident when memory-mapped).
"""

from dataclasses import dataclass

import torch

from loram.publisher.importance import LayerScores
from loram.shared.architectures import PRUNED_MODULES, Shape, kept_index, kept_kv_heads, kept_mlp_channels
from loram.shared.errors import LoramError, warn
from loram.shared.safetensors_stream import LazyTensor, saved_tensors


@dataclass
class KeptUnits:
    """Sorted kept indices of one pruned layer."""

    kv_heads: torch.Tensor  # [kept_kv] int64, sorted
    mlp_channels: torch.Tensor  # [kept_I] int64, sorted


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending; ties broken by lower index (deterministic)."""
    order = torch.argsort(-scores, stable=True)
    return order[:k].sort().values


def select_kept(scores: dict[int, LayerScores], shape: Shape, attn_ratio: float,
                mlp_ratio: float) -> dict[int, KeptUnits]:
    """Kept units per layer from the scores, with the paper's rounding rules."""
    n_kv = kept_kv_heads(shape, attn_ratio)
    n_mlp = kept_mlp_channels(shape.intermediate, mlp_ratio)
    if n_kv < 1:
        raise LoramError(f"attention ratio {attn_ratio} would remove every KV group ({shape.num_kv_heads} "
                         f"groups of {shape.head_dim}-dim heads); use a smaller ratio")
    if n_mlp < 1:
        raise LoramError(f"MLP ratio {mlp_ratio} would remove every one of {shape.intermediate} channels; "
                         "use a smaller ratio")
    return {i: KeptUnits(_top(s.kv, n_kv), _top(s.mlp, n_mlp)) for i, s in sorted(scores.items())}


def check_removal(shape: Shape, attn_ratio: float, mlp_ratio: float) -> None:
    """Refuse ratios that remove nothing (the checkpoint would be an unpruned copy); warn when an attention ratio
    above 0 rounds to no KV group, a whole group being the smallest step (only MLP channels are then pruned)."""
    whole_attention = kept_kv_heads(shape, attn_ratio) == shape.num_kv_heads
    if whole_attention and kept_mlp_channels(shape.intermediate, mlp_ratio) == shape.intermediate:
        raise LoramError(f"attention ratio {attn_ratio} and MLP ratio {mlp_ratio} remove nothing: the checkpoint "
                         "would be an unpruned copy; give a ratio above 0, e.g. --ratio 0.5")
    if whole_attention and attn_ratio > 0:
        width = shape.num_kv_heads * shape.head_dim
        smallest = (shape.head_dim - 1) / width  # a ratio above it removes one group (kept_kv_heads)
        warn(f"attention ratio {attn_ratio} removes no KV group ({shape.num_kv_heads} per layer, a whole group the "
             f"smallest step): attention stays whole and only MLP channels are pruned; a ratio above {smallest:.3f} "
             "removes one group")


def _slice(source: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor | LazyTensor:
    if index.numel() == source.shape[dim]:
        return source.detach()  # nothing removed on this side

    def make() -> torch.Tensor:
        with torch.no_grad():
            return source.detach().index_select(dim, index.to(source.device)).contiguous()

    shape = list(source.shape)
    shape[dim] = index.numel()
    return LazyTensor(tuple(shape), source.dtype, make)


def sliced_tensors(model: torch.nn.Module, pruned: torch.nn.Module,
                   kept: dict[int, KeptUnits]) -> list[tuple[str, torch.Tensor | LazyTensor]]:
    """The weights of the pruned checkpoint, in `pruned`'s (a meta-device model of the pruned config) saving
    order: each kept block of `model` a LazyTensor that slices it when written, every other tensor `model`'s
    own. Nothing is copied here, so writing them one at a time keeps the peak at the model plus one slice."""
    shape = Shape.of(model.config)
    layers = model.get_decoder().layers
    slices: dict[int, tuple[int, torch.Tensor]] = {}  # id(original tensor) -> (dim, kept index)
    for i, units in kept.items():
        for spec in PRUNED_MODULES:
            index = kept_index(shape, spec, units.kv_heads, units.mlp_channels)
            linear = layers[i].get_submodule(spec.path)
            slices[id(linear.weight)] = (0 if spec.axis == "out" else 1, index)
            if spec.axis == "out" and linear.bias is not None:
                slices[id(linear.bias)] = (0, index)
    originals = model.state_dict(keep_vars=True)
    items = []
    for name, target in saved_tensors(pruned):
        source = originals.get(name)
        if source is None:
            raise LoramError(f"internal error: the pruned model has {name}, the original has not")
        if id(source) in slices:
            items.append((name, _slice(source, *slices[id(source)])))
        else:
            items.append((name, source.detach()))
        if tuple(items[-1][1].shape) != tuple(target.shape):
            raise LoramError(f"internal error: {name} would be {list(items[-1][1].shape)}, the pruned config "
                             f"says {list(target.shape)}")
    return items


@torch.no_grad()
def zero_pruned_contributions_(model: torch.nn.Module, kept: dict[int, KeptUnits]) -> None:
    """Zero the o_proj/down_proj columns of removed heads/channels, in place (the reference for tests:
    this dense model computes exactly what the pruned model computes)."""
    shape = Shape.of(model.config)
    layers = model.get_decoder().layers
    for i, units in kept.items():
        for spec in PRUNED_MODULES:
            if spec.axis != "in":
                continue
            weight = layers[i].get_submodule(spec.path).weight
            mask = torch.ones(weight.shape[1], dtype=torch.bool)
            mask[kept_index(shape, spec, units.kv_heads, units.mlp_channels)] = False
            mask = mask.to(weight.device)
            weight[:, mask] = 0
