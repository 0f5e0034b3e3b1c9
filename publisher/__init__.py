"""LoRAM publisher toolkit: prune a model, align it by continual pre-training, publish it.

    from loram.publisher import prune, selfgen, align, push
    prune(base="HuggingFaceTB/SmolLM2-135M-Instruct", method="taylor", ratio=0.5, out="pruned")
    selfgen(model="HuggingFaceTB/SmolLM2-135M-Instruct", prompts="math", count=128, out=Path("math.jsonl"))
    align(pruned="pruned", data=["wiki-chat:1", "math.jsonl:1"], steps=200, seq_len=256, out="aligned")

The package exports the recipe functions (and their configs); their modules are `loram.publisher.prune`,
`loram.publisher.selfgen`, `loram.publisher.align` and `loram.publisher.push` (import names from them with `from ... import`).
"""

from loram.publisher.align import AlignConfig, AlignResult, align
from loram.publisher.prune import PruneConfig, PruneResult, prune
from loram.publisher.push import PushConfig, push
from loram.publisher.selfgen import SelfgenConfig, SelfgenResult, selfgen

__all__ = ["AlignConfig", "AlignResult", "PruneConfig", "PruneResult", "PushConfig", "SelfgenConfig", "SelfgenResult", "align", "prune",
           "push", "selfgen"]
