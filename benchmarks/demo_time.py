"""Wall time of `loram demo` (target: 15 minutes on a 2-core CPU; `--quick` under 3) and its table.

    python benchmarks/demo_time.py                 # a fresh full run and a fresh --quick run
    python benchmarks/demo_time.py --skip-full     # only the --quick run
    python benchmarks/demo_time.py --full-report DIR   # record a fresh full run made earlier into DIR

Each run starts from an empty output folder (the model and data are already cached, as after the
first `make demo`), so no stage is reused. Writes benchmarks/results/demo.{md,json}.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, machine, write

LORAM = str(Path(sys.executable).parent / "loram")
TARGETS = {"full": 15 * 60, "quick": 3 * 60}


def run(out: Path, quick: bool) -> dict:
    cmd = [LORAM, "demo", "--out", str(out), *(["--quick"] if quick else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return {"wall_s": round(time.perf_counter() - started, 1), **_summary(out)}


def _summary(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {"report_wall_s": report["wall_time_s"], "results": report["results"], "config": report["config"],
            "stages": {n: s["seconds"] for n, s in report["stages"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--full-report", type=Path, help="a folder holding a fresh full `loram demo` run's report")
    args = ap.parse_args()
    previous = RESULTS / "demo.json"
    runs = json.loads(previous.read_text()).get("runs", {}) if previous.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_report:
            summary = _summary(args.full_report)
            runs["full"] = {"wall_s": summary["report_wall_s"], **summary}
        elif not args.skip_full:
            runs["full"] = run(Path(tmp) / "full", quick=False)
        runs["quick"] = run(Path(tmp) / "quick", quick=True)
    table = ["# `loram demo` wall time (2-core CPU, assets cached, no stage reused)", "",
             "| run | wall time (s) | target (s) | within target | stages (s) |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        table.append(f"| `loram demo{' --quick' if name == 'quick' else ''}` | {r['wall_s']:.0f} | {TARGETS[name]} | "
                     f"{'yes' if r['wall_s'] <= TARGETS[name] else 'no'} | {stages} |")
    if "full" in runs:
        table += ["", "Full run, response-token perplexity:", "", "| variant | data | perplexity |", "|---|---|---|"]
        table += [f"| {r['variant']} | {r['data']} | {r['perplexity']} |" for r in runs["full"]["results"]]
    write("demo", {"machine": machine(), "runs": runs}, table)


if __name__ == "__main__":
    main()
