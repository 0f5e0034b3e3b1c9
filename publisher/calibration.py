"""Plain-text sources for calibration and alignment: a built-in split name or a local file.

- a built-in name (`wiki`, `wiki-heldout`, `news`; see `assets.py`)
- `*.txt`: the whole file (paragraphs kept as they are)
- `*.jsonl` / `*.json`: the `text` field of each record
"""

import json
from array import array
from pathlib import Path

import torch

from loram.shared import assets
from loram.shared.errors import LoramError

TEXT_SPLITS = ("wiki", "wiki-heldout", "news")


def read_texts(source: str | Path) -> list[str]:
    """The documents of a text source, in order."""
    if str(source) in TEXT_SPLITS:
        return assets.read_texts(str(source))
    path = Path(source)
    if not path.is_file():
        raise LoramError(f"text source {source!r} is neither a file nor a built-in name ({', '.join(TEXT_SPLITS)})")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            records = [json.loads(line) for line in lines if line.strip()] if path.suffix == ".jsonl" \
                else json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise LoramError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {e}") from e
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
            raise LoramError(f"every record of {path} needs a string field 'text'")
        return [r["text"] for r in records]
    raise LoramError(f"text source {path} must be .txt, .jsonl or .json")


def token_blocks(tokenizer, source: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` blocks of `seq_len` tokens, evenly spread over the source: LongTensor [samples, seq_len].

    Documents are tokenized one at a time (each followed by a blank line) into one flat int32 array,
    which keeps memory small for large sources; block k starts at k * stride, where
    stride = (tokens - seq_len) // (samples - 1), so the blocks cover the whole text deterministically.
    """
    if samples < 1 or seq_len < 2:
        raise LoramError(f"need at least 1 sample of at least 2 tokens, got {samples} x {seq_len}")
    ids = array("i")
    for doc in read_texts(source):
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
    need = samples * seq_len
    if len(ids) < need:
        raise LoramError(f"calibration text {source} has {len(ids):,} tokens, fewer than --samples {samples} x "
                         f"--seq-len {seq_len} = {need:,}; use a longer source or fewer/shorter samples")
    stride = (len(ids) - seq_len) // (samples - 1) if samples > 1 else 0
    flat = torch.frombuffer(ids, dtype=torch.int32)
    return torch.stack([flat[k * stride: k * stride + seq_len] for k in range(samples)]).long()
