"""lm-evaluation-harness on LoRAM's models, offline: the tasks the project ships data for.

`loram eval MODEL[+ADAPTER] --tasks gsm8k_cot,strategyqa` runs lm-eval's own evaluator
(`HFLM(pretrained=<the in-memory model>)` + `simple_evaluate`) on an original, a pruned checkpoint, an
original + recovered adapter or a merged model. Tasks read only data that is on this machine: each
shipped task is a task YAML written into the asset cache (`loram assets path lm-eval-tasks`), with
`dataset_path: json` and `data_files` pointing at the embedded assets:

| task                 | as lm-eval's task                        | test items (few-shot source)            |
|----------------------|------------------------------------------|-----------------------------------------|
| `gsm8k`              | `gsm8k` (5-shot "Question: .. Answer:")  | gsm8k-heldout, 319 (gsm8k-train)        |
| `gsm8k_cot`          | `gsm8k_cot` (8-shot chain of thought)    | gsm8k-heldout, 319 (the 8 fixed shots)  |
| `gsm8k_chat`         | the model's chat template, `#### n`      | gsm8k-heldout, 319 (gsm8k-train)        |
| `elementary_math_qa` | `bigbench_elementary_math_qa_multiple_choice` (MathQA) | BIG-bench, 7,688          |
| `strategyqa`         | `bigbench_strategyqa_multiple_choice`    | BIG-bench, 2,289                        |
| `social_iqa`         | `bigbench_social_iqa_multiple_choice`    | BIG-bench, 1,935                        |

The GSM8K tasks take lm-eval's YAML as installed and change only where the data comes from; the test
split is `gsm8k-heldout` because `gsm8k-train` (GSM8K test items 0..999) is the fine-tuning set.
`gsm8k_chat` is the protocol of LoRAM's earlier hand-written GSM8K accuracy (question as the user's
turn, greedy answer, the number after `####` else the last number, compared exactly), now run by lm-eval.
Any other lm-eval task is refused when its data would come from the Hub; a task folder of your own
(`--include-path DIR`, task YAMLs with local `data_files`) runs as it is. The Hub is never contacted:
`HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` are set while tasks load.
"""

import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path

from loram.shared.errors import LoramError

PREFIX = "loram_"  # shipped task names inside lm-eval (loram_gsm8k_cot), so they never shadow its own
GSM8K_TASKS = {"gsm8k": "gsm8k/gsm8k.yaml", "gsm8k_cot": "gsm8k/gsm8k-cot.yaml"}  # lm-eval's YAML to adapt
CHAT_TASKS = ("gsm8k_chat",)  # run with lm-eval's chat template and multi-turn few-shot
BIGBENCH_TASKS = ("elementary_math_qa", "strategyqa", "social_iqa")
SHIPPED = (*GSM8K_TASKS, *CHAT_TASKS, *BIGBENCH_TASKS)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")
INSTALL = "pip install 'loram[eval]'"


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise LoramError(f"--tasks needs lm-evaluation-harness, which is not installed; run `{INSTALL}`") from None
    return lm_eval


def short_name(task: str) -> str:
    """`loram_gsm8k_cot` -> `gsm8k_cot`; other names unchanged."""
    return task[len(PREFIX):] if task.startswith(PREFIX) and task[len(PREFIX):] in SHIPPED else task


def gsm8k_answer(text: str) -> str | None:
    """The number after `####`, else the last number in the text; commas and a trailing `.0` removed."""
    import re

    match = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    found = match.group(1) if match else (re.findall(r"-?[\d,]*\.?\d+", text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "").rstrip(".")
    return found[:-2] if found.endswith(".0") else found


def gsm8k_chat_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` of `gsm8k_chat`: 1 when the reply's answer equals the gold one."""
    got = gsm8k_answer(results[0])
    return {"exact_match": int(got is not None and got == gsm8k_answer(doc["answer"]))}


# --- task YAMLs -----------------------------------------------------------------------------------

def _data_files(**splits: Path) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {k: str(v) for k, v in splits.items()}}}


def _gsm8k_config(name: str) -> dict:
    import yaml

    from loram.shared import assets

    source = Path(_lm_eval().__file__).parent / "tasks" / GSM8K_TASKS[name]
    config = yaml.safe_load(source.read_text())
    for key in ("tag", "dataset_name", "include"):
        config.pop(key, None)
    config.update(task=PREFIX + name, training_split="train", test_split="test",
                  **_data_files(train=assets.data_path("gsm8k-train"), test=assets.data_path("gsm8k-heldout")))
    if "fewshot_config" not in config:
        config["fewshot_split"] = "train"
    config.setdefault("metadata", {})["source"] = f"lm-eval {GSM8K_TASKS[name]}, data from loram's assets"
    return config


def _gsm8k_chat_config() -> dict:
    from loram.shared import assets

    return {"task": PREFIX + "gsm8k_chat", "output_type": "generate_until",
            **_data_files(train=assets.data_path("gsm8k-train"), test=assets.data_path("gsm8k-heldout")),
            "training_split": "train", "fewshot_split": "train", "test_split": "test",
            "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}", "num_fewshot": 0,
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": 256},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "needs": "--apply_chat_template --fewshot_as_multiturn"}}


def _bigbench_config(name: str) -> dict:
    from loram.shared.assets.bigbench import bigbench_path

    return {"task": PREFIX + name, "output_type": "multiple_choice", **_data_files(test=bigbench_path(name)),
            "test_split": "test", "doc_to_text": "{{inputs.strip()}}", "doc_to_target": "{{multiple_choice_scores.index(1)}}",
            "doc_to_choice": "{{multiple_choice_targets}}", "metric_list": [{"metric": "acc"}],
            "metadata": {"version": 1.0, "source": f"bigbench_{name}_multiple_choice, data from the bigbench sdist"}}


def _task_yaml(name: str) -> str:
    import yaml

    if name in GSM8K_TASKS:
        return yaml.safe_dump(_gsm8k_config(name), sort_keys=False)
    if name in CHAT_TASKS:  # process_results is a function: a tag safe_dump cannot write
        return (yaml.safe_dump(_gsm8k_chat_config(), sort_keys=False)
                + f"process_results: !function {__name__}.gsm8k_chat_results\n")
    return yaml.safe_dump(_bigbench_config(name), sort_keys=False)


def task_dir(names=SHIPPED) -> Path:
    """The folder of shipped task YAMLs (for `TaskManager(include_path=...)` and `lm_eval --include_path`),
    with (re)written YAMLs for `names`; the data each needs is fetched into the asset cache first."""
    from loram.shared.cache import cache_dir

    folder = cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = _task_yaml(name)
        path = folder / f"{PREFIX}{name}.yaml"
        if not path.is_file() or path.read_text() != text:
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
                tmp.write(text)  # a name of its own: two processes writing the same YAML never share one
            Path(tmp.name).replace(path)
    return folder


# --- running tasks --------------------------------------------------------------------------------

@contextlib.contextmanager
def _offline():
    """Hub and datasets offline for lm-eval's run: the environment (for anything imported from here on) and
    the module constants huggingface_hub and datasets read it into at import (for what already is)."""
    import datasets.config
    import huggingface_hub.constants

    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    constants = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                 (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = {k: os.environ.get(k) for k in keys}
    saved_constants = [(module, name, getattr(module, name)) for module, name in constants if hasattr(module, name)]
    os.environ.update({k: "1" for k in keys})
    for module, name, _ in saved_constants:
        setattr(module, name, True)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for module, name, value in saved_constants:
            setattr(module, name, value)


def parse_tasks(text: str) -> list[str]:
    """`gsm8k_cot, strategyqa` -> ["gsm8k_cot", "strategyqa"] (short names, order kept, no repeats)."""
    names = [short_name(t.strip()) for t in text.split(",") if t.strip()]
    if not names:
        raise LoramError(f"--tasks names no task; shipped: {', '.join(SHIPPED)}")
    return list(dict.fromkeys(names))


def _data_source(config: dict) -> str | None:
    """The Hub dataset a task config would download, or None when its data is local."""
    path = str(config.get("dataset_path") or "")
    if not path or path in LOCAL_BUILDERS or Path(path).expanduser().exists():
        return None
    return path


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool, files: tuple[str, ...]):
    """lm-eval's TaskManager (indexing its ~10,000 task files takes seconds: built once per process and
    set of task files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager(names: list[str], include_path: list[str] = ()):
    """lm-eval's TaskManager over the shipped task folder and `include_path`; every name checked first:
    unknown tasks and tasks whose data would come from the Hub are refused in one line."""
    lm_eval = _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    for folder in include_path:
        if not Path(folder).is_dir():
            raise LoramError(f"--include-path {folder} is not a folder of task YAMLs")
    shipped = [n for n in names if n in SHIPPED]
    paths = (str(task_dir(shipped)), *map(str, include_path))
    others = [n for n in names if n not in SHIPPED]
    files = tuple(sorted(str(p) for folder in paths for p in Path(folder).rglob("*.yaml")))
    manager = _manager(paths, bool(others), files)
    for name in others:
        entry = manager.task_index.get(name)
        if entry is None:
            raise LoramError(f"lm-eval {lm_eval.__version__} has no task {name!r}; shipped offline tasks: "
                             f"{', '.join(SHIPPED)} (or a task of your own with --include-path DIR)")
        yaml_path = getattr(entry, "yaml_path", None)
        config = load_yaml(yaml_path, resolve_func=False) if yaml_path else {}
        source = _data_source(config)
        if source is not None:
            raise LoramError(f"lm-eval task {name!r} downloads its data from the Hub ({source}), and loram eval "
                             f"runs offline; use a shipped task ({', '.join(SHIPPED)}), or copy the data here and "
                             "pass a task folder with --include-path DIR (dataset_path: json, data_files: ...)")
    return manager


def run_tasks(model, tokenizer, names: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
              batch: int = 4, max_new_tokens: int | None = None, include_path: list[str] = (), seed: int = 0,
              log_samples: bool = False, manager=None) -> dict:
    """lm-eval's results for `names` on an in-memory model (`manager`: a `task_manager(names, include_path)`
    already built, else built here): {"results": {short name: {metric: value,
    "<metric>_stderr": se}}, "n": {short name: items}, "samples": ... (with log_samples)}."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(names, include_path)
    if any(n in CHAT_TASKS for n in names) and not getattr(tokenizer, "chat_template", None):
        raise LoramError(f"{', '.join(n for n in names if n in CHAT_TASKS)} prompts through the chat template, and "
                         "this tokenizer has none; use gsm8k or gsm8k_cot")
    with _quiet_logs():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
    out = {"results": {}, "n": {}, "samples": {}}
    groups = [[n for n in names if n in CHAT_TASKS], [n for n in names if n not in CHAT_TASKS]]
    for chat, group in zip((True, False), groups, strict=True):
        if not group:
            continue
        with _offline(), _quiet_logs(), _hub_errors(), _no_git():
            got = simple_evaluate(
                model=lm, tasks=[PREFIX + n if n in SHIPPED else n for n in group], task_manager=manager,
                limit=limit, num_fewshot=num_fewshot, apply_chat_template=chat, fewshot_as_multiturn=chat,
                gen_kwargs={"max_gen_toks": max_new_tokens} if max_new_tokens else None, log_samples=log_samples,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        for task, metrics in got["results"].items():
            name = short_name(task)
            out["results"][name] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                                    if k not in ("alias", "sample_len") and isinstance(v, (int, float))}
            out["n"][name] = got.get("n-samples", {}).get(task, {}).get("effective")
        if log_samples:
            out["samples"].update({short_name(t): s for t, s in got.get("samples", {}).items()})
    return out


@contextlib.contextmanager
def _hub_errors():
    """A task (or a group's subtask) that still reaches for the Hub fails offline deep inside datasets:
    one line instead."""
    try:
        yield
    except (ConnectionError, OSError, ValueError) as e:
        text = str(e)
        if not any(w in text.lower() for w in ("offline", "connect", "hub", "resolve")):
            raise
        raise LoramError(f"a task needs data from the Hub, and loram eval runs offline ({type(e).__name__}: "
                         f"{text.splitlines()[0][:200]}); use a shipped task ({', '.join(SHIPPED)}) or a local "
                         "copy with --include-path DIR") from None


def _no_git():
    """lm-eval records `git describe` of the working folder in its results (the user's project, not the model or
    the harness), and outside a repository git prints `fatal: not a git repository` on stderr: not run."""
    from unittest import mock

    return mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None)


@contextlib.contextmanager
def _quiet_logs():
    """lm-eval logs each task's setup at INFO and warns that an in-memory model ignores its loading
    arguments (it does, by design here): keep warnings about the run, drop the rest."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def headline(results: dict) -> dict[str, tuple[float, float | None]]:
    """{column: (value, stderr)} of each task's main scores: GSM8K strict and flexible matching,
    multiple-choice accuracy."""
    columns = {}
    for task, metrics in results.items():
        for key, label in (("exact_match,strict-match", "strict"), ("exact_match,flexible-extract", "flexible"),
                           ("exact_match", ""), ("acc", "")):
            if key in metrics:
                stderr = metrics.get(key.replace(",", "_stderr,", 1) if "," in key else f"{key}_stderr")
                columns[f"{task} {label}".strip()] = (metrics[key], stderr if isinstance(stderr, float) else None)
    return columns


def format_score(value: float, stderr: float | None) -> str:
    """`0.120 ± 0.046`: the score and its 95% confidence half-width (1.96 x lm-eval's stderr)."""
    return f"{value:.3f}" if stderr is None else f"{value:.3f} ± {1.96 * stderr:.3f}"


# --- lm-eval's own CLI ----------------------------------------------------------------------------

def lm_eval_main() -> None:
    """`loram-lm-eval ...`: lm-eval's command line, unchanged, with LoRAM's pruned model types registered
    (so `--model hf --model_args pretrained=PRUNED_DIR` loads a pruned checkpoint without remote code) and
    `--include_path` given the shipped offline tasks unless told otherwise."""
    from loram.shared.pruned_model import register

    lm_eval = _lm_eval()
    register()
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:]
    if "--include_path" not in args and args and args[0] not in ("ls", "validate", "-h", "--help"):
        args += ["--include_path", str(task_dir())]
    sys.argv = [sys.argv[0], *args]
    print(f"[loram-lm-eval] lm-eval {lm_eval.__version__} with LoRAM's model types registered", file=sys.stderr)
    cli_evaluate()
