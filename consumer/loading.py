"""Load a causal LM for training or evaluation: full precision, 8-bit or 4-bit (QLoRA).

QLoRA settings (docs/method.md §5): NF4, double quantization, bf16 compute where the device supports
it (CUDA with bf16), fp32 compute otherwise (CPU bf16 matmuls are slow on most CPUs).

CPU pitfall (docs/consumer.md, Precision): on CPUs with AVX512-BF16, bitsandbytes runs a 4-bit layer in eval mode
without gradients through a packed-weight kernel that crashes when out_features is not a multiple
of 32 and permanently repacks the weight, after which LoRA layers behind it get no gradient. We
switch that path off on every `Linear4bit` right after loading.
"""

import torch

from loram.shared.errors import LoramError

QUANTS = ("none", "int8", "nf4")


def compute_dtype() -> torch.dtype:
    """bf16 on CUDA devices that support it, else fp32."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(quant: str):
    """The BitsAndBytesConfig for `quant`, or None for full precision."""
    if quant not in QUANTS:
        raise LoramError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise LoramError(f"--quant {quant} needs bitsandbytes; install it with: pip install 'loram[quant]'") from e
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype())


def disable_cpu_packed_4bit(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 packed-weight path on every Linear4bit; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def load_causal_lm(path, quant: str = "none", dtype: torch.dtype | None = None):
    """Load `path` (stock or pruned) with the requested quantization."""
    from loram.shared.pruned_model import from_pretrained


    qconfig = quantization_config(quant)
    dtype = dtype or (compute_dtype() if qconfig is not None or torch.cuda.is_available() else torch.float32)
    kwargs = {"dtype": dtype}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    elif torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    model = from_pretrained(path, **kwargs)
    if quant == "nf4":
        disable_cpu_packed_4bit(model)
    return model
