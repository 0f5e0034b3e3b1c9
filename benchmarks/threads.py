"""Back-to-back runs keep their wall time: the thread count each `loram publish prune --method taylor`
picks on an idle machine right after the previous run, side by side with the earlier rule.

Three rules, each run three times back to back (SmolLM2, ratio 0.5, 32 x 128 calibration tokens):
- now: `loram` chooses (cores less the threads runnable right now, /proc/stat procs_running);
- earlier rule: cores less the rounded 1-minute load average, read just before the run (what `loram`
  chose before), passed as LORAM_THREADS;
- all cores: LORAM_THREADS = every core, the baseline of an idle machine.
Run it on an otherwise idle machine: it measures the choice, not contention.
Usage: python benchmarks/threads.py [--runs 3] [--samples 32 --seq-len 128]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, write

LORAM = str(Path(sys.executable).parent / "loram")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(tmp: Path, n: int, samples: int, seq_len: int, threads: int | None) -> dict:
    from loram.shared import assets

    env = {k: v for k, v in os.environ.items() if k not in ("LORAM_THREADS", "OMP_NUM_THREADS")}
    if threads is not None:
        env["LORAM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([LORAM, "publish", "prune", str(assets.model_dir()), "--method", "taylor", "--ratio", "0.5",
                           "--samples", str(samples), "--seq-len", str(seq_len), "--kv-score", "taylor",
                           "--out", str(tmp / f"run-{n}")],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    chosen = re.search(r"\((\d+) CPU threads?\)", proc.stderr)
    return {"wall_s": round(wall, 1), "threads": int(chosen.group(1)) if chosen else None,
            "load_avg_1min_before": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    cores = _cores()
    rules = {
        "now (procs_running)": lambda: None,
        "earlier rule (1-min load average)": lambda: max(1, cores - int(os.getloadavg()[0] + 0.5)),
        f"all cores (LORAM_THREADS={cores})": lambda: cores,
    }
    rows, n = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads in rules.items():
            for k in range(args.runs):
                n += 1
                r = _run(Path(tmp), n, args.samples, args.seq_len, threads())
                rows.append({"rule": name, "run": k + 1, **r})
                print(rows[-1], flush=True)
    best = min(r["wall_s"] for r in rows if r["rule"].startswith("all cores"))
    for r in rows:
        r["vs_all_cores"] = round(r["wall_s"] / best, 2)
    mean = {name: round(sum(r["wall_s"] for r in rows if r["rule"] == name) / args.runs, 1) for name in rules}
    table = [f"# Threads of back-to-back `loram publish prune --method taylor` runs ({cores} cores, "
             f"{args.samples} x {args.seq_len} calibration tokens)", "",
             "| rule | run | 1-min load average before | threads | wall (s) | vs best all-cores run |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['rule']} | {r['run']} | {r['load_avg_1min_before']} | {r['threads']} | {r['wall_s']} | "
              f"{r['vs_all_cores']}x |" for r in rows]
    table += ["", "mean wall time: " + ", ".join(f"{k} {v} s" for k, v in mean.items())]
    write("threads", {"machine": machine(), "cores": cores, "rows": rows, "mean_wall_s": mean}, table)


if __name__ == "__main__":
    main()
