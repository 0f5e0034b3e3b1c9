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
GEN_TASKS = ("gsm8k_cot",)  # gsm8k_chat: part 1


def reference_gsm8k(model, tokenizer, items: list[dict], max_new_tokens: int) -> list[str]:
    """The greedy reply to each question as the chat template's user turn (the earlier consumer/gsm8k.py loop)."""
    import torch

    replies = []
    for item in items:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def agreement(model, tok, items: list[dict], max_new_tokens: int) -> dict:
    """The reference loop and lm-eval's gsm8k_chat on the same items: replies, extracted answers, scores."""
    from loram import harness

    t0 = time.perf_counter()
    ref = reference_gsm8k(model, tok, items, max_new_tokens)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = harness.run_tasks(model, tok, ["gsm8k_chat"], limit=len(items), batch=1, max_new_tokens=max_new_tokens,
                            log_samples=True)
    t_lm = time.perf_counter() - t0
    lm = [s["resps"][0][0] for s in sorted(got["samples"]["gsm8k_chat"], key=lambda s: s["doc_id"])]
    gold = [harness.gsm8k_answer(it["answer"]) for it in items]
    ref_answers, lm_answers = [harness.gsm8k_answer(r) for r in ref], [harness.gsm8k_answer(r) for r in lm]
    ref_acc = sum(a is not None and a == g for a, g in zip(ref_answers, gold, strict=True)) / len(items)
    return {"items": len(items), "max_new_tokens": max_new_tokens,
            "identical_replies": sum(a.strip() == b.strip() for a, b in zip(ref, lm, strict=True)),
            "same_answer": sum(a == b for a, b in zip(ref_answers, lm_answers, strict=True)),
            "answers": [[a, b, g] for a, b, g in zip(ref_answers, lm_answers, gold, strict=True)],
            "reference_accuracy": ref_acc, "lm_eval_accuracy": got["results"]["gsm8k_chat"]["exact_match"],
            "reference_s": round(t_ref, 1), "lm_eval_s": round(t_lm, 1)}


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
    ap.add_argument("--gsm8k-items", type=int, default=12, help="items per GSM8K task (generation is slow on CPUs)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="generation length of the GSM8K tasks")
    args = ap.parse_args()
    from loram import harness
    from loram.evaluate import load_spec
    from loram.shared import assets
    from loram.shared.runtime import configure_threads

    base = str(assets.model_dir())
    chosen = models(args.work, base)
    configure_threads()
    started = time.perf_counter()

    # 1. agreement on the same items (LoRA on the original: the model most likely to answer some correctly)
    model, tok = load_spec(*chosen["LoRA"], False)
    agree = agreement(model, tok, assets.read_records("gsm8k-heldout")[:args.gsm8k_items], args.max_new_tokens)
    print(json.dumps({k: v for k, v in agree.items() if k != "answers"}), flush=True)
    del model

    # 2. scores per model
    scores = {}
    for name, (model_id, adapter) in chosen.items():
        model, tok = load_spec(model_id, adapter, False)
        mc = harness.run_tasks(model, tok, list(MC_TASKS), limit=args.mc_items, batch=8)
        gen = harness.run_tasks(model, tok, list(GEN_TASKS), limit=args.gsm8k_items, batch=4,
                                max_new_tokens=args.max_new_tokens)
        results = {**mc["results"], **gen["results"]}
        scores[name] = {"results": results, "n": {**mc["n"], **gen["n"]},
                        "headline": {k: list(v) for k, v in harness.headline(results).items()}}
        print(name, json.dumps(scores[name]["headline"]), flush=True)
        del model

    columns = list(next(iter(scores.values()))["headline"])
    lines = ["# lm-evaluation-harness tasks on SmolLM2-135M (offline)", "",
             f"`python benchmarks/harness_tasks.py --mc-items {args.mc_items} --gsm8k-items {args.gsm8k_items} "
             f"--max-new-tokens {args.max_new_tokens}` "
             f"({time.perf_counter() - started:.0f} s). Value ± 95% confidence half-width (1.96 x lm-eval's "
             "standard error). LoRAM: the original + the recovered adapter trained on the Taylor 0.5 model aligned "
             "with the default objective; LoRA: trained on the original; both the demo's recipe (15 steps, nf4), seed 0.", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(harness.format_score(*s["headline"][c]) for c in columns) + " |")
    n = next(iter(scores.values()))["n"]
    lines += ["", "Items per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) + ". Chance: strategyqa 0.5, "
              "social_iqa 0.33, elementary_math_qa 0.2 (5 choices).", "",
              "## lm-eval's gsm8k_chat against the earlier hand-written GSM8K accuracy", "",
              f"Same {agree['items']} gsm8k-heldout items, LoRA on the original, greedy, {agree['max_new_tokens']} "
              f"new tokens: identical replies on {agree['identical_replies']} of {agree['items']} items, the same "
              f"extracted answer on {agree['same_answer']}; accuracy hand-written {agree['reference_accuracy']:.3f} "
              f"({agree['reference_s']:.0f} s), lm-eval {agree['lm_eval_accuracy']:.3f} ({agree['lm_eval_s']:.0f} s).",
              "", "| item | hand-written answer | lm-eval answer | gold |", "|---|---|---|---|"]
    lines += [f"| {i} | {a} | {b} | {g} |" for i, (a, b, g) in enumerate(agree["answers"])]
    payload = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "agreement": agree,
               "scores": scores}
    write("harness_tasks", payload, lines)


if __name__ == "__main__":
    main()
