"""The LoRAM effect on SmolLM2-135M, run with the CLI as a user would (method.md §8 points 1-2).

prune (taylor, 0.5) -> train LoRA on the pruned model -> recover -> evaluate on held-out GSM8K
(response-token perplexity), next to the original without fine-tuning, the pruned model with and
without its adapter ("train small, infer small") and LoRA trained directly on the original.
Usage: python benchmarks/loram_effect.py [--steps 30 --lr 3e-4 --limit 100 --ratio 0.5]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, write

LORAM = str(Path(sys.executable).parent / "loram")


def sh(*args: str) -> str:
    print("$ loram " + " ".join(args), flush=True)
    proc = subprocess.run([LORAM, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    base = sh("assets", "path", "model").strip()
    train = ["--data", "gsm8k-train", "--columns", "prompt=question,response=answer", "--steps", str(args.steps),
             "--lr", str(args.lr), "--batch", "4", "--seq-len", "256"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sh("publish", "prune", base, "--method", "taylor", "--ratio", str(args.ratio), "--out", str(t / "pruned"))
        sh("train", str(t / "pruned"), *train, "--out", str(t / "adapter"))
        sh("recover", str(t / "adapter"), "--out", str(t / "recovered"))
        sh("train", base, *train, "--out", str(t / "lora"))
        specs = [f"original (no fine-tuning)={base}", f"LoRAM (recovered adapter on the original)={base}+{t / 'recovered'}",
                 f"pruned + its adapter (infer small)={t / 'pruned'}+{t / 'adapter'}",
                 f"pruned, no fine-tuning={t / 'pruned'}", f"LoRA on the original (upper bound)={base}+{t / 'lora'}"]
        rows = json.loads(sh("eval", *specs, "--data", "gsm8k-heldout", "--limit", str(args.limit), "--json"))["results"]
        reports = {k: json.loads((t / k / "training_report.json").read_text()) for k in ("adapter", "lora")}
    for r in rows:
        r.pop("model"), r.pop("adapter")
    table = [f"# The LoRAM effect on SmolLM2-135M (Taylor pruning at {args.ratio}, {args.steps} LoRA steps, lr {args.lr})",
             "", f"Response-token perplexity on the first {args.limit} held-out GSM8K items.", "",
             "| variant | perplexity |", "|---|---|"]
    table += [f"| {r['name']} | {r['perplexity']:.3f} |" for r in rows]
    mib = 2**20
    table += ["", f"Training peak memory (process RSS, CPU): LoRAM {reports['adapter']['peak_memory_bytes'] / mib:,.0f} MiB "
              f"vs LoRA {reports['lora']['peak_memory_bytes'] / mib:,.0f} MiB; trainable parameters "
              f"{reports['adapter']['trainable_params']:,} vs {reports['lora']['trainable_params']:,}; wall time "
              f"{reports['adapter']['wall_time_s']:.0f} s vs {reports['lora']['wall_time_s']:.0f} s."]
    write("loram_effect", {"machine": machine(), "args": vars(args), "rows": rows,
                           "training": {k: {x: v[x] for x in ("peak_memory_bytes", "trainable_params", "wall_time_s",
                                                              "losses")} for k, v in reports.items()}}, table)


if __name__ == "__main__":
    main()
