"""Non-structured selection and SparseGPT on single layers: patterns, counts, references, error order."""

import pytest
import torch

from loram.publisher.sparsity import Target, lowest_mask, magnitude_mask, parse_nm, sparsegpt_, wanda_mask
from loram.shared.errors import LoramError


def _layer(out=24, width=64, tokens=512, seed=0):
    """A weight and correlated inputs with uneven feature scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g)
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    scale = torch.exp(torch.randn(width, generator=g))
    x = (torch.randn(tokens, width, generator=g) @ mix) * scale
    return w, x


def _hessian(x):
    return 2 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (2, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_holds_in_every_row_and_group(method, n, m):
    w, x = _layer()
    target = Target(nm=(n, m))
    if method == "magnitude":
        mask = magnitude_mask(w, target)
    elif method == "wanda":
        mask = wanda_mask(w, x.norm(dim=0), target)
    else:
        mask = sparsegpt_(w, _hessian(x), target)
        assert bool((w[~mask] == 0).all())
    kept_per_group = mask.reshape(w.shape[0], -1, m).sum(dim=2)
    assert bool((kept_per_group == m - n).all())


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.55, 0.9])
def test_unstructured_sparsity_is_exact_up_to_row_rounding(sparsity):
    w, x = _layer(width=100)
    target = Target(sparsity=sparsity)
    for mask in (magnitude_mask(w, target), wanda_mask(w, x.norm(dim=0), target)):
        assert bool(((~mask).sum(dim=1) == int(100 * sparsity)).all())  # every row, floor(in * s)
    weight = w.clone()
    mask = sparsegpt_(weight, _hessian(x), target)
    # SparseGPT chooses within blocks of 128 columns over all rows: exact per block
    assert int((~mask).sum()) == int(w.numel() * sparsity)
    assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())


def test_wanda_matches_a_brute_force_reference():
    w, x = _layer(out=6, width=12, tokens=40, seed=3)
    target = Target(sparsity=0.5)
    mask = wanda_mask(w, x.norm(dim=0), target)
    for i in range(w.shape[0]):
        scores = []
        for j in range(w.shape[1]):
            norm = sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) ** 0.5
            scores.append((abs(float(w[i, j])) * norm, j))
        pruned = {j for _, j in sorted(scores)[:6]}
        assert {j for j in range(12) if not mask[i, j]} == pruned, i
    # 2:4: in each group of 4, the two lowest |W| * ||X|| go
    mask = wanda_mask(w, x.norm(dim=0), Target(nm=(2, 4)))
    scores = w.abs() * x.norm(dim=0)
    for i in range(6):
        for g in range(3):
            group = [(float(scores[i, 4 * g + k]), 4 * g + k) for k in range(4)]
            assert {j for _, j in sorted(group)[:2]} == {j for j in range(4 * g, 4 * g + 4) if not mask[i, j]}


@pytest.mark.parametrize("target", [Target(sparsity=0.5), Target(nm=(2, 4))], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target):
    w, x = _layer(out=48, width=256, tokens=1024, seed=1)
    ref = x @ w.T

    def error(pruned):
        return float((ref - x @ pruned.T).norm())

    sgpt = w.clone()
    mask = sparsegpt_(sgpt, _hessian(x), target)
    wanda = w * wanda_mask(w, x.norm(dim=0), target)
    magnitude = w * magnitude_mask(w, target)
    assert (~mask).float().mean() == pytest.approx(0.5)
    assert error(sgpt) < error(wanda) < error(magnitude)
    # SparseGPT updates the surviving weights (W_P != W0 * M)
    assert not torch.allclose(sgpt[mask], w[mask])


def test_sparsegpt_is_deterministic_and_keeps_dtype():
    w, x = _layer(seed=2)
    a, b = w.clone().bfloat16(), w.clone().bfloat16()
    assert torch.equal(sparsegpt_(a, _hessian(x), Target(sparsity=0.5)), sparsegpt_(b, _hessian(x), Target(sparsity=0.5)))
    assert torch.equal(a, b) and a.dtype == torch.bfloat16


def test_inputs_never_seen_are_pruned_to_zero():
    w, x = _layer()
    x[:, 5] = 0
    weight = w.clone()
    sparsegpt_(weight, _hessian(x), Target(sparsity=0.25))
    assert bool((weight[:, 5] == 0).all())


def test_lowest_mask_ties_still_give_exact_counts():
    mask = lowest_mask(torch.ones(3, 8), Target(nm=(2, 4)))
    assert bool((mask.reshape(3, 2, 4).sum(dim=2) == 2).all())


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 0.0}, "--sparsity must lie in (0, 1)"),
    ({"sparsity": 1.0}, "--sparsity must lie in (0, 1)"),
    ({"nm": (4, 4)}, "need 0 < N < M"),
    ({"nm": (0, 4)}, "need 0 < N < M"),
    ({}, "exactly one of"),
    ({"sparsity": 0.5, "nm": (2, 4)}, "exactly one of"),
])
def test_bad_targets(kwargs, message):
    with pytest.raises(LoramError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Target(**kwargs)


def test_parse_nm_and_width_check():
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(LoramError, match="must look like N:M"):
        parse_nm("2-4")
    with pytest.raises(LoramError, match="M=3 does not divide the input width 64 of q_proj"):
        Target(nm=(1, 3)).check_width(64, "q_proj")
