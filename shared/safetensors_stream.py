"""Safetensors written one tensor at a time, for models too large to hold twice.

`write_safetensors_streamed` takes an ordered list of (name, tensor) where each tensor is a plain tensor,
a DTensor (FSDP2: gathered with `full_tensor()` on every rank, written by one) or a `LazyTensor` (made
just before its bytes are written and dropped right after: structured pruning slices each kept block
this way, so the pruned copy never exists in memory next to the original).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loram.shared.errors import LoramError
from loram.shared.pruned_model import WEIGHTS, WEIGHTS_INDEX

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def saved_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """What `save_pretrained` writes: the state dict with each shared tensor (tied embeddings) once."""
    seen, items = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            items.append((name, t))
    return items


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of known shape and dtype, made by `make()` only when it is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _shape_dtype(t) -> tuple[list[int], torch.dtype]:
    return list(t.shape), t.dtype  # a DTensor's shape is the global one


def write_safetensors_streamed(items: list[tuple[str, "torch.Tensor | LazyTensor"]], out: Path, *, max_shard_bytes: int,
                               writer: bool) -> list[str]:
    """Write `items` (plain tensors, DTensors or LazyTensors, in order) as safetensors file(s) in `out`, one tensor at a
    time: every rank joins each `full_tensor()` all-gather, `writer` (rank 0) appends its bytes to the file
    whose header was written up front, so no rank holds more than its shard plus one full tensor.
    Above `max_shard_bytes`, several `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`,
    as `save_pretrained` names them. Returns the file names."""
    from torch.distributed.tensor import DTensor

    groups, size = [[]], 0
    for name, t in items:
        shape, dtype = _shape_dtype(t)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t, shape, dtype, nbytes))
        size += nbytes
    names = ([WEIGHTS] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for file_name, group in zip(names, groups, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, _, shape, dtype, nbytes in group:
            if dtype not in _ST_DTYPES:
                raise LoramError(f"cannot write {name}: dtype {dtype} has no safetensors code here")
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        f = open(out / file_name, "wb") if writer else None  # noqa: SIM115
        try:
            if f is not None:
                f.write(len(raw).to_bytes(8, "little") + raw)
            for name, t, *_ in group:
                if isinstance(t, LazyTensor):
                    full = t.make()
                    if list(full.shape) != list(t.shape) or full.dtype != t.dtype:
                        raise LoramError(f"internal error: {name} was announced as {list(t.shape)} {t.dtype}, "
                                         f"made as {list(full.shape)} {full.dtype}")
                else:
                    full = t.full_tensor() if isinstance(t, DTensor) else t  # collective: every rank, same order
                if f is not None:
                    data = full.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(data.numpy()))
                del full
        finally:
            if f is not None:
                f.close()
    if writer and len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names
