"""The committed progress of a `loram publish selfgen` run: what `--resume` continues from.

Next to `--out` (say `gen.jsonl`) a hidden folder `.gen.jsonl.selfgen/` holds

    conversations.jsonl   the records of every finished batch, appended in order
    rng-N.safetensors     torch's random number generators (CPU, and every CUDA device) after the first N conversations
    progress.json         the options that decide the text, the committed count N, answer tokens, byte count and sha256
                          of conversations.jsonl, the name and sha256 of its generators' file, the thread count

A batch is committed by appending its records (flushed to disk), writing the generators' new file, replacing
`progress.json` and only then removing the previous generators' file: `progress.json` alone says what is committed,
and an interruption at any point leaves it naming files that hold what it says. Bytes past its count (a batch cut
off while being appended) are dropped on resume, and nothing is trusted before its hash is checked. The folder
appears with the first committed batch and goes when `--out` is written.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loram.shared.errors import LoramError, warn
from loram.shared.outputs import atomic_file

RECORDS, STATE = "conversations.jsonl", "progress.json"
# option -> flag, for the options the text depends on (`prompts`: the hash of the prompts' lines, so a prompts file
# named by another path but holding the same lines resumes, and an edited one does not)
FLAGS = {"model": "MODEL", "revision": "--revision", "prompts": "--prompts", "count": "--count",
         "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "batch": "--batch",
         "seed": "--seed"}


def progress_folder(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.selfgen"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Progress:
    folder: Path
    options: dict
    done: int = 0  # conversations committed
    tokens: int = 0  # their answer tokens
    cut: int = 0  # their answers cut at --max-new-tokens (not recorded by progress written before this count was)
    size: int = 0  # bytes of their records at the start of conversations.jsonl
    hash: "hashlib._Hash" = field(default_factory=hashlib.sha256)  # sha256 of those bytes, updated batch by batch
    threads: int | None = None  # the thread count the committed batches were sampled with
    rng: dict = field(default_factory=dict)
    resuming: bool = False

    @classmethod
    def open(cls, cfg, prompts: list[str]) -> "Progress":
        """The progress to continue (`--resume`: read and verified) or to start from; refuses a new run that would
        silently leave an interrupted one's progress behind."""
        folder = progress_folder(cfg.out)
        options = {k: getattr(cfg, k) for k in FLAGS if k != "prompts"}
        options["prompts"] = _sha256("\n".join(prompts).encode())
        local = Path(cfg.model).expanduser()
        if local.exists():  # a folder, however it is spelled (relative, ~, a link): the same model
            options["model"] = str(local.resolve())
        if not cfg.resume:
            if folder.exists() and not cfg.overwrite:
                raise LoramError(f"{folder} holds an interrupted run's conversations for --out {cfg.out}; continue it "
                                 "with --resume, or start again with --overwrite")
            return cls(folder, options)
        if not (folder / STATE).is_file():
            raise LoramError(f"--resume: no interrupted run to continue for --out {cfg.out} ({folder / STATE} not "
                             "found); run without --resume")
        refetch = f"{folder} is damaged; start again with --overwrite"
        try:
            state = json.loads((folder / STATE).read_text(encoding="utf-8"))
            recorded, done, tokens, size = state["options"], int(state["done"]), int(state["tokens"]), int(state["bytes"])
            rng_name = Path(state["rng"]).name  # a name inside the folder, whatever progress.json says
            records, rng = (folder / RECORDS).read_bytes(), (folder / rng_name).read_bytes()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LoramError(f"{folder / STATE} or its files cannot be read ({type(e).__name__}); {refetch}") from None
        changed = [k for k in FLAGS if recorded.get(k) != options[k]]
        if changed:
            said = ", ".join(f"{FLAGS[k]} ({'other prompts' if k == 'prompts' else recorded.get(k)} then, "
                             f"{'these' if k == 'prompts' else options[k]} now)" for k in changed)
            raise LoramError(f"--resume: {said} {'differs' if len(changed) == 1 else 'differ'} from the interrupted "
                             "run's; resume with the options it began with, or start again with --overwrite")
        if len(records) < size or _sha256(records[:size]) != state.get("sha256") or _sha256(rng) != state.get(
                "rng_sha256") or not 0 < done <= cfg.count:
            raise LoramError(f"{folder}: the committed conversations or generator state do not match the hashes "
                             f"{STATE} recorded; {refetch}")
        from safetensors.torch import load

        return cls(folder, options, done, tokens, int(state.get("cut", 0)), size, hashlib.sha256(records[:size]),
                   state.get("threads"), load(rng), resuming=True)

    def check_threads(self, threads: int) -> None:
        if self.resuming and self.threads is not None and self.threads != threads:
            warn(f"--resume with {threads} threads where the run began with {self.threads}: the rest is sampled "
                 "as usual, but the file will differ from an uninterrupted run's (LORAM_THREADS fixes the count)")
        self.threads = threads

    def start(self) -> None:
        """A fresh run: an earlier run's progress (kept only with --overwrite) goes now, every input checked."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore_rng(self) -> None:
        import torch

        torch.random.set_rng_state(self.rng["cpu"])
        cuda = [self.rng[k] for k in sorted(self.rng) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        elif cuda or torch.cuda.is_available():
            warn("--resume on other devices than the run began on: the rest is sampled with fresh generators, and "
                 "the file will differ from an uninterrupted run's")
            torch.manual_seed(self.options["seed"] + self.done)

    def commit(self, texts: list[str], tokens: int, cut: int = 0) -> None:
        """Append one finished batch and make it part of what `--resume` continues from."""
        import torch
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode("utf-8")
        path = self.folder / RECORDS
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.truncate(self.size)  # bytes of a batch that was cut off while being appended
            f.seek(self.size)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.size += len(data)
        self.hash.update(data)
        self.done += len(texts)
        self.tokens += tokens
        self.cut += cut
        state = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            state.update({f"cuda{i:03d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        rng, name = save(state), f"rng-{self.done}.safetensors"
        _replace(self.folder / name, rng)
        _replace(self.folder / STATE, json.dumps(
            {"options": self.options, "done": self.done, "tokens": self.tokens, "cut": self.cut, "bytes": self.size,
             "sha256": self.hash.hexdigest(), "rng": name, "rng_sha256": _sha256(rng), "threads": self.threads},
            indent=1).encode("utf-8"))
        for old in self.folder.glob("rng-*.safetensors"):  # the previous batch's, and any a cut-off commit left
            if old.name != name:
                old.unlink(missing_ok=True)

    def write(self, out: Path) -> None:
        """`out`: the committed records, whole or not at all."""
        with atomic_file(out) as tmp, open(self.folder / RECORDS, "rb") as records:
            tmp.write_bytes(records.read(self.size))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _replace(path: Path, data: bytes) -> None:
    """`data` as `path` in one rename, on disk before it: a lost machine leaves the old file or the new one."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
