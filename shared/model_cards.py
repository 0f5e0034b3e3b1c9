"""Model cards (README.md) for what LoRAM publishes (docs/hub.md, Model cards).

The Hub's `base_model_relation` has no "pruned": a pruned (and aligned) checkpoint is a `finetune`
of its original model, and a recovered adapter is an `adapter` of the original (peft's own card would
name the pruned model it was trained on). LoRAM's details go under a `loram:` metadata key. Cards are
deterministic (no dates), so publishing the same folder twice yields the same README.md.

    pruned_card(folder, manifest, repo_id="org/llama-70b-p85")   # metadata + prose for a checkpoint
    adapter_card(sidecar, adapter_config, repo_id=None)           # for `loram recover` / `loram push`
"""

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import yaml

from loram.shared.manifest import Manifest

RECIPES = ("prune_config.yaml", "align_config.yaml")  # the commands that made a checkpoint, in order
EVAL_GLOB = "eval*.json"  # `loram eval --json > eval_results.json`: {"results": [row, ...]}


def _front_matter(meta: dict) -> str:
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n"


def _marker(meta: dict) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"<!-- loram card {digest} -->\n"


def card_metadata(text: str) -> dict:
    """The YAML metadata block of a model card ({} when there is none or it is not a mapping)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


# -- pruned checkpoints ----------------------------------------------------------------------------

def parameter_counts(folder: Path) -> dict:
    """Parameters of the original and of the pruned model, counted from `config.json` on the meta device.

    The pruned config keeps every original global size and records per-layer sizes in
    `per_layer_config`, so dropping that (and using the stock model type) gives the original model."""
    from loram.shared.pruned_model import load_config, original_config, param_count

    data = json.loads((Path(folder) / "config.json").read_text())
    counts = {"original": param_count(original_config(data)), "pruned": param_count(load_config(folder))}
    counts["reduction"] = round(counts["original"] / counts["pruned"], 4)
    return counts


def evaluation_results(folder: Path) -> list[dict]:
    """Rows of every `eval*.json` in `folder` (the output of `loram eval --json`), in file-name order."""
    rows = []
    for path in sorted(Path(folder).glob(EVAL_GLOB)):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            rows += [{"file": path.name, **r} for r in data["results"] if isinstance(r, dict)]
    return rows


def evaluation_table(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, flat rows) of `loram eval` rows for a table: name, perplexity, tokens, one column per
    lm-eval headline score (each row's `scores`), model, adapter; columns no row has are left out."""
    flat = [{**{k: v for k, v in r.items() if k != "scores"}, **(r.get("scores") or {})} for r in rows]
    for r in flat:  # as the progress lines print it (4.8720, not 4.872)
        if isinstance(r.get("perplexity"), float):
            r["perplexity"] = f"{r['perplexity']:.4f}"
    scores = list(dict.fromkeys(k for r in rows for k in (r.get("scores") or {})))
    columns = ["name", "perplexity", "tokens", "gsm8k_accuracy", *scores, "model", "adapter"]  # gsm8k_accuracy: older rows
    return [c for c in columns if any(c in r for r in flat)], flat


def _method_line(method: dict) -> str:
    if method["kind"] == "structured":
        layers = method.get("layers")
        where = f", layers [{layers[0]}, {layers[1]})" if layers else ""
        return (f"structured, {method['criterion']} importance, attention ratio {method.get('attn_ratio')}, "
                f"MLP ratio {method.get('mlp_ratio')}{where}")
    target = f"{method['nm'][0]}:{method['nm'][1]}" if method.get("nm") else f"sparsity {method.get('sparsity')}"
    return f"non-structured, {method['criterion']}, {target}"


def _alignment_line(record: dict) -> str:
    def named(d: dict) -> str:
        digest = f", sha256 {d['sha256'][:12]}" if d.get("sha256") else ""
        return f"{d.get('source')} (weight {d.get('weight')}{digest})"
    data = ", ".join(named(d) for d in record.get("data") or [])
    ppl = (record.get("eval") or {}).get("perplexity")
    parts = [f"{record.get('steps')} steps", f"{record.get('tokens', 0):,} tokens" if record.get("tokens") else "",
             f"on {data}" if data else "", f"held-out perplexity {ppl}" if ppl is not None else ""]
    return ", ".join(p for p in parts if p)


def pruned_card(folder: Path, manifest: Manifest, *, repo_id: str | None = None, base_model: str | None = None,
                license: str | None = None) -> str:
    """The card of a pruned (and possibly aligned) checkpoint: metadata from the manifest, the alignment
    records, evaluation results found in `folder`, and the recipes (`prune_config.yaml`, ...) that made it.

    `base_model`: the original's Hub id when the manifest names a local folder (default: the manifest's
    id when it was pulled from the Hub, i.e. has a revision)."""
    folder = Path(folder)
    method = asdict(manifest.method)
    structured = method["kind"] == "structured"
    counts = parameter_counts(folder)
    evals = evaluation_results(folder)
    base = base_model or (manifest.base.id if manifest.base.revision else None)
    loram_meta = {
        "format_version": manifest.format_version, "tool_version": manifest.tool_version,
        "base": {"id": manifest.base.id, "revision": manifest.base.revision},
        "method": method,
        "parameters": {"original": counts["original"], "pruned": counts["pruned"], "reduction": counts["reduction"]},
        "pruned_layers": manifest.pruned_layers if structured else manifest.masked_layers,
        "alignment": manifest.alignment,
        "evaluation": evals,
    }
    meta = {"base_model": base, "base_model_relation": "finetune" if base else None, "library_name": "transformers",
            "pipeline_tag": "text-generation", "license": license,
            "tags": ["loram", "pruned", "structured-pruning" if structured else "non-structured-pruning"],
            "loram": loram_meta}
    meta = {k: v for k, v in meta.items() if v is not None}
    name = repo_id or folder.name
    original = base or manifest.base.id
    revision = f" (revision `{manifest.base.revision[:12]}`)" if manifest.base.revision else ""
    lines = [f"# {name}", "",
             f"`{original}`{revision} pruned with LoRAM: train LoRA adapters on this smaller model, then recover "
             "them onto the original model with `loram recover`.", "",
             "| | |", "|---|---|",
             f"| Method | {_method_line(method)} |",
             f"| Parameters | {counts['original']:,} -> {counts['pruned']:,} ({counts['reduction']:.2f}x smaller) |"
             if structured else f"| Parameters | {counts['pruned']:,} (shapes unchanged, pruned weights are zeros) |",
             f"| Alignment | {'; '.join(_alignment_line(r) for r in manifest.alignment) or 'none'} |", ""]
    if not base:
        lines += [f"The manifest names the original model by a local path (`{manifest.base.id}`); recover adapters "
                  "with `loram recover ADAPTER --original ORG/NAME` pointing at a copy of it.", ""]
    lines += ["## Use", "", "```bash", f"loram train {name} --data my.jsonl --out adapter-pruned",
              "loram recover adapter-pruned --out adapter        # a standard peft adapter of the original", "```",
              "", "```python"]
    if structured:
        lines += ["import loram",
                  "loram.register()  # the pruned model types, for transformers' Auto classes (no remote code)",
                  "from transformers import AutoModelForCausalLM", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```", "",
                  "Without the `loram` package, pass `trust_remote_code=True` (the repository carries its modeling "
                  "file).", ""]
    else:
        lines += ["from transformers import AutoModelForCausalLM  # the stock model class: shapes are the original's",
                  "", f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```", ""]
    if evals:
        columns, flat = evaluation_table(evals)
        lines += ["## Evaluation", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in flat]
        lines.append("")
    lines += ["## How it was made", ""]
    for recipe in RECIPES:
        if (folder / recipe).is_file():
            command = "loram publish " + recipe.split("_")[0]
            lines += [f"`{recipe}` (repeat with `{command} --config {recipe}`):", "", "```yaml",
                      (folder / recipe).read_text().rstrip(), "```", ""]
    lines += ["## Integrity", "", "`loram_manifest.json` records the sha256 of every file; `loram pull` checks "
              "them and refuses a file that differs.", ""]
    return _front_matter(meta) + "\n" + "\n".join(lines) + "\n" + _marker(meta)


# -- recovered adapters ----------------------------------------------------------------------------

def adapter_card(sidecar: dict, adapter_config: dict, repo_id: str | None = None) -> str:
    """The recovered adapter's card (docs/hub.md, Model cards): base is the original model, relation adapter."""
    original, pruned = sidecar["original_model"], sidecar["pruned_model"]
    meta = {
        "base_model": original["id"], "base_model_relation": "adapter", "library_name": "peft",
        "pipeline_tag": "text-generation", "tags": ["loram", "lora", "peft"],
        "loram": {"trained_on": pruned["id"], "trained_on_revision": pruned["revision"],
                  "method": sidecar["method"], "fill": sidecar["fill"],
                  "rank": adapter_config.get("r"), "alpha": adapter_config.get("lora_alpha"),
                  "target_modules": sorted(adapter_config.get("target_modules") or [])},
    }
    return (f"{_front_matter(meta)}\n# LoRAM adapter for {original['id']}\n\n"
            f"A LoRA adapter trained with LoRAM on the pruned model `{pruned['id']}` and recovered to the "
            f"shapes of the original model `{original['id']}` (fill: {sidecar['fill']}).\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id or '<this adapter>'}\")\n```\n\n"
            + _marker(meta))
