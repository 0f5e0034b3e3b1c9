"""Resumable pipeline stages: a stage whose inputs did not change is reused, not re-run.

Each stage owns a folder `<root>/<name>/`. Running it writes `stage.json` last, holding the key
(sha256 of the stage's inputs, which include the keys of the stages it depends on) and its result.
A stage is complete exactly when `stage.json` exists with the current key: an interrupted stage has
none, so the next run deletes its folder and runs it again, and every completed stage before it is
reused. A changed input changes the key of its stage and of everything downstream.
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


class Stages:
    """Run or reuse named stages under `root`; `log` receives one line per stage."""

    def __init__(self, root: Path, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.done: dict[str, StageResult] = {}

    def run(self, name: str, inputs: dict, body: Callable[[Path], dict]) -> StageResult:
        """`body(folder)` does the work inside `folder` and returns a JSON-able result."""
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
                done = StageResult(key, folder, saved["result"], True, saved.get("seconds", 0.0))
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
        tmp.write_text(json.dumps({"key": key, "inputs": inputs, "result": result, "seconds": seconds},
                                  indent=2, default=str))
        tmp.replace(record)
        self.log(f"[{name}] done in {seconds:.0f} s")
        done = StageResult(key, folder, result, False, seconds)
        self.done[name] = done
        return done
