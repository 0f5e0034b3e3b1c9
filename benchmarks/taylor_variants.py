"""Structured Taylor scorings side by side (for `prune_quality.py --variants`): which coupled saliences count
in a KV group's score, how query heads are folded onto KV groups, element-wise or vectorised, and the MLP
channel ranking, and KV groups scored by the loss with each removed (`--kv-score loss`, the default, on 4 to
32 of the calibration samples), each as held-out perplexity of SmolLM2 pruned at 0.5 on layers [4, 28).

One gradient of the mean calibration loss per budget (a plain checkpointed backward, every gradient kept:
fine for a 135M model), then every scoring from it. Each pruned model is evaluated as the dense model with
the removed heads' o_proj and channels' down_proj columns zeroed, which computes exactly what the sliced
model computes (`structured.zero_pruned_contributions_`, tested in tests/publisher/test_prune.py).
"""

import torch

from loram.perplexity import perplexity
from loram.publisher.calibration import token_blocks
from loram.publisher.importance import LayerScores, add_unit_scores_
from loram.publisher.importance.group_loss import KV_SAMPLES, kv_loss_scores
from loram.publisher.structured import select_kept, zero_pruned_contributions_
from loram.shared.architectures import PRUNED_MODULES, PrunedModule, Shape

LAYERS = range(4, 28)
# LLM-Pruner (block-wise, param_first), 32 x 128 calibration: the KV groups it kept in layers 4..27 (issue 17)
REFERENCE_KEPT = ["01", "01", "12", "12", "02", "12", "12", "01", "01", "01", "02", "12", "02", "02", "02", "02", "01", "01", "02", "01", "12", "12", "12", "01"]
LOSS_SAMPLES = (4, 8, 16, 32)  # samples the loss-scored KV variant is measured on (capped at the budget's)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SPECS = {spec.name: spec for spec in PRUNED_MODULES}
# name -> (attention modules, query fold, vectorised); the fold is "coupled" (h // G), "strided" (h mod n_kv)
# or "shifted" (a control: the heads of group g + 1)
KV_VARIANTS = {
    "q,k,v,o, strided fold (LLM-Pruner's; the default of --kv-score taylor)": (ATTN, "strided", False),
    "q,k,v,o, coupled fold (the earlier default)": (ATTN, "coupled", False),
    "q,k,v,o, shifted fold (control: another group's heads)": (ATTN, "shifted", False),
    "q,k,v, coupled fold": (ATTN[:3], "coupled", False),
    "k,v only": (("k_proj", "v_proj"), "coupled", False),
    "q,k,v,o, strided, vectorised |sum w*g|": (ATTN, "strided", True),
}


def gradients(model, calib: torch.Tensor, chunk: int = 4) -> dict[str, torch.Tensor]:
    """d(mean next-token loss over every calibration token)/dW for every weight, chunk by chunk."""
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    total = calib.shape[0] * (calib.shape[1] - 1)
    for rows in calib.split(chunk):
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss * (rows.shape[0] * (rows.shape[1] - 1) / total)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    model.eval()
    return grads


def fisher(model, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM-Pruner's `acc_grad` for param_mix: the mean over calibration samples of each sample's squared
    gradient (of its own mean loss), for the decoder layers' weights."""
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    acc = {}
    for row in calib.split(1):
        model(input_ids=row, labels=row, use_cache=False).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None and ".layers." in n:
                acc[n] = acc.get(n, 0) + p.grad.detach() ** 2 / len(calib)
        model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    model.eval()
    return acc


def _per_index(model, grads, i: int, spec: PrunedModule, vectorised: bool, acc=None) -> torch.Tensor:
    name = f"model.layers.{i}.{spec.path}.weight"
    w = model.get_parameter(name).detach()
    salience = w * grads[name]
    if acc is not None:  # param_mix: first order minus half the diagonal second-order term, as LLM-Pruner
        salience = salience - 0.5 * w * acc[name] * w
    axis = 1 if spec.axis == "out" else 0  # sum each row (out) or each column (in)
    return (salience.sum(axis).abs() if vectorised else salience.abs().sum(axis)).double()


def kv_scores(model, grads, shape: Shape, i: int, modules, fold: str, vectorised: bool, acc=None) -> torch.Tensor:
    """A layer's KV-group scores from `modules`, query heads folded by the project's `add_unit_scores_`
    ("strided" or "coupled"), or "shifted": coupled, then each group given the next group's query heads."""
    scores = LayerScores.zeros(shape)
    for m in modules:
        spec = SPECS[m]
        per_index = _per_index(model, grads, i, spec, vectorised, acc)
        if fold == "shifted" and spec.unit == "q":
            own = LayerScores.zeros(shape)
            add_unit_scores_(own, shape, spec, per_index, "coupled")
            scores.kv += own.kv.roll(1)
        else:
            add_unit_scores_(scores, shape, spec, per_index, "coupled" if fold == "shifted" else fold)
    return scores.kv


def mlp_scores(model, grads, i: int, vectorised: bool = False, float32: bool = False, acc=None) -> torch.Tensor:
    """gate/up rows + down columns. `float32`: summed in float32 as LLM-Pruner's TaylorImportance does (ours
    sums in float64): the reference-style ranking."""
    parts = [_per_index(model, grads, i, SPECS[m], vectorised, acc) for m in MLP]
    return sum(p.float() for p in parts).double() if float32 else sum(parts)


MLP_VARIANTS = {
    "MLP: reference-style ranking (float32 sums of gate/up rows + down columns)":
        lambda model, grads, i: mlp_scores(model, grads, i, float32=True),
    "MLP: gate/up rows only": lambda model, grads, i: (_per_index(model, grads, i, SPECS["gate_proj"], False)
                                                       + _per_index(model, grads, i, SPECS["up_proj"], False)),
    "MLP: down columns only": lambda model, grads, i: _per_index(model, grads, i, SPECS["down_proj"], False),
}


class Evaluator:
    """Perplexity of the dense model with a scoring's removed units zeroed."""

    def __init__(self, model, windows):
        self.model, self.windows = model, windows
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters() if "o_proj" in n or "down_proj" in n}

    def __call__(self, scores: dict[int, LayerScores], shape: Shape):
        kept = select_kept(scores, shape, 0.5, 0.5)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.saved:
                    p.copy_(self.saved[n])
        zero_pruned_contributions_(self.model, kept)
        ppl = perplexity(self.model, self.windows, progress=False)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.saved:
                    p.copy_(self.saved[n])
        return ppl, kept


def run(model, tokenizer, windows, dense_ppl: float, budgets, log=print) -> list[dict]:
    shape = Shape.of(model.config)
    evaluate = Evaluator(model, windows)
    rows = []
    for samples, seq_len in budgets:
        calib = token_blocks(tokenizer, "wiki", samples, seq_len)
        grads = gradients(model, calib)
        base_mlp = {i: mlp_scores(model, grads, i) for i in LAYERS}
        default_kept = None
        for name, (modules, fold, vectorised) in KV_VARIANTS.items():
            scores = {i: LayerScores(kv_scores(model, grads, shape, i, modules, fold, vectorised),
                                     mlp_scores(model, grads, i, vectorised=True) if vectorised else base_mlp[i])
                      for i in LAYERS}
            ppl, kept = evaluate(scores, shape)
            default_kept = default_kept or kept
            groups = ["".join(str(int(x)) for x in kept[i].kv_heads) for i in LAYERS]
            rows.append({"calibration": f"{samples} x {seq_len}", "scoring": name, "ppl": round(ppl, 2),
                         "relative": round(ppl / dense_ppl, 2),
                         "kv_same_as_reference": sum(a == b for a, b in zip(groups, REFERENCE_KEPT, strict=True)),
                         "kept_kv": " ".join(groups),
                         "mlp_overlap_with_default": _overlap(kept, default_kept)})
            log(rows[-1])
        # KV groups by the loss with each removed (`--kv-score loss`, the default), on the first n samples
        for n in sorted({min(n, samples) for n in LOSS_SAMPLES}):
            kv = kv_loss_scores(model, LAYERS, calib[:n], 4)
            ppl, kept = evaluate({i: LayerScores(kv[i], base_mlp[i]) for i in LAYERS}, shape)
            groups = ["".join(str(int(x)) for x in kept[i].kv_heads) for i in LAYERS]
            rows.append({"calibration": f"{samples} x {seq_len}",
                         "scoring": f"KV: loss with the group removed, on {n} of the samples"
                                    + (" (the default)" if n == min(KV_SAMPLES, samples) else ""),
                         "ppl": round(ppl, 2), "relative": round(ppl / dense_ppl, 2),
                         "kv_same_as_reference": sum(a == b for a, b in zip(groups, REFERENCE_KEPT, strict=True)),
                         "kept_kv": " ".join(groups), "mlp_overlap_with_default": _overlap(kept, default_kept)})
            log(rows[-1])
        acc = fisher(model, calib)  # second order, LLM-Pruner's `param_mix`, strided fold (attention and MLP)
        ppl, kept = evaluate({i: LayerScores(kv_scores(model, grads, shape, i, ATTN, "strided", False, acc),
                                             mlp_scores(model, grads, i, acc=acc)) for i in LAYERS}, shape)
        groups = ["".join(str(int(x)) for x in kept[i].kv_heads) for i in LAYERS]
        rows.append({"calibration": f"{samples} x {seq_len}", "scoring": "q,k,v,o, strided, param_mix (second order)",
                     "ppl": round(ppl, 2), "relative": round(ppl / dense_ppl, 2),
                     "kv_same_as_reference": sum(a == b for a, b in zip(groups, REFERENCE_KEPT, strict=True)),
                     "kept_kv": " ".join(groups), "mlp_overlap_with_default": _overlap(kept, default_kept)})
        log(rows[-1])
        del acc
        # the MLP channels: a reference-style ranking (float32 sums) against ours, attention scored the default way
        attn = {i: kv_scores(model, grads, shape, i, ATTN, "strided", False) for i in LAYERS}
        for name, mlp in MLP_VARIANTS.items():
            ppl, kept = evaluate({i: LayerScores(attn[i], mlp(model, grads, i)) for i in LAYERS}, shape)
            rows.append({"calibration": f"{samples} x {seq_len}", "scoring": name, "ppl": round(ppl, 2),
                         "relative": round(ppl / dense_ppl, 2), "kv_same_as_reference": None, "kept_kv": None,
                         "mlp_overlap_with_default": _overlap(kept, default_kept)})
            log(rows[-1])
    return rows


def _overlap(kept, other) -> float:
    same = sum(len(set(kept[i].mlp_channels.tolist()) & set(other[i].mlp_channels.tolist())) for i in LAYERS)
    return round(same / sum(len(other[i].mlp_channels) for i in LAYERS), 4)
