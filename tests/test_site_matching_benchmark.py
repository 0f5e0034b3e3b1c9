"""benchmarks/site_matching.py: inside each pruned layer it records the states a LoRA adapter's linears read, the
original's taken at the heads and channels the pruned layer keeps, and `--sites out` is the default objective."""

import sys
from pathlib import Path

import torch
from tiny_models import tiny_pruned_workspace

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import site_matching  # noqa: E402


def test_sites_are_the_originals_at_the_kept_heads_and_channels(tmp_path):
    from transformers import AutoModelForCausalLM

    import loram
    from loram.publisher import distill
    from loram.shared.manifest import Manifest

    loram.register()
    root = tiny_pruned_workspace(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(root / "pruned").eval()
    teacher = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    manifest = Manifest.load(root / "pruned")
    layers = manifest.pruned_layers
    kept = site_matching.kept_columns(manifest, layers)
    assert {site for _, site in kept} == {"o_in", "down_in"} and {i for i, _ in kept} == set(layers)
    recorders = site_matching.site_outputs(["out", *site_matching.SITES], kept)
    s_rec, t_rec = recorders(student, layers), recorders(teacher, layers)
    full = {}  # the teacher's whole o_proj input of the first pruned layer, recorded independently
    teacher.model.layers[layers[0]].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: full.setdefault("o_in", args[0]))
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    s, t = site_matching.recorded(student, s_rec, ids), site_matching.recorded(teacher, t_rec, ids)
    assert sorted(s) == sorted(t) == sorted(f"{i:03d}/{site}" for i in layers for site in ("out", "mid", "o_in", "down_in"))
    for key in s:
        assert s[key].shape == t[key].shape, key
    first = f"{layers[0]:03d}/o_in"
    cols = kept[(layers[0], "o_in")]
    assert len(cols) < full["o_in"].shape[-1] and torch.equal(t[first], full["o_in"][..., cols])
    # the layers before the first pruned one are the original's, and its kept heads keep their q, k, v rows: the
    # kept heads' output is the original's at exactly the recorded columns
    assert torch.allclose(s[first], t[first], atol=1e-5)
    assert distill.hidden_sum({first: s[first]}, {first: t[first]}, "mse").item() < 1e-8
    assert distill.hidden_sum({k: s[k] for k in s if k.endswith("/out")},
                              {k: t[k] for k in t if k.endswith("/out")}, "mse").item() > 1e-3  # pruning shows
    only_out = site_matching.site_outputs(["out"], kept)(student, layers)
    assert sorted(site_matching.recorded(student, only_out, ids)) == [f"{i:03d}/out" for i in layers]  # `--sites out`: the default objective's states
