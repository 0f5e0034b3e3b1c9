"""`loram publish prune`: prune a base model and write a loadable pruned checkpoint with its manifest.

    loram publish prune BASE --method taylor --ratio 0.5 --out pruned/

The recipe, top to bottom: resolve BASE (local folder or Hub id at a revision), score units with
the chosen criterion (or read `--scores`), keep the top units per layer by the paper's rounding
rules, slice the layers in place, re-home the weights in LoRAM's per-layer model class, and write
checkpoint + manifest + importance scores + resolved config into a temporary folder that is
renamed onto `--out` when complete.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import loram  # noqa: F401  (registers the pruned model types with the Auto classes)
from loram.publisher.importance import NEEDS_CALIBRATION, STRUCTURED_CRITERIA, LayerScores, get_criterion
from loram.publisher.structured import select_kept, slice_layers_
from loram.shared.architectures import Shape, family_of, parse_layer_range
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import resolve_model
from loram.shared.manifest import BaseModelInfo, Calibration, Manifest, Method, fingerprint
from loram.shared.outputs import atomic_output_dir, check_output_dir
from loram.shared.pruned_model import build_pruned_config, is_pruned_config, save_pruned_checkpoint
from loram.shared.runtime import configure_threads
from loram.shared.text_sources import token_blocks

SCORES_FILE = "importance.safetensors"


@dataclass
class PruneConfig(Config):
    base: str = option(help="Base model: a local checkpoint folder or a Hub repo id.", argument=True)
    out: Path = option(help="Output folder for the pruned checkpoint.")
    method: str = option("taylor", "Importance criterion.", choices=STRUCTURED_CRITERIA)
    ratio: float = option(0.5, "Pruning ratio p in [0, 1) for attention and MLP alike.")
    attn_ratio: float | None = option(None, "Pruning ratio for attention (KV groups); default --ratio.")
    mlp_ratio: float | None = option(None, "Pruning ratio for MLP channels; default --ratio.")
    layers: str | None = option(None, "Half-open layer range A:B, negative ends allowed; default the paper's 4:-2.")
    calib: str = option("wiki", "Calibration text: a .txt/.jsonl file or a built-in name (wiki).")
    samples: int = option(32, "Calibration samples (taylor).")
    seq_len: int = option(128, "Tokens per calibration sample (taylor).")
    seed: int = option(0, "Seed (random criterion; any sampling).")
    scores: Path | None = option(None, "Re-prune from saved importance scores (importance.safetensors) "
                                       "instead of recalibrating.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of BASE.")
    endpoint: str | None = option(None, "Hub endpoint URL (default: huggingface.co or HF_ENDPOINT).")
    overwrite: bool = option(False, "Replace an existing --out folder.")

    def __post_init__(self):
        for name in ("ratio", "attn_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise LoramError(f"--{name.replace('_', '-')} must lie in [0, 1), got {value}")
        if self.samples < 1 or self.seq_len < 2:
            raise LoramError("--samples must be >= 1 and --seq-len >= 2")
        if self.scores is not None and not Path(self.scores).is_file():
            raise LoramError(f"--scores file {self.scores} not found")

    @property
    def ratios(self) -> tuple[float, float]:
        return (self.ratio if self.attn_ratio is None else self.attn_ratio,
                self.ratio if self.mlp_ratio is None else self.mlp_ratio)


@dataclass
class PruneResult:
    out: Path
    original_params: int
    pruned_params: int
    kept: dict[int, tuple[int, int]]  # layer -> (kept KV groups, kept MLP channels)
    seconds: float

    @property
    def reduction(self) -> float:
        return self.original_params / self.pruned_params


def _log(msg: str) -> None:
    print(f"[loram prune] {msg}", file=sys.stderr, flush=True)


def prune(config: PruneConfig | None = None, **kwargs) -> PruneResult:
    """Prune `config.base` and write the pruned checkpoint to `config.out` (see the module docstring)."""
    cfg = config or PruneConfig.resolve(**kwargs)
    started = time.time()
    configure_threads()
    check_output_dir(cfg.out, cfg.overwrite)  # fail before any heavy work
    source = resolve_model(cfg.base, cfg.revision, cfg.endpoint)
    stock_config = AutoConfig.from_pretrained(source.path)
    if is_pruned_config(stock_config):
        raise LoramError(f"{cfg.base} is already a LoRAM pruned checkpoint; prune the original model instead")
    family_of(stock_config)
    shape = Shape.of(stock_config)
    start, stop = parse_layer_range(cfg.layers, shape.num_layers)
    attn_ratio, mlp_ratio = cfg.ratios
    select_kept({}, shape, attn_ratio, mlp_ratio)  # refuses ratios that remove everything, before loading

    _log(f"loading {source.id}")
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto")
    tokenizer = _tokenizer_or_none(source.path)
    original_params = sum(p.numel() for p in model.parameters())
    if cfg.scores is not None:
        scores, calibration = read_scores(cfg.scores, range(start, stop), shape)
    else:
        scores, calibration = _score(cfg, model, tokenizer, range(start, stop))
    kept = select_kept(scores, shape, attn_ratio, mlp_ratio)
    slice_layers_(model, kept)
    pruned = rehome(model, build_pruned_config(stock_config, {i: (len(u.kv_heads), len(u.mlp_channels))
                                                               for i, u in kept.items()}))
    del model
    manifest = Manifest(
        base=BaseModelInfo(source.id, source.revision, fingerprint(source.path)),
        architecture=shape,
        method=Method(kind="structured", criterion=cfg.method, ratio=cfg.ratio, attn_ratio=attn_ratio,
                      mlp_ratio=mlp_ratio, layers=[start, stop], calibration=calibration, seed=cfg.seed),
        kept_kv_heads={i: u.kv_heads for i, u in kept.items()},
        kept_mlp_channels={i: u.mlp_channels for i, u in kept.items()},
    )
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as out:
        save_pruned_checkpoint(pruned, out, tokenizer)
        write_scores(out / SCORES_FILE, scores, cfg.method, calibration)
        cfg.save(out / "prune_config.yaml")
        manifest.save(out)
    return PruneResult(Path(cfg.out), original_params, sum(p.numel() for p in pruned.parameters()),
                       {i: (len(u.kv_heads), len(u.mlp_channels)) for i, u in kept.items()},
                       round(time.time() - started, 2))


def _tokenizer_or_none(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _score(cfg: PruneConfig, model, tokenizer, layers: range):
    calib, calibration = None, Calibration()
    if cfg.method in NEEDS_CALIBRATION:
        if tokenizer is None:
            raise LoramError(f"{cfg.base} has no tokenizer, which --method {cfg.method} needs for calibration")
        calib = token_blocks(tokenizer, cfg.calib, cfg.samples, cfg.seq_len)
        calibration = Calibration(str(cfg.calib), cfg.samples, cfg.seq_len)
        _log(f"scoring with {cfg.method} on {cfg.samples} x {cfg.seq_len} tokens of {cfg.calib}")
    return get_criterion(cfg.method)(model, layers, calib, cfg.seed), calibration


@torch.no_grad()
def rehome(model, pruned_config):
    """Move `model`'s (already sliced) tensors into LoRAM's per-layer class without copying them."""
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(pruned_config, dtype=model.dtype)
    pruned.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        pruned.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
    pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.eval()


def write_scores(path: Path, scores: dict[int, LayerScores], criterion: str, calibration: Calibration) -> None:
    """Importance scores (float64) per layer, so `--scores` can re-prune at another ratio."""
    tensors = {}
    for i, s in scores.items():
        tensors[f"layers.{i}.kv"] = s.kv.contiguous()
        tensors[f"layers.{i}.mlp"] = s.mlp.contiguous()
    # One metadata key: safetensors writes its metadata map in no fixed order, and the file must be
    # byte-identical for identical inputs.
    meta = {"loram_scores": json.dumps({"criterion": criterion, "calibration": asdict(calibration)}, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)


def read_scores(path: Path, layers: range, shape: Shape):
    """Scores saved by an earlier prune, checked against the model and the requested layer range."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise LoramError(f"--scores {path} is not a readable safetensors scores file ({e})") from e
    scores = {}
    for i in layers:
        kv, mlp = tensors.get(f"layers.{i}.kv"), tensors.get(f"layers.{i}.mlp")
        if kv is None or mlp is None:
            raise LoramError(f"--scores {path} has no scores for layer {i}; it covers layers "
                             f"{sorted({int(k.split('.')[1]) for k in tensors})}")
        if kv.shape != (shape.num_kv_heads,) or mlp.shape != (shape.intermediate,):
            raise LoramError(f"--scores {path} does not match this model: layer {i} has {kv.numel()} KV groups "
                             f"and {mlp.numel()} channels, the model {shape.num_kv_heads} and {shape.intermediate}")
        scores[i] = LayerScores(kv, mlp)
    calibration = Calibration(**json.loads(meta.get("loram_scores", "{}")).get("calibration", {}))
    return scores, calibration
