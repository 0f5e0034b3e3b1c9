"""Quality of structured pruning on SmolLM2-135M: held-out Wikipedia perplexity per criterion.

Runs `loram publish prune` as a user would (ratio 0.5, the paper's layer range [4, 28)), then
measures perplexity on 80 windows of 256 tokens of the held-out Wikipedia split, no fine-tuning.
Usage: python benchmarks/prune_quality.py [--ratio 0.5] [--seeds 0 1 2]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import machine, write
from transformers import AutoModelForCausalLM, AutoTokenizer

import loram
from loram.perplexity import perplexity, text_windows
from loram.shared import assets

loram.register()  # pruned checkpoints load with the Auto classes

LORAM = str(Path(sys.executable).parent / "loram")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--windows", type=int, default=80)
    args = ap.parse_args()
    base = assets.model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    windows = text_windows(tok, assets.read_texts("wiki-heldout"), 256, args.windows)

    def ppl(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return round(perplexity(model, windows, progress=False), 2)

    runs = [("taylor", 0), ("l2", 0), ("l1", 0)] + [("random", s) for s in args.seeds]
    rows = [{"method": "dense", "seed": "-", "params": 134_515_008, "ppl": ppl(base)}]
    with tempfile.TemporaryDirectory() as tmp:
        for method, seed in runs:
            out = Path(tmp) / f"{method}-{seed}"
            cmd = [LORAM, "publish", "prune", str(base), "--method", method, "--ratio", str(args.ratio),
                   "--seed", str(seed), "--out", str(out)]
            subprocess.run(cmd, check=True, capture_output=True)
            model = AutoModelForCausalLM.from_pretrained(out)
            rows.append({"method": method, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
                         "ppl": ppl(out)})
            print(rows[-1], flush=True)
    dense = rows[0]["ppl"]
    for r in rows:
        r["relative"] = round(r["ppl"] / dense, 2)
    table = [f"# Structured pruning quality, SmolLM2-135M, ratio {args.ratio}, layers [4, 28)", "",
             f"Held-out Wikipedia perplexity ({args.windows} x 256 tokens), no fine-tuning. Command per row: "
             f"`loram publish prune $(loram assets path model) --method M --ratio {args.ratio} --seed S --out DIR`.",
             "", "| method | seed | parameters | perplexity | relative to dense |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['seed']} | {r['params']:,} | {r['ppl']} | {r['relative']}x |" for r in rows]
    write("prune_quality", {"machine": machine(), "ratio": args.ratio, "rows": rows}, table)


if __name__ == "__main__":
    main()
