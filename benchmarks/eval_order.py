"""Response-token perplexity batched longest first (what `loram eval` and `loram demo` do) against the rows in order.

The demo's evaluation sets when this was measured (the first 32 GSM8K held-out items and 16 news documents, 256
tokens, batch 4; the demo evaluates 50 news documents since) on the
original SmolLM2-135M, one model in one process, the two orders alternating (--repeats times each); reports
the padded positions, the median wall time of each order and their ratio, and both perplexities.

Usage: python benchmarks/eval_order.py [--repeats 3]
"""

import argparse
import math
import statistics
import time

from _common import machine, write


def in_order(model, data, collator, batch: int, progress: bool = False) -> tuple[float, int]:
    """`dataset_perplexity` as it was, the rows in the dataset's order: (perplexity, labelled tokens)."""
    from loram.perplexity import nll_sum

    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        b = collator([data[j] for j in range(i, min(i + batch, len(data)))])
        s, c = nll_sum(model, b["input_ids"], b["labels"], b["attention_mask"])
        total, count = total + s, count + c
    return math.exp(total / count), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from loram.evaluate import eval_set
    from loram.perplexity import dataset_perplexity
    from loram.sft_format import SFTCollator, tokenize_sft
    from loram.shared.assets import model_dir
    from loram.shared.pruned_model import load_tokenizer
    from loram.shared.runtime import configure_threads

    configure_threads()
    tokenizer = load_tokenizer(model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir())
    collator = SFTCollator.for_tokenizer(tokenizer)
    padded = [0]

    def counting(rows):  # every batch either order builds: its padded positions
        out = collator(rows)
        padded[0] += out["input_ids"].numel()
        return out

    data = {}
    for name, n in (("gsm8k-heldout", 32), ("news", 16)):
        records, columns = eval_set(name, n)
        data[name] = tokenize_sft(records, tokenizer, 256, columns)
    orders = {"in order": in_order, "longest first": dataset_perplexity}
    times = {order: [] for order in orders}
    ppl, padded_by_order = {}, {}
    for _ in range(args.repeats):
        for order, score in orders.items():
            padded[0], started = 0, time.perf_counter()
            for name, rows in data.items():
                ppl[(order, name)] = score(model, rows, counting, 4, progress=False)[0]
            times[order].append(time.perf_counter() - started)
            padded_by_order[order] = padded[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"machine": machine(), "repeats": args.repeats, "seconds": times, "positions": padded_by_order,
              "perplexity": {f"{o} / {n}": v for (o, n), v in ppl.items()},
              "ratio": round(med["longest first"] / med["in order"], 3)}
    table = ["# Evaluation batched longest first vs in order (SmolLM2-135M original, CPU)", "",
             "The demo's sets when measured: 32 GSM8K held-out items and 16 news documents (50 since), 256 tokens, batch 4; median of "
             f"{args.repeats} alternating passes in one process.", "",
             "| order | padded positions | wall time (s) | GSM8K PPL | news PPL |", "|---|---|---|---|---|"]
    for order in times:
        table.append(f"| {order} | {padded_by_order[order]:,} | {med[order]:.1f} | "
                     f"{ppl[(order, 'gsm8k-heldout')]:.4f} | {ppl[(order, 'news')]:.4f} |")
    table += ["", f"Longest first takes **{result['ratio']:.2f}x** the time of the rows in order."]
    write("eval_order", result, table)


if __name__ == "__main__":
    main()
