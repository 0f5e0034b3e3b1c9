"""Alignment throughput and memory on CPU: one process vs two (torchrun, gloo DDP), and the cost of distillation.

Each configuration is a fresh `loram publish align` run on SmolLM2-135M pruned at 0.5 (the wiki split,
blocks of 256 tokens, the same global batch everywhere), so what is measured is what a user runs:
- 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread (torchrun --nproc_per_node 2);
- 1 process x 1 thread with `--distill-from` the original model: logit distillation (`--kd-weight 0.5`), the default
  objective (hidden-state distillation, only the last position projected onto the vocabulary), and the same with an
  LM term of 0.001 (every position projected: what the projection the default skips costs).
Step time is the median over steps 2..N (step 1 includes warm-up); tokens/s = tokens per step / median
step time; peak memory is each process's peak RSS (VmHWM), from `align_report.json`.
Usage: python benchmarks/align_throughput.py [--steps 6] [--pruned DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, write

BIN = Path(sys.executable).parent


def run(cmd: list[str], threads: int) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "LORAM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])


def measure(name: str, out: Path, tokens_per_step: int) -> dict:
    report = json.loads((out / "align_report.json").read_text())
    steps = report["step_seconds"]
    median = statistics.median(steps[1:] or steps)
    peaks = report["peak_memory_bytes_per_rank"]
    return {"name": name, "processes": report["world_size"], "median_step_s": round(median, 3),
            "tokens_per_second": round(tokens_per_step / median, 1), "peak_rss_mib_per_process":
            [round(p / 2**20) for p in peaks], "peak_rss_mib_total": round(sum(peaks) / 2**20),
            "final_loss": report["losses"][-1]["loss"], "losses": [r["loss"] for r in report["losses"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="global batch (blocks per optimizer step)")
    ap.add_argument("--pruned", help="a pruned SmolLM2 checkpoint to reuse (default: prune with l2 at 0.5)")
    args = ap.parse_args()
    from loram.shared import assets

    base = str(assets.model_dir())
    rows = []
    tokens_per_step = args.batch * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pruned = args.pruned or str(t / "p50")
        if not args.pruned:
            run([str(BIN / "loram"), "publish", "prune", base, "--method", "l2", "--ratio", "0.5", "--out", pruned], 1)
        common = [pruned, "--data", "wiki", "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                  "--save-every", str(10 * args.steps)]
        align = [str(BIN / "loram"), "publish", "align"]
        lm = ["--distill-from", "none"]  # the paper's LM objective: the baseline rows hold no teacher
        configs = [
            ("1 process x 1 thread", align, args.batch, 1, lm),
            ("1 process x 2 threads", align, args.batch, 2, lm),
            ("2 processes x 1 thread (torchrun)",
             [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "loram", "publish", "align"],
             args.batch // 2, 1, lm),
            ("1 process x 1 thread, distillation (kd 0.5)", align, args.batch, 1,
             ["--distill-from", base, "--kd-weight", "0.5", "--hidden-weight", "0"]),
            ("1 process x 1 thread, hidden-state distillation (the default)", align, args.batch, 1,
             ["--distill-from", base]),
            ("1 process x 1 thread, hidden 0.999 + LM 0.001 (every position projected onto the vocabulary)", align,
             args.batch, 1, ["--distill-from", base, "--hidden-weight", "0.999"]),
        ]
        for i, (name, launcher, batch, threads, extra) in enumerate(configs):
            out = t / f"run{i}"
            run([*launcher, *common, "--batch", str(batch), *extra, "--out", str(out)], threads)
            rows.append(measure(name, out, tokens_per_step))
            print(rows[-1], flush=True)
    ref = rows[0]
    table = [f"# Alignment throughput on CPU, SmolLM2-135M pruned at 0.5 (global batch {args.batch} x "
             f"{args.seq_len} tokens, {args.steps} steps)", "",
             "Fresh `loram publish align` runs on the `wiki` split; median step over steps 2..N; peak RSS per process.",
             "", "| configuration | median step (s) | tokens/s | vs 1 x 1 | peak RSS per process (MiB) | total (MiB) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['name']} | {r['median_step_s']:.2f} | {r['tokens_per_second']:.0f} | "
              f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x | "
              f"{' + '.join(f'{p:,}' for p in r['peak_rss_mib_per_process'])} | {r['peak_rss_mib_total']:,} |"
              for r in rows]
    ddp = rows[2]
    gap = max(abs(a - b) / b for a, b in zip(ddp["losses"], ref["losses"], strict=True))
    table += ["", f"Loss of the 2-process run vs the 1-process run, step by step: largest relative difference "
              f"{gap:.1e} (same blocks, same global batch)."]
    table += ["", "Made by `python benchmarks/align_throughput.py " + " ".join(sys.argv[1:]) + "`."]
    headline = "; ".join(f"{r['name']}: {r['tokens_per_second']:.0f} tok/s, peak {r['peak_rss_mib_total']:,} MiB"
                         for r in rows)
    write("align_throughput", {"machine": machine(), "args": vars(args), "headline": headline, "rows": rows}, table)


if __name__ == "__main__":
    main()
