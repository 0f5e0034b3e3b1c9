"""LoRAM publisher toolkit: prune a model, align it by continual pre-training, publish it.

    from loram.publisher import prune
"""
