"""Which alignment makes LoRAM pay: every objective of `loram publish align`, measured by what LoRAM gains.

For each pruned model and alignment variant (objective x steps x seed), with the project's commands:

    loram publish align PRUNED --data wiki ... (the variant's objective flags)      (skipped for "none")
    loram train ALIGNED --data gsm8k-train ... (the demo's recipe: 15 steps, QLoRA when bitsandbytes is there)
    loram recover ADAPTER
    then the original + recovered adapter on GSM8K held-out (100 items) and news (50 documents),
    response-token perplexity, next to the original and LoRA trained on the original (same seed).

Gap closed = (original - LoRAM) / (original - LoRA): 0 is no better than the original, 1 is full LoRA.
Alignment uses general text (the built-in wiki split, or the chat-form files below); news and GSM8K stay out of
it, except in the `oracle-gsm8k` rows: a diagnostic bound aligned on GSM8K held-out items that neither the LoRA runs
nor the evaluation see (what aligning on the task's own domain could give; no publisher can do it for an unknown task).
Objectives in PROTOTYPES are not `loram publish align`'s: a benchmark script extends it (gradient_matching.py).
Every cell is cached under --work (a re-run measures only what is missing).

    python benchmarks/alignment_grid.py                        # the default grid (see GRID)
    python benchmarks/alignment_grid.py --cells taylor50/lm/40/0 taylor50/hidden-mse/40/1
    python benchmarks/alignment_grid.py --report-only          # rebuild results/alignment_grid.* from --work
    python benchmarks/alignment_grid.py --restore --cells ...  # on a new machine: the stored cells, and new ones
    python benchmarks/alignment_grid.py --work /tmp/side --results /tmp/side/results --cells ...  # a side run

Writes benchmarks/results/alignment_grid.{md,json} and alignment_grid.png (gap closed per variant). The `-wikichat`
objectives align on `--data wiki-chat` (the wiki split in the chat template), `-selfgen`, `-mathgen` and `-demo-math` on
the original's own chat answers (general prompts; requests for worked math problems, 128 of them or the 48 `loram demo`
writes), `-dmmath` on DeepMind's mathematics_dataset questions with their answers, `-champ` on CHAMP's competition
problems with other models' worked solutions, and `oracle-gsm8k` on GSM8K held-out items 100..318 as chat (`-plain`:
without GSM8K's `<<...>>` annotations and `#### N`), files that `alignment_data.py` writes under --work/data.
`-batch1`: steps of one sequence. `qat-` aligns the pruned model computing in NF4, as a QLoRA consumer trains on it
(quant_aware.py); `docstart-` starts every block at a document's start instead of packing across documents
(doc_start_blocks.py); `perturbed-` matches the two models perturbed alike by random rank-8 deltas
(perturbed_alignment.py); `sites-` matches inside the pruned layers too, the states the adapter's linears read
(site_matching.py); `headkd-` adds logit distillation for the layers after the pruned range, which it alone trains
(head_kd.py).
The ceiling (`ceiling()`): LoRA on the original confined to the positions a recovered LoRAM adapter reaches.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, machine, write
from alignment_data import ORACLE_FILES, ORACLE_ITEMS

LORAM = str(Path(sys.executable).parent / "loram")
QUANT = "nf4" if importlib.util.find_spec("bitsandbytes") else "none"  # as `loram demo --quant auto`
DEMO_STEPS = 40  # the demo's alignment budget in the grid's steps of 2 x 256 tokens; 4x is 160 (consumer/demo.py
# spends the same 20,480 tokens as 80 steps of one sequence: the DEMO objective, batch 1)
PRUNE = {  # name -> `loram publish prune` flags
    "taylor50": ["--method", "taylor", "--ratio", "0.5", "--samples", "32"],  # the demo's pruned model
    # calibration as benchmarks/prune_sparse_quality.py (the references' 128 x 2048 takes ~30x longer on 2 cores)
    "wanda50": ["--method", "wanda", "--sparsity", "0.5", "--samples", "32", "--seq-len", "256"],
    "sparsegpt50": ["--method", "sparsegpt", "--sparsity", "0.5", "--samples", "32", "--seq-len", "256"],
    "sparsegpt2:4": ["--method", "sparsegpt", "--nm", "2:4", "--samples", "32", "--seq-len", "256"],
}
PRUNED_MSE = ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "1", "--hidden-layers", "pruned"]
# what `loram demo` aligns on: wiki-chat and the math problems `loram publish selfgen` writes with the demo's flags
DEMO_TEXT = [*PRUNED_MSE, "--data", "wiki-chat:1", "--data", "{work}/data/demo-math.jsonl:1"]
DEMO_TEXT_BATCH1 = [*DEMO_TEXT, "--batch", "1"]  # in steps of one sequence, as `loram demo` runs it
OBJECTIVES = {  # name -> `loram publish align` flags beyond the demo's recipe ({base}: the original)
    "none": None,
    "lm": ["--distill-from", "none"],  # explicit: align's default objective is hidden-state distillation since this grid
    "kd": ["--distill-from", "{base}", "--kd-weight", "0.5", "--hidden-weight", "0"],
    "kd-pure": ["--distill-from", "{base}", "--kd-weight", "1", "--hidden-weight", "0"],
    "hidden-mse-pure-lr3e-4": ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "1", "--lr", "3e-4",
                               "--hidden-layers", "all"],
    "hidden-mse": ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "0.5", "--hidden-layers", "all"],
    "hidden-mse-pure": ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "1", "--hidden-layers", "all"],
    "hidden-cos-pure": ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "1",
                        "--hidden-loss", "cosine", "--hidden-layers", "all"],
    "hidden-mse-pruned": [*PRUNED_MSE],
    "hidden-mse-pruned-lr3e-5": [*PRUNED_MSE, "--lr", "3e-5"],
    "hidden-mse-local": [*PRUNED_MSE, "--hidden-inputs", "original"],
    "hidden-mse-pruned-wikichat": [*PRUNED_MSE, "--data", "wiki-chat"],
    "hidden-mse-pruned-selfgen": [*PRUNED_MSE, "--data", "{work}/data/selfgen.jsonl"],
    "hidden-mse-pruned-wikichat-batch8": [*PRUNED_MSE, "--data", "wiki-chat", "--batch", "8"],
    "kd+hidden": ["--distill-from", "{base}", "--kd-weight", "0.5", "--hidden-weight", "0.5", "--hidden-layers", "all"],
    "hidden-mse-pure-train-pruned": ["--distill-from", "{base}", "--kd-weight", "0", "--hidden-weight", "1",
                                     "--train-layers", "pruned", "--hidden-layers", "all"],
    # logit distillation with the layers after the pruned range kept the original's (does KD fail there only?)
    "kd-pure-train-pruned-wikichat": ["--distill-from", "{base}", "--kd-weight", "1", "--hidden-weight", "0",
                                      "--train-layers", "pruned", "--data", "wiki-chat"],
    "kd+hidden-pruned-train-pruned-wikichat": ["--distill-from", "{base}", "--kd-weight", "0.5", "--hidden-weight",
                                               "0.5", "--hidden-layers", "pruned", "--train-layers", "pruned",
                                               "--data", "wiki-chat"],
    # a prototype objective (PROTOTYPES): the wiki-chat alignment + matching the original's weight gradients
    "gradmatch-wikichat": [*PRUNED_MSE, "--data", "wiki-chat"],
    # the original's own worked math problems (alignment_data.py): math-domain text made without a dataset
    "hidden-mse-pruned-mathgen": [*PRUNED_MSE, "--data", "{work}/data/mathgen.jsonl"],
    "gradmatch-mathgen": [*PRUNED_MSE, "--data", "{work}/data/mathgen.jsonl"],
    # the same text with a tool-use notation a publisher can anticipate (Toolformer's calculator calls), not GSM8K's
    "gradmatch-mathgen-calc": [*PRUNED_MSE, "--data", "{work}/data/mathgen-calc.jsonl"],
    # the paper's recipe in spirit: general text and math-domain text, half and half
    "hidden-mse-pruned-wikichat+mathgen": [*PRUNED_MSE, "--data", "wiki-chat:1", "--data", "{work}/data/mathgen.jsonl:1"],
    # what `loram demo` aligned on in steps of two (DEMO_TEXT)
    "hidden-mse-pruned-wikichat+demo-math": DEMO_TEXT,
    # DeepMind's mathematics_dataset (a PyPI generator of school-level questions with answers, as chat): math text
    # the original did not write, so its LM-loss gradient is not the original's own sampling noise
    "hidden-mse-pruned-dmmath": [*PRUNED_MSE, "--data", "{work}/data/dmmath.jsonl"],
    "gradmatch-dmmath": [*PRUNED_MSE, "--data", "{work}/data/dmmath.jsonl"],
    # CHAMP's competition problems with other models' worded solutions (a PyPI package, as chat): math text in the
    # form GSM8K's answers take (worked steps in words), written by neither the original nor GSM8K
    "hidden-mse-pruned-champ": [*PRUNED_MSE, "--data", "{work}/data/champ.jsonl"],
    "gradmatch-champ": [*PRUNED_MSE, "--data", "{work}/data/champ.jsonl"],
    # what `loram demo` runs now: the same tokens and compute in twice the optimizer steps (batch 1, 80 steps)
    "hidden-mse-pruned-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the demo's alignment + matching the per-token gradient at every layer's output (residual stream)
    "resmatch-wikichat+demo-math": DEMO_TEXT,
    # the demo's alignment at twice the peak learning rate (steps of one: is 80 steps short of converged?)
    "hidden-mse-pruned-wikichat+demo-math-batch1-lr2e-4": [*DEMO_TEXT_BATCH1, "--lr", "2e-4"],
    # the demo's alignment training only the pruned layers (layers 0-3 and 28-29 stay the original's, as LoRA sees them)
    "hidden-mse-pruned-wikichat+demo-math-batch1-train-pruned": [*DEMO_TEXT_BATCH1, "--train-layers", "pruned"],
    # prototype: the demo's alignment, every block starting at a conversation's start (not packed across them)
    "docstart-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the demo's alignment, the student's decoder linears computing in NF4 as a QLoRA consumer's do
    "qat-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the demo's alignment on models perturbed alike by random rank-8 deltas (perturbed_alignment.py):
    # ||D|| = 0.05 ||W|| at every step, and 0.1 ||W|| at half the steps
    "perturbed-0.05-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    "perturbed-0.1-half-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the same, matching how the two models' layer outputs respond to a shared delta of 0.03 ||W|| (2 passes)
    "perturbed-response-0.03-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the demo's alignment, matching inside the pruned layers too: the states the adapter's linears read
    # (between attention and MLP, o_proj's and down_proj's inputs at the kept heads and channels; site_matching.py)
    "sites-wikichat+demo-math-batch1": DEMO_TEXT_BATCH1,
    # prototype: the demo's alignment for the pruned layers, logit distillation for the layers after them, each term
    # training only its own layers (head_kd.py): the aligned model's predictions made close to the original's
    "headkd-wikichat+demo-math-batch1": ["--distill-from", "{base}", "--kd-weight", "0.5", "--hidden-weight", "0.5",
                                         "--hidden-layers", "pruned", "--data", "wiki-chat:1", "--data",
                                         "{work}/data/demo-math.jsonl:1", "--batch", "1"],
    # the demo's alignment with Python source (20 standard-library modules, code.jsonl) in place of wiki-chat: formal
    # text of expressions and brackets, as GSM8K's calculator notation is
    "hidden-mse-pruned-code+demo-math-batch1": [*PRUNED_MSE, "--data", "{work}/data/code.jsonl:1", "--data",
                                                "{work}/data/demo-math.jsonl:1", "--batch", "1"],
    # diagnostic bounds, NOT general text: aligned on the fine-tuning task's own domain (alignment_data.py)
    "oracle-gsm8k": [*PRUNED_MSE, "--data", "{work}/data/gsm8k-oracle.jsonl"],
    "gradmatch-oracle-gsm8k": [*PRUNED_MSE, "--data", "{work}/data/gsm8k-oracle.jsonl"],
    # the same items without GSM8K's notation (calculator annotations, "#### N"): the task's problems in plain words
    "gradmatch-oracle-gsm8k-plain": [*PRUNED_MSE, "--data", "{work}/data/gsm8k-oracle-plain.jsonl"],
}
# objectives that `loram publish align` does not have, run by a benchmark script that extends it (its flags first)
PROTOTYPES = {**{o: ["gradient_matching.py", "--weight", "1"]
                 for o in ("gradmatch-wikichat", "gradmatch-mathgen", "gradmatch-mathgen-calc", "gradmatch-dmmath", "gradmatch-champ",
                           "gradmatch-oracle-gsm8k", "gradmatch-oracle-gsm8k-plain")},
              "resmatch-wikichat+demo-math": ["gradient_matching.py", "--weight", "1", "--match", "residual"],
              "qat-wikichat+demo-math-batch1": ["quant_aware.py"],
              "sites-wikichat+demo-math-batch1": ["site_matching.py"],
              "headkd-wikichat+demo-math-batch1": ["head_kd.py"],
              "docstart-wikichat+demo-math-batch1": ["doc_start_blocks.py"],
              "perturbed-0.05-wikichat+demo-math-batch1": ["perturbed_alignment.py", "--eps", "0.05"],
              "perturbed-0.1-half-wikichat+demo-math-batch1": ["perturbed_alignment.py", "--eps", "0.1", "--prob", "0.5"],
              "perturbed-response-0.03-wikichat+demo-math-batch1": ["perturbed_alignment.py", "--eps", "0.03",
                                                                    "--match", "response"]}
DEFAULT = "hidden-mse-pruned"  # `loram publish align`'s default objective
WIKICHAT = "hidden-mse-pruned-wikichat"  # the default objective on --data wiki-chat (what the demo aligned on before)
DEMO = "hidden-mse-pruned-wikichat+demo-math-batch1"  # what `loram demo` aligns with (consumer/demo.py), at 80 steps
DEMO_BATCH2 = "hidden-mse-pruned-wikichat+demo-math"  # the same in the grid's steps of 2: what the demo ran before
# Non-structured models hold masks in every layer, so there --hidden-layers pruned is all: hidden-mse-pure is the
# default there too. The 4x-budget rows: hidden-mse-pure (the default before hidden-mse-pruned won), mathgen, wiki-chat
# and the demo's text.
# Two seeds for the leading variants: the defaults, the demo's alignments (now and before) and the non-structured
# models.
BATCH1 = [o for o in OBJECTIVES if "batch1" in o]  # steps of one sequence: the demo's budget is 80 of them
GRID = ([f"taylor50/{o}/{DEMO_STEPS}/0" for o in OBJECTIVES if o not in BATCH1]
        + [f"taylor50/{o}/{2 * DEMO_STEPS}/0" for o in BATCH1]
        + [f"taylor50/{o}/{2 * DEMO_STEPS}/1" for o in (DEMO, "sites-wikichat+demo-math-batch1")]
        + [f"taylor50/{DEMO}/{8 * DEMO_STEPS}/0"]
        + [f"taylor50/{o}/{DEMO_STEPS}/1" for o in ("none", DEFAULT, WIKICHAT, DEMO_BATCH2, "hidden-mse-pure",
                                                     "hidden-mse-pure-train-pruned", "hidden-mse-pruned-mathgen",
                                                     "gradmatch-oracle-gsm8k")]
        + [f"taylor50/{o}/{4 * DEMO_STEPS}/0" for o in ("hidden-mse-pure", "hidden-mse-pruned-mathgen")]
        + [f"taylor50/{o}/{4 * DEMO_STEPS}/{s}" for o in (WIKICHAT, DEMO_BATCH2) for s in (0, 1)]
        + [f"{m}/{o}/{DEMO_STEPS}/{s}" for m in ("wanda50", "sparsegpt50", "sparsegpt2:4") for o in ("none", "hidden-mse-pure")
           for s in (0, 1)]
        + [f"sparsegpt2:4/{WIKICHAT}/{DEMO_STEPS}/0"])  # wiki-chat on the non-structured model closest to 2x


def sh(*args, prototype: list[str] | None = None) -> str:
    """`loram ARGS`, or with `prototype` (a PROTOTYPES entry) `python SCRIPT FLAGS -- ARGS`; its stdout."""
    command = [sys.executable, str(Path(__file__).parent / prototype[0]), *prototype[1:], "--"] if prototype else [LORAM]
    print("$ " + " ".join([*(command[1:] if prototype else ["loram"]), *map(str, args)]), flush=True)
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return proc.stdout


def folder_name(cell: str) -> str:
    """A cell (or pruned model) name as a folder name: taylor50/lm/40/0 -> taylor50_lm_40_0, sparsegpt2:4 -> 2-4."""
    return cell.replace("/", "_").replace(":", "-")


def cached(path: Path, make) -> dict:
    """The JSON result stored at `path`, made (and stored) when missing."""
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    result = make()
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def train_recipe(seed: int) -> dict:
    """The demo's LoRA recipe as `loram.train.train` keywords (`train_args` renders it as `loram train` flags)."""
    return {"data": "gsm8k-train", "columns": "prompt=question,response=answer", "quant": QUANT, "steps": 15,
            "lr": 3e-4, "batch": 4, "seq_len": 256, "save_every": 1000, "seed": seed}


def train_args(seed: int) -> list[str]:
    flags = [x for k, v in train_recipe(seed).items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return [*flags, "--overwrite"]


def align_args(objective: str, steps: int, seed: int, base: str, work: Path) -> list[str]:
    flags = [f.format(base=base, work=work) for f in OBJECTIVES[objective]]
    data = [] if "--data" in flags else ["--data", "wiki"]
    return [*data, "--steps", steps, "--seq-len", 256, "--batch", 2, "--lr", "1e-4",
            "--warmup", max(1, steps // 20), "--eval-data", "wiki-heldout", "--eval-limit", 16,
            "--eval-every", steps, "--save-every", steps, "--seed", seed, *flags, "--overwrite"]


class Evaluator:
    """Response-token perplexity of the original with an adapter, on GSM8K held-out and news."""

    def __init__(self, base: str, items: int):
        from loram.evaluate import eval_set
        from loram.shared.runtime import configure_threads

        configure_threads()
        self.base = base
        self.sets = {"gsm8k": eval_set("gsm8k-heldout", items), "news": eval_set("news", max(1, items // 2))}

    def __call__(self, adapter: str | None, model: str | None = None) -> dict:
        from loram.evaluate import load_spec, response_perplexity
        from loram.shared.runtime import configure_threads

        configure_threads()  # again for every model: the cores free now, not when the script started
        m, tok = load_spec(model or self.base, adapter, False)
        out = {}
        for name, (records, columns) in self.sets.items():
            ppl, tokens = response_perplexity(m, tok, records, columns, 256, 4, name)
            out[name] = round(ppl, 4)
            out[f"{name}_tokens"] = tokens
        return out


def run_cell(work: Path, cell: str, base: str, evaluate: Evaluator) -> dict:
    model, objective, steps, seed = cell.split("/")
    steps, seed = int(steps), int(seed)
    pruned = work / "pruned" / model

    def prune() -> None:  # only when a stage that is not cached needs the pruned model
        if not (pruned / "loram_manifest.json").is_file():
            sh("publish", "prune", base, *PRUNE[model], "--out", pruned, "--overwrite")
    folder = work / "cells" / folder_name(cell)
    align: dict = {}
    trained_on = pruned
    if OBJECTIVES[objective] is not None:
        def do_align() -> dict:
            prune()
            started = time.perf_counter()
            sh("publish", "align", pruned, *align_args(objective, steps, seed, base, work), "--out", folder / "aligned",
               prototype=PROTOTYPES.get(objective))
            report = json.loads((folder / "aligned" / "align_report.json").read_text())
            evals = report["evals"]
            return {"wall_s": round(time.perf_counter() - started, 1),
                    "s_per_step": round(report["tokens_seen"] / report["steps"] / report["tokens_per_second"], 3),
                    "tokens_per_s": report["tokens_per_second"],
                    "peak_mib": round(report["peak_memory_bytes"] / 2**20, 1),
                    "wiki_ppl_start": evals[0]["perplexity"], "wiki_ppl_end": evals[-1]["perplexity"],
                    "final_losses": report["losses"][-1]}
        align = cached(folder / "align.json", do_align)
        trained_on = folder / "aligned"

    def do_train() -> dict:
        prune()
        sh("train", trained_on, *train_args(seed), "--out", folder / "adapter")
        sh("recover", folder / "adapter", "--out", folder / "recovered", "--overwrite")
        return evaluate(str(folder / "recovered"))
    return {"cell": cell, "model": model, "objective": objective, "steps": steps if align else 0, "seed": seed,
            "align": align, **cached(folder / "eval.json", do_train)}


def references(work: Path, base: str, seeds: set[int], evaluate: Evaluator) -> dict:
    refs = {"original": cached(work / "ref" / "original.json", lambda: evaluate(None))}
    for seed in sorted(seeds):
        def lora(seed=seed) -> dict:
            folder = work / "ref" / f"lora-{seed}"
            sh("train", base, *train_args(seed), "--out", folder)
            return evaluate(str(folder))
        refs[f"lora-{seed}"] = cached(work / "ref" / f"lora-{seed}.json", lora)
    return refs


def ceiling(work: Path, base: str, model: str, seed: int, evaluate: Evaluator) -> dict:
    """What perfect alignment could give: LoRA on the original, confined to what a recovered LoRAM adapter reaches.

    A LoRAM adapter of a structured model, recovered, is zero in the columns of A and the rows of B that the
    pruning removed. Trained on the pruned model, it sees the pruned model's activations; the best any
    alignment can do is make them the original's. This trains the demo's recipe (same seed, so the same A
    init) on the original itself with those positions held at zero (zeroed at init, gradient masked), so
    the adapter reaches exactly the recovered adapter's positions and sees exactly the original's
    activations. Its gap closed is the ceiling of alignment for that pruned model and recipe.
    """
    def make() -> dict:
        import peft
        import torch
        from safetensors.torch import load_file

        from loram.train import train

        def recovered() -> list[Path]:
            return sorted((work / "cells").glob(f"{name}_*/recovered/adapter_model.safetensors"))
        if not recovered():
            run_cell(work, f"{model}/none/{DEMO_STEPS}/{seed}", base, evaluate)
        masks = {k: (v != 0) for k, v in load_file(recovered()[0]).items()}
        real = peft.get_peft_model

        def confined(m, config, *args, **kwargs):
            m = real(m, config, *args, **kwargs)
            for name, param in m.named_parameters():
                if param.requires_grad:
                    mask = masks[name.replace(".default", "")].to(param.dtype)
                    with torch.no_grad():
                        param.mul_(mask)
                    param.register_hook(lambda g, mask=mask: g * mask)
            return m
        peft.get_peft_model = confined
        try:
            train(model=base, out=folder, overwrite=True, **train_recipe(seed))
        finally:
            peft.get_peft_model = real
        return evaluate(str(folder))
    name = folder_name(model)
    folder = work / "ref" / f"ceiling-{name}-{seed}"
    return cached(work / "ref" / f"ceiling-{name}-{seed}.json", make)


def restore(work: Path, items: int) -> int:
    """Rebuild --work's records (every cell's results, the references) from results/alignment_grid.json, where missing.

    The trained models are not restored: a restored cell is reported, not re-run; a new cell is measured next to
    them (the same references, the pruned model made again: pruning is deterministic for a thread count). Returns
    the number of cells restored."""
    saved = json.loads((RESULTS / "alignment_grid.json").read_text())
    if saved["items"] != items:
        raise SystemExit(f"--restore: the stored cells were evaluated on {saved['items']} GSM8K items, not --items {items}")
    for name, result in saved["references"].items():
        path = work / "ref" / f"{name}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    restored = 0
    for row in saved["rows"]:
        folder = work / "cells" / folder_name(row["cell"])
        if (folder / "cell.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if row["align"]:
            (folder / "align.json").write_text(json.dumps(row["align"], indent=1) + "\n")
        (folder / "eval.json").write_text(json.dumps({k: v for k, v in row.items() if k.startswith(("gsm8k", "news"))},
                                                     indent=1) + "\n")
        (folder / "cell.json").write_text(json.dumps(row))
        restored += 1
    return restored


def gap(original: float, lora: float, value: float) -> float:
    return (original - value) / (original - lora)


def table(rows: list[dict], refs: dict) -> list[str]:
    orig = refs["original"]
    lines = ["| pruned | alignment | steps | seed | GSM8K PPL | gap closed | news PPL | news vs original | "
             "wiki PPL after align | align s/step | align peak MiB |", "|---" * 11 + "|"]
    for r in sorted(rows, key=order):
        lora = refs[f"lora-{r['seed']}"]
        a = r["align"]
        lines.append(
            f"| {r['model']} | {r['objective']} | {r['steps']} | {r['seed']} | {r['gsm8k']:.3f} | "
            f"{gap(orig['gsm8k'], lora['gsm8k'], r['gsm8k']):.0%} | {r['news']:.3f} | "
            f"{r['news'] - orig['news']:+.3f} | " + (f"{a['wiki_ppl_end']:.1f} | {a['s_per_step']:.2f} | "
                                                      f"{a['peak_mib']:.0f} |" if a else "- | - | - |"))
    return lines


def order(r: dict) -> tuple:
    """Rows by pruned model (as PRUNE), steps, objective (as OBJECTIVES), seed."""
    objectives = list(OBJECTIVES)
    return (list(PRUNE).index(r["model"]), r["steps"],
            objectives.index(r["objective"]) if r["objective"] in objectives else len(objectives), r.get("seed", 0))


def summary(rows: list[dict], refs: dict) -> list[dict]:
    """Mean and spread (max - min) over seeds of each (model, objective, steps)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["objective"], r["steps"]), []).append(r)
    out = []
    orig = refs["original"]
    for (model, objective, steps), rs in groups.items():
        gaps = [gap(orig["gsm8k"], refs[f"lora-{r['seed']}"]["gsm8k"], r["gsm8k"]) for r in rs]
        news = [r["news"] for r in rs]
        out.append({"model": model, "objective": objective, "steps": steps, "seeds": [r["seed"] for r in rs],
                    "gap_closed": sum(gaps) / len(gaps), "gap_spread": max(gaps) - min(gaps),
                    "gsm8k": sum(r["gsm8k"] for r in rs) / len(rs), "news": sum(news) / len(news),
                    "news_spread": max(news) - min(news)})
    return sorted(out, key=order)


def plot(groups: list[dict], path: Path, ceiling: float | None = None) -> None:
    """Gap closed per variant (bars, +- half the seed spread), with the targets of the demo's model as lines: no
    alignment, twice that (the issue's target), half the gap (its ambitious goal) and the ceiling of alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(groups, key=order, reverse=True)  # first row on top
    labels = [f"{g['model']} / {g['objective']} / {g['steps']} steps ({len(g['seeds'])} seed"
              f"{'s' if len(g['seeds']) > 1 else ''})" for g in groups]
    colors = ["#999999" if g["objective"] == "none" else "#d62728" if g["objective"] == DEMO
              else "#e69f00" if "oracle" in g["objective"] else "#4c72b0" for g in groups]
    fig, ax = plt.subplots(figsize=(13, 0.3 * len(groups) + 1.8))
    values = [100 * g["gap_closed"] for g in groups]
    ax.barh(labels, values, xerr=[50 * g["gap_spread"] for g in groups], color=colors, height=0.7)
    for i, v in enumerate(values):
        ax.text(v + 1, i, f"{v:.0f}%", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    none = next((100 * g["gap_closed"] for g in groups if g["model"] == "taylor50" and g["objective"] == "none"), None)
    lines = [(50, "half the gap", "#555555")]
    if none is not None:
        lines += [(none, f"no alignment {none:.0f}%", "#999999"), (2 * none, f"2x no alignment {2 * none:.0f}%", "#d62728")]
    if ceiling is not None:
        lines.append((100 * ceiling, f"ceiling {100 * ceiling:.0f}%", "#2ca02c"))
    for x, text, color in lines:  # the structured model's references (the rows above the non-structured ones)
        ax.axvline(x, color=color, ls="--", lw=1)
        ax.text(x, len(groups) - 0.4, text, rotation=90, ha="right", va="bottom", fontsize=8, color=color)
    ax.set_ylim(-0.6, len(groups) + 3.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the original -> LoRA gap closed on GSM8K held-out (grey: no alignment; red: what loram demo "
                  "aligns with; orange: aligned on GSM8K text, a bound;\n"
                  "dashed: for taylor50, no alignment, twice that (the target), half the gap, the ceiling of alignment)")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/loram-alignment-grid"))
    ap.add_argument("--cells", nargs="*", default=None, help="MODEL/OBJECTIVE/STEPS/SEED (default: GRID)")
    ap.add_argument("--items", type=int, default=100, help="GSM8K held-out items (news: half as many)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="folder for alignment_grid.{md,json,png} (default benchmarks/results; another folder keeps a "
                         "side run's --work from rewriting the committed results)")
    ap.add_argument("--restore", action="store_true", help="first rebuild --work's records from results/alignment_grid.json "
                                                           "(a new machine: measure new cells next to the stored ones)")
    args = ap.parse_args()
    if args.restore:
        print(f"restored {restore(args.work, args.items)} cells into {args.work}", flush=True)
    cells = args.cells if args.cells is not None else GRID
    wanted = {f.split("/")[-1].split(".jsonl")[0] for c in cells for f in OBJECTIVES[c.split("/")[1]] or []
              if f.startswith("{work}/data/")}
    if wanted.intersection(ORACLE_FILES) and args.items > ORACLE_ITEMS.start:
        raise SystemExit(f"--items {args.items}: the oracle cells align on gsm8k-heldout items from "
                         f"{ORACLE_ITEMS.start} on; evaluate at most {ORACLE_ITEMS.start} items with them")
    base = sh("assets", "path", "model").strip()
    evaluate = Evaluator(base, args.items)
    done = {p.parent.name for p in (args.work / "cells").glob("*/eval.json")}
    rows = []
    earlier = [json.loads((args.work / "cells" / d / "cell.json").read_text())["cell"]
               for d in sorted(done) if (args.work / "cells" / d / "cell.json").is_file()]
    all_cells = list(dict.fromkeys([*cells, *earlier]))  # the asked ones first, in order; then every earlier one
    if not args.report_only and wanted:
        import alignment_data

        alignment_data.build(args.work / "data", files=wanted)  # the grid's own alignment files, where missing
    for cell in all_cells:
        if args.report_only and folder_name(cell) not in done:
            continue
        row = run_cell(args.work, cell, base, evaluate)
        (args.work / "cells" / folder_name(cell) / "cell.json").write_text(json.dumps(row))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("cell", "gsm8k", "news")}), flush=True)
    refs = references(args.work, base, {r["seed"] for r in rows} | {0}, evaluate)
    refs["ceiling-taylor50-0"] = ceiling(args.work, base, "taylor50", 0, evaluate)
    groups = summary(rows, refs)
    lines = ["# Alignment that pays: LoRAM on SmolLM2-135M by alignment objective", "",
             "Original: GSM8K held-out " + f"{refs['original']['gsm8k']:.3f}, news {refs['original']['news']:.3f}; "
             + "; ".join(f"LoRA on the original (seed {k.split('-')[1]}): GSM8K {v['gsm8k']:.3f}, news {v['news']:.3f}"
                         for k, v in refs.items() if k.startswith("lora-")), "",
             *table(rows, refs), "", "Mean over seeds (spread = max - min):", "",
             "| pruned | alignment | steps | seeds | gap closed | spread | news PPL | news spread |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['model']} | {g['objective']} | {g['steps']} | {len(g['seeds'])} | {g['gap_closed']:.1%} | "
              f"{g['gap_spread']:.1%} | {g['news']:.3f} | {g['news_spread']:.3f} |" for g in groups]
    top = refs["ceiling-taylor50-0"]
    ceiling_gap = gap(refs["original"]["gsm8k"], refs["lora-0"]["gsm8k"], top["gsm8k"])
    lines[3:3] = ["", f"Ceiling of alignment for taylor50 (LoRA on the original confined to a recovered LoRAM "
                      f"adapter's positions, seed 0): GSM8K {top['gsm8k']:.3f} ({ceiling_gap:.0%} of the gap), "
                      f"news {top['news']:.3f}"]
    args.results.mkdir(parents=True, exist_ok=True)
    plot(groups, args.results / "alignment_grid.png", ceiling_gap)
    write("alignment_grid", {"machine": machine(), "items": args.items, "references": refs, "rows": rows,
                             "summary": groups}, lines, args.results)


if __name__ == "__main__":
    main()
