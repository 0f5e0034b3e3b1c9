"""Which layers' recovered deltas carry LoRAM's gain on the original: the adapter of one alignment-grid cell,
recovered, evaluated on the original with the LoRA B of a group of layers set to zero.

The adapter-agreement measurement (adapter_agreement.py) finds the LoRAM adapter's updates in the unpruned layers
(0-3 before the pruned range, 28-29 after it) agreeing with full LoRA's at cosines of 0.19 and 0.01; this asks
whether they help the original at all, i.e. whether a recovery that left them out would transfer better.

    python benchmarks/alignment_grid.py --work /tmp/grid --cells taylor50/hidden-mse-pruned-wikichat+demo-math-batch1/80/0
    python benchmarks/recovered_ablation.py --work /tmp/grid --cell taylor50/hidden-mse-pruned-wikichat+demo-math-batch1/80/0

Writes results/recovered_ablation.{md,json}: GSM8K held-out response perplexity (the grid's first 100 items) and
the gap closed against the grid's references for the same seed.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from _common import machine, write
from alignment_grid import Evaluator, folder_name, gap, sh
from safetensors.torch import load_file, save_file

from loram.shared.manifest import Manifest


def layer(key: str) -> int:
    """The decoder layer of an adapter tensor: base_model.model.model.layers.L.self_attn.q_proj.lora_A.weight -> L."""
    return int(key.split(".layers.")[1].split(".")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the alignment grid's --work folder")
    ap.add_argument("--cell", required=True, help="MODEL/OBJECTIVE/STEPS/SEED of a structured cell already run")
    ap.add_argument("--items", type=int, default=100)
    args = ap.parse_args()
    model, _, _, seed = args.cell.split("/")
    recovered = args.work / "cells" / folder_name(args.cell) / "recovered"
    if not (recovered / "adapter_model.safetensors").is_file():
        raise SystemExit(f"{recovered}: no recovered adapter; run the cell with alignment_grid.py first")
    pruned = set(Manifest.load(args.work / "pruned" / model).pruned_layers)
    weights = load_file(recovered / "adapter_model.safetensors")
    layers = sorted({layer(k) for k in weights})
    groups = {"none (the recovered adapter)": [],
              "layers before the pruned range": [i for i in layers if i < min(pruned)],
              "layers after the pruned range": [i for i in layers if i > max(pruned)],
              "every unpruned layer": [i for i in layers if i not in pruned], "the pruned layers": sorted(pruned)}
    refs = {n: json.loads((args.work / "ref" / f"{n}.json").read_text()) for n in ("original", f"lora-{seed}")}
    evaluate = Evaluator(sh("assets", "path", "model").strip(), args.items)
    evaluate.sets.pop("news")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, drop in groups.items():
            folder = Path(tmp) / str(len(rows))
            shutil.copytree(recovered, folder)
            save_file({k: torch.zeros_like(v) if "lora_B" in k and layer(k) in drop
                       else v for k, v in weights.items()}, folder / "adapter_model.safetensors")
            ppl = evaluate(str(folder))["gsm8k"]
            rows.append({"zeroed": name, "layers": drop, "gsm8k": ppl,
                         "gap_closed": gap(refs["original"]["gsm8k"], refs[f"lora-{seed}"]["gsm8k"], ppl)})
            print(rows[-1], flush=True)
    table = [f"Cell `{args.cell}`: its recovered adapter on the original with the LoRA B of some layers zeroed "
             f"(`python benchmarks/recovered_ablation.py --work DIR --cell {args.cell}`); GSM8K held-out, "
             f"{args.items} items; original {refs['original']['gsm8k']:.3f}, LoRA {refs[f'lora-{seed}']['gsm8k']:.3f}.",
             "", "| deltas zeroed | layers | GSM8K PPL | gap closed |", "|---|---|---|---|"]
    def span(ls: list[int]) -> str:
        return ", ".join(map(str, ls)) if len(ls) < 8 else f"{ls[0]}-{ls[-1]}"
    table += [f"| {r['zeroed']} | {span(r['layers'])} | {r['gsm8k']:.4f} | {100 * r['gap_closed']:.1f}% |" for r in rows]
    write("recovered_ablation", {"machine": machine(), "cell": args.cell, "items": args.items, "rows": rows}, table)


if __name__ == "__main__":
    main()
