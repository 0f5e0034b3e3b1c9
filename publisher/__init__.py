"""LoRAM publisher toolkit: prune a model, align it by continual pre-training, publish it.

    from loram.publisher import prune, align, push
    prune(base="HuggingFaceTB/SmolLM2-135M", method="taylor", ratio=0.5, out="pruned")
    align(pruned="pruned", data=["wiki"], steps=200, seq_len=256, out="aligned")

The package exports the recipe functions (and their configs); their modules are `loram.publisher.prune`,
`loram.publisher.align` and `loram.publisher.push` (import names from them with `from ... import`).
"""

from loram.publisher.align import AlignConfig, AlignResult, align
from loram.publisher.prune import PruneConfig, prune
from loram.publisher.push import PushConfig, push

__all__ = ["AlignConfig", "AlignResult", "PruneConfig", "PushConfig", "align", "prune", "push"]
