"""What each alignment objective costs, side by side: time per token and peak memory, on one machine in one script.

The alignment grid (alignment_grid.py) records each cell's step time and peak memory as its run found them, over
weeks and on more than one machine, so its cost column carries marks for rows measured elsewhere. This script
measures the cost of every distinct objective again, fresh `loram publish align` runs (or the prototype script
that extends it) one after another, all on the same text (`--data wiki-chat`: the cost of an objective does not
depend on which text it reads), in --rounds interleaved rounds so that a drift of the machine falls on every
objective alike. Per run: the median step over steps 2..N (step 1 includes warm-up), as seconds per 512 tokens
(one step of the grid's 2 x 256; a step of one sequence counts half), and the process's peak RSS from
align_report.json. Ratios are to the paper's LM objective and to align's default, measured in the same rounds.

    python benchmarks/objective_cost.py --pruned /tmp/loram-alignment-grid/pruned/taylor50     # ~30 minutes
    python benchmarks/objective_cost.py --pruned DIR --objectives lm hidden-mse-pruned --results /tmp/cost  # a few

Writes benchmarks/results/objective_cost.{md,json}.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, write
from alignment_grid import DEFAULT, DEMO, OBJECTIVES, PROTOTYPES, PRUNE, sh

BASELINE = "lm"  # the paper's objective: the ratios' denominator
SEQ_LEN, GRID_BATCH = 256, 2  # the grid's blocks and sequences per step (alignment_grid.align_args)
TOKENS = GRID_BATCH * SEQ_LEN  # the grid's step: the unit the costs are given in
COSTED = [  # grid objectives (alignment_grid.OBJECTIVES) whose cost differs; the rest differ from one of them in text
    BASELINE, "kd", "kd-pure", "hidden-mse", "kd+hidden", "hidden-mse-pure", "hidden-cos-pure", DEFAULT,
    "hidden-mse-local", "hidden-mse-pure-train-pruned", "kd-pure-train-pruned-wikichat", DEMO,
    "hidden-mse-pruned-wikichat+demo-math-batch1-train-pruned", "gradmatch-wikichat", "resmatch-wikichat+demo-math",
    "qat-wikichat+demo-math-batch1", "docstart-wikichat+demo-math-batch1", "perturbed-0.05-wikichat+demo-math-batch1",
    "perturbed-response-0.03-wikichat+demo-math-batch1", "sites-wikichat+demo-math-batch1",
    "headkd-wikichat+demo-math-batch1",
]


def objective_flags(objective: str, base: str) -> list[str]:
    """The objective's `loram publish align` flags with its text replaced by `wiki-chat` (batch and lr kept)."""
    flags = [f.format(base=base, work="") for f in OBJECTIVES[objective]]
    kept = []
    for i, flag in enumerate(flags):
        if flag == "--data" or (i and flags[i - 1] == "--data"):
            continue
        kept.append(flag)
    return kept


def batch(flags: list[str]) -> int:
    """Sequences per step: the objective's --batch, else the grid's."""
    return int(flags[flags.index("--batch") + 1]) if "--batch" in flags else GRID_BATCH


def run_args(objective: str, steps: int, base: str) -> list[str]:
    flags = objective_flags(objective, base)
    if "--batch" not in flags:
        flags += ["--batch", str(GRID_BATCH)]
    return ["--data", "wiki-chat", "--steps", steps, "--seq-len", SEQ_LEN, "--lr", "1e-4", "--warmup", 1,
            "--save-every", 1000, "--seed", 0, *flags, "--overwrite"]


def measured(report: dict, sequences: int) -> dict:
    """Seconds per 512 tokens (median step over steps 2..N) and peak RSS, from an align_report.json."""
    steps = report["step_seconds"]
    median = statistics.median(steps[1:] or steps)
    return {"s_per_512": round(median * TOKENS / (sequences * SEQ_LEN), 3), "step_s": round(median, 3),
            "peak_mib": round(report["peak_memory_bytes"] / 2**20)}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per objective: mean over rounds, spread (max - min) and ratios to the baseline and the default."""
    rows = []
    mean = {o: statistics.fmean(r["s_per_512"] for r in rs) for o, rs in runs.items()}
    for objective, rs in runs.items():
        times = [r["s_per_512"] for r in rs]
        rows.append({"objective": objective, "prototype": objective in PROTOTYPES,
                     "s_per_512": round(mean[objective], 3), "rounds": times,
                     "spread": round(max(times) - min(times), 3),
                     "vs_lm": round(mean[objective] / mean[BASELINE], 2) if BASELINE in mean else None,
                     "vs_default": round(mean[objective] / mean[DEFAULT], 2) if DEFAULT in mean else None,
                     "peak_mib": max(r["peak_mib"] for r in rs)})
    return rows


def table(rows: list[dict], base: str, args) -> list[str]:
    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x}x"

    def flags(o: str) -> str:
        shown = " ".join(f.replace(base, "ORIGINAL") for f in objective_flags(o, base)) or "(none)"
        return f"`{' '.join(PROTOTYPES[o])} -- ... {shown}`" if o in PROTOTYPES else f"`{shown}`"

    lines = [f"# Cost of each alignment objective, side by side (SmolLM2-135M pruned at 0.5, {args.rounds} rounds)", "",
             f"Fresh `loram publish align` runs on `--data wiki-chat`, blocks of 256 tokens, {args.steps} steps each; "
             "seconds per 512 tokens from the median step over steps 2..N (the mean over rounds; spread = max - min); "
             "peak RSS of the align process (student, its gradients and AdamW state, the teacher, activations).", "",
             "| objective | flags | s per 512 tokens | spread | vs LM | vs default | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["objective"] + (" (prototype)" if r["prototype"] else "") + (" (the default)" if r["objective"] == DEFAULT
                                                                               else "")
        lines.append(f"| {name} | {flags(r['objective'])} | {r['s_per_512']:.2f} | {r['spread']:.2f} | "
                     f"{ratio(r['vs_lm'])} | {ratio(r['vs_default'])} | {r['peak_mib']:,} |")
    lines += ["", "Made by `python benchmarks/objective_cost.py " + " ".join(sys.argv[1:]) + "`."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruned", help="the grid's taylor50 pruned model (default: prune one as the grid does)")
    ap.add_argument("--objectives", nargs="+", default=COSTED, choices=[o for o in OBJECTIVES if OBJECTIVES[o] is not None],
                    metavar="OBJECTIVE", help="grid objectives to measure (default: every distinct cost)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="folder for objective_cost.{md,json} (default benchmarks/results; another keeps a partial run "
                         "from rewriting the committed table)")
    args = ap.parse_args()
    from loram.shared.assets import model_dir

    base = str(model_dir())
    runs: dict[str, list[dict]] = {o: [] for o in args.objectives}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = args.pruned or str(Path(tmp) / "taylor50")
        if not args.pruned:
            sh("publish", "prune", base, *PRUNE["taylor50"], "--out", pruned)
        for round_ in range(args.rounds):
            for objective in args.objectives:
                out = Path(tmp) / "aligned"
                cli = run_args(objective, args.steps, base)
                sh("publish", "align", pruned, *cli, "--out", out, prototype=PROTOTYPES.get(objective))
                report = json.loads((out / "align_report.json").read_text())
                runs[objective].append(measured(report, batch(cli)))
                print(f"round {round_ + 1} {objective}: {runs[objective][-1]}", flush=True)
    rows = summarize(runs)
    headline = "; ".join(f"{r['objective']} {r['s_per_512']:.2f} s ({r['vs_lm']}x LM), {r['peak_mib']:,} MiB"
                         for r in rows)
    write("objective_cost", {"machine": machine(), "args": {**vars(args), "results": str(args.results)},
                             "wall_s": round(time.perf_counter() - started), "headline": headline, "rows": rows},
          table(rows, base, args), args.results)


if __name__ == "__main__":
    main()
