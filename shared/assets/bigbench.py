"""Multiple-choice sets from the BIG-bench sdist, for lm-evaluation-harness tasks that run offline.

The `bigbench==1.0.0` sdist (358 MB) is the package that carries BIG-bench's task files. It is fetched
once into the asset cache like the wheels, verified against its pinned sha256, and only the task files
below are read out of it (streamed, never unpacked whole):

| name                 | task file in the sdist                                    | examples |
|----------------------|-----------------------------------------------------------|----------|
| `elementary_math_qa` | `elementary_math_qa/question_only/task.json` (MathQA)     | 7,688    |
| `strategyqa`         | `strategyqa/task.json`                                    | 2,290    |
| `social_iqa`         | `social_iqa/task.json`                                    | 1,935    |

Each becomes `<cache>/bigbench/<name>.jsonl` with the fields of lm-eval's own `bigbench_*_multiple_choice`
tasks (the `hails/bigbench` layout): `inputs`, `targets`, `multiple_choice_targets`, `multiple_choice_scores`.
`inputs` is formatted as BIG-bench's json tasks format a zero-shot query: the task's prefix, the
example input prefix (default "\\nQ: "), the input, the listed choices when the task appends them
(sorted, then shuffled by one fixed permutation per choice count), and the output prefix (default "\\nA: ").
Duplicate examples are dropped, as BIG-bench does.
"""

import json
import tarfile
from pathlib import Path

import numpy as np

from loram.shared.assets import CACHE_FIX, Wheel, _log, _record, _write_jsonl, built, fetch_wheel
from loram.shared.cache import cache_dir
from loram.shared.errors import LoramError
from loram.shared.outputs import atomic_output_dir

BIGBENCH_SDIST = Wheel("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                       "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
TASK_FILES = {
    "elementary_math_qa": "elementary_math_qa/question_only/task.json",
    "strategyqa": "strategyqa/task.json",
    "social_iqa": "social_iqa/task.json",
}
CHOICE_SEED = 42  # BIG-bench's default random_seed for the order of appended choices
_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def format_examples(task: dict) -> list[dict]:
    """The distinct multiple-choice examples of a BIG-bench task.json, as lm-eval's bigbench records."""
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    task_prefix = str(task.get("task_prefix", ""))
    seen, records = set(), []
    for example in task["examples"]:
        key = json.dumps(example, sort_keys=True)
        if key in seen or "target_scores" not in example:
            continue
        seen.add(key)
        scores = example["target_scores"]
        choices = list(scores)
        text = example["input"]
        if append_choices:
            order = np.random.RandomState(seed=CHOICE_SEED).permutation(sorted(choices))
            text = text + choice_prefix + choice_prefix.join(order)
        best = max(scores.values())
        if best <= min(scores.values()) and len(scores) > 1:
            continue  # no correct choice: BIG-bench refuses such an example
        targets = [c for c in choices if scores[c] == best][:1]
        records.append({"inputs": task_prefix + input_prefix + text + output_prefix, "targets": targets,
                        "multiple_choice_targets": choices,
                        "multiple_choice_scores": [int(scores[c] == best) for c in choices]})
    return records


def bigbench_dir() -> Path:
    """The folder of converted BIG-bench sets (one `<name>.jsonl` per TASK_FILES entry), built once."""
    return built(cache_dir() / "bigbench", _build)


def _build(folder: Path) -> None:
    sdist = fetch_wheel(BIGBENCH_SDIST)
    _log(f"reading {', '.join(TASK_FILES)} out of {sdist.name} (once)")
    wanted = {_PREFIX + member: name for name, member in TASK_FILES.items()}
    found = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for info in tar:
            if info.name in wanted and info.isfile():
                found[wanted[info.name]] = json.load(tar.extractfile(info))
                if len(found) == len(wanted):
                    break
    missing = sorted(set(TASK_FILES) - set(found))
    if missing:
        raise LoramError(f"{sdist.name} holds no task file for {', '.join(missing)}; delete {sdist} to fetch it again")
    with atomic_output_dir(folder, overwrite=True, fix=CACHE_FIX) as out:
        for name in TASK_FILES:
            _write_jsonl(out / f"{name}.jsonl", format_examples(found[name]))
        _record(out, BIGBENCH_SDIST)


def bigbench_path(name: str) -> Path:
    """The jsonl file of one converted BIG-bench set."""
    if name not in TASK_FILES:
        raise LoramError(f"unknown BIG-bench set {name!r}; choose one of {', '.join(TASK_FILES)}")
    return bigbench_dir() / f"{name}.jsonl"
