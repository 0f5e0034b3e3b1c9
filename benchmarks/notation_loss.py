"""Where the GSM8K gap is: response-token loss on GSM8K's notation and on everything else.

GSM8K's answers carry a notation of the dataset's own: calculator annotations (`48/2 = <<48/2=24>>24`) and a final
`#### 72` line. A LoRA fine-tuned on GSM8K learns it within a few steps, and the grid's metric (response-token
perplexity on held-out items) scores every token of it. This splits the metric: for the original, LoRA on the
original and LoRAM adapters of the alignment grid, the summed next-token loss (NLL) over the labelled tokens of the
first 100 `gsm8k-heldout` items, on the tokens that overlap the notation and on the rest, and the share of the
original -> LoRA difference each adapter closes on each. NLL sums add up, so the shares are exact in log-perplexity
(the grid's gap closed is in perplexity: close, not equal).

The items are tokenized exactly as the grid's evaluation does (`tokenize_sft`, 256 tokens); a token is notation when
its text overlaps a `<<...>>` annotation or the `####` line of the decoded response. The perplexity each row reports
is the grid's figure again (a check that the same tokens are scored).

    python benchmarks/notation_loss.py --work /tmp/loram-alignment-grid [--cells MODEL/OBJECTIVE/STEPS/SEED ...]

Needs the grid's --work folder (the cells' recovered adapters); LoRA on the original is trained once under
--work/notation (the grid's recipe, seed 0) when missing.
"""

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

from _common import machine, write

NOTATION = re.compile(r"<<[^<>]*>>|####[^\n]*")
CELLS = ["taylor50/hidden-mse-pruned-wikichat+demo-math-batch1/80/0", "taylor50/oracle-gsm8k/40/0",
         "taylor50/gradmatch-oracle-gsm8k/40/0", "taylor50/gradmatch-oracle-gsm8k-plain/40/0"]
ITEMS = 100


def token_kinds(tokenizer, ids: list[int]) -> list[bool]:
    """For the response tokens `ids`: True where a token's text overlaps GSM8K's notation."""
    ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]
    spans = [m.span() for m in NOTATION.finditer(tokenizer.decode(ids))]
    starts = [0, *ends[:-1]]
    return [any(s < b and a < e for s, e in spans) for a, b in zip(starts, ends, strict=True)]


def labelled(tokenizer, data) -> list[tuple[list[int], list[int], list[bool]]]:
    """Per row of `data`: its input ids, its labelled positions, and which of those are notation (`token_kinds`)."""
    from loram.perplexity import IGNORE

    out = []
    for row in data:
        ids, labels = row["input_ids"], row["labels"]
        positions = [p for p in range(1, len(ids)) if labels[p] != IGNORE]
        out.append((ids, positions, token_kinds(tokenizer, [ids[p] for p in positions])))
    return out


def split_nll(model, rows) -> dict:
    """Summed NLL and token counts over the labelled positions of `rows` (`labelled`), notation and the rest."""
    import torch

    out = {"notation": [0.0, 0], "rest": [0.0, 0]}
    model.eval()
    with torch.no_grad():
        for ids, positions, kinds in rows:
            logits = model(torch.tensor([ids])).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[[p - 1 for p in positions]],
                                                    torch.tensor([ids[p] for p in positions]), reduction="none")
            for value, notation in zip(nll.tolist(), kinds, strict=True):
                entry = out["notation" if notation else "rest"]
                entry[0] += value
                entry[1] += 1
    return {k: {"nll": round(v[0], 3), "tokens": v[1]} for k, v in out.items()}


def lora_on_original(work: Path, base: str) -> Path:
    """The grid's LoRA on the original (seed 0), trained once under work/notation."""
    from alignment_grid import train_args

    out = work / "notation" / "lora-0"
    if not (out / "adapter_model.safetensors").is_file():
        loram = Path(sys.executable).parent / "loram"
        subprocess.run([loram, "train", base, *train_args(0), "--out", out], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loram-alignment-grid"))
    ap.add_argument("--cells", nargs="*", default=CELLS)
    args = ap.parse_args()

    from alignment_grid import folder_name

    from loram.evaluate import eval_set, load_spec
    from loram.sft_format import tokenize_sft
    from loram.shared.assets import model_dir
    from loram.shared.pruned_model import load_tokenizer
    from loram.shared.runtime import configure_threads

    configure_threads()
    base = str(model_dir())
    records, columns = eval_set("gsm8k-heldout", ITEMS)
    models = {"original": None, "LoRA on the original (seed 0)": lora_on_original(args.work, base)}
    for cell in args.cells:
        adapter = args.work / "cells" / folder_name(cell) / "recovered"
        if not (adapter / "adapter_model.safetensors").is_file():
            raise SystemExit(f"{cell}: no recovered adapter under {adapter}; run alignment_grid.py --cells {cell}")
        models[cell] = adapter
    tokenizer = load_tokenizer(base)  # every model here is the original's, with or without an adapter
    scored = labelled(tokenizer, tokenize_sft(records, tokenizer, 256, columns))  # tokenized and classified once
    rows = []
    for name, adapter in models.items():
        model, _ = load_spec(base, str(adapter) if adapter else None, False)
        split = split_nll(model, scored)
        total = sum(v["nll"] for v in split.values()), sum(v["tokens"] for v in split.values())
        rows.append({"model": name, **split, "perplexity": round(math.exp(total[0] / total[1]), 4)})
        print(rows[-1], flush=True)
    original, lora = rows[0], rows[1]
    for row in rows:
        for kind in ("notation", "rest"):
            gap = original[kind]["nll"] - lora[kind]["nll"]
            row[kind]["gap_closed"] = round((original[kind]["nll"] - row[kind]["nll"]) / gap, 4)
    lora_gain = {k: original[k]["nll"] - lora[k]["nll"] for k in ("notation", "rest")}
    share = lora_gain["notation"] / sum(lora_gain.values())
    table = ["# Where the GSM8K gap is: GSM8K's notation against the rest of the response", "",
             f"Summed next-token loss over the labelled tokens of the first {ITEMS} `gsm8k-heldout` items "
             f"({original['notation']['tokens']:,} notation tokens: `<<...>>` annotations and the `####` line; "
             f"{original['rest']['tokens']:,} others). LoRA on the original lowers it by "
             f"{sum(lora_gain.values()):,.0f} nats, **{share:.0%} of them on the notation** "
             f"({original['notation']['tokens'] / (original['notation']['tokens'] + original['rest']['tokens']):.0%} "
             "of the tokens). Gap closed per kind = (original - model) / (original - LoRA on the original), "
             "in summed NLL. `python benchmarks/notation_loss.py --work DIR`", "",
             "| model | perplexity | NLL notation | gap closed, notation | NLL rest | gap closed, rest |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['perplexity']:.3f} | {r['notation']['nll']:.1f} | "
              f"{r['notation']['gap_closed']:.1%} | {r['rest']['nll']:.1f} | {r['rest']['gap_closed']:.1%} |"
              for r in rows]
    write("notation_loss", {"machine": machine(), "items": ITEMS, "notation_share_of_lora_gain": round(share, 4),
                            "rows": rows}, table)


if __name__ == "__main__":
    main()
