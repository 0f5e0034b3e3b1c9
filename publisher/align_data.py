"""Alignment data: text sources streamed, tokenized, packed into blocks of L tokens and mixed by weight.

    --data wiki:1 --data corpus.jsonl:3   ->   one endless stream of {"input_ids": [L token ids]}

Sources (`SOURCE[:WEIGHT]`, weight 1 when omitted) are text sources as `loram.shared.records.iter_texts`
reads them (the one text reader: built-in splits, .txt paragraphs, the `text` column of .jsonl/.json/.parquet
files and saved datasets), streamed, so a large corpus is never loaded whole.

Packing: each document is tokenized without special tokens and followed by a blank line ("\\n\\n", the
separator calibration text uses too); documents are concatenated and cut into blocks of exactly L tokens
(the partial block at the end of a pass is dropped). A block is one training sequence, labels = inputs.

Chat form (`wiki-chat`, `wiki-heldout-chat`): the built-in article split in the model's own chat template,
the form an instruction-tuned model is fine-tuned and used in. Each article is cut into runs of paragraphs
(a run ends once it passes 700 characters); each run is one document, the assistant's answer to "Tell me
about TITLE." (an article's first run) or "Tell me more about TITLE." (its later runs). Measured on
SmolLM2: LoRAM recovers more of the gap to LoRA when alignment reads `wiki-chat` than `wiki`
(docs/alignment.md), which is why it is half of what the demo aligns on.

Mixing: each source's blocks repeat endlessly (a small source from memory after its first pass) and
`datasets.interleave_datasets` draws the source of every block with probabilities weight / sum(weights), seeded. The weights are therefore fractions of training
tokens, whatever the sources' sizes: a small source is repeated, a large one is sampled. A seeded shuffle
buffer of blocks then breaks up runs of consecutive blocks from one long document. The stream is a pure
function of (sources, tokenizer, L, seed), which is what makes `--resume` exact: the Trainer re-reads and
skips the blocks already trained on.
"""

import hashlib
import math
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from loram.shared.errors import LoramError
from loram.shared.manifest import sha256_file, visible_file_hashes
from loram.shared.records import SEPARATOR, TEXT_SPLITS, check_source, iter_texts

TOKENIZE_BATCH = 64  # documents per tokenizer call
CHAT_SPLITS = {"wiki-chat": "wiki", "wiki-heldout-chat": "wiki-heldout"}  # chat form -> built-in article split
CHAT_RUN = 700  # characters of paragraphs after which a chat-form answer ends
REPLAY_TOKENS = 1 << 24  # a source with at most this many tokens of blocks is read once, then replayed (64 MiB)


@dataclass(frozen=True)
class Source:
    """One `--data` entry: where the text is and its share of the training tokens (before normalizing)."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Source":
        """`SOURCE[:WEIGHT]`; a trailing `:x` that is not a number is part of the name only if that path exists."""
        name, sep, tail = str(spec).rpartition(":")
        if not sep:
            return cls(str(spec))
        try:
            weight = float(tail)
        except ValueError:
            if Path(spec).exists():
                return cls(str(spec))
            raise LoramError(f"--data {spec}: weight {tail!r} is not a number; write SOURCE or SOURCE:WEIGHT") from None
        if not (math.isfinite(weight) and weight > 0):
            raise LoramError(f"--data {spec}: the weight must be a positive number, got {tail}")
        if not name:
            raise LoramError(f"--data {spec}: names no source; write SOURCE or SOURCE:WEIGHT")
        return cls(name, weight)


def source_record(name: str) -> dict:
    """How the manifest's alignment record names a source: a built-in by its name; a file or folder by its own
    name, size and sha256 (a folder's: over each file's relative path and sha256, in order, hidden files left
    out as in a checkpoint's hashes), not by its path on the publisher's disk, which nobody else could open.
    Only a run's first process calls this (align._data_records)."""
    path = Path(name).expanduser()
    if name in TEXT_SPLITS or name in CHAT_SPLITS or not path.exists():
        return {"source": name}
    try:
        if path.is_file():
            digest, size = sha256_file(path), path.stat().st_size
        else:
            digests = visible_file_hashes(path)
            digest = hashlib.sha256("".join(f"{rel} {h}\n" for rel, h in digests.items()).encode()).hexdigest()
            size = sum((path / rel).stat().st_size for rel in digests)
    except OSError as e:
        raise LoramError(f"data source {name}: cannot read {e.filename} ({e.strerror}); check its permissions") from e
    # the name as given, not as symlinks resolve it (a Hub cache snapshot links to blobs named by hash)
    return {"source": Path(os.path.abspath(path)).name, "sha256": digest, "bytes": size}


def probabilities(sources: list[Source]) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def check_text_source(name: str) -> None:
    """Refuse a source that is neither a chat-form split nor a text source `iter_texts` reads (one-line error)."""
    if name not in CHAT_SPLITS:
        check_source(name, also=tuple(CHAT_SPLITS))


def chat_texts(name: str, tokenizer) -> Iterator[str]:
    """The documents of a chat-form split (`CHAT_SPLITS`), rendered with the tokenizer's chat template."""
    from loram.shared.assets import read_records

    split = CHAT_SPLITS[name]
    if not getattr(tokenizer, "chat_template", None):
        raise LoramError(f"data source {name} renders {split} in the model's chat template, and this tokenizer "
                         f"has none; use {split} instead")
    for record in read_records(split):
        runs, run, size = [], [], 0
        for paragraph in (p for p in record["text"].split("\n\n") if p.strip()):
            run.append(paragraph)
            size += len(paragraph)
            if size > CHAT_RUN:
                runs.append(run)
                run, size = [], 0
        runs += [run] if run else []
        for i, paragraphs in enumerate(runs):
            ask = f"Tell me {'more ' if i else ''}about {record['title']}."
            yield render_chat(tokenizer, [{"role": "user", "content": ask},
                                          {"role": "assistant", "content": "\n\n".join(paragraphs)}],
                              fix=f"use {split} instead", prefix=f"data source {name}: ")


def render_chat(tokenizer, turns: list[dict], fix: str, prefix: str = "", **kwargs) -> str:
    """`turns` rendered (as text) with the tokenizer's chat template; a template that fails is one LoramError,
    `prefix` + what failed + `fix`."""
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
    except Exception as e:  # jinja errors, a template's own raise_exception: the template is at fault
        raise LoramError(f"{prefix}the tokenizer's chat template failed on a {' + '.join(t['role'] for t in turns)} "
                         f"turn ({type(e).__name__}: {' '.join(str(e).split())}); {fix}") from e


def iter_document_ids(name: str, tokenizer) -> Iterator[list[int]]:
    """One pass over a source's documents as token ids, each followed by the separator's (TOKENIZE_BATCH
    documents per tokenizer call)."""
    docs = chat_texts(name, tokenizer) if name in CHAT_SPLITS else iter_texts(name)
    while batch := list(islice(docs, TOKENIZE_BATCH)):
        yield from tokenizer([t + SEPARATOR for t in batch], add_special_tokens=False)["input_ids"]


def iter_blocks(name: str, tokenizer, seq_len: int) -> Iterator[dict]:
    """One pass over a source as packed blocks {"input_ids": [seq_len ids]} (see the module docstring)."""
    buffer: list[int] = []
    for ids in iter_document_ids(name, tokenizer):
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= seq_len:
            yield {"input_ids": buffer[start:start + seq_len]}
            start += seq_len
        del buffer[:start]


def repeated_blocks(name: str, tokenizer, seq_len: int) -> Iterator[dict]:
    """`iter_blocks(name)` pass after pass, endlessly (nothing when the source holds no block).

    A source whose blocks hold at most REPLAY_TOKENS tokens is read and tokenized once and then replayed from
    memory (4 bytes a token); a larger one is streamed again on every pass. The blocks are the same either way.
    Why: opening a streaming reader costs a fraction of a second, and a small source mixed with a large one is
    passed over many times just to fill the shuffle buffer: next to wiki-chat, the quick demo's 6 self-generated
    conversations at --seq-len 128 took 33 s to the first 1200 blocks re-read every pass, 0.65 s replayed
    (benchmarks/align_stream.py)."""
    kept: list[array] | None = []
    for block in iter_blocks(name, tokenizer, seq_len):
        if kept is not None:
            kept.append(array("i", block["input_ids"]))
            if len(kept) * seq_len > REPLAY_TOKENS:
                kept = None  # too large to hold: stream every pass
        yield block
    if kept is None:
        while True:
            yield from iter_blocks(name, tokenizer, seq_len)
    while kept:
        for ids in kept:
            yield {"input_ids": ids.tolist()}


def _blocks_dataset(name: str, tokenizer, seq_len: int, endless: bool = False):
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    return datasets.IterableDataset.from_generator(
        repeated_blocks if endless else iter_blocks, features=features,
        gen_kwargs={"name": name, "tokenizer": tokenizer, "seq_len": seq_len})


def mixture(sources: list[Source], tokenizer, seq_len: int, seed: int = 0, shuffle_buffer: int = 1000):
    """The endless, seeded training stream of packed blocks drawn from `sources` by weight.

    Every source must hold at least one block of `seq_len` tokens; a source that does not (empty, or
    too short) is refused here, before any training, with a one-line LoramError.
    """
    import datasets

    from loram.shared.records import quiet_datasets

    for s in sources:
        with quiet_datasets():  # a broken file fails here, as one LoramError without datasets' own log line
            first = next(iter_blocks(s.name, tokenizer, seq_len), None)
        if first is None:
            raise LoramError(f"data source {s.name} is empty or shorter than one block of --seq-len {seq_len} "
                             "tokens; give more text or a shorter --seq-len")
    streams = [_blocks_dataset(s.name, tokenizer, seq_len, endless=True) for s in sources]
    mixed = datasets.interleave_datasets(streams, probabilities=probabilities(sources), seed=seed,
                                         stopping_strategy="first_exhausted")  # endless: no source runs out
    return mixed.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else mixed


def eval_blocks(name: str, tokenizer, seq_len: int, count: int) -> list[dict]:
    """The first `count` packed blocks of a (held-out) source: a fixed evaluation set."""
    from loram.shared.records import quiet_datasets

    with quiet_datasets():
        blocks = list(islice(iter_blocks(name, tokenizer, seq_len), count))
    if not blocks:
        raise LoramError(f"evaluation source {name} is empty or shorter than one block of --seq-len {seq_len} tokens")
    return blocks


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks -> {"input_ids", "labels"} LongTensors [batch, seq_len]; the model shifts labels itself."""
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}
