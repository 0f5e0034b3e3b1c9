"""`loram merge`: fold a recovered adapter into its original model and save a full checkpoint.

    loram merge adapter-recovered --out merged/ [--dtype bf16]

W = W0 + (alpha/r) B A, computed by peft's merge in the chosen dtype (bf16 by default; fp16 only
when asked, since it can overflow). The output is sharded safetensors that stock transformers loads.
The original is the adapter's `base_model_name_or_path` at its revision, refused when its
fingerprint differs from the one recorded at recovery (`--ignore-fingerprint` overrides).
"""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, revision_option
from loram.shared.outputs import atomic_output_dir

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


@dataclass
class MergeConfig(Config):
    adapter: str = option(help="A recovered adapter folder (or any LoRA adapter on its original model).",
                          argument=True)
    out: Path = option(help="Output folder for the merged checkpoint.")
    dtype: str = option("bf16", "Dtype of the merged weights.", choices=tuple(DTYPES))
    base: str | None = option(None, "Use this copy of the original model (folder or Hub id) instead of the "
                                    "adapter's base.")
    ignore_fingerprint: bool = option(False, "Merge even if the base differs from the recorded fingerprint.")
    max_shard_size: str = option("5GB", "Largest safetensors shard.")
    revision: str | None = revision_option("ADAPTER")
    endpoint: str | None = endpoint_option()
    overwrite: bool = option(False, "Replace an existing --out folder.")


def check_original(adapter_dir: Path, base_dir: Path, ignore: bool) -> None:
    """Refuse a base whose config/weights differ from the fingerprint recorded by `loram recover`."""
    sidecar = adapter_dir / "loram_recovery.json"
    if ignore or not sidecar.is_file():
        return
    from loram.shared.manifest import fingerprint_mismatches

    wrong = fingerprint_mismatches(json.loads(sidecar.read_text())["original_model"].get("fingerprint") or {},
                                   base_dir)
    if wrong:
        raise LoramError(f"{base_dir} is not the original model this adapter was recovered for "
                         f"({', '.join(wrong)} differ); pass --ignore-fingerprint to use it anyway")


def load_with_adapter(adapter: str | Path, base: str | None = None, ignore_fingerprint: bool = False,
                      dtype=None, endpoint: str | None = None, *, adapter_revision: str | None = None,
                      base_revision: str | None = None):
    """(peft model = original + adapter, adapter folder, base source), with the fingerprint check.

    The base is `base` at `base_revision` when given, else the adapter's recorded base at its revision."""
    import torch
    from peft import PeftModel

    from loram.shared.hub import resolve_model
    from loram.shared.pruned_model import from_pretrained

    adapter_dir = resolve_model(adapter, adapter_revision, endpoint, required="adapter_config.json",
                                kind="peft adapter").path
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    source = resolve_model(base or adapter_cfg["base_model_name_or_path"],
                           base_revision if base else adapter_cfg.get("revision"), endpoint)
    check_original(adapter_dir, source.path, ignore_fingerprint)
    model = from_pretrained(source.path, dtype=dtype or torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir), adapter_dir, source


def merge(config: MergeConfig | None = None, **kwargs) -> Path:
    """Merge the adapter into its original model and write the result to `config.out`."""
    import torch

    from loram.shared.pruned_model import load_tokenizer

    cfg = config or MergeConfig.resolve(**kwargs)
    dtype = getattr(torch, DTYPES[cfg.dtype])
    model, adapter_dir, source = load_with_adapter(cfg.adapter, cfg.base, cfg.ignore_fingerprint, dtype,
                                                   cfg.endpoint, adapter_revision=cfg.revision)
    merged = model.merge_and_unload()
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as out:
        merged.save_pretrained(out, max_shard_size=cfg.max_shard_size)
        with contextlib.suppress(OSError, ValueError):  # a base without tokenizer files
            load_tokenizer(source.path).save_pretrained(out)
        cfg.save(out / "merge_config.yaml")
    return Path(cfg.out)
