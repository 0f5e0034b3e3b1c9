"""`loram eval`: compare models on response-token perplexity and on lm-evaluation-harness tasks.

    loram eval original=BASE loram=BASE+RECOVERED small=PRUNED+ADAPTER --data gsm8k-heldout --json
    loram eval original=BASE loram=BASE+RECOVERED --tasks gsm8k_cot,strategyqa --limit 100

Each model spec is `MODEL`, `MODEL+ADAPTER` or `NAME=MODEL[+ADAPTER]`; MODEL is an original,
pruned or merged checkpoint (folder or Hub id), ADAPTER a peft adapter folder. Perplexity is
exp(mean NLL over response tokens) with the prompt masked (docs/method.md §8); plain-text data (`text`
records such as the built-in `news` split) is scored on every token. `--tasks` runs lm-eval's evaluator
on the loaded model, offline (`loram.harness`, docs/harness.md).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from loram.shared.architectures import check_positions
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, is_hub_id, looks_like_repo_id, revision_option


@dataclass
class EvalConfig(Config):
    models: list[str] = option(help="Models: MODEL, MODEL+ADAPTER or NAME=MODEL[+ADAPTER] (several to compare); a "
                                    "Hub MODEL or ADAPTER may name its revision: ORG/NAME@REV.", argument=True)
    data: str = option("gsm8k-heldout", "Evaluation data: a file, saved dataset folder or built-in split.")
    columns: str | None = option(None, "Column mapping, e.g. prompt=question,response=answer "
                                       "(automatic for the built-in GSM8K splits).")
    seq_len: int = option(512, "Maximum tokens per example.")
    limit: int | None = option(None, "Evaluate only the first N records.")
    batch: int = option(4, "Sequences per forward pass.")
    perplexity: bool = option(True, "Measure response-token perplexity on --data (--no-perplexity: tasks only).")
    tasks: str | None = option(None, "lm-eval tasks, comma-separated: gsm8k, gsm8k_cot, gsm8k_chat, "
                                     "elementary_math_qa, strategyqa, social_iqa (offline), or tasks of --include-path.")
    include_path: str | None = option(None, "A folder of your own lm-eval task YAMLs (local data_files) for --tasks.")
    shots: int | None = option(None, "Few-shot examples for --tasks (default: each task's own).")
    max_new_tokens: int | None = option(None, "Generation length for generative --tasks (default: the task's, 256).")
    seed: int = option(0, "Seed of lm-eval's few-shot sampling and generation for --tasks.")
    ignore_fingerprint: bool = option(False, "Evaluate an adapter on a base other than its recorded one (fingerprint or pruned manifest).")
    revision: str | None = revision_option("each MODEL")  # one that names none itself (ORG/NAME@REV)
    endpoint: str | None = endpoint_option()
    json: bool = option(False, "Print one JSON object instead of a table.")

    def check(self):
        if not self.models:
            raise LoramError("name at least one model to evaluate")
        names = [parse_spec(spec)[0] for spec in self.models]  # every spec read before any model loads
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise LoramError(f"two models are named {twice[0]!r}; give each its own name: NAME=MODEL[+ADAPTER]")
        if self.revision and not any(is_hub_id(parse_spec(spec)[1]) for spec in self.models):
            raise LoramError("--revision applies to Hub repositories (ORG/NAME), but no MODEL here is one")
        if not self.perplexity and not self.tasks:
            raise LoramError("--no-perplexity leaves nothing to measure; add --tasks NAMES")
        if self.limit is not None and self.limit < 1:
            raise LoramError("--limit must be >= 1")
        checks = [(self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
                  (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
                  (self.shots is None or self.shots >= 0, f"--shots must be >= 0, got {self.shots}"),
                  (self.max_new_tokens is None or self.max_new_tokens >= 1,
                   f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")]
        for ok, message in checks:
            if not ok:
                raise LoramError(message)


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """`NAME=MODEL+ADAPTER` -> (name, model, adapter). A spec that is an existing path is a model path (a
    folder may well be named `lr=1e-4`), and so is one whose MODEL part (before `+`) is; otherwise the
    name ends at the first `=`."""
    if Path(spec).expanduser().exists():
        return spec, spec, None
    name, named, rest = spec.partition("=")
    if not named or Path(spec.partition("+")[0]).expanduser().exists():
        name, named, rest = "", "", spec
    model, plus, adapter = rest.partition("+")
    usage = "use MODEL, MODEL+ADAPTER or NAME=MODEL+ADAPTER"
    if named and not name.strip():
        raise LoramError(f"model spec {spec!r} has an empty NAME before '='; {usage}")
    if not model:
        raise LoramError(f"model spec {spec!r} names no model; {usage}")
    if plus and not adapter:
        raise LoramError(f"model spec {spec!r} names no adapter after '+'; {usage}")
    return name or rest, model, adapter or None


def split_revision(name: str, default: str | None = None) -> tuple[str, str | None]:
    """`ORG/NAME@REV` -> (ORG/NAME, REV); a Hub id without `@` takes `default` (--revision); a local path (which
    may contain `@`) takes no revision."""
    if Path(name).expanduser().exists():
        return name, None
    repo, at, revision = name.rpartition("@")
    if at and looks_like_repo_id(repo):
        if not revision.strip():
            raise LoramError(f"{name!r} names no revision after '@'; write ORG/NAME@REVISION (a branch, tag or commit)")
        return repo, revision
    return name, default if is_hub_id(name) else None


def load_spec(model: str, adapter: str | None, ignore_fingerprint: bool, endpoint: str | None = None,
              revision: str | None = None):
    """(model ready for inference, tokenizer) for one spec. MODEL and ADAPTER may name a revision each
    (`ORG/NAME@REV`); `revision` (--revision) is that of every MODEL on the Hub that names none."""
    import torch

    from loram.shared.hub import resolve_model
    from loram.shared.pruned_model import from_pretrained, load_tokenizer

    model, revision = split_revision(model, revision)
    if adapter:
        from loram.merge import load_with_adapter

        adapter, adapter_revision = split_revision(adapter)
        peft_model, _, source = load_with_adapter(adapter, model, ignore_fingerprint, endpoint=endpoint,
                                                  adapter_revision=adapter_revision, base_revision=revision)
        return peft_model.eval(), load_tokenizer(source.path)
    source = resolve_model(model, revision, endpoint)
    return (from_pretrained(source.path, dtype=torch.float32).eval(),
            load_tokenizer(source.path))


def eval_set(data: str, limit: int | None = None, columns: str | None = None):
    """(records, parsed column mapping) of an evaluation set: its first `limit` records; the built-in
    GSM8K splits map question/answer automatically."""
    from loram.sft_format import builtin_columns, parse_columns
    from loram.shared.records import load_records

    records = load_records(data)
    if limit:
        records = records.select(range(min(limit, len(records))))
    columns = columns or builtin_columns(data)
    return records, parse_columns(columns) if columns else None


def response_perplexity(model, tokenizer, records, columns, seq_len: int, batch: int, desc: str) -> tuple[float, int]:
    """exp(mean NLL over response tokens) of `records` (every token of plain-text records), and the token count."""
    from loram.perplexity import dataset_perplexity
    from loram.sft_format import SFTCollator, tokenize_sft

    data = tokenize_sft(records, tokenizer, seq_len, columns)
    return dataset_perplexity(model, data, SFTCollator.for_tokenizer(tokenizer), batch, desc=desc)


def evaluate(config: EvalConfig | None = None, **kwargs) -> list[dict]:
    """One row per model: name, model, adapter, perplexity and tokens (unless --no-perplexity), and with
    --tasks: `tasks` (lm-eval's metrics per task), `n` (items per task) and `scores` (headline columns)."""
    from loram.shared.runtime import configure_threads

    cfg = EvalConfig.given(config, **kwargs)
    configure_threads()
    tasks = None
    if cfg.tasks:
        from loram.harness import parse_tasks, task_manager

        tasks = parse_tasks(cfg.tasks)
        include = [cfg.include_path] if cfg.include_path else []
        manager = task_manager(tasks, include)  # every task checked (and its data fetched) before any model loads
    records, columns = eval_set(cfg.data, cfg.limit, cfg.columns) if cfg.perplexity else (None, None)
    rows = []
    for spec in cfg.models:
        name, model_id, adapter = parse_spec(spec)
        model, tokenizer = load_spec(model_id, adapter, cfg.ignore_fingerprint, cfg.endpoint, cfg.revision)
        if cfg.perplexity:
            check_positions(model.config, cfg.seq_len, f"--seq-len {cfg.seq_len}")
        row = {"name": name, "model": model_id, "adapter": adapter}
        if cfg.perplexity:
            ppl, tokens = response_perplexity(model, tokenizer, records, columns, cfg.seq_len, cfg.batch,
                                              f"perplexity {name}")
            row.update(perplexity=round(ppl, 4), tokens=tokens)
            print(f"[loram eval] {name}: perplexity {ppl:.4f} over {tokens:,} tokens", file=sys.stderr, flush=True)
        if tasks:
            from loram.harness import format_score, headline, run_tasks

            out = run_tasks(model, tokenizer, tasks, limit=cfg.limit, num_fewshot=cfg.shots, batch=cfg.batch,
                            max_new_tokens=cfg.max_new_tokens, include_path=include, seed=cfg.seed,
                            manager=manager)
            row.update(tasks=out["results"], n=out["n"],
                       scores={k: format_score(*v) for k, v in headline(out["results"]).items()})
            print(f"[loram eval] {name}: " + ", ".join(f"{k} {v}" for k, v in row["scores"].items()),
                  file=sys.stderr, flush=True)
        rows.append(row)
        del model
    return rows


def print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"results": rows}, indent=2))
        return
    from loram.shared.cli_support import print_table
    from loram.shared.model_cards import evaluation_table

    columns, flat = evaluation_table(rows)
    print_table(flat, columns)
    if any(r.get("scores") for r in rows):
        print("lm-eval scores: value ± 95% confidence half-width (1.96 x lm-eval's standard error).")
