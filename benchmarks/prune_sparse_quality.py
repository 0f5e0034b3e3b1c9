"""Quality of non-structured pruning on SmolLM2-135M: held-out Wikipedia perplexity per method.

Runs `loram publish prune` as a user would (every layer, seven projections) with magnitude, Wanda
and SparseGPT at 50% unstructured and at 2:4, calibration 32 x 256 tokens of the Wikipedia split
(the reference setting of docs/method.md §9), then measures perplexity on 80 windows of 256 tokens of the
held-out split, no fine-tuning.
Usage: python benchmarks/prune_sparse_quality.py [--samples 32 --seq-len 256 --windows 80]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write
from transformers import AutoModelForCausalLM, AutoTokenizer

from loram.perplexity import perplexity, text_windows
from loram.shared import assets

LORAM = str(Path(sys.executable).parent / "loram")
# docs/method.md §9: reference implementations, PPL relative to the dense model
REFERENCE = {("magnitude", "50%"): 16.0, ("wanda", "50%"): 2.2, ("sparsegpt", "50%"): 2.0,
             ("wanda", "2:4"): 7.3, ("sparsegpt", "2:4"): 3.8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=80)
    args = ap.parse_args()
    base = assets.model_dir()
    windows = text_windows(AutoTokenizer.from_pretrained(base), assets.read_texts("wiki-heldout"), 256, args.windows)

    def ppl(path) -> float:
        return round(perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), windows,
                                progress=False), 2)

    dense = ppl(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting, flag in (("50%", ["--sparsity", "0.5"]), ("2:4", ["--nm", "2:4"])):
            for method in ("magnitude", "wanda", "sparsegpt"):
                out = Path(tmp) / f"{method}-{setting.replace(':', '-').replace('%', '')}"
                cmd = [LORAM, "publish", "prune", str(base), "--method", method, *flag,
                       "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
                started = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-2000:])
                seconds = round(time.perf_counter() - started, 1)
                nonzero = next(line for line in proc.stdout.splitlines() if "non-zero" in line)
                value = ppl(out)
                rows.append({"method": method, "setting": setting, "ppl": value, "relative": round(value / dense, 2),
                             "reference_relative": REFERENCE.get((method, setting)), "prune_seconds": seconds,
                             "nonzero_params": int(nonzero.split("non-zero ")[1].split()[0].replace(",", ""))})
                print(rows[-1], flush=True)
    table = [f"# Non-structured pruning quality, SmolLM2-135M, every layer, calibration {args.samples} x "
             f"{args.seq_len} Wikipedia tokens", "",
             f"Held-out Wikipedia perplexity ({args.windows} x 256 tokens), no fine-tuning; dense model {dense}. "
             "Reference: docs/method.md §9 (public reference implementations, same data). Command per row: "
             f"`loram publish prune $(loram assets path model) --method M (--sparsity 0.5 | --nm 2:4) --samples "
             f"{args.samples} --seq-len {args.seq_len} --out DIR`.", "",
             "| method | setting | non-zero parameters | perplexity | relative to dense | reference | prune time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"about {r['reference_relative']}x" if r["reference_relative"] else "-"
        table.append(f"| {r['method']} | {r['setting']} | {r['nonzero_params']:,} | {r['ppl']} | {r['relative']}x | "
                     f"{ref} | {r['prune_seconds']} |")
    write("prune_sparse_quality", {"machine": machine(), "dense_ppl": dense, "samples": args.samples,
                                   "seq_len": args.seq_len, "windows": args.windows, "rows": rows}, table)


if __name__ == "__main__":
    main()
