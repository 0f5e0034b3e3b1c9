"""Quality of structured pruning on SmolLM2-135M: held-out Wikipedia perplexity per criterion.

Runs `loram publish prune` as a user would (ratio 0.5, the paper's layer range [4, 28)), then
measures perplexity on 80 windows of 256 tokens of the held-out Wikipedia split, no fine-tuning.
    python benchmarks/prune_quality.py [--ratio 0.5] [--seeds 0 1 2]     criteria (prune_quality.md)
    python benchmarks/prune_quality.py --variants [--budgets 10x64 32x128]
        Taylor scorings side by side at equal calibration (taylor_variants.py; prune_quality_variants.md)
    python benchmarks/prune_quality.py --sweep [--budgets 10x64 32x128 64x256 128x256]
        `loram publish prune --method taylor` per calibration size, each in a fresh process: perplexity,
        wall time and peak RSS (prune_quality_calibration.md)
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import machine, run_measured, write
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
    ap.add_argument("--variants", action="store_true", help="Taylor scorings side by side")
    ap.add_argument("--sweep", action="store_true", help="Taylor against calibration size")
    ap.add_argument("--budgets", nargs="+", help="calibration budgets SAMPLESxSEQ_LEN")
    args = ap.parse_args()
    base = assets.model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    windows = text_windows(tok, assets.read_texts("wiki-heldout"), 256, args.windows)

    def ppl(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return round(perplexity(model, windows, progress=False), 2)

    if args.variants:
        return variants(base, tok, windows, _budgets(args.budgets or ["10x64", "32x128"]))
    if args.sweep:
        return sweep(base, windows, ppl, _budgets(args.budgets or ["10x64", "32x128", "64x256", "128x256"]))

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


# LLM-Pruner (block-wise Taylor, param_first, same kept counts) on the project's held-out split, relative to
# dense (docs/method.md §9)
REFERENCE = {"10 x 64": 6.2, "32 x 128": 5.5}


def _reference(calibration: str) -> str:
    return f"{REFERENCE[calibration]}x" if calibration in REFERENCE else "-"


def _budgets(texts: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in t.lower().split("x")) for t in texts]


def variants(base, tok, windows, budgets) -> None:
    import taylor_variants

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dense = perplexity(model, windows, progress=False)
    rows = taylor_variants.run(model, tok, windows, dense, budgets, log=lambda r: print(r, flush=True))
    table = ["# Taylor scorings side by side, SmolLM2-135M, ratio 0.5, layers [4, 28)", "",
             f"Held-out Wikipedia perplexity ({len(windows)} x 256 tokens; dense {dense:.2f}), calibration from the "
             "Wikipedia split; one gradient per budget, every scoring from it. KV groups kept: the same as "
             "LLM-Pruner's 32 x 128 run in how many of the 24 layers. MLP overlap: share of kept channels also "
             "kept by the default. `python benchmarks/prune_quality.py --variants`", "",
             "| calibration | scoring | perplexity | relative to dense | LLM-Pruner at this budget | KV groups as "
             "LLM-Pruner | MLP overlap with the default |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['calibration']} | {r['scoring']} | {r['ppl']} | {r['relative']}x | "
              f"{_reference(r['calibration'])} | "
              f"{'-' if r['kv_same_as_reference'] is None else str(r['kv_same_as_reference']) + '/24'} | "
              f"{r['mlp_overlap_with_default']:.1%} |" for r in rows]
    table += ["", "Kept KV groups per layer (4..27), per scoring:", ""]
    table += [f"- {r['calibration']}, {r['scoring']}: `{r['kept_kv']}`" for r in rows if r["kept_kv"]]
    table += [f"- LLM-Pruner, 32 x 128: `{' '.join(taylor_variants.REFERENCE_KEPT)}`"]
    write("prune_quality_variants", {"machine": machine(), "dense_ppl": dense, "rows": rows}, table)


PRUNE_SNIPPET = """
import time
from loram.publisher.prune import prune
start = time.perf_counter()
prune(base='{base}', out='{out}', method='taylor', ratio=0.5, samples={samples}, seq_len={seq_len})
result = dict(seconds=round(time.perf_counter() - start, 2))
"""


def sweep(base, windows, ppl, budgets) -> None:
    rows = []
    dense = ppl(base)
    with tempfile.TemporaryDirectory() as tmp:
        for samples, seq_len in budgets:
            out = Path(tmp) / f"taylor-{samples}x{seq_len}"
            measured = run_measured(PRUNE_SNIPPET.format(base=base, out=out, samples=samples, seq_len=seq_len))
            rows.append({"calibration": f"{samples} x {seq_len}", "tokens": samples * seq_len,
                         "seconds": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"], "ppl": ppl(out)})
            rows[-1]["relative"] = round(rows[-1]["ppl"] / dense, 2)
            print(rows[-1], flush=True)
    table = ["# Taylor pruning against calibration size, SmolLM2-135M, ratio 0.5, layers [4, 28)", "",
             f"`loram publish prune --method taylor --samples N --seq-len T` (default --query-fold strided), each in "
             f"a fresh process on the CPU; held-out Wikipedia perplexity ({len(windows)} x 256 tokens; dense "
             f"{dense:.2f}). `python benchmarks/prune_quality.py --sweep`", "",
             "| calibration | tokens | perplexity | relative to dense | LLM-Pruner at this budget | prune wall (s) | "
             "peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['calibration']} | {r['tokens']:,} | {r['ppl']} | {r['relative']}x | "
              f"{_reference(r['calibration'])} | {r['seconds']} | {r['peak_rss_mib']} |" for r in rows]
    write("prune_quality_calibration", {"machine": machine(), "dense_ppl": dense, "rows": rows}, table)


if __name__ == "__main__":
    main()
