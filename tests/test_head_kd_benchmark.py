"""benchmarks/head_kd.py: the logit term trains only the layers after the pruned range (and the final norm), the
hidden-state term only the layers up to its end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import tiny_pruned_workspace

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import head_kd  # noqa: E402


def _trained(model, loss) -> set[str]:
    """Names of the parameters `loss` gives a nonzero gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_term_trains_only_its_own_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    import loram
    from loram.publisher import distill
    from loram.shared.manifest import Manifest

    loram.register()
    root = tiny_pruned_workspace(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(root / "pruned")
    student.get_output_embeddings().weight.requires_grad_(False)  # align's default (tied: the embeddings too)
    teacher = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    layers = Manifest.load(root / "pruned").pruned_layers
    boundary = max(layers) + 1
    assert boundary < student.config.num_hidden_layers  # tiny: pruned 1, 2 of 6
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    student.eval()
    before = student(input_ids=ids).logits
    handle = head_kd.detach_input(student.model.layers[boundary])
    assert torch.equal(student(input_ids=ids).logits, before)  # evaluation: the hook does nothing
    student.train()
    s_rec, t_rec = distill.LayerOutputs(student, layers), distill.LayerOutputs(teacher, layers)
    s_rec.capturing = t_rec.capturing = True
    logits = student(input_ids=ids).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    assert torch.allclose(logits, before, atol=1e-6)  # training: the same numbers, only the graph is cut
    kd = distill.kd_sum(logits, teacher_logits)
    hidden = distill.hidden_sum(s_rec.take(), t_rec.take(), "mse")
    after = {f"model.layers.{i}." for i in range(boundary, student.config.num_hidden_layers)}
    is_after = lambda n: any(n.startswith(p) for p in after) or n == "model.norm.weight"  # noqa: E731
    by_kd = _trained(student, kd)
    assert by_kd and all(is_after(n) for n in by_kd), sorted(by_kd)
    assert any(n.startswith(f"model.layers.{boundary}.") for n in by_kd) and "model.norm.weight" in by_kd
    by_hidden = _trained(student, hidden)
    assert by_hidden and not any(is_after(n) for n in by_hidden), sorted(by_hidden)
    assert any(n.startswith(f"model.layers.{layers[0]}.") for n in by_hidden)
    handle.remove()  # without the cut, the logit term reaches the pruned layers
    student.zero_grad(set_to_none=True)
    assert any(not is_after(n) for n in _trained(student, distill.kd_sum(student(input_ids=ids).logits, teacher_logits)))


def test_align_run_leaves_the_layers_before_the_boundary_to_the_hidden_term(tmp_path):
    """End to end, as the grid runs it, with the logit term alone (--hidden-weight 0): the decoder layers before the
    boundary come out bit-identical, those after it trained."""
    root = tiny_pruned_workspace(tmp_path)
    text = " ".join(f"{r['question']} {r['answer']}" for r in map(json.loads, (root / "qa.jsonl").read_text().splitlines()))
    (root / "text.jsonl").write_text(json.dumps({"text": text * 4}) + "\n")
    out = tmp_path / "aligned"
    cmd = [sys.executable, str(BENCHMARKS / "head_kd.py"), "--", "publish", "align", str(root / "pruned"),
           "--data", str(root / "text.jsonl"), "--steps", "3", "--seq-len", "16", "--batch", "2", "--lr", "1e-2",
           "--warmup", "0", "--distill-from", str(root / "base"), "--kd-weight", "1", "--hidden-weight", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LORAM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "head_kd: the KL term trains layers 3..5" in proc.stderr
    start, end = load_file(root / "pruned" / "model.safetensors"), load_file(out / "model.safetensors")
    decoder = [k for k in start if k.startswith("model.layers.")]
    moved = {k for k in decoder if not torch.equal(start[k], end[k])}
    assert moved and all(int(k.split(".")[2]) >= 3 for k in moved), sorted(moved)
    assert any(k.startswith("model.layers.3.") for k in moved)
