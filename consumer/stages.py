"""Resumable pipeline stages: a stage whose inputs did not change is reused, not re-run.

Each stage owns a folder `<root>/<name>/`. Running it writes `stage.json` last, holding the key
(sha256 of the stage's inputs, which include the keys of the stages it depends on) and its result.
A stage is complete exactly when `stage.json` exists with the current key: an interrupted stage has
none, so the next run deletes its folder and runs it again, and every completed stage before it is
reused. A changed input changes the key of its stage and of everything downstream. Paths into the stages'
own folder are written relative to it (`{stages}/...`), so a run's folder copied or moved elsewhere still reuses
its stages, and they point into the new place.
"""

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RECORD = "stage.json"


@dataclass
class StageResult:
    key: str
    folder: Path
    result: dict
    reused: bool
    seconds: float


def stage_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


ROOT = "{stages}"  # how stage.json writes the stages' own folder, so that a copied or moved run still reads


def _swap(value, old: str, new: str):
    """`value` (JSON-able: strings, lists, dicts, paths) with every string or path under `old` moved under `new`."""
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_swap(v, old, new) for v in value]
    if isinstance(value, str | Path):
        text = str(value)
        if text == old or text.startswith(old + "/"):
            return new + text[len(old):]
    return value


class Stages:
    """Run or reuse named stages under `root`; `log` receives one line per stage."""

    def __init__(self, root: Path, log: Callable[[str], None] | None = None):
        self.root = Path(root).resolve()  # the form the paths in results take (resolve_model resolves its paths)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.done: dict[str, StageResult] = {}

    def run(self, name: str, inputs: dict, body: Callable[[Path], dict]) -> StageResult:
        """`body(folder)` does the work inside `folder` and returns a JSON-able result."""
        root = str(self.root)
        inputs = _swap(inputs, root, ROOT)  # a stage's paths into earlier stages, written as the stages' folder
        key = stage_key(inputs)
        folder = self.root / name
        record = folder / RECORD
        if record.is_file():
            try:
                saved = json.loads(record.read_text())
            except ValueError:
                saved = {}
            if saved.get("key") == key:
                self.log(f"[{name}] inputs unchanged: reusing {folder}")
                done = StageResult(key, folder, _swap(saved["result"], ROOT, root), True, saved.get("seconds", 0.0))
                self.done[name] = done
                return done
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.log(f"[{name}] running")
        started = time.perf_counter()
        result = body(folder)
        seconds = round(time.perf_counter() - started, 1)
        tmp = record.with_name(f".{RECORD}.tmp")
        tmp.write_text(json.dumps({"key": key, "inputs": inputs, "result": _swap(result, root, ROOT),
                                   "seconds": seconds}, indent=2, default=str))
        tmp.replace(record)
        self.log(f"[{name}] done in {seconds:.0f} s")
        done = StageResult(key, folder, result, False, seconds)
        self.done[name] = done
        return done
