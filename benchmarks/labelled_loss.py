"""`loram train`'s loss projecting only the labelled positions, against the stock causal-LM loss.

The demo's recipe (GSM8K fine-tune split, batch 4 x 256, r = 8, the seven projections), on the original
SmolLM2-135M and on it pruned at 0.5, in fp32 and nf4: `loram train` as it is, and the same command with the
Trainer's stock loss (every position projected onto the 49k vocabulary), each run in a fresh process (its
peak RSS is its own), the two alternating (which goes first flips from one configuration to the next) so
that drift of the machine hits both. Both runs train on the same batches, whose lengths make steps differ by
15-25%, so the step ratio is the median over steps 2..N of each step's ratio (labelled / stock, the same
batch). Also reported: the fraction of positions the demo's batches label (the response tokens).

Usage: python benchmarks/labelled_loss.py [--steps 8] [--pruned DIR] [--models original pruned] [--quants none nf4]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import machine, run_measured, write
from train_loram import PRUNE, median_step
from train_loram import TRAIN as LORAM_TRAIN

# `loram train` with the demo's recipe (train_loram's), or the same command with the Trainer's stock loss
TRAIN = """
import loram.labelled_loss
from loram.shared.checkpoints import SafeCheckpointTrainer
if {stock!r}:
    loram.labelled_loss.LabelledLossTrainer = SafeCheckpointTrainer  # the Trainer's own loss over full logits
""" + LORAM_TRAIN

FRACTION = """
import loram
from loram.perplexity import IGNORE
from loram.sft_format import SFTCollator, parse_columns, tokenize_sft
from loram.shared.pruned_model import load_tokenizer
from loram.shared.records import load_records
tok = load_tokenizer({model!r})
data = tokenize_sft(load_records('gsm8k-train'), tok, 256, parse_columns('prompt=question,response=answer'))
collate = SFTCollator.for_tokenizer(tok)
positions = labelled = 0
for i in range(0, 4 * {steps}, 4):
    labels = collate([data[j] for j in range(i, i + 4)])['labels']
    positions += labels[:, 1:].numel()
    labelled += int((labels[:, 1:] != IGNORE).sum())
result = dict(positions=positions, labelled=labelled)
"""


def step_ratio(pair: dict) -> float:
    """Median over steps 2..N of labelled / stock step time (the same batch at each step)."""
    ratios = [a / b for a, b in zip(pair["labelled"]["steps"], pair["stock"]["steps"], strict=True)]
    return statistics.median(ratios[1:] or ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pruned", help="a pruned SmolLM2 at 0.5 to reuse (default: prune one with Taylor)")
    ap.add_argument("--models", nargs="+", default=["original", "pruned"], choices=["original", "pruned"])
    ap.add_argument("--quants", nargs="+", default=["none", "nf4"], choices=["none", "nf4"])
    args = ap.parse_args()
    from loram.shared import assets

    base = str(assets.model_dir())
    data = {"machine": machine(), "steps": args.steps, "runs": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"original": base, "pruned": args.pruned}
        if "pruned" in args.models and not args.pruned:
            models["pruned"] = str(Path(tmp) / "p50")
            run_measured(PRUNE.format(base=base, out=models["pruned"], ratio=0.5))
        data["labelled"] = run_measured(FRACTION.format(model=base, steps=args.steps))
        stock_first = True
        for name in args.models:
            for quant in args.quants:
                pair = {}
                for stock in ((True, False) if stock_first else (False, True)):
                    out = str(Path(tmp) / f"{name}-{quant}-{'stock' if stock else 'ours'}")
                    pair["stock" if stock else "labelled"] = r = run_measured(
                        TRAIN.format(model=models[name], out=out, quant=quant, steps=args.steps, stock=stock))
                    print(name, quant, "stock" if stock else "labelled", round(median_step(r), 2),
                          r["peak_rss_mib"], flush=True)
                pair["step_ratio"], pair["stock_first"] = round(step_ratio(pair), 3), stock_first
                stock_first = not stock_first
                data["runs"][f"{name} / {quant}"] = pair
                rows.append((name, quant, pair))
    frac = data["labelled"]["labelled"] / data["labelled"]["positions"]
    table = ["# `loram train`: loss at labelled positions only vs the stock loss (SmolLM2-135M, CPU)", "",
             f"The demo's recipe: GSM8K fine-tune split, batch 4 x 256, r = 8, {args.steps} steps (median of steps "
             f"2..{args.steps}; the step ratio is the median of each step's ratio, the same batch in both runs), each "
             "run in a fresh process, stock and labelled alternating (which goes first flips per row). Batches of "
             f"4 consecutive records (the first {args.steps}) label {frac:.1%} of their next-token positions "
             "(the response tokens; the rest is prompt and padding).", "",
             "| model | base precision | first run | step, stock loss (s) | step, labelled only (s) | step ratio | "
             "peak RSS stock (MiB) | peak RSS labelled (MiB) | peak ratio | largest loss difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, quant, pair in rows:
        s, o = pair["stock"], pair["labelled"]
        diff = max(abs(a - b) / abs(a) for a, b in zip(s["losses"], o["losses"], strict=True))
        first = "stock" if pair["stock_first"] else "labelled"
        table.append(f"| {name} | {quant} | {first} | {median_step(s):.2f} | {median_step(o):.2f} | "
                     f"**{pair['step_ratio']:.2f}x** | {s['peak_rss_mib']:,.0f} | "
                     f"{o['peak_rss_mib']:,.0f} | {o['peak_rss_mib'] / s['peak_rss_mib']:.2f}x | "
                     f"{diff:.1e} (relative) |")
    write("labelled_loss", data, table)


if __name__ == "__main__":
    main()
