"""LoRAM consumer SDK: pull a pruned model, train LoRA/QLoRA on it, recover, merge, evaluate.

    import loram
    model_dir = loram.assets.model_dir()          # the embedded SmolLM2-135M-Instruct

`import loram` never imports the publisher toolkit (`loram.publisher`).
"""

from loram.shared import assets
from loram.shared.errors import LoramError
from loram.shared.modeling_loram import register as _register_model_types

# The Auto classes learn loram_llama / loram_mistral / loram_qwen2, so pruned checkpoints load with
# AutoModelForCausalLM.from_pretrained and never need trust_remote_code on the SDK's path.
_register_model_types()

__version__ = "0.1.0"
__all__ = ["LoramError", "__version__", "assets"]
