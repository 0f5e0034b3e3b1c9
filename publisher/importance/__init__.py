"""Importance criteria for structured pruning: one file per criterion, one interface.

A criterion scores the prunable units of each decoder layer in a range:

    scores(model, layers, calib, seed) -> {layer: LayerScores(kv [n_kv], mlp [I])}

where `kv[g]` is the importance of KV group g (its KV head, its G query heads and the matching
`o_proj` columns) and `mlp[c]` that of intermediate channel c (row c of gate/up, column c of down).
Higher means more important; the lowest-scoring units are removed.

Criteria that score individual weights (l1, l2, taylor) produce an element-wise salience for each
module of `PRUNED_MODULES` and let `group_scores` sum it over each unit's coupled weights.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loram.shared.architectures import PRUNED_MODULES, PrunedModule, Shape
from loram.shared.errors import LoramError


@dataclass
class LayerScores:
    kv: torch.Tensor  # [n_kv] float64, one score per KV group
    mlp: torch.Tensor  # [I] float64, one score per intermediate channel

    @classmethod
    def zeros(cls, shape: Shape) -> "LayerScores":
        return cls(torch.zeros(shape.num_kv_heads, dtype=torch.float64),
                   torch.zeros(shape.intermediate, dtype=torch.float64))


def submodule(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    return layer.get_submodule(path)


QUERY_FOLDS = ("strided", "coupled")  # how query heads' saliences enter the KV-group scores (add_unit_scores_)


def group_scores(layer: torch.nn.Module, shape: Shape,
                 salience: Callable[[torch.nn.Parameter], torch.Tensor], query_fold: str = "coupled") -> LayerScores:
    """Sum an element-wise salience over every weight (and bias) of each unit's coupled group.

    For a module pruned along `out` the unit axis is rows (and bias entries); along `in`, columns.
    Query-head units are folded into KV groups by `query_fold` (`add_unit_scores_`).
    """
    scores = LayerScores.zeros(shape)
    for spec in PRUNED_MODULES:
        module = submodule(layer, spec.path)
        dim = 0 if spec.axis == "out" else 1
        per_index = salience(module.weight).double().sum(dim=1 - dim)          # [out] or [in]
        if spec.axis == "out" and module.bias is not None:
            per_index = per_index + salience(module.bias).double()
        add_unit_scores_(scores, shape, spec, per_index, query_fold)
    return scores


def add_unit_scores_(scores: LayerScores, shape: Shape, spec: PrunedModule, per_index: torch.Tensor,
                     query_fold: str = "coupled") -> None:
    """Add one module's salience summed per row (`out` axis, bias entries included) or per column (`in`)
    to the scores of the units those rows or columns belong to, in place (on the CPU, in float64).

    Query heads (q_proj rows, o_proj columns) enter the KV-group scores by `query_fold`:
    - "coupled": head h counts for group h // G, the group it attends with, whose removal removes it;
    - "strided": head h counts for group h mod n_kv, as LLM-Pruner's Taylor importance folds them (it sums
      a module's per-channel salience over blocks of the KV width). Not the model's pairing, but measured
      better for Taylor on SmolLM2 at both budgets compared, 10 x 64 and 32 x 128 (docs/results.md
      "Structured pruning quality").
    The heads removed with a group are always the coupled ones; only the score differs."""
    per_index = per_index.to("cpu", torch.float64)
    if spec.unit == "mlp":
        scores.mlp += per_index
        return
    per_head = per_index.view(-1, shape.head_dim).sum(dim=1)                   # [heads]
    if spec.unit == "q":
        if query_fold == "coupled":
            per_head = per_head.view(shape.num_kv_heads, shape.group_size).sum(dim=1)
        elif query_fold == "strided":
            per_head = per_head.view(shape.group_size, shape.num_kv_heads).sum(dim=0)
        else:
            raise LoramError(f"unknown query fold {query_fold!r}; choose one of {', '.join(QUERY_FOLDS)}")
    scores.kv += per_head


def criteria() -> dict[str, Callable]:
    """Name -> scoring function, imported lazily."""
    from loram.publisher.importance import l1, l2, random, taylor

    return {"random": random.scores, "l1": l1.scores, "l2": l2.scores, "taylor": taylor.scores}


STRUCTURED_CRITERIA = ("random", "l1", "l2", "taylor")
NEEDS_CALIBRATION = ("taylor",)


def get_criterion(name: str) -> Callable:
    table = criteria()
    if name not in table:
        raise LoramError(f"unknown structured criterion {name!r}; choose one of {', '.join(table)}")
    return table[name]
