"""benchmarks/perturbed_alignment.py: the teacher's delta is the student's zero-padded at the pruned rows and columns
(what recovery does to an adapter), its size is eps x the original's kept weight, every entry draws anew, and
removing the hooks leaves both models as they were."""

import sys
from pathlib import Path

import torch
from tiny_models import tiny_pruned_workspace

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import perturbed_alignment  # noqa: E402


def _delta(linear: torch.nn.Linear) -> torch.Tensor:
    """The weight the linear's hooks add: its output on the identity minus the plain output, as [out, in]."""
    eye = torch.eye(linear.weight.shape[1])
    with torch.no_grad():
        return (linear(eye) - torch.nn.functional.linear(eye, linear.weight, linear.bias)).T


def test_teacher_delta_is_the_recovered_student_delta(tmp_path):
    from transformers import AutoModelForCausalLM

    import loram
    from loram.shared.manifest import Manifest

    loram.register()
    root = tiny_pruned_workspace(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(root / "pruned")
    teacher = AutoModelForCausalLM.from_pretrained(root / "base")
    pairs = perturbed_alignment.linear_pairs(student, teacher, Manifest.load(root / "pruned"))
    assert len(pairs) == 7 * len(teacher.model.layers)
    assert any(rows is not None for _, _, rows, _ in pairs) and any(cols is not None for _, _, _, cols in pairs)
    pert = perturbed_alignment.Perturbation(pairs, rank=2, eps=0.05, seed=0)
    with pert.applied():
        first = [(_delta(s), _delta(t)) for s, t, _, _ in pairs]
    for (s, t, rows, cols), (ds, dt) in zip(pairs, first, strict=True):
        padded = torch.zeros_like(dt)
        r = rows if rows is not None else torch.arange(dt.shape[0])
        c = cols if cols is not None else torch.arange(dt.shape[1])
        padded[r[:, None], c] = ds
        assert torch.allclose(dt, padded, atol=1e-7)
        kept = t.weight.detach()[r][:, c]
        assert torch.linalg.matrix_rank(ds) == 2
        assert abs(ds.norm().item() - 0.05 * kept.norm().item()) < 1e-4 * kept.norm().item()
        assert torch.count_nonzero(_delta(s)) == 0 and torch.count_nonzero(_delta(t)) == 0  # hooks removed
    with pert.applied():
        again = _delta(pairs[0][0])
    assert not torch.allclose(again, first[0][0])  # a fresh draw every step


def test_response_sum_compares_what_the_perturbation_changes():
    g = torch.Generator().manual_seed(0)
    t0, move = {4: torch.randn(2, 5, 8, generator=g)}, {4: torch.randn(2, 5, 8, generator=g)}
    s0 = {4: t0[4] + torch.randn(2, 5, 8, generator=g)}  # the student's outputs differ; only the responses count
    td = {4: t0[4] + move[4]}
    assert perturbed_alignment.response_sum(s0, t0, {4: s0[4] + move[4]}, td).item() < 1e-10
    assert abs(perturbed_alignment.response_sum(s0, t0, s0, td).item() - 1.0) < 1e-6  # no response at all: 1
    last = {4: move[4].clone()}
    last[4][:, -1] = 100.0  # the last position predicts nothing and is left out, as in the hidden loss
    assert perturbed_alignment.response_sum(s0, t0, {4: s0[4] + last[4]}, td).item() < 1e-10
