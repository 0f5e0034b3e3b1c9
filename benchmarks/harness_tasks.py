"""lm-evaluation-harness tasks on SmolLM2-135M: original / LoRAM / full LoRA, offline, with 95% intervals.

    python benchmarks/harness_tasks.py --work /tmp/loram-alignment-grid            # reuses alignment_grid cells
    python benchmarks/harness_tasks.py --mc-items 100 --gsm8k-items 16

Two parts, each with the project's own code:
1. Agreement: LoRAM's earlier hand-written GSM8K accuracy (greedy generation from the chat template, the
   number after `####` else the last number, compared exactly; re-implemented below as the reference) against
   lm-eval's run of the shipped `gsm8k_chat` task, on the same first N gsm8k-heldout items, item by item.
2. Scores: `gsm8k_cot` (8-shot chain of thought), `gsm8k_chat` and the BIG-bench multiple-choice sets for
   the original, LoRAM (the original + the adapter trained on the default-aligned Taylor 0.5 model and
   recovered) and LoRA trained on the original, the demo's recipe (alignment_grid's cells, made if missing).

Writes benchmarks/results/harness_tasks.{md,json}.
"""

import argparse
import json
import time
from pathlib import Path

from _common import machine, write

MC_TASKS = ("elementary_math_qa", "strategyqa", "social_iqa")
GEN_TASKS = ("gsm8k_cot", "gsm8k_chat")


def reference_gsm8k(model, tokenizer, items: list[dict], max_new_tokens: int = 256) -> list[int]:
    """1/0 per item: greedy reply to the question as the chat template's user turn, answer compared exactly
    (the earlier consumer/gsm8k.py loop; the answer extraction is the one function both use)."""
    import torch

    from loram.harness import gsm8k_answer as _answer

    hits = []
    for item in items:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        got = _answer(reply)
        hits.append(int(got is not None and got == _answer(item["answer"])))
    return hits


def models(work: Path, base: str) -> dict[str, tuple[str, str | None]]:
    """name -> (model, adapter): the original, LoRAM (default alignment, seed 0) and LoRA (seed 0)."""
    import alignment_grid as grid

    evaluate = grid.Evaluator(base, 100)
    grid.run_cell(work, f"taylor50/{grid.DEFAULT}/{grid.DEMO_STEPS}/0", base, evaluate)
    grid.references(work, base, {0}, evaluate)
    cell = f"taylor50_{grid.DEFAULT}_{grid.DEMO_STEPS}_0"
    return {"original": (base, None), "LoRAM": (base, str(work / "cells" / cell / "recovered")),
            "LoRA": (base, str(work / "ref" / "lora-0"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/loram-alignment-grid"))
    ap.add_argument("--mc-items", type=int, default=100, help="items per multiple-choice task")
    ap.add_argument("--gsm8k-items", type=int, default=16, help="items per GSM8K task (generation is slow on CPUs)")
    args = ap.parse_args()
    from loram import harness
    from loram.evaluate import load_spec
    from loram.shared import assets
    from loram.shared.runtime import configure_threads

    base = str(assets.model_dir())
    chosen = models(args.work, base)
    configure_threads()
    started = time.perf_counter()

    # 1. agreement on the same items (the original model)
    model, tok = load_spec(base, None, False)
    items = assets.read_records("gsm8k-heldout")[:args.gsm8k_items]
    t0 = time.perf_counter()
    reference = reference_gsm8k(model, tok, items)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = harness.run_tasks(model, tok, ["gsm8k_chat"], limit=args.gsm8k_items, batch=1, log_samples=True)
    t_lm = time.perf_counter() - t0
    by_doc = sorted(got["samples"]["gsm8k_chat"], key=lambda s: s["doc_id"])
    lm_hits = [int(s["exact_match"]) for s in by_doc]
    agreement = {"items": len(items), "reference_accuracy": sum(reference) / len(items),
                 "lm_eval_accuracy": got["results"]["gsm8k_chat"]["exact_match"],
                 "items_that_differ": [i for i, (a, b) in enumerate(zip(reference, lm_hits, strict=True)) if a != b],
                 "reference_s": round(t_ref, 1), "lm_eval_s": round(t_lm, 1)}
    print(json.dumps(agreement), flush=True)
    del model

    # 2. scores per model
    scores = {}
    for name, (model_id, adapter) in chosen.items():
        model, tok = load_spec(model_id, adapter, False)
        mc = harness.run_tasks(model, tok, list(MC_TASKS), limit=args.mc_items, batch=8)
        gen = harness.run_tasks(model, tok, list(GEN_TASKS), limit=args.gsm8k_items, batch=4)
        results = {**mc["results"], **gen["results"]}
        scores[name] = {"results": results, "n": {**mc["n"], **gen["n"]},
                        "headline": {k: list(v) for k, v in harness.headline(results).items()}}
        print(name, json.dumps(scores[name]["headline"]), flush=True)
        del model

    columns = list(next(iter(scores.values()))["headline"])
    lines = ["# lm-evaluation-harness tasks on SmolLM2-135M (offline)", "",
             f"`python benchmarks/harness_tasks.py --mc-items {args.mc_items} --gsm8k-items {args.gsm8k_items}` "
             f"({time.perf_counter() - started:.0f} s). Value ± 95% confidence half-width (1.96 x lm-eval's "
             "standard error). LoRAM: the original + the recovered adapter trained on the default-aligned Taylor "
             "0.5 model; LoRA: trained on the original; both the demo's recipe (15 steps, nf4), seed 0.", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(harness.format_score(*s["headline"][c]) for c in columns) + " |")
    n = next(iter(scores.values()))["n"]
    lines += ["", "Items per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) + ". Chance: strategyqa 0.5, "
              "social_iqa 0.33, elementary_math_qa 0.2 (5 choices).", "",
              "## lm-eval's gsm8k_chat against the earlier hand-written GSM8K accuracy", "",
              f"Same {agreement['items']} gsm8k-heldout items, the original model: hand-written "
              f"{agreement['reference_accuracy']:.3f} ({agreement['reference_s']:.0f} s), lm-eval "
              f"{agreement['lm_eval_accuracy']:.3f} ({agreement['lm_eval_s']:.0f} s); items scored differently: "
              f"{agreement['items_that_differ'] or 'none'}."]
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "agreement": agreement,
               "scores": scores}
    write("harness_tasks", payload, lines)


if __name__ == "__main__":
    main()
