"""`loram demo`: the whole LoRAM loop on the embedded SmolLM2-135M-Instruct, with a report.

    assets -> prune (Taylor, ratio 0.5) -> selfgen (the original writes worked math problems) -> align
    (hidden-state distillation from the original, on Wikipedia in the chat template and those problems, half
    and half) -> publish (local folder repository,
    and a Hub endpoint when given) -> pull (verified) -> train QLoRA on GSM8K (LoRA when 4-bit is
    unavailable) -> recover -> evaluate -> report.md + plots

Next to LoRAM it trains LoRAM on the unaligned pruned model (does alignment help?) and LoRA on the
original (the upper bound), and evaluates on held-out GSM8K (in-domain) and news (out-of-domain).
Every stage runs the same code a user would, under `--out/stages/<name>/`: prune, selfgen, align and each
training run the `loram` command in a process of their own (so each training's peak memory is its own);
publish, pull, recover and evaluate call the same functions in the demo's process; a stage whose inputs did not change is reused, so a
re-run or a run after an interruption continues from the last completed stage.
"""

import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from loram.demo_report import LORA, LORAM, ORIGINAL, PRUNED, SMALL, UNALIGNED
from loram.shared.architectures import DEFAULT_RATIO, check_positions, ratio_options
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import looks_like_repo_id

GSM8K_COLUMNS = "prompt=question,response=answer"
# General text and math-domain text the original writes itself, half and half: the paper's FineWeb + OpenWebMath
# recipe in small, measured above wiki-chat alone for LoRAM on GSM8K (docs/alignment.md)
ALIGN_DATA = ("wiki-chat:1", "{selfgen}:1")
ALIGN_BATCH = 1  # sequences per alignment step (DEFAULTS' align_steps)
SELFGEN_FILE = "math.jsonl"
SELFGEN_PROMPTS = "math"  # `loram publish selfgen --prompts`: the built-in requests for worked math problems
# (full, --quick) defaults; docs/demo.md explains them.
DEFAULTS = {
    "calib_samples": (32, 4),
    # how prune scores KV groups: the default (the loss with each removed); --quick first-order, a smoke run
    "kv_score": ("loss", "taylor"),
    # alignment: 20,480 tokens (--quick 512) in steps of one sequence: at this budget twice the optimizer steps of
    # batch 2 close more of the gap in the same time (docs/alignment.md)
    "align_steps": (80, 4),
    # `loram publish selfgen --prompts math`: conversations, tokens per answer, batch (one batch: fastest on CPU)
    "selfgen_count": (48, 6),
    "selfgen_tokens": (192, 48),
    "train_steps": (15, 2),
    "eval_limit": (32, 6),
    # news documents: at 50 (the grid's set) alignment's small effect on news separates from noise; at 16 or 32 it
    # did not in the demo's own models (docs/demo.md)
    "news_limit": (50, 3),
    "seq_len": (256, 128),
}


@dataclass
class DemoConfig(Config):
    out: Path = option(Path("loram-demo"), "Folder for the report, its plots and every stage's output.")
    quick: bool = option(False, "A smoke run of a few minutes: tiny alignment, training and evaluation.")
    ratio: float | None = ratio_options()[0]  # Taylor on layers [4, L-2); docs/demo.md: why 0.5
    align_steps: int | None = option(None, "Alignment steps on Wikipedia and the original's own math problems "
                                           "(of one sequence each; default 80; --quick 4).")
    train_steps: int | None = option(None, "LoRA steps on the GSM8K fine-tune split (default 15; --quick 2).")
    eval_limit: int | None = option(None, "Held-out GSM8K items evaluated (default 32; --quick 6).")
    news_limit: int | None = option(None, "News documents evaluated, the out-of-domain set (default 50; --quick 3).")
    quant: str = option("auto", "Base-model precision for training: nf4 (QLoRA), none (LoRA), or auto "
                                "(nf4 when bitsandbytes is installed).", choices=("auto", "nf4", "none"))
    publish_to: str | None = option(None, "Also push the aligned checkpoint to the Hub at this endpoint URL (as "
                                          "--repo-id) and pull it back from there.")
    repo_id: str = option("loram-demo/smollm2-135m-loram", "Hub repository for --publish-to.")
    seq_len: int | None = option(None, "Tokens per alignment, training and evaluation sequence (default 256; "
                                       "--quick 128).")

    def check(self):
        self.ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        if not 0 < self.ratio < 1:
            why = " (0 prunes nothing: the demo would compare the original with itself)" if self.ratio == 0 else ""
            raise LoramError(f"--ratio must lie in (0, 1) for the demo{why}, got {self.ratio}")
        for name, least in (("align_steps", 1), ("train_steps", 1), ("eval_limit", 1), ("news_limit", 1),
                            ("seq_len", 2)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise LoramError(f"--{name.replace('_', '-')} must be >= {least}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise LoramError(f"--out {self.out} exists and is not a directory; choose another --out")
        if self.publish_to is not None:
            url = urllib.parse.urlparse(self.publish_to)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise LoramError(f"--publish-to {self.publish_to!r} is not a Hub endpoint URL; give one such as "
                                 "http://127.0.0.1:8000")
            if not looks_like_repo_id(self.repo_id):
                raise LoramError(f"--repo-id {self.repo_id!r} is not a Hub repository id ORG/NAME")

    def setting(self, name: str) -> int | str:
        value = getattr(self, name, None)
        return value if value is not None else DEFAULTS[name][1 if self.quick else 0]

    @property
    def align_eval_limit(self) -> int:
        """Held-out Wikipedia blocks the alignment stage evaluates."""
        return 4 if self.quick else 16

    @property
    def resolved_quant(self) -> str:
        if self.quant != "auto":
            return self.quant
        return "nf4" if importlib.util.find_spec("bitsandbytes") else "none"


def _log(msg: str) -> None:
    print(f"[loram demo] {msg}", file=sys.stderr, flush=True)


def _loram(*args) -> None:
    """Run one `loram` command as a user would; its output (progress included) goes to stderr."""
    cmd = [sys.executable, "-m", "loram", *map(str, args)]
    _log("$ loram " + " ".join(map(str, args)))
    proc = subprocess.run(cmd, stdout=sys.stderr)
    if proc.returncode == 130:
        interrupt = KeyboardInterrupt()
        interrupt.already_said = True  # the stage's process said "interrupted" itself: once is enough
        raise interrupt
    if proc.returncode != 0:
        raise LoramError(f"`loram {args[0]}` failed (exit {proc.returncode}); see its message above. Completed "
                         "stages are kept: re-run `loram demo` to continue")


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or reuse) every stage, then write the report into `cfg.out`; returns the report."""
    from loram.demo_report import write_report
    from loram.shared import assets
    from loram.stages import Stages

    started = time.time()
    out = Path(cfg.out)
    stages = Stages(out / "stages", log=_log)
    model_dir, data_dir = assets.model_dir(), assets.data_dir()
    asset_key = [json.loads((d / assets.RECORD_FILE).read_text())["sha256"] for d in (model_dir, data_dir)]
    quant, seq_len = cfg.resolved_quant, cfg.setting("seq_len")
    check_positions(json.loads((model_dir / "config.json").read_text()), seq_len, f"--seq-len {seq_len}")
    sizes = {"gsm8k-heldout": cfg.setting("eval_limit"), "news": cfg.setting("news_limit")}  # records per set
    train_args = ["--data", "gsm8k-train", "--columns", GSM8K_COLUMNS, "--quant", quant,
                  "--steps", cfg.setting("train_steps"), "--lr", "3e-4", "--batch", "4", "--seq-len", seq_len,
                  "--save-every", 1000, "--overwrite"]
    train_key = {"args": train_args}

    prune = stages.run("prune", {"assets": asset_key, "ratio": cfg.ratio, "samples": cfg.setting("calib_samples"),
                                 "kv_score": cfg.setting("kv_score")},
                       lambda f: _prune(model_dir, f, cfg))
    generated = stages.run("selfgen", {"assets": asset_key, **_selfgen_key(cfg)},
                           lambda f: _selfgen(model_dir, f, cfg))
    align_data = [d.format(selfgen=generated.folder / SELFGEN_FILE) for d in ALIGN_DATA]
    align = stages.run("align", {"prune": prune.key, "selfgen": generated.key, "steps": cfg.setting("align_steps"),
                                 "seq_len": seq_len, "eval_limit": cfg.align_eval_limit,
                                 "objective": _align_objective(), "data": ALIGN_DATA, "batch": ALIGN_BATCH},
                       lambda f: _align(prune.folder / "pruned", f, cfg, align_data))
    publish = stages.run("publish", {"align": align.key, "publish_to": cfg.publish_to, "repo_id": cfg.repo_id},
                         lambda f: _publish(align.folder / "aligned", f, cfg))
    pulled = _pull(publish, cfg)
    runs = {
        "train-loram": (pulled, {"publish": publish.key}),
        "train-loram-unaligned": (prune.folder / "pruned", {"prune": prune.key}),
        "train-lora": (model_dir, {"assets": asset_key}),
    }
    trained = {name: stages.run(name, {**key, **train_key}, lambda f, m=model: _train(m, f, train_args))
               for name, (model, key) in runs.items()}
    recovered = stages.run("recover", {n: trained[n].key for n in ("train-loram", "train-loram-unaligned")},
                           lambda f: _recover(trained, f))
    variants = {
        ORIGINAL: (model_dir, None),
        LORAM: (model_dir, recovered.folder / "aligned"),
        UNALIGNED: (model_dir, recovered.folder / "unaligned"),
        SMALL: (pulled, trained["train-loram"].folder / "adapter"),
        PRUNED: (pulled, None),
        LORA: (model_dir, trained["train-lora"].folder / "adapter"),
    }
    evaluated = stages.run("evaluate", {"stages": [s.key for s in stages.done.values()], "sizes": sizes,
                                        "seq_len": seq_len},
                           lambda f: _evaluate(variants, sizes, seq_len))
    report = {
        "config": cfg.to_dict(), "quant": quant, "model": str(model_dir),
        "stages": {n: {"seconds": s.seconds, "reused": s.reused, "folder": str(s.folder)} for n, s in stages.done.items()},
        "prune": prune.result, "selfgen": generated.result, "align": align.result, "publish": publish.result,
        "training": {n: t.result for n, t in trained.items()}, "results": evaluated.result["rows"],
        # records evaluated: fewer than asked when one keeps no response token within --seq-len (--quick's 128)
        **{key: evaluated.result.get("items", {}).get(data, sizes[data])
           for key, data in (("eval_items", "gsm8k-heldout"), ("news_docs", "news"))},
        "eval_items_asked": sizes["gsm8k-heldout"],
    }
    report["wall_time_s"] = round(time.time() - started, 1)
    write_report(report, out, cfg)
    return report


def _prune(model_dir: Path, folder: Path, cfg: DemoConfig) -> dict:
    from loram.accounting import plan_params

    _loram("publish", "prune", model_dir, "--method", "taylor", "--ratio", cfg.ratio,
           "--samples", cfg.setting("calib_samples"), "--kv-score", cfg.setting("kv_score"), "--out", folder / "pruned")
    plan = plan_params(json.loads((model_dir / "config.json").read_text()), "structured", cfg.ratio)
    return {"path": str(folder / "pruned"), "original_params": plan.original_params,
            "pruned_params": plan.training_params, "reduction": round(plan.reduction, 3),
            "reduction_4bit": round(plan.reduction_4bit, 3)}


def _align_objective() -> dict:
    """`loram publish align`'s default objective, read off its config; part of the align stage's key, so that a
    demo folder aligned with another objective is aligned again."""
    from dataclasses import fields

    from loram.publisher.align import AlignConfig

    names = ("distill_from", "kd_weight", "hidden_weight", "hidden_loss", "hidden_layers", "hidden_inputs", "train_layers")
    return {f.name: f.default for f in fields(AlignConfig) if f.name in names}


def selfgen_args(cfg: DemoConfig) -> list:
    """`loram publish selfgen` flags of the demo (after the model, before --out), every sampling setting spelled
    out so that the selfgen stage's key holds them. At least 2 x --seq-len / answer tokens conversations: each
    is longer than its answer (system prompt and request), so the file holds a few alignment blocks at any
    --seq-len (align refuses a source shorter than one block)."""
    tokens = cfg.setting("selfgen_tokens")
    count = max(cfg.setting("selfgen_count"), math.ceil(2 * cfg.setting("seq_len") / tokens))
    return ["--prompts", SELFGEN_PROMPTS, "--count", count, "--max-new-tokens", tokens, "--batch", count,
            "--temperature", 0.7, "--top-p", 0.9, "--seed", 0]


def _selfgen_key(cfg: DemoConfig) -> dict:
    """What the generated file depends on besides the model: the flags and the built-in prompts' text."""
    from loram.publisher.selfgen import BUILT_IN

    prompts = hashlib.sha256("\n".join(BUILT_IN[SELFGEN_PROMPTS]).encode()).hexdigest()
    return {"args": selfgen_args(cfg), "prompts": prompts}


def _selfgen(model_dir: Path, folder: Path, cfg: DemoConfig) -> dict:
    _loram("publish", "selfgen", model_dir, *selfgen_args(cfg), "--out", folder / SELFGEN_FILE)
    lines = (folder / SELFGEN_FILE).read_text().splitlines()
    return {"path": str(folder / SELFGEN_FILE), "conversations": len(lines), "prompts": SELFGEN_PROMPTS}


def _align(pruned: Path, folder: Path, cfg: DemoConfig, data: list[str]) -> dict:
    steps = cfg.setting("align_steps")
    _loram("publish", "align", pruned, *[x for d in data for x in ("--data", d)], "--steps", steps,
           "--seq-len", cfg.setting("seq_len"), "--batch", ALIGN_BATCH, "--lr", "1e-4", "--warmup", max(1, steps // 20),
           "--eval-data", "wiki-heldout",
           "--eval-limit", cfg.align_eval_limit, "--eval-every", max(1, steps // 2), "--save-every", steps,
           "--out", folder / "aligned")
    report = json.loads((folder / "aligned" / "align_report.json").read_text())
    return {"path": str(folder / "aligned"), "steps": steps, "losses": report.get("losses", []),
            "perplexities": [{"step": e["step"], "perplexity": e["perplexity"]} for e in report.get("evals", [])],
            "tokens": report.get("tokens_seen"), "seconds": report.get("wall_time_s")}


def _publish(aligned: Path, folder: Path, cfg: DemoConfig) -> dict:
    """A local folder repository (the files a Hub repository would hold, with its card); also the Hub."""
    from loram.publisher.push import checkpoint_files
    from loram.shared.manifest import Manifest, verify_files
    from loram.shared.model_cards import pruned_card

    manifest = Manifest.load(aligned)
    verify_files(aligned)
    repo = folder / "repo"
    repo.mkdir()
    for name, path in checkpoint_files(aligned, manifest).items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, repo / name)
    (repo / "README.md").write_text(pruned_card(aligned, manifest, repo_id=cfg.repo_id))
    result = {"folder": str(repo), "files": len(list(repo.iterdir()))}
    if cfg.publish_to:
        from loram.publisher.push import push

        pushed = push(folder=aligned, repo_id=cfg.repo_id, endpoint=cfg.publish_to)
        result["hub"] = {"repo_id": cfg.repo_id, "endpoint": cfg.publish_to, "commit": pushed.commit}
    return result


def _pull(publish, cfg: DemoConfig) -> Path:
    """The published model as a consumer gets it: every file checked against the manifest."""
    from loram.shared.manifest import verify_files

    hub = publish.result.get("hub")
    if hub:
        from loram.shared.hub import resolve_model

        _log(f"pulling {hub['repo_id']}@{hub['commit'][:10]} from {hub['endpoint']}")
        return resolve_model(hub["repo_id"], hub["commit"], hub["endpoint"]).path
    repo = Path(publish.result["folder"])
    verify_files(repo)
    _log(f"pulled {repo}: every file matches the manifest")
    return repo


def _train(model: Path, folder: Path, args: list) -> dict:
    _loram("train", model, *args, "--out", folder / "adapter")
    report = json.loads((folder / "adapter" / "training_report.json").read_text())
    keep = ("losses", "tokens_per_second", "peak_memory_bytes", "wall_time_s", "trainable_params")
    return {"model": str(model), **{k: report.get(k) for k in keep}}


def _recover(trained: dict, folder: Path) -> dict:
    from loram.recover import recover

    for name, src in (("aligned", "train-loram"), ("unaligned", "train-loram-unaligned")):
        _log(f"$ loram recover {trained[src].folder / 'adapter'} --out {folder / name}")
        recover(adapter=str(trained[src].folder / "adapter"), out=folder / name)
    return {"aligned": str(folder / "aligned"), "unaligned": str(folder / "unaligned")}


def _evaluate(variants: dict, sizes: dict[str, int], seq_len: int) -> dict:
    """Response-token perplexity of every variant on both sets; each model is loaded once."""
    from loram.evaluate import eval_set, load_spec, response_perplexity
    from loram.sft_format import tokenize_sft
    from loram.shared.runtime import configure_threads

    configure_threads()
    sets = {data: eval_set(data, count) for data, count in sizes.items()}
    rows, items = [], {}
    for name, (model_path, adapter) in variants.items():
        model, tokenizer = load_spec(str(model_path), str(adapter) if adapter else None, False)
        for data, (records, columns) in sets.items():
            if data not in items:  # the records that keep a labelled token within --seq-len (one tokenizer for all)
                items[data] = len(tokenize_sft(records, tokenizer, seq_len, columns))
            ppl, tokens = response_perplexity(model, tokenizer, records, columns, seq_len, 4, f"{name} on {data}")
            ppl = round(ppl, 4)  # the value the report shows (to 3 digits): the log rounds the same number
            rows.append({"variant": name, "data": data, "perplexity": ppl, "tokens": tokens})
            _log(f"{name} on {data}: perplexity {ppl:.3f} over {tokens:,} tokens")
        del model
    return {"rows": rows, "items": items}
