"""Calibration text for pruning: evenly spread blocks of tokens from a text source.

The source is read by `loram.shared.records.iter_texts`, the reader alignment uses too (built-in splits,
.txt paragraphs, the `text` column of .jsonl/.json/.parquet files and saved datasets).
"""

from array import array
from pathlib import Path

import torch

from loram.shared.errors import LoramError
from loram.shared.records import SEPARATOR, iter_texts


def token_blocks(tokenizer, source: str | Path, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` blocks of `seq_len` tokens, evenly spread over the source: LongTensor [samples, seq_len].

    Documents are tokenized one at a time (each followed by a blank line) into one flat int32 array,
    which keeps memory small for large sources; block k starts at k * stride, where
    stride = (tokens - seq_len) // (samples - 1), so the blocks cover the whole text deterministically.
    """
    if samples < 1 or seq_len < 2:
        raise LoramError(f"need at least 1 sample of at least 2 tokens, got {samples} x {seq_len}")
    ids = array("i")
    for doc in iter_texts(str(source)):
        ids.extend(tokenizer(doc + SEPARATOR, add_special_tokens=False)["input_ids"])
    need = samples * seq_len
    if len(ids) < need:
        raise LoramError(f"calibration text {source} has {len(ids):,} tokens, fewer than --samples {samples} x "
                         f"--seq-len {seq_len} = {need:,}; use a longer source or fewer/shorter samples")
    stride = (len(ids) - seq_len) // (samples - 1) if samples > 1 else 0
    flat = torch.frombuffer(ids, dtype=torch.int32)
    return torch.stack([flat[k * stride: k * stride + seq_len] for k in range(samples)]).long()
