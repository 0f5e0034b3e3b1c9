"""The LoRAM effect on SmolLM2-135M, run with the CLI as a user would (docs/method.md §8 points 1-3).

prune (taylor, 0.5) -> train LoRA on the pruned model -> recover -> evaluate on held-out GSM8K
(response-token perplexity), next to the original without fine-tuning, the pruned model with and
without its adapter ("train small, infer small") and LoRA trained directly on the original.

With `--aligned`, the pruned model is also aligned (`loram publish align` on the Wikipedia split) and
the same LoRA recipe runs on the aligned model, so the table compares LoRAM with and without
alignment (point 3); held-out Wikipedia perplexity (80 x 256 tokens, as benchmarks/prune_quality.py)
of the pruned and aligned models is measured too. Results: results/loram_effect.* without alignment,
results/align_loram_effect.* with it.
Usage: python benchmarks/loram_effect.py [--steps 30 --lr 3e-4 --limit 100 --ratio 0.5]
       python benchmarks/loram_effect.py --aligned [--align-steps 200 ...] [--pruned DIR] [--aligned-from DIR]
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


def wiki_perplexity(models: dict[str, str], windows: int = 80) -> dict[str, float]:
    """Held-out Wikipedia perplexity over `windows` x 256 tokens (the protocol of prune_quality.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loram

    loram.register()
    from loram.perplexity import perplexity, text_windows
    from loram.shared import assets
    from loram.shared.runtime import configure_threads

    configure_threads()
    tokens = text_windows(AutoTokenizer.from_pretrained(assets.model_dir()), assets.read_texts("wiki-heldout"),
                          256, windows)
    return {name: round(perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokens,
                                   progress=False), 2) for name, path in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--pruned", help="reuse this pruned checkpoint (made with --method taylor --ratio RATIO)")
    ap.add_argument("--no-full-lora", action="store_true", help="skip LoRA on the original (the upper bound)")
    ap.add_argument("--aligned", action="store_true", help="also align the pruned model and compare")
    ap.add_argument("--aligned-from", help="with --aligned: reuse this aligned checkpoint of --pruned")
    ap.add_argument("--align-steps", type=int, default=200)
    ap.add_argument("--align-seq-len", type=int, default=256)
    ap.add_argument("--align-batch", type=int, default=2)
    ap.add_argument("--align-lr", type=float, default=1e-4)
    ap.add_argument("--align-warmup", type=int, default=10)
    ap.add_argument("--align-distill", default="none",
                    help="--distill-from of the alignment: none (the paper's LM loss, as results/align_loram_effect.* "
                         "was measured) or base (align's default, hidden-state distillation)")
    args = ap.parse_args()
    base = sh("assets", "path", "model").strip()
    train = ["--data", "gsm8k-train", "--columns", "prompt=question,response=answer", "--steps", str(args.steps),
             "--lr", str(args.lr), "--batch", "4", "--seq-len", "256"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pruned = args.pruned or str(t / "pruned")
        if not args.pruned:
            sh("publish", "prune", base, "--method", "taylor", "--ratio", str(args.ratio), "--out", pruned)
        small = {"": pruned}
        if args.aligned:
            small["-aligned"] = args.aligned_from or str(t / "aligned")
            if not args.aligned_from:
                sh("publish", "align", pruned, "--data", "wiki", "--steps", str(args.align_steps),
                   "--seq-len", str(args.align_seq_len), "--batch", str(args.align_batch), "--lr", str(args.align_lr),
                   "--warmup", str(args.align_warmup), "--save-every", str(args.align_steps), "--distill-from",
               args.align_distill, "--out", small["-aligned"])
        for tag, model in small.items():
            sh("train", model, *train, "--out", str(t / f"adapter{tag}"))
            sh("recover", str(t / f"adapter{tag}"), "--out", str(t / f"recovered{tag}"))
        specs = [f"original (no fine-tuning)={base}",
                 f"LoRAM (recovered adapter on the original)={base}+{t / 'recovered'}"]
        if args.aligned:
            specs.append(f"LoRAM, aligned (recovered adapter on the original)={base}+{t / 'recovered-aligned'}")
        specs += [f"pruned + its adapter (infer small)={pruned}+{t / 'adapter'}", f"pruned, no fine-tuning={pruned}"]
        if args.aligned:
            specs += [f"aligned + its adapter (infer small)={small['-aligned']}+{t / 'adapter-aligned'}",
                      f"aligned, no fine-tuning={small['-aligned']}"]
        if not args.no_full_lora:
            sh("train", base, *train, "--out", str(t / "lora"))
            specs.append(f"LoRA on the original (upper bound)={base}+{t / 'lora'}")
        rows = json.loads(sh("eval", *specs, "--data", "gsm8k-heldout", "--limit", str(args.limit), "--json"))["results"]
        reports = {k: json.loads((t / k / "training_report.json").read_text())
                   for k in ("adapter", "adapter-aligned", "lora") if (t / k / "training_report.json").exists()}
        wiki, alignment = {}, None
        if args.aligned:
            wiki = wiki_perplexity({"original": base, "pruned": pruned, "aligned": small["-aligned"]})
            alignment = json.loads((Path(small["-aligned"]) / "loram_manifest.json").read_text())["alignment"][-1]
    for r in rows:
        r.pop("model"), r.pop("adapter")
    title = "The LoRAM effect" + (" with and without alignment" if args.aligned else "")
    table = [f"# {title} on SmolLM2-135M (Taylor pruning at {args.ratio}, {args.steps} LoRA steps, lr {args.lr})",
             "", f"Response-token perplexity on the first {args.limit} held-out GSM8K items.", "",
             "| variant | perplexity |", "|---|---|"]
    table += [f"| {r['name']} | {r['perplexity']:.3f} |" for r in rows]
    mib = 2**20
    if "lora" in reports:
        table += ["", f"Training peak memory (process RSS, CPU): LoRAM {reports['adapter']['peak_memory_bytes'] / mib:,.0f} "
                  f"MiB vs LoRA {reports['lora']['peak_memory_bytes'] / mib:,.0f} MiB; trainable parameters "
                  f"{reports['adapter']['trainable_params']:,} vs {reports['lora']['trainable_params']:,}; wall time "
                  f"{reports['adapter']['wall_time_s']:.0f} s vs {reports['lora']['wall_time_s']:.0f} s."]
    if args.aligned:
        a = alignment
        table += ["", f"Alignment: {a['steps']} steps of {a['global_batch']} x {a['seq_len']} tokens ({a['tokens']:,} "
                  f"tokens) of {', '.join(d['source'] for d in a['data'])}, lr {a['lr']}, warm-up {a['warmup']}, "
                  f"cosine, lm_head (tied: the embeddings) {a['lm_head']}.", "",
                  "Held-out Wikipedia perplexity (80 x 256 tokens): " +
                  ", ".join(f"{k} {v}" for k, v in wiki.items()) + "."]
    table += ["", "Made by `python benchmarks/loram_effect.py " + " ".join(sys.argv[1:]) + "`."]
    data = {"machine": machine(), "args": vars(args), "rows": rows, "wiki_heldout_perplexity": wiki,
            "alignment": alignment, "training": {k: {x: v[x] for x in ("peak_memory_bytes", "trainable_params",
                                                                       "wall_time_s", "losses")}
                                                 for k, v in reports.items()}}
    write("align_loram_effect" if args.aligned else "loram_effect", data, table)


if __name__ == "__main__":
    main()
