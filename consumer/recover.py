"""`loram recover`: map an adapter trained on the pruned model back to the original model's shapes.

    loram recover adapter-p50/ --out adapter-recovered/

Linear `y = x W^T` with `W` of shape [out, in]; LoRA adds `(alpha/r) B A` with A [r, in], B [out, r].
On a pruned module with kept output rows O and kept input columns I (docs/method.md §6):

    A^R = zeros(r, in_full);  A^R[:, I] = A^P          (only when columns were pruned: o, down)
    B^R = zeros(out_full, r); B^R[O, :] = B^P          (only when rows were pruned: q, k, v, gate, up)

so dW^R equals dW^P on the O x I block and is exactly zero elsewhere. Dense layers, lm_head and
non-structured checkpoints are copied unchanged. `--fill normal` fills the new A columns with
N(0, 1/r) instead of zeros (the paper's normA ablation). The recovery streams the adapter tensor by
tensor and never loads a base model; slicing its output with the manifest gives back the input bit
for bit.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loram import __version__
from loram.shared.architectures import layer_module
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError, warn
from loram.shared.hub import (
    endpoint_option,
    looks_like_repo_id,
    names_nothing,
    resolve_model,
    revision_option,
    verify_option,
)
from loram.shared.manifest import MANIFEST_JSON, Manifest, sha256_file
from loram.shared.model_cards import adapter_card
from loram.shared.outputs import atomic_output_dir, check_not_an_input
from loram.shared.pruned_model import PICKLE_SUFFIXES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "loram_recovery.json"
# base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.adapter].weight
_LORA = re.compile(r"\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class RecoverConfig(Config):
    adapter: str = option(help="The adapter trained on the pruned model: a folder or Hub repo id.", argument=True)
    out: Path = option(help="Output folder for the recovered adapter.")
    fill: str = option("zero", "Fill for the new lora_A columns: zero (exact) or normal (N(0, 1/r)).",
                       choices=("zero", "normal"))
    seed: int = option(0, "Seed for --fill normal.")
    original: str | None = option(None, "Point the recovered adapter at this copy of the original model (folder "
                                        "or Hub id) instead of the manifest's; its fingerprint must match.")
    ignore_fingerprint: bool = option(False, "Accept an --original whose config/weights differ from the manifest's "
                                             "fingerprint, or a pruned checkpoint other than the one the adapter "
                                             "was trained on (you are on your own).")
    revision: str | None = revision_option("ADAPTER")
    endpoint: str | None = endpoint_option()
    verify: bool = verify_option()
    overwrite: bool = option(False, "Replace an existing --out.")


@dataclass
class RecoverResult:
    out: Path
    expanded: int  # tensors whose shape grew
    copied: int  # tensors copied unchanged
    original: str  # base_model_name_or_path of the recovered adapter


def adapter_config_json(folder: Path) -> dict:
    """A peft adapter folder's adapter_config.json as a dict, its weights being safetensors (peft would fall
    back to torch.load of an adapter_model.bin, which is pickle): one LoramError otherwise."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoramError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-download or re-create the "
                         "adapter") from e
    if not isinstance(config, dict):
        raise LoramError(f"{path} must hold a JSON object; re-download or re-create the adapter")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in folder.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES)
        found = f" (only {', '.join(pickles)}: LoRAM never loads pickle)" if pickles else ""
        raise LoramError(f"{folder} has no {ADAPTER_WEIGHTS}{found}; save the adapter as safetensors "
                         "(peft's save_pretrained does by default)")
    from loram.shared.pruned_model import safetensors_shapes

    safetensors_shapes(folder / ADAPTER_WEIGHTS, "re-download or re-create the adapter")  # a complete file
    return config


def read_adapter_config(folder: Path) -> dict:
    """`adapter_config_json`, for a LoRA adapter (the kind recovery can expand)."""
    config = adapter_config_json(folder)
    if config.get("peft_type") != "LORA":
        raise LoramError(f"{folder} holds a {config.get('peft_type')} adapter; LoRAM recovers LoRA adapters only")
    if config.get("use_dora"):
        raise LoramError(f"{folder} is a DoRA adapter; its magnitude vectors cannot be recovered exactly, use LoRA")
    return config


def pruned_manifest(adapter_config: dict, endpoint: str | None = None, verify: bool = True) -> tuple[Path, Manifest]:
    """The pruned checkpoint an adapter was trained on (its `base_model_name_or_path`) and its manifest,
    validated against its config and (with `verify`) every file checked (`check_pruned_checkpoint`)."""
    from loram.shared.pruned_model import check_pruned_checkpoint

    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise LoramError("the adapter's config names no base model (base_model_name_or_path)")
    source = resolve_model(base, adapter_config.get("revision"), endpoint)
    if not (source.path / MANIFEST_JSON).is_file():
        raise LoramError(f"the adapter's base {base} has no loram_manifest.json: it is not a LoRAM pruned "
                         "checkpoint (was this adapter trained on the original model already?)")
    return source.path, check_pruned_checkpoint(source.path, verify=verify and not source.verified)


TRAIN_REPORT = "training_report.json"  # what `loram train` writes beside the adapter (loram.train.REPORT)


def check_trained_on(adapter_dir: Path, pruned_dir: Path, ignore: bool = False) -> None:
    """Refuse a pruned checkpoint other than the one the adapter was trained on: `loram train` records the
    manifest's sha256 in the adapter's training_report.json. Another checkpoint of the same shapes (re-pruned into
    the same folder, or another method or calibration) loads without complaint, and its kept channels are others.
    An adapter without the record (trained elsewhere, or before it was kept) is not checked."""
    try:
        recorded = json.loads((Path(adapter_dir) / TRAIN_REPORT).read_text(encoding="utf-8"))["model"]
        recorded = recorded["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if ignore or sha256_file(Path(pruned_dir) / MANIFEST_JSON) == recorded:
        return
    raise LoramError(f"{pruned_dir} is not the pruned checkpoint the adapter {adapter_dir} was trained on: its "
                     f"manifest's sha256 differs from the one in {TRAIN_REPORT} ({recorded[:12]}...), so its kept "
                     "channels may be others; use the checkpoint it was trained on (pass --ignore-fingerprint to use "
                     "this one anyway)")


def _card_base_model(folder: Path) -> str | None:
    """The `base_model` a published pruned checkpoint's card names (`loram publish push --base-model`), if any."""
    from huggingface_hub import ModelCard

    try:
        base = ModelCard.load(folder / "README.md").data.base_model
    except Exception:  # noqa: BLE001 (no card, or one without metadata: no hint)
        return None
    return base if isinstance(base, str) and looks_like_repo_id(base) else None


def expand(tensor: torch.Tensor, which: str, rows, cols, full: int, fill: str, gen: torch.Generator | None,
           name: str) -> torch.Tensor:
    """Place a pruned-space lora_A (which="A", [r, in]) or lora_B ("B", [out, r]) into original shapes."""
    index = rows if which == "B" else cols
    if index is None:
        return tensor
    dim = 0 if which == "B" else 1
    if tensor.shape[dim] != len(index):
        expected = (len(index), tensor.shape[1]) if which == "B" else (tensor.shape[0], len(index))
        raise LoramError(f"{name}: shape {tuple(tensor.shape)} does not match the manifest, which expects "
                         f"{expected}")
    shape = (full, tensor.shape[1]) if which == "B" else (tensor.shape[0], full)
    if which == "A" and fill == "normal":
        r = tensor.shape[0]
        out = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(r ** -0.5).to(tensor.dtype)
    else:
        out = torch.zeros(shape, dtype=tensor.dtype)
    out.index_copy_(dim, index, tensor)
    return out


def recover(config: RecoverConfig | None = None, **kwargs) -> RecoverResult:
    """Recover an adapter (see the module docstring) and write it to `config.out`."""
    cfg = RecoverConfig.given(config, **kwargs)
    folder = resolve_model(cfg.adapter, cfg.revision, cfg.endpoint, ADAPTER_CONFIG, "peft adapter").path
    adapter_config = read_adapter_config(folder)
    if (folder / SIDECAR).is_file():
        raise LoramError(f"{cfg.adapter} is a recovered adapter already ({SIDECAR}): it has the original model's "
                         "shapes; use it as it is with merge, eval, generate or push")
    pruned_dir, manifest = pruned_manifest(adapter_config, cfg.endpoint, cfg.verify)
    check_trained_on(folder, pruned_dir, cfg.ignore_fingerprint)
    check_not_an_input(cfg.out, {"the adapter": folder, "its pruned model": pruned_dir, "--original": cfg.original,
                                 "the original model": manifest.base.id})
    arch = manifest.architecture
    gen = torch.Generator().manual_seed(cfg.seed)
    tensors, expanded = {}, 0
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = f.get_tensor(name)
            lora, found = _LORA.search(name), layer_module(name)
            if lora and found and manifest.method.kind == "structured":
                (layer, module), which = found, lora.group(1)
                rows, cols = manifest.kept_indices(layer, module.path)
                new = expand(tensor, which, rows, cols, arch.width(module.unit), cfg.fill, gen, name)
                expanded += new is not tensor
                tensor = new
            tensors[name] = tensor.contiguous()
    base = manifest.base
    base_id, base_revision = base.id, base.revision
    if cfg.original is not None:
        source = resolve_model(cfg.original, endpoint=cfg.endpoint)
        if not cfg.ignore_fingerprint:
            manifest.check_base(source.path)
        base_id, base_revision = source.id, source.revision
    elif names_nothing(base_id):
        hint = _card_base_model(pruned_dir)
        warn(f"the original model the pruned checkpoint's manifest names, {base_id}, is not on this machine: merge, "
             "eval and generate look for it there; recover again with --original "
             + (f"{hint} (the base_model its model card names)" if hint else "PATH or ORG/NAME (a copy of the original)"))
    recovered_config = {**adapter_config, "base_model_name_or_path": base_id, "revision": base_revision}
    fill = cfg.fill if manifest.method.kind == "structured" else "none"  # nothing to fill: the original's shapes
    if cfg.fill == "normal" and fill == "none":
        warn("--fill normal applies to structured checkpoints: a non-structured adapter already has the original's "
             "shapes and is copied unchanged (recorded as fill: none)")
    sidecar = {
        "tool_version": __version__, "fill": fill, "seed": cfg.seed if fill == "normal" else None,
        "source_adapter": {"id": cfg.adapter, "revision": cfg.revision,
                           "sha256": sha256_file(folder / ADAPTER_WEIGHTS)},
        "pruned_model": {"id": adapter_config["base_model_name_or_path"], "revision": adapter_config.get("revision"),
                         "manifest_sha256": sha256_file(pruned_dir / MANIFEST_JSON)},
        "original_model": {"id": base_id, "revision": base_revision, "fingerprint": base.fingerprint},
        "method": {"kind": manifest.method.kind, "criterion": manifest.method.criterion,
                   "ratio": manifest.method.ratio, "layers": manifest.method.layers},
    }
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as out:
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (out / ADAPTER_CONFIG).write_text(json.dumps(recovered_config, indent=2, sort_keys=True) + "\n")
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        (out / "README.md").write_text(adapter_card(sidecar, adapter_config))
        cfg.save(out / "recover_config.yaml")
        for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (folder / extra).is_file():
                shutil.copyfile(folder / extra, out / extra)
    return RecoverResult(Path(cfg.out), expanded, len(tensors) - expanded, base_id)

