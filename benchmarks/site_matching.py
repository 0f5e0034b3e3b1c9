"""A candidate alignment objective, measured by the alignment grid and not (yet) in `loram publish align`.

Matching inside the pruned layers, at the inputs a LoRA adapter reads. The default objective matches each pruned
layer's output (the residual stream after it) to the original's. A consumer's LoRA adapter, though, sits on the
seven linears of every layer and learns from their inputs: the residual stream entering the attention (the
previous layer's output, matched already), the residual stream between the attention and the MLP (entering
gate_proj and up_proj: not matched), the attention heads' output entering o_proj, and the MLP's hidden
activations entering down_proj. Alignment is free to change the kept heads' and channels' activations as long as
the layer's output comes out right, and the recovered adapter then meets, on the original, activations unlike the
ones it was trained on. This objective adds those three sites to the matched states, each by the same relative
squared error per position, the original's heads and channels taken at the ones the pruned layer keeps:

    loss = mean over the pruned layers and the sites {output, mid, o_in, down_in} of ||s - t||^2 / ||t||^2

(`--sites` picks a subset; `out` alone is the default objective). The extra states are read by forward pre-hooks
during the same two forwards, so a step costs about what the default's does. `--error NAME=MODEL ...` measures instead
how far given pruned models are from the original at each site (results/site_matching_error.md).

    python benchmarks/site_matching.py [--sites out mid o_in down_in] -- publish align PRUNED --data wiki-chat:1 \\
        --data math.jsonl:1 --steps 80 --batch 1 --distill-from base --kd-weight 0 --hidden-weight 1 ... --out ALIGNED

The arguments after `--` are those of `loram publish align` (one process, a structured pruned model, pure hidden-state
distillation). The output is an ordinary aligned checkpoint (its manifest record says the hidden-state objective;
the extra sites are this script's).
"""

import argparse
import sys

from _common import align_argv, gsm8k_chat_ids, run_loram, structured_manifest

from loram.publisher import align_trainer, distill

SITES = {"mid": "post_attention_layernorm", "o_in": "self_attn.o_proj", "down_in": "mlp.down_proj"}  # site -> module
KEPT_FROM = {site: SITES[site] for site in ("o_in", "down_in")}  # sites read by a pruned side: the kept columns


def kept_columns(manifest, layers) -> dict[tuple[int, str], object]:
    """(layer, site) -> the original's kept columns of the site's module (o_proj's heads, down_proj's channels)."""
    out = {}
    for i in layers:
        for site, module in KEPT_FROM.items():
            _, cols = manifest.kept_indices(i, module)
            if cols is not None:
                out[(i, site)] = cols
    return out


def site_outputs(sites: list[str], kept: dict):
    """A `distill.LayerOutputs` that also records each matched layer's `sites` (its output only if "out" is one)."""

    class SiteOutputs(distill.LayerOutputs):
        def __init__(self, model, layers, inputs=False):
            super().__init__(model, layers, inputs)
            blocks = model.model.layers
            for i in layers:
                for site in sites:
                    if site != "out":
                        blocks[i].get_submodule(SITES[site]).register_forward_pre_hook(self._site_hook(i, site))

        def _hook(self, index):  # the layer's output, keyed by layer and site
            def hook(module, args, output):
                if self.capturing and "out" in sites:
                    self.outputs[f"{index:03d}/out"] = output[0] if isinstance(output, tuple) else output
            return hook

        def _site_hook(self, index, site):
            columns = kept.get((index, site))

            def hook(module, args):
                if self.capturing:
                    x = args[0]
                    if columns is not None and x.shape[-1] != len(columns):  # the original's: its kept heads/channels
                        x = x[..., columns.to(x.device)]
                    self.outputs[f"{index:03d}/{site}"] = x
            return hook
    return SiteOutputs


def recorded(model, recorder, input_ids) -> dict:
    """The states `recorder` (a `site_outputs` instance on `model`) records in one forward of `input_ids`."""
    import torch

    recorder.capturing = True
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        recorder.capturing = False
    return recorder.take()


def site_errors(models: dict[str, str], items: int = 16) -> dict:
    """Per model: the relative squared error against the original at each site, mean over the pruned layers and the
    positions of `items` GSM8K training items in chat form (items the demo's adapter trains on; no held-out item)."""
    from transformers import AutoTokenizer

    from loram.loading import load_causal_lm
    from loram.publisher.distill import hidden_sum
    from loram.shared.assets import model_dir
    from loram.shared.manifest import Manifest
    from loram.shared.runtime import configure_threads

    configure_threads()
    base = str(model_dir())
    ids = gsm8k_chat_ids(AutoTokenizer.from_pretrained(base), items)
    sites = ["out", *SITES]
    out = {}
    for name, path in models.items():
        manifest = Manifest.load(path)
        layers = manifest.pruned_layers
        recorder = site_outputs(sites, kept_columns(manifest, layers))
        student, teacher = load_causal_lm(path, "none"), load_causal_lm(base, "none")  # each hooked for this model
        s_rec, t_rec = recorder(student, layers), recorder(teacher, layers)
        totals, positions = dict.fromkeys(sites, 0.0), 0
        for x in ids:
            s, t = recorded(student, s_rec, x), recorded(teacher, t_rec, x)
            for site in sites:
                keys = [k for k in s if k.endswith(f"/{site}")]
                totals[site] += hidden_sum({k: s[k] for k in keys}, {k: t[k] for k in keys}, "mse").item()
            positions += x.shape[1] - 1
        out[name] = {site: round(total / positions, 4) for site, total in totals.items()}
        print(f"{name}: {out[name]}", flush=True)
    return out


def write_errors(models: dict[str, str]) -> None:
    from _common import machine, write

    errors = site_errors(models)
    table = ["Relative squared error against the original at each site of the pruned layers (`python "
             "benchmarks/site_matching.py --error NAME=MODEL ...`), mean over the pruned layers and the positions of "
             "16 GSM8K training items: `out` the layer's output (what the default objective matches), `mid` the "
             "residual stream between attention and MLP, `o_in` / `down_in` the inputs of o_proj and down_proj at the "
             "kept heads and channels.", "", "| model | out | mid | o_in | down_in |", "|---|---|---|---|---|"]
    table += [f"| {name} | " + " | ".join(f"{e[s]:.4f}" for s in ("out", *SITES)) + " |" for name, e in errors.items()]
    write("site_matching_error", {"machine": machine(), "models": models, "errors": errors}, table)


def main() -> None:
    if sys.argv[1:2] == ["--error"]:
        return write_errors(dict(a.split("=", 1) for a in sys.argv[2:]))
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=["out", *SITES], choices=["out", *SITES],
                    help="states matched at every pruned layer (default: all four)")
    args = ap.parse_args(sys.argv[1:cut])
    argv = align_argv(sys.argv[cut:], "site_matching.py [--sites ...] -- publish align PRUNED ... (see --help)")
    manifest = structured_manifest(argv, "site_matching.py")
    align_trainer.LayerOutputs = site_outputs(args.sites, kept_columns(manifest, manifest.pruned_layers))
    print(f"site_matching: matching {', '.join(args.sites)} at each pruned layer", file=sys.stderr)
    run_loram(argv)


if __name__ == "__main__":
    main()
