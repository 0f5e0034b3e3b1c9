"""Tiny random models built in-process from configs (milliseconds on CPU), for unit tests.

`tiny_config(kind)` covers the layouts LoRAM must handle:
- "llama-gqa": Llama, 8 query heads / 2 KV heads (G = 4), tied embeddings
- "llama-mha": Llama, 4 heads / 4 KV heads (G = 1), untied embeddings
- "mistral":   Mistral, 6 query heads / 2 KV heads (G = 3), untied
- "qwen2":     Qwen2 with q/k/v biases, 6 / 3 heads (G = 2), tied
"""

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

KINDS = ("llama-gqa", "llama-mha", "mistral", "qwen2")

_COMMON = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=6, vocab_size=97,
               max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(kind: str = "llama-gqa", **overrides):
    if kind == "llama-gqa":
        cfg = LlamaConfig(**{**_COMMON, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 6,
                             "tie_word_embeddings": True, **overrides})
    elif kind == "llama-mha":
        cfg = LlamaConfig(**{**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 12,
                             "tie_word_embeddings": False, **overrides})
    elif kind == "mistral":
        cfg = MistralConfig(**{**_COMMON, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8,
                               "sliding_window": None, "tie_word_embeddings": False, **overrides})
    elif kind == "qwen2":
        cfg = Qwen2Config(**{**_COMMON, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8,
                             "tie_word_embeddings": True, "use_sliding_window": False, **overrides})
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS}")
    return cfg


def tiny_model(kind: str = "llama-gqa", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in fp32 eval mode (biases, if any, made non-zero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_batch(vocab: int = 97, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def tiny_tokenizer():
    """A character-level fast tokenizer whose 97 ids match the tiny configs' vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({chr(c): 3 + k for k, c in enumerate(range(32, 126))})  # 94 printable characters
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<pad>")
    return tok


def save_tiny_checkpoint(folder, kind: str = "llama-gqa", seed: int = 0, **overrides):
    """A tiny model + tokenizer saved as a local checkpoint folder (safetensors); returns the model."""
    model = tiny_model(kind, seed=seed, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}
      for a in range(7) for b in range(5)]


def tiny_pruned_workspace(root, layers: str = "1:3"):
    """`root/base` (tiny Llama GQA), `root/pruned` (L2 structured, ratio 0.5 on `layers`) and
    `root/qa.jsonl` (question/answer records), the inputs of most command-line tests; returns `root`."""
    import json
    from pathlib import Path

    from loram.publisher.prune import prune

    root = Path(root)
    save_tiny_checkpoint(root / "base", "llama-gqa")
    prune(base=str(root / "base"), out=root / "pruned", method="l2", ratio=0.5, layers=layers)
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    return root


def run_loram(*args, cwd=None, timeout: int = 300, **env):
    """The real `loram` command in a subprocess (one torch thread), as a user runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    loram = str(Path(sys.executable).parent / "loram")
    return subprocess.run([loram, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "LORAM_THREADS": "1", **env})


def file_tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder`: equal trees mean nothing was lost or changed."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_masked_checkpoint(folder, kind: str = "llama-mha", layers=(1, 5)) -> dict:
    """A tiny model with half of each projection's weights zeroed by magnitude in `layers`, saved with its
    manifest (the format the non-structured pruner writes); returns {module name: kept mask}."""
    from loram.shared.architectures import PRUNED_MODULES, Shape
    from loram.shared.manifest import BaseModelInfo, Manifest, Method, PackedMask

    model = save_tiny_checkpoint(folder, kind)
    masks = {}
    with torch.no_grad():
        for i in range(*layers):
            for spec in PRUNED_MODULES:
                name = f"model.layers.{i}.{spec.path}"
                weight = model.get_submodule(name).weight
                keep = weight.abs() > weight.abs().flatten().median()
                weight.mul_(keep)
                masks[name] = keep
    model.save_pretrained(folder)
    Manifest(base=BaseModelInfo("tiny-dense"), architecture=Shape.of(model.config),
             method=Method(kind="non-structured", criterion="magnitude", sparsity=0.5, layers=list(layers)),
             masks={n: PackedMask.of(m) for n, m in masks.items()}).save(folder)
    return masks


def existing_output(folder, text: str = "do not lose me") -> dict:
    """Make `folder` an existing output (one file) for an `--overwrite` test; returns its `file_tree`."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir()
    (folder / "precious.txt").write_text(text)
    return file_tree(folder)


def assert_left_alone(folder, before: dict) -> None:
    """`folder` is byte for byte as `before`, and nothing else (no staging or temporary folder) is beside it."""
    assert file_tree(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
