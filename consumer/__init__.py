"""LoRAM consumer SDK: pull a pruned model, train LoRA/QLoRA on it, recover, merge, evaluate.

    import loram
    model_dir = loram.assets.model_dir()          # the embedded SmolLM2-135M-Instruct
    loram.register()                              # let transformers' Auto classes load pruned checkpoints

`import loram` is light: it imports neither the publisher toolkit (`loram.publisher`) nor transformers'
model code. The project's own loaders register the LoRAM model types themselves; call `loram.register()`
before `AutoModelForCausalLM.from_pretrained(pruned_dir)` in your own code.
"""

from importlib import metadata

from loram.shared.errors import LoramError, LoramWarning


def __getattr__(name: str):
    """`loram.assets` on first use: it loads torch, which `import loram` (the CLI's first step) need not."""
    if name == "assets":
        from loram.shared import assets

        return assets
    raise AttributeError(f"module 'loram' has no attribute {name!r}")


def register() -> None:
    """Make transformers' Auto classes know loram_llama / loram_mistral / loram_qwen2 (no remote code)."""
    from loram.shared.pruned_model import register as _register

    _register()


try:
    __version__ = metadata.version("loram")  # one version: pyproject.toml's
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["LoramError", "LoramWarning", "__version__", "assets", "register"]
