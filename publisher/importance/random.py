"""`random`: one seeded random score per unit (LoRAM-Rand). Reproducible from the seed alone."""

import torch

from loram.publisher.importance import LayerScores
from loram.shared.architectures import Shape


def scores(model, layers: range, calib, seed: int) -> dict[int, LayerScores]:
    shape = Shape.of(model.config)
    g = torch.Generator().manual_seed(seed)
    return {i: LayerScores(torch.rand(shape.num_kv_heads, generator=g, dtype=torch.float64),
                           torch.rand(shape.intermediate, generator=g, dtype=torch.float64))
            for i in layers}
