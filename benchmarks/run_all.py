"""Run every benchmark of the project and write one results table that describes the machine.

    python benchmarks/run_all.py                 # everything (about an hour on a 2-core CPU)
    python benchmarks/run_all.py --only prune_sparse recover_70b
    python benchmarks/run_all.py --index-only    # rebuild the table from the existing results
    make bench                                   # the same as the first line

Each benchmark runs as its own process with its default settings and writes
`benchmarks/results/<name>.{md,json}`; this script then writes `benchmarks/results/README.md` and
`benchmarks/results/summary.json`: the machine, one row per benchmark (its command, wall time,
status and headline figures), followed by every benchmark's own table. Benchmarks report ratios
against a baseline run side by side, so figures from noisy machines stay comparable.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, machine

HERE = Path(__file__).parent


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


_DEMO_CELL = "hidden-mse-pruned-wikichat+demo-math-batch1"  # the alignment `loram demo` runs, as the grid names it
# the grid's unaligned and demo-aligned pruned models, as NAME=MODEL for the benchmarks comparing models with them
_GRID_MODELS = ["unaligned=/tmp/loram-alignment-grid/pruned/taylor50",
                f"demo-aligned=/tmp/loram-alignment-grid/cells/taylor50_{_DEMO_CELL}_80_0/aligned"]
# name -> (script arguments, headline from its JSON)
BENCHMARKS = {
    "prune_taylor": ([], lambda d: f"Taylor prune {d['time_ratio']}x the time and {d['peak_ratio']}x the peak of one "
                                   "forward+backward over the calibration"),
    "fsdp_load": ([], lambda d: f"FSDP load over {d['processes']} processes: peak per process {d['peak_ratio']}x "
                                f"loading the whole model first, same shards: {d['same_shards']}"),
    "threads": ([], lambda d: "back-to-back prune runs, mean wall: " + ", ".join(
        f"{k} {v} s" for k, v in d["mean_wall_s"].items())),
    "prune_quality": ([], lambda d: "held-out PPL relative to dense: " + ", ".join(
        f"{r['method']}{'' if r['seed'] in ('-', 0) else ' s' + str(r['seed'])} {r['relative']}x"
        for r in d["rows"][1:])),
    "prune_quality_variants": (["--variants"], lambda d: "Taylor scorings, PPL relative to dense: " + ", ".join(
        f"{r['calibration']} {r['scoring'].split(' (')[0]} {r['relative']}x" for r in d["rows"]
        if r["scoring"].endswith("(the default)") or r["scoring"].startswith("q,k,v,o, strided fold"))),
    "prune_quality_calibration": (["--sweep"], lambda d: "Taylor PPL relative to dense by calibration: " + ", ".join(
        f"{r['calibration']} {r['relative']}x ({r['seconds']} s)" for r in d["rows"])),
    "prune_sparse": ([], lambda d: "; ".join(
        f"{r['step']} {r['mean_layer_s']} s/layer ({r['time_vs_reference']}x ref), "
        f"{r['beyond_weights_mib']} MiB beyond weights" for r in d["rows"])),
    "prune_sparse_quality": ([], lambda d: "held-out PPL relative to dense: " + ", ".join(
        f"{r['method']} {r['setting']} {r['relative']}x" for r in d["rows"])),
    "align_throughput": ([], lambda d: json.dumps(d.get("headline", ""))[1:-1]),
    "align_stream": ([], lambda d: "first 1200 blocks of wiki-chat + a small source: " + ", ".join(
        f"{r['small']} {r['baseline_s']} s -> {r['replay_s']} s ({r['speedup']}x)" for r in d["rows"])),
    "train_loram": ([], lambda d: f"`loram train` step time {d['overhead']['ratio']}x a plain peft + Trainer script; "
                                  + ", ".join(f"{k} {v['tokens_per_second']} tok/s" for k, v in d["runs"].items())),
    "recover_70b": ([], lambda d: f"recovery {d['time_ratio']}x a plain copy, peak {d['peak_over_output']}x the "
                                  "output size"),
    "verify_cost": ([], lambda d: f"integrity check (manifest + sha256 of {d['bytes'] / 2**20:.0f} MiB) "
                                  f"{d['check_over_load']}x a warm fp32 from_pretrained"),
    "reliability_sweep": ([], lambda d: f"{d['cases']} bad inputs and faults through the CLI: {d['refused']} "
                                        f"refused in one line (exit 2), {d['ran']} ran (with a warning), "
                                        f"{d['bad']} losing data or not one line"),
    "gpu_check": (["--scale", "full"] if _gpu() else ["--scale", "tiny"],
                  lambda d: f"{d['scale']} scale on {d['device']}: {d['total_seconds']} s; "
                            + "; ".join(f"{r['step']}: {r['check']}" for r in d["rows"][:3])),
    "qloram_70b": (["--scale", "full"] if _gpu() else ["--scale", "tiny"], lambda d: d["verdict"]),
    "loram_effect": ([], lambda d: "; ".join(f"{r['name']}: {r['perplexity']}" for r in d["rows"])),
    "align_loram_effect": (["--aligned", "--no-full-lora"], lambda d: "; ".join(
        f"{r['name']}: {r['perplexity']}" for r in d["rows"])),
    "alignment_grid": ([], lambda d: "LoRAM gap closed on GSM8K (original -> full LoRA): " + ", ".join(
        f"{g['model']} {g['objective']} {g['steps']} steps {g['gap_closed']:.0%}" for g in d["summary"]
        if g["model"] == "taylor50" and g["objective"] in ("none", "lm", "hidden-mse-pure", "hidden-mse-pruned",
                                                           "hidden-mse-pruned-wikichat", "gradmatch-wikichat",
                                                           "hidden-mse-pruned-wikichat+demo-math",
                                                           "hidden-mse-pruned-wikichat+demo-math-batch1",
                                                           "gradmatch-oracle-gsm8k", "gradmatch-oracle-gsm8k-plain"))),
    # after alignment_grid, on its default --work folder
    "objective_cost": (["--pruned", "/tmp/loram-alignment-grid/pruned/taylor50"], lambda d: (
        "alignment objectives side by side, s per 512 tokens (x the paper's LM): ") + ", ".join(
            f"{r['objective']} {r['s_per_512']:.2f} ({r['vs_lm']}x)" for r in d["rows"])),
    "adapter_agreement": (["--work", "/tmp/loram-alignment-grid"], lambda d: "gradient agreement with the original "
                          "(cosine, layers before the pruned range): " + ", ".join(
                              f"{r['a']} {r[d['groups'][0]]:.2f}" for r in d["gradient_rows"])),
    "gradient_agreement": (["--work", "/tmp/loram-alignment-grid", "--gradients-only"], lambda d: "gradient cosine "
                           "over the unpruned layers -> gap closed: " + ", ".join(
                               f"{r['a']} {r['all']:.2f} -> "
                               + ("-" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}")
                               for r in sorted(d["gradient_rows"], key=lambda r: r["all"]))),
    "notation_loss": (["--work", "/tmp/loram-alignment-grid"], lambda d: (
        f"LoRA on the original's gain on GSM8K held-out, {d['notation_share_of_lora_gain']:.0%} on GSM8K's notation; gap "
        "closed on notation / rest: ") + ", ".join(f"{r['model']} {r['notation']['gap_closed']:.0%} / "
                                                  f"{r['rest']['gap_closed']:.0%}" for r in d["rows"][2:])),
    "labelled_loss": (["--pruned", "/tmp/loram-alignment-grid/pruned/taylor50"],
                      lambda d: "`loram train` step time with the loss at labelled positions only vs the stock loss: "
                      + ", ".join(f"{k} {v['step_ratio']:.2f}x" for k, v in d["runs"].items())),
    "eval_order": ([], lambda d: f"evaluation batched longest first: {d['ratio']}x the time of the records in order, "
                   f"{d['positions']['longest first']:,} padded positions against {d['positions']['in order']:,}"),
    "recovered_ablation": (["--work", "/tmp/loram-alignment-grid", "--cell", f"taylor50/{_DEMO_CELL}/80/0"],
                           lambda d: "the demo's recovered adapter, gap closed with some layers' deltas zeroed: "
                           + ", ".join(f"{r['zeroed']} {r['gap_closed']:.0%}" for r in d["rows"])),
    "quant_aware_error": (["--error", *_GRID_MODELS,
                           "qat-aligned=/tmp/loram-alignment-grid/cells/taylor50_qat-wikichat+demo-math-batch1_80_0/"
                           "aligned"],
                          lambda d: "relative layer-output error against the original, mean over layers: " + ", ".join(
                              f"{k} {v['mean']:.3f}" for k, v in d["errors"].items())),
    "site_matching_error": (["--error", *_GRID_MODELS,
                             "sites-aligned=/tmp/loram-alignment-grid/cells/taylor50_sites-wikichat+demo-math-batch1_80_0/"
                             "aligned"],
                            lambda d: "relative error against the original inside the pruned layers (out / mid / o_in / "
                            "down_in): " + ", ".join(f"{k} " + " / ".join(f"{x:.3f}" for x in v.values())
                                                     for k, v in d["errors"].items())),
    "harness_tasks": ([], lambda d: "lm-eval gsm8k_chat vs the hand-written GSM8K accuracy on "
                      f"{d['agreement']['items']} items: {d['agreement']['identical_replies']} identical replies; "
                      + "; ".join(f"{m}: " + ", ".join(f"{k} {v[0]:.2f}" for k, v in s["headline"].items())
                                  for m, s in d["scores"].items())),
}
BENCHMARKS["demo"] = ([], lambda d: "; ".join(f"loram demo{' --quick' if k == 'quick' else ''}: {r['wall_s']:.0f} s"
                                              for k, r in d["runs"].items()))
SCRIPTS = {"align_loram_effect": "loram_effect", "demo": "demo_time", "prune_quality_variants": "prune_quality",
           "prune_quality_calibration": "prune_quality", "gradient_agreement": "adapter_agreement",
           "quant_aware_error": "quant_aware", "site_matching_error": "site_matching"}  # benchmarks run by another benchmark's script


def _result_name(name: str, args: list[str]) -> str:
    return f"{name}_tiny" if name in ("qloram_70b", "gpu_check") and "tiny" in args else name


def run(names: list[str]) -> dict[str, dict]:
    status = {}
    for name in names:
        args, _ = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / f"{SCRIPTS.get(name, name)}.py"), *args]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE)
        status[name] = {"command": f"python benchmarks/{SCRIPTS.get(name, name)}.py {' '.join(args)}".strip(),
                        "wall_s": round(time.perf_counter() - started, 1), "ok": proc.returncode == 0}
    return status


def index(status: dict[str, dict]) -> None:
    previous = RESULTS / "summary.json"
    rows = json.loads(previous.read_text())["benchmarks"] if previous.is_file() else {}
    rows.update(status)
    lines = ["# Benchmark results", "", "Made by `python benchmarks/run_all.py` (`make bench`).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()), "",
             "| benchmark | command | wall time (s) | status | headline |", "|---|---|---|---|---|"]
    sections = []
    for name, (args, headline) in BENCHMARKS.items():
        result = RESULTS / f"{_result_name(name, args)}.json"
        row = rows.get(name, {"command": f"python benchmarks/{SCRIPTS.get(name, name)}.py {' '.join(args)}".strip(),
                              "wall_s": None, "ok": None})
        try:
            row["headline"] = headline(json.loads(result.read_text())) if result.is_file() else "not run yet"
        except (KeyError, TypeError, ValueError) as e:
            row["headline"] = f"(results in an older format: {type(e).__name__})"
        rows[name] = row
        state = {True: "ok", False: "FAILED", None: "earlier run"}[row["ok"]]
        lines.append(f"| [{name}]({_result_name(name, args)}.md) | `{row['command']}` | {row['wall_s'] or '-'} | "
                     f"{state} | {row['headline']} |")
        md = result.with_suffix(".md")
        if md.is_file():
            sections.append(md.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1))
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n\n" + "\n".join(sections))
    previous.write_text(json.dumps({"machine": machine(), "benchmarks": rows}, indent=2) + "\n")
    print(f"results table: {RESULTS / 'README.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=tuple(BENCHMARKS), help="run just these benchmarks")
    ap.add_argument("--index-only", action="store_true", help="only rebuild the table from existing results")
    args = ap.parse_args()
    status = {} if args.index_only else run(args.only or list(BENCHMARKS))
    index(status)
    if not all(s["ok"] for s in status.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
