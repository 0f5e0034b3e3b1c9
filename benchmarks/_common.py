"""Helpers shared by the benchmarks: run a measured step in a fresh process, describe the machine."""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def demo_selfgen(cfg, out: Path) -> Path:
    """`loram publish selfgen` on the embedded model with the flags `loram demo` (config `cfg`) uses; returns `out`."""
    from loram.demo import selfgen_args
    from loram.shared.assets import model_dir

    loram = Path(sys.executable).parent / "loram"
    subprocess.run([loram, "publish", "selfgen", model_dir(), *map(str, selfgen_args(cfg)), "--out", out], check=True)
    return out


def chat_pair(tokenizer, user: str, assistant: str) -> str:
    """One user turn and the assistant's answer, rendered as text in the tokenizer's chat template."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                         tokenize=False)


def gsm8k_chat_ids(tokenizer, items: int, max_len: int = 256) -> list:
    """The first `items` items of the GSM8K fine-tuning split (text of the task; no held-out item) in the model's
    chat form, question as the user turn and answer as the assistant's: one LongTensor [1, <= max_len] each."""
    from loram.evaluate import eval_set

    records, _ = eval_set("gsm8k-train", items)
    return [tokenizer(chat_pair(tokenizer, r["question"], r["answer"]), return_tensors="pt").input_ids[:, :max_len]
            for r in records]


def align_argv(args: list[str], usage: str) -> list[str]:
    """The `publish align PRUNED ...` arguments a prototype script takes after `--`; exits with `usage` otherwise."""
    argv = args[1:] if args[:1] == ["--"] else args
    if argv[:2] != ["publish", "align"] or len(argv) < 3:
        raise SystemExit(f"usage: {usage}")
    return argv


def structured_manifest(argv: list[str], script: str):
    """The manifest of the pruned model a prototype's `publish align` arguments name; exits when it has no structurally
    pruned layer (the prototypes that work on the pruned range need a structured checkpoint)."""
    from loram.shared.manifest import Manifest

    manifest = Manifest.load(argv[2])
    if not manifest.pruned_layers:
        raise SystemExit(f"{script}: {argv[2]} has no structurally pruned layer (a structured checkpoint needed)")
    return manifest


def before_first_loss(setup) -> None:
    """Patch `AlignTrainer.compute_loss` so that `setup(model)` runs once for each model it trains, before that model's
    first loss (a prototype's change to the student, made where the Trainer has placed it)."""
    from loram.publisher import align_trainer

    plain, done = align_trainer.AlignTrainer.compute_loss, set()

    def compute_loss(self, model, *args, **kwargs):
        if id(model) not in done:
            setup(model)
            done.add(id(model))
        return plain(self, model, *args, **kwargs)
    align_trainer.AlignTrainer.compute_loss = compute_loss


def run_loram(argv: list[str]) -> None:
    """`loram ARGV` in this process (after a prototype script has patched what it extends)."""
    from loram.cli import main

    sys.argv = ["loram", *argv]
    main()


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_measured(code: str, env: dict | None = None) -> dict:
    """Run `code` (which fills a dict named `result`) in a fresh Python process.

    Returns `result` plus the process's wall time and its own peak RSS (VmHWM, see
    `loram.shared.progress.process_peak_rss_bytes`).
    """
    tail = ("\nimport json as _j\nfrom loram.shared.progress import process_peak_rss_bytes as _peak\n"
            "result['peak_rss_mib'] = round(_peak() / 2**20, 1)\n"
            "print(_j.dumps(result))\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = round(time.perf_counter() - started, 2)
    return out


def write(name: str, data: dict, table: list[str], results: Path | None = None) -> None:
    """results/NAME.json and .md (the table, also printed); `results`: another folder than RESULTS."""
    results = RESULTS if results is None else results  # read when called: tests point RESULTS elsewhere
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
