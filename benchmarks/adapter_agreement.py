"""Where LoRAM's adapter parts from LoRA's: per-layer agreement of the weight updates, from the alignment grid.

For every cell of an alignment grid work folder (`alignment_grid.py --work DIR`) that kept its recovered
adapter, the update each adapted module makes, dW = B @ A (scaled alike in every adapter: same rank and
alpha), is compared with the same module's update in LoRA trained on the original (same seed), in the
ceiling (`alignment_grid.ceiling()`: LoRA on the original confined to the recovered adapter's positions) and
in the unaligned LoRAM adapter: the cosine similarity of the flattened updates, averaged over the modules of
three groups of decoder layers: before the pruned range, the pruned layers, after it.

The layers before the pruned range run the same weights on the same inputs in the unaligned pruned model
and the original, so there the forward pass is identical and only the backward signal (what the layers
downstream make of the loss) differs: an agreement far below LoRA-vs-ceiling there says the gap lies in the
gradient the pruned model passes back, not in the activations it feeds forward. (Alignment with
`--train-layers all`, the default, also moves those layers a little.)

A second table puts the same question without the optimizer in between: the gradient of the demo's
fine-tuning loss (the first 16 GSM8K training examples, 256 tokens) with respect to each adapted weight of
the unpruned layers, in the original, the pruned model and every aligned model the folder kept, fp32:
cosine similarity to the original's gradient. Adam's first steps move every entry by about the learning
rate whatever the gradient's size, so two adapters can disagree far more than their gradients do.

    python benchmarks/alignment_grid.py --work DIR --cells ...     # the cells and references first
    python benchmarks/adapter_agreement.py --work DIR               # writes results/adapter_agreement.{md,json}
    python benchmarks/adapter_agreement.py --work DIR --gradients-only
        # only the second table, for every aligned model the folder kept, next to each cell's gap closed: does
        # the gap closed follow the gradient agreement? (needs no reference adapters; results/gradient_agreement.*)
    python benchmarks/adapter_agreement.py --work DIR --gradients-only --cells taylor50/oracle-gsm8k/40/0
        # those cells measured again, every other stored row kept
"""

import argparse
import json
import re
from pathlib import Path

from _common import RESULTS, machine, write
from alignment_grid import folder_name


def updates(folder: Path) -> dict:
    """{module: B @ A} of a peft LoRA adapter folder, in float32."""
    from safetensors.torch import load_file

    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {k.removesuffix(".lora_A.weight"): sd[k.replace("lora_A", "lora_B")].float() @ a.float()
            for k, a in sd.items() if k.endswith(".lora_A.weight")}


def reference(folder: Path) -> Path:
    """A reference adapter folder of the grid, or a one-line exit naming what to run."""
    if not (folder / "adapter_model.safetensors").is_file():
        raise SystemExit(f"no adapter in {folder}: run the grid (alignment_grid.py) on this --work folder first")
    return folder


def agreement(a: dict, b: dict, groups: dict[str, range]) -> dict:
    """Mean cosine similarity of the updates over the modules of each layer group (and of all)."""
    import torch

    def layer(name: str) -> int:
        return int(re.search(r"\.layers\.(\d+)\.", name).group(1))
    cos = {k: torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), 0).item() for k in a}
    out = {"all": sum(cos.values()) / len(cos)}
    for name, layers in groups.items():
        vals = [c for k, c in cos.items() if layer(k) in layers]
        out[name] = sum(vals) / len(vals) if vals else None
    return out


def gradients(path: Path, batches: list[dict], layers: list[int]) -> dict:
    """{module name: d loss / d weight} over `batches` for the adapted modules of decoder `layers` (fp32)."""
    import torch

    from loram.memory_plan import TARGETS
    from loram.shared.pruned_model import from_pretrained

    model = from_pretrained(path, dtype=torch.float32)
    wanted = {f"model.layers.{i}." for i in layers}
    params = {n.removesuffix(".weight"): p for n, p in model.named_parameters()
              if any(n.startswith(w) for w in wanted) and n.split(".")[-2].removesuffix("_proj") in TARGETS}
    wanted_ids = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted_ids)
    for batch in batches:
        model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in params.items()}


def gradient_rows(work: Path, model: str, groups: dict[str, range], only: list[str] | None = None) -> list[dict]:
    """Gradient agreement of the pruned model and of every kept aligned model (or only the cells `only` names) with
    the original's."""
    from loram.evaluate import eval_set
    from loram.sft_format import SFTCollator, tokenize_sft
    from loram.shared.assets import model_dir
    from loram.shared.pruned_model import load_tokenizer

    unpruned = {k: v for k, v in groups.items() if "pruned" not in k}
    layers = [i for r in unpruned.values() for i in r]
    tok = load_tokenizer(model_dir())
    records, columns = eval_set("gsm8k-train", 16)  # the built-in split's question / answer columns
    data = tokenize_sft(records, tok, 256, columns)
    collate = SFTCollator.for_tokenizer(tok)
    batches = [collate([data[j] for j in range(i, min(i + 4, len(data)))]) for i in range(0, len(data), 4)]
    original = gradients(model_dir(), batches, layers)
    models = {f"{model} (no alignment)": work / "pruned" / model}
    for f in sorted((work / "cells").glob(f"{folder_name(model)}_*")):
        if (f / "aligned" / "model.safetensors").is_file() and (f / "cell.json").is_file():
            models[json.loads((f / "cell.json").read_text())["cell"]] = f / "aligned"
    if only is not None:
        missing = [c for c in only if c not in models]
        if missing:
            raise SystemExit(f"--cells: no aligned model kept under {work}/cells for {', '.join(missing)}")
        models = {c: models[c] for c in only}
    return [{"a": name, "b": "original", **agreement(gradients(path, batches, layers), original, unpruned)}
            for name, path in models.items()]


def gradients_only(work: Path, model: str, groups: dict[str, range], only: list[str] | None = None) -> None:
    """The gradient table alone, each aligned model next to its cell's gap closed on GSM8K held-out. With `only`,
    those cells are measured again and every other row is kept from results/gradient_agreement.json."""
    from alignment_grid import DEMO_STEPS, gap

    grads = gradient_rows(work, model, groups, only)
    refs = {p.stem: json.loads(p.read_text()) for p in (work / "ref").glob("*.json")}
    for r in grads:
        folder = work / "cells" / folder_name(r["a"])
        cell = json.loads((folder / "cell.json").read_text()) if (folder / "cell.json").is_file() else None
        if r["a"].endswith("(no alignment)"):  # gradient_rows' unaligned model: the grid's seed-0 "none" cell
            none = work / "cells" / folder_name(f"{model}/none/{DEMO_STEPS}/0") / "cell.json"
            cell = json.loads(none.read_text()) if none.is_file() else None
        r["gap_closed"] = (gap(refs["original"]["gsm8k"], refs[f"lora-{cell['seed']}"]["gsm8k"], cell["gsm8k"])
                           if cell and f"lora-{cell['seed']}" in refs else None)
    if only is not None:
        stored = json.loads((RESULTS / "gradient_agreement.json").read_text())["gradient_rows"]
        grads = [r for r in stored if r["a"] not in only] + grads
    keys = ["all", *(k for k in groups if "pruned" not in k)]
    table = ["# Does LoRAM's gain follow the fine-tuning gradient's agreement with the original's?", "",
             "Gradient of the fine-tuning loss (16 GSM8K training examples) with respect to each adapted weight of the "
             f"unpruned layers of {model}, against the original's (mean cosine similarity), and the cell's share of the "
             "original -> LoRA gap closed on GSM8K held-out. "
             "`python benchmarks/adapter_agreement.py --work DIR --gradients-only`", "",
             "| model | " + " | ".join(keys) + " | gap closed |", "|---" * (len(keys) + 2) + "|"]
    for r in sorted(grads, key=lambda r: r["all"]):
        table.append(f"| {r['a']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " | "
                     + ("-" if r["gap_closed"] is None else f"{r['gap_closed']:.1%}") + " |")
    write("gradient_agreement", {"machine": machine(), "model": model, "gradient_rows": grads}, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="an alignment_grid.py --work folder")
    ap.add_argument("--model", default="taylor50", help="the grid's pruned model whose cells to compare")
    ap.add_argument("--gradients-only", action="store_true",
                    help="only the gradient table, with each cell's gap closed (results/gradient_agreement.*)")
    ap.add_argument("--cells", nargs="+", default=None,
                    help="with --gradients-only: measure only these cells (MODEL/OBJECTIVE/STEPS/SEED) again and keep "
                         "the stored rows of every other")
    args = ap.parse_args()
    if args.cells and not args.gradients_only:
        raise SystemExit("--cells needs --gradients-only: the adapter table compares every kept cell")
    from loram.shared.errors import LoramError
    from loram.shared.manifest import Manifest

    try:
        manifest = Manifest.load(args.work / "pruned" / args.model)
    except LoramError as e:
        raise SystemExit(f"{e} (the grid's pruned models live under --work/pruned)") from None
    pruned = sorted(manifest.pruned_layers)
    if not pruned:
        raise SystemExit(f"{args.model} is not a structured pruned model (no pruned layers): compare a structured one")

    n = manifest.architecture.num_layers
    groups = {f"layers 0-{pruned[0] - 1} (before)": range(pruned[0]),
              f"layers {pruned[0]}-{pruned[-1]} (pruned)": range(pruned[0], pruned[-1] + 1),
              f"layers {pruned[-1] + 1}-{n - 1} (after)": range(pruned[-1] + 1, n)}
    if args.gradients_only:
        return gradients_only(args.work, args.model, groups, args.cells)
    cells = {json.loads((f / "cell.json").read_text())["cell"]: f
             for f in sorted((args.work / "cells").glob(f"{folder_name(args.model)}_*"))
             if (f / "recovered" / "adapter_model.safetensors").is_file() and (f / "cell.json").is_file()}
    if not cells:
        raise SystemExit(f"no cell of {args.model} under {args.work}/cells kept its recovered adapter; run the grid first")
    ceiling = updates(reference(args.work / "ref" / f"ceiling-{folder_name(args.model)}-0"))
    rows = []
    for seed in sorted({int(c.split("/")[3]) for c in cells}):
        lora = updates(reference(args.work / "ref" / f"lora-{seed}"))
        if seed == 0:
            rows.append({"a": "ceiling", "b": f"lora-{seed}", **agreement(ceiling, lora, groups)})
        unaligned = next((f for c, f in cells.items() if c.split("/")[1] == "none" and c.endswith(f"/{seed}")), None)
        unaligned_updates = updates(unaligned / "recovered") if unaligned is not None else None
        for cell, folder in cells.items():
            if not cell.endswith(f"/{seed}"):
                continue
            mine = updates(folder / "recovered")
            rows.append({"a": cell, "b": f"lora-{seed}", **agreement(mine, lora, groups)})
            if seed == 0:
                rows.append({"a": cell, "b": "ceiling", **agreement(mine, ceiling, groups)})
            if unaligned is not None and folder != unaligned:
                rows.append({"a": cell, "b": f"{args.model}/none (seed {seed})",
                             **agreement(mine, unaligned_updates, groups)})
    keys = ["all", *groups]
    grads = gradient_rows(args.work, args.model, groups)
    gkeys = ["all", *(k for k in groups if "pruned" not in k)]
    table = ["# Where LoRAM's adapter parts from LoRA's: agreement of the weight updates (B @ A)", "",
             f"Mean cosine similarity over the adapted modules; {args.model}, pruned layers {pruned[0]}-{pruned[-1]} "
             f"of {n}. `python benchmarks/adapter_agreement.py --work DIR`", "",
             "| adapter | compared with | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        table.append(f"| {r['a']} | {r['b']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in keys) + " |")
    table += ["", "Gradient of the fine-tuning loss (16 GSM8K training examples) with respect to each adapted weight of "
              "the unpruned layers, against the original's (mean cosine similarity):", "",
              "| model | compared with | " + " | ".join(gkeys) + " |", "|---" * (len(gkeys) + 2) + "|"]
    for r in grads:
        table.append(f"| {r['a']} | {r['b']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for k in gkeys) + " |")
    write("adapter_agreement", {"machine": machine(), "model": args.model, "groups": list(groups), "rows": rows,
                                "gradient_rows": grads}, table)


if __name__ == "__main__":
    main()
