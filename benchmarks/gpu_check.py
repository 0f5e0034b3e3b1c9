"""The GPU check: the whole publisher + consumer loop on one CUDA GPU, in one table, in under 8 minutes.

    GPU (SmolLM2-135M, real data; the figures docs/results.md records):
        python benchmarks/gpu_check.py --scale full
    CPU, toy scale (a tiny random model, seconds; CI runs it through tests/test_gpu_check.py):
        python benchmarks/gpu_check.py --scale tiny

Every step runs the real `loram` command in a fresh process, so each peak is its own:
  1. structured Taylor pruning at 0.5 on the compute device, and the same on the CPU: same kept units?
  2. 20 alignment steps (bf16 autocast on GPUs that support it, fp32 on CPU)
  3. QLoRA nf4 training of the aligned model: measured peak (CUDA max allocated / CPU peak RSS) next to
     `loram plan`'s estimate for the same settings
  4. recover, 5. merge (bf16), 6. eval (original vs original + recovered adapter)
  7. the 70B-shaped QLoRAM peak of benchmarks/qloram_70b.py (--scale full on CUDA, tiny on CPU)
Writes benchmarks/results/gpu_check[_tiny].json/.md.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
SCALES = {
    "full": {"align_steps": 20, "train_steps": 10, "seq_len": 256, "batch": 4, "eval_limit": 20, "samples": 32,
             "layers": "4:-2"},
    # the tiny model has 6 layers: the paper's [4, L-2) would select none
    "tiny": {"align_steps": 2, "train_steps": 2, "seq_len": 32, "batch": 2, "eval_limit": 4, "samples": 4,
             "layers": "1:5"},
}
COLUMNS = "prompt=question,response=answer"


def _loram(*args) -> dict:
    """Run `loram ARGS`; returns wall seconds and the last stdout line (raises with stderr on failure)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import run_loram

    started = time.perf_counter()
    proc = run_loram(*args, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"loram {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "stdout": proc.stdout}


def _inputs(scale: str, root: Path) -> tuple[str, str, str, str]:
    """(base model, training data, held-out data, alignment text) for the scale."""
    if scale == "full":
        from loram.shared import assets

        return str(assets.model_dir()), "gsm8k-train", "gsm8k-heldout", "wiki"
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import QA, save_tiny_checkpoint

    save_tiny_checkpoint(root / "base", "llama-gqa")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (root / "text.txt").write_text("\n\n".join(f"paragraph {i} " + "words " * 30 for i in range(60)))
    return str(root / "base"), str(root / "qa.jsonl"), str(root / "qa.jsonl"), str(root / "text.txt")


def _kept(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in sorted(load_file(str(folder / "loram_manifest.safetensors")).items())}


def run(scale: str, device: str) -> dict:
    s = SCALES[scale]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, data, heldout, text = _inputs(scale, root)
        prune = ["publish", "prune", base, "--method", "taylor", "--ratio", "0.5", "--layers", s["layers"],
                 "--samples", s["samples"],
                 "--seq-len", min(128, s["seq_len"]), "--calib", text]
        step = _loram(*prune, "--device", device, "--out", root / "pruned")
        same = True
        if device != "cpu":
            _loram(*prune, "--device", "cpu", "--out", root / "pruned-cpu")
            same = _kept(root / "pruned") == _kept(root / "pruned-cpu")
        rows.append({"step": f"Taylor prune 0.5 on {device}", "seconds": step["seconds"],
                     "check": ("CPU run (nothing to compare)" if device == "cpu" else
                               "same kept units as on CPU" if same else "kept units DIFFER from the CPU run")})

        step = _loram("publish", "align", root / "pruned", "--data", text, "--steps", s["align_steps"], "--seq-len",
                      s["seq_len"], "--batch", s["batch"], "--save-every", 1000, "--out", root / "aligned")
        report = json.loads((root / "aligned" / "align_report.json").read_text())
        rows.append({"step": f"align {s['align_steps']} steps", "seconds": step["seconds"],
                     "peak_mib": round(report["peak_memory_bytes"] / 2**20),
                     "check": f"loss {report['losses'][0]['loss']:.3f} -> {report['losses'][-1]['loss']:.3f}"})

        quant = "nf4" if _has_bitsandbytes() else "none"
        train = ["--quant", quant, "--batch", s["batch"], "--seq-len", s["seq_len"]]
        step = _loram("train", root / "aligned", "--data", data, "--columns", COLUMNS, *train, "--steps",
                      s["train_steps"], "--save-every", 1000, "--out", root / "adapter")
        report = json.loads((root / "adapter" / "training_report.json").read_text())
        plan = json.loads(_loram("plan", root / "aligned", *train, "--device", "cuda" if device != "cpu" else "cpu",
                                 "--json")["stdout"])
        measured, estimate = report["peak_memory_bytes"], plan["memory"]["total_bytes"]
        rows.append({"step": f"train QLoRA {quant} {s['train_steps']} steps", "seconds": step["seconds"],
                     "peak_mib": round(measured / 2**20),
                     "check": f"loram plan estimates {estimate / 2**20:,.0f} MiB (measured / plan = "
                              f"{measured / estimate:.2f})"})

        step = _loram("recover", root / "adapter", "--out", root / "recovered")
        rows.append({"step": "recover", "seconds": step["seconds"], "check": "peft adapter of the original"})
        step = _loram("merge", root / "recovered", "--out", root / "merged")
        rows.append({"step": "merge (bf16)", "seconds": step["seconds"], "check": "merged checkpoint written"})
        step = _loram("eval", f"original={base}", f"loram={base}+{root / 'recovered'}", "--data", heldout,
                      "--columns", COLUMNS, "--limit", s["eval_limit"], "--seq-len", s["seq_len"], "--json")
        ppl = {r["name"]: r["perplexity"] for r in json.loads(step["stdout"])["results"]}
        rows.append({"step": f"eval {s['eval_limit']} held-out items", "seconds": step["seconds"],
                     "check": ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())})

    qloram_args = ["--scale", "full", "--device", "cuda"] if device != "cpu" else ["--scale", "tiny", "--device",
                                                                                   "cpu", "--steps", "2"]
    started = time.perf_counter()
    import subprocess

    with tempfile.TemporaryDirectory() as results:
        proc = subprocess.run([sys.executable, str(HERE / "qloram_70b.py"), *qloram_args, "--results-dir", results],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        data = json.loads(next(Path(results).glob("*.json")).read_text())
    rows.append({"step": f"70B-shaped QLoRAM ({qloram_args[1]})", "seconds": round(time.perf_counter() - started, 1),
                 "check": data.get("verdict", "")})
    return {"scale": scale, "device": device, "machine": _common.machine(), "rows": rows,
            "total_seconds": round(sum(r["seconds"] for r in rows), 1)}


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def table(data: dict) -> list[str]:
    lines = [f"# GPU check ({data['scale']} scale on {data['device']}; {data['machine']['cuda'] or 'no CUDA'})", "",
             f"`python benchmarks/gpu_check.py --scale {data['scale']}`: {data['total_seconds']} s in all.", "",
             "| step | seconds | peak MiB | check |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']} | {r.get('peak_mib', '-')} | {r['check']} |" for r in data["rows"]]
    return lines


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SCALES), default="full" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    data = run(args.scale, args.device)
    _common.write("gpu_check" if args.scale == "full" else "gpu_check_tiny", data, table(data))
    return data


if __name__ == "__main__":
    main()
