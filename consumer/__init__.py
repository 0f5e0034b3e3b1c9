"""LoRAM consumer SDK: pull a pruned model, train LoRA/QLoRA on it, recover, merge, evaluate.

    import loram
    model_dir = loram.assets.model_dir()          # the embedded SmolLM2-135M-Instruct

`import loram` never imports the publisher toolkit (`loram.publisher`).
"""

from loram.shared import assets
from loram.shared.errors import LoramError

__version__ = "0.1.0"
__all__ = ["LoramError", "__version__", "assets"]
