"""`loram merge`: fold a recovered adapter into its original model and save a full checkpoint.

    loram merge adapter-recovered --out merged/ [--dtype auto|bf16|fp32|fp16]

W = W0 + (alpha/r) B A, computed by peft's merge in the chosen dtype: by default the original checkpoint's own
(bf16 for Llama-3.1-70B; fp32 for a checkpoint stored in fp32, where bf16 would round away most of a small
adapter's update); fp16 only when asked, since it can overflow. The output is sharded safetensors that stock transformers loads.
The original is the adapter's `base_model_name_or_path` at its revision, refused when its
fingerprint differs from the one recorded at recovery (`--ignore-fingerprint` overrides).
"""

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from loram.memory_plan import DTYPE_CHOICES, config_dtype, dtype_name
from loram.recover import ADAPTER_WEIGHTS, adapter_config_json, check_trained_on
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, is_hub_id, names_nothing, revision_option
from loram.shared.outputs import atomic_output_dir, check_not_an_input, check_output_dir

MANIFEST_JSON = "loram_manifest.json"  # loram.shared.manifest's (not imported here: it loads torch)


@dataclass
class MergeConfig(Config):
    adapter: str = option(help="A recovered adapter folder (or any LoRA adapter on its original model).",
                          argument=True)
    out: Path = option(help="Output folder for the merged checkpoint.")
    dtype: str = option("auto", "Dtype of the merged weights: auto (the original checkpoint's own), bf16, fp32 or "
                                "fp16.", choices=("auto", *DTYPE_CHOICES))
    base: str | None = option(None, "Use this copy of the original model (folder or Hub id) instead of the "
                                    "adapter's base.")
    ignore_fingerprint: bool = option(False, "Merge even if the base differs from the recorded one (fingerprint or pruned manifest).")
    max_shard_size: str = option("5GB", "Largest safetensors shard.")
    revision: str | None = revision_option("ADAPTER")
    endpoint: str | None = endpoint_option()
    overwrite: bool = option(False, "Replace an existing --out.")

    def check(self):
        from loram.memory_plan import parse_bytes

        try:
            size = parse_bytes(self.max_shard_size)
        except LoramError:
            size = None
        if not size:
            raise LoramError(f"--max-shard-size {self.max_shard_size!r} is not a size above zero; write e.g. 5GB "
                             "or 2GiB")


def check_original(adapter_dir: Path, base_dir: Path, ignore: bool, base_name: str | None = None) -> None:
    """Refuse a base whose config/weights differ from the fingerprint recorded by `loram recover` (`base_name`: the
    base as the user knows it, `ORG/NAME@REV` for a Hub snapshot, in the message)."""
    sidecar = adapter_dir / "loram_recovery.json"
    if not sidecar.is_file():
        return
    name = base_name or base_dir
    if (base_dir / MANIFEST_JSON).is_file():  # shapes too would differ: --ignore-fingerprint cannot help
        recorded = json.loads(sidecar.read_text()).get("original_model") or {}
        original = recorded.get("id") or "the model it was pruned from"
        at = f"@{recorded['revision']}" if recorded.get("revision") and is_hub_id(str(original)) else ""
        raise LoramError(f"{name} is a LoRAM pruned checkpoint, but {adapter_dir} is a recovered adapter, shaped "
                         f"for the original model; use it with the original ({original}{at}) in place of {name}")
    if ignore:
        return
    from loram.shared.manifest import fingerprint_mismatches

    wrong = fingerprint_mismatches(json.loads(sidecar.read_text())["original_model"].get("fingerprint") or {},
                                   base_dir)
    if wrong:
        raise LoramError(f"{name} is not the original model this adapter was recovered for "
                         f"({' and '.join(wrong)} differ); pass --ignore-fingerprint to use it anyway")


def load_with_adapter(adapter: str | Path, base: str | None = None, ignore_fingerprint: bool = False,
                      dtype=None, endpoint: str | None = None, *, adapter_revision: str | None = None,
                      base_revision: str | None = None, pruned_base_ok: bool = True):
    """(peft model = original + adapter, adapter folder, base source), with the fingerprint check.

    The base is `base` at `base_revision` when given, else the adapter's recorded base at its revision;
    `pruned_base_ok=False` refuses a recorded base that is a LoRAM pruned checkpoint (an adapter never
    recovered). An adapter whose shapes do not fit the base is one LoramError, not peft's size mismatches."""
    import torch
    from peft import PeftModel

    from loram.shared.hub import resolve_model
    from loram.shared.pruned_model import from_pretrained, read_config_json

    adapter_dir = resolve_model(adapter, adapter_revision, endpoint, required="adapter_config.json",
                                kind="peft adapter").path
    adapter_cfg = adapter_config_json(adapter_dir)
    if base is None and not adapter_cfg.get("base_model_name_or_path"):
        raise LoramError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path); "
                         "name the model the adapter belongs to")
    recorded = adapter_cfg["base_model_name_or_path"]
    if base is None and names_nothing(recorded):
        raise LoramError(f"the base model {adapter} names (base_model_name_or_path), {recorded}, is not on this "
                         "machine; pass --base PATH or ORG/NAME (a copy of the original), or recover the adapter "
                         "again with --original")
    source = resolve_model(base or recorded, base_revision if base else adapter_cfg.get("revision"), endpoint)
    if not pruned_base_ok and base is None and (source.path / MANIFEST_JSON).is_file():
        raise LoramError(f"{adapter} was trained on the pruned checkpoint {adapter_cfg['base_model_name_or_path']} "
                         f"and has the pruned model's shapes; run `loram recover {adapter} --out DIR` first "
                         "and use the recovered adapter")
    check_original(adapter_dir, source.path, ignore_fingerprint,
                   source.id if source.revision is None else f"{source.id}@{source.revision[:12]}")
    if (source.path / MANIFEST_JSON).is_file():  # an adapter used on a pruned checkpoint, as it was trained
        check_trained_on(adapter_dir, source.path, ignore_fingerprint)
    if dtype == "auto":  # the checkpoint's own dtype (config.json)
        dtype = getattr(torch, config_dtype(read_config_json(source.path)))
    model = from_pretrained(source.path, dtype=dtype or torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise LoramError(_mismatch_message(str(e), adapter, adapter_dir, adapter_cfg, source.id)) from e
    _check_every_tensor_loaded(peft_model, adapter, adapter_dir, source.id)
    return peft_model, adapter_dir, source


def _check_every_tensor_loaded(peft_model, adapter, adapter_dir: Path, base_id: str) -> None:
    """peft only warns about adapter tensors with no module to go to (a model with fewer layers, say, under
    --ignore-fingerprint): part of the adapter would be silently dropped."""
    from loram.shared.pruned_model import safetensors_shapes

    held = {name.replace(".default.", ".") for name, _ in peft_model.named_parameters()}
    dropped = [name for name in safetensors_shapes(adapter_dir / ADAPTER_WEIGHTS, "re-create the adapter")
               if name not in held]
    if dropped:
        raise LoramError(f"{adapter} does not fit {base_id}: {len(dropped)} adapter tensors have no module in the "
                         f"model (e.g. {dropped[0]}); use the model the adapter was trained or recovered for")


_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                       r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _mismatch_message(error: str, adapter, adapter_dir: Path, adapter_cfg: dict, base_id: str) -> str:
    """One line for peft's wall of size mismatches: an adapter never recovered (pruned shapes: smaller, or its
    recorded base is a LoRAM pruned checkpoint), or an adapter of another model."""
    found = [(name, [int(x) for x in a.split(",") if x.strip()], [int(x) for x in b.split(",") if x.strip()])
             for name, a, b in _MISMATCH.findall(error)]
    recorded = adapter_cfg.get("base_model_name_or_path") or ""
    on_pruned = bool(recorded) and (Path(recorded).expanduser() / MANIFEST_JSON).is_file()
    smaller = bool(found) and all(len(a) == len(b) and all(x <= y for x, y in zip(a, b, strict=True))
                                  for _, a, b in found)
    if not (adapter_dir / "loram_recovery.json").is_file() and (on_pruned or smaller):
        return (f"{adapter} has the pruned model's shapes (it was trained on {recorded or 'a pruned model'}), "
                f"not those of {base_id}; run `loram recover {adapter} --out DIR` first and use the recovered "
                "adapter")
    example = f" (e.g. {found[0][0]}: adapter {found[0][1]}, model {found[0][2]})" if found else ""
    return (f"{adapter} does not fit {base_id}: {len(found) or 'some'} adapter tensors have other shapes{example}; "
            "use the model the adapter was trained or recovered for")


def merge(config: MergeConfig | None = None, **kwargs) -> Path:
    """Merge the adapter into its original model and write the result to `config.out`."""
    import torch

    from loram.memory_plan import parse_bytes
    from loram.shared.pruned_model import load_tokenizer

    cfg = MergeConfig.given(config, **kwargs)
    check_output_dir(cfg.out, cfg.overwrite)  # before loading anything
    check_not_an_input(cfg.out, {"the adapter": cfg.adapter, "--base": cfg.base})
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, dtype_name(cfg.dtype))
    model, adapter_dir, source = load_with_adapter(cfg.adapter, cfg.base, cfg.ignore_fingerprint, dtype,
                                                   cfg.endpoint, adapter_revision=cfg.revision, pruned_base_ok=False)
    check_not_an_input(cfg.out, {"the adapter": adapter_dir, "its base model": source.path})  # as resolved
    merged = model.merge_and_unload()
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as out:
        merged.save_pretrained(out, max_shard_size=parse_bytes(cfg.max_shard_size))
        with contextlib.suppress(OSError, ValueError):  # a base without tokenizer files
            load_tokenizer(source.path).save_pretrained(out)
        cfg.save(out / "merge_config.yaml")
    return Path(cfg.out)
