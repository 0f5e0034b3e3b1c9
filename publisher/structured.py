"""Structured pruning: choose the kept units from importance scores and slice the layers in place.

Per pruned layer i (docs/method.md §2): keep the top-scoring KV groups and MLP channels, by the paper's
rounding rules, with the kept indices sorted. Slicing follows `PRUNED_MODULES`: q/k/v rows (and
their biases) and o columns of whole KV groups; gate/up rows and down columns of channels. Each
module is replaced by its slice one at a time, on the device it is on, so peak memory is the model
plus one module.
"""

from dataclasses import dataclass

import torch

from loram.publisher.importance import LayerScores
from loram.shared.architectures import PRUNED_MODULES, Shape, kept_index, kept_kv_heads, kept_mlp_channels
from loram.shared.errors import LoramError


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


@torch.no_grad()
def _slice_linear_(linear: torch.nn.Linear, axis: str, index: torch.Tensor) -> None:
    dim = 0 if axis == "out" else 1
    if index.numel() == linear.weight.shape[dim]:
        return  # nothing removed on this side
    index = index.to(linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index).contiguous(),
                                       requires_grad=linear.weight.requires_grad)
    if axis == "out":
        linear.out_features = index.numel()
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.index_select(0, index).contiguous(),
                                             requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = index.numel()


def slice_layers_(model: torch.nn.Module, kept: dict[int, KeptUnits]) -> None:
    """Physically remove the pruned rows/columns from `model`'s decoder layers, in place."""
    shape = Shape.of(model.config)
    layers = model.get_decoder().layers
    for i, units in kept.items():
        for spec in PRUNED_MODULES:
            index = kept_index(shape, spec, units.kv_heads, units.mlp_channels)
            _slice_linear_(layers[i].get_submodule(spec.path), spec.axis, index)


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
