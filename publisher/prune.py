"""`loram publish prune`: prune a base model and write a loadable pruned checkpoint with its manifest.

    loram publish prune BASE --method taylor --ratio 0.5 --out pruned/          # structured
    loram publish prune BASE --method wanda --nm 2:4 --out pruned-24/           # non-structured

Structured (random, l1, l2, taylor), top to bottom: resolve BASE (local folder or Hub id at a
revision), load it in its own dtype on `--device` (or spread by `--device-map auto`), score units
with the chosen criterion (or read `--scores`), keep the top units per layer by the paper's rounding
rules, and write LoRAM's per-layer checkpoint, each kept block sliced from the original as it is
written (`structured.sliced_tensors`). Non-structured (magnitude, wanda, sparsegpt): zero weights layer by layer
(`layerwise.py`), keep the stock architecture, and record the bit-packed masks in the manifest.
Either way checkpoint + manifest (+ importance scores) + resolved config are written into a
temporary folder that is renamed onto `--out` when complete.
"""

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from loram.publisher.calibration import token_blocks
from loram.publisher.importance import (
    NEEDS_CALIBRATION,
    QUERY_FOLDS,
    STRUCTURED_CRITERIA,
    LayerScores,
    get_criterion,
)
from loram.publisher.importance.group_loss import KV_SAMPLES, KV_SCORES, kv_loss_scores
from loram.publisher.importance.taylor import CALIB_BATCH
from loram.publisher.layerwise import NEEDS_INPUTS, NONSTRUCTURED_CRITERIA, prune_layerwise
from loram.publisher.sparsity import Target, parse_nm
from loram.publisher.structured import check_removal, select_kept, sliced_tensors
from loram.shared.architectures import (
    DEFAULT_RATIO,
    PRUNED_MODULES,
    TAYLOR_CALIBRATION,
    Shape,
    check_positions,
    family_of,
    pruned_layer_range,
    ratio_options,
)
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError, warn
from loram.shared.hub import endpoint_option, resolve_model, revision_option
from loram.shared.manifest import (
    MANIFEST_JSON,
    BaseModelInfo,
    Calibration,
    Manifest,
    Method,
    fingerprint,
)
from loram.shared.outputs import atomic_output_dir, check_not_an_input, check_output_dir
from loram.shared.pruned_model import (
    build_pruned_config,
    from_pretrained,
    is_pruned_config,
    load_config,
    load_tokenizer,
    save_pruned_checkpoint,
)
from loram.shared.records import check_source
from loram.shared.runtime import configure_threads

SCORES_FILE = "importance.safetensors"
PRUNE_CONFIG = "prune_config.yaml"  # the resolved config (`--config` repeats the run)


# Calibration defaults (samples x tokens): Taylor as measured in docs/method.md §9; Wanda and SparseGPT
# as their reference implementations (128 x 2048). On a CPU, `--samples 32 --seq-len 256` is enough.
CALIBRATION_DEFAULTS = {"taylor": TAYLOR_CALIBRATION, "wanda": (128, 2048), "sparsegpt": (128, 2048)}
METHODS = STRUCTURED_CRITERIA + NONSTRUCTURED_CRITERIA


RATIO, ATTN_RATIO, MLP_RATIO = ratio_options()


@dataclass
class PruneConfig(Config):
    base: str = option(help="Base model: a local checkpoint folder or a Hub repo id.", argument=True)
    out: Path = option(help="Output folder for the pruned checkpoint.")
    method: str = option("taylor", "Criterion: structured random|l1|l2|taylor, or non-structured "
                                   "magnitude|wanda|sparsegpt.", choices=METHODS)
    ratio: float | None = RATIO
    attn_ratio: float | None = ATTN_RATIO
    mlp_ratio: float | None = MLP_RATIO
    sparsity: float | None = option(None, "Non-structured: fraction of each row's weights to zero, in (0, 1).")
    nm: str | None = option(None, "Non-structured: N:M, zero N of every M consecutive weights of a row (e.g. 2:4).")
    layers: str | None = option(None, "Half-open layer range A:B, negative ends allowed; default the paper's 4:-2 "
                                      "(structured) or every layer (non-structured).")
    calib: str = option("wiki", "Calibration text: a .txt/.jsonl file or a built-in name (wiki).")
    samples: int | None = option(None, "Calibration samples (taylor 32; wanda, sparsegpt 128 as the references).")
    seq_len: int | None = option(None, "Tokens per calibration sample (taylor 128; wanda, sparsegpt 2048).")
    device: str | None = option(None, "Compute device, cpu, cuda or cuda:N. Structured pruning loads the model "
                                      "there (default cuda if available for taylor, else cpu); non-structured "
                                      "pruning moves one layer at a time there (default cuda if available).")
    device_map: str | None = option(None, "Structured: auto places the model over the accelerators (accelerate's "
                                          "placement), the CPU for what does not fit; each layer computes where it "
                                          "is (instead of --device).", choices=("auto",))
    calib_batch: int | None = option(None, f"Taylor: calibration samples per forward/backward chunk (default "
                                           f"{CALIB_BATCH}). The scores are the same for any value; memory and "
                                           "speed are not.")
    kv_score: str | None = option(None, "Taylor: how KV groups are scored: loss (default; the loss on the first "
                                        "--kv-samples calibration samples with that one group removed, measured "
                                        "far better; about n_kv x layers / 2 extra forwards of those samples, "
                                        "without gradients) or taylor (first order, as LLM-Pruner). MLP channels "
                                        "are Taylor-scored either way.", choices=KV_SCORES)
    kv_samples: int | None = option(None, f"With --kv-score loss: calibration samples the loss is measured on "
                                          f"(default {KV_SAMPLES}, at most --samples).")
    query_fold: str | None = option(None, "With --kv-score taylor: how query heads enter the KV-group scores: "
                                          "strided (default; "
                                          "head h with group h mod n_kv, LLM-Pruner's fold, measured better) or "
                                          "coupled (head h with the group it attends with, h // G). The heads "
                                          "removed with a group are the coupled ones either way.",
                                    choices=QUERY_FOLDS)
    seed: int = option(0, "Seed (random criterion; any sampling).")
    scores: Path | None = option(None, "Re-prune from saved importance scores (importance.safetensors) "
                                       "instead of recalibrating.")
    revision: str | None = revision_option("BASE")
    endpoint: str | None = endpoint_option()
    overwrite: bool = option(False, "Replace an existing --out.")

    def check(self):
        given = [f"--{n.replace('_', '-')}" for n in ("ratio", "attn_ratio", "mlp_ratio", "scores", "device_map",
                                                     "calib_batch") if getattr(self, n) is not None]
        if self.structured:
            if self.sparsity is not None or self.nm is not None:
                raise LoramError(f"--sparsity and --nm apply to non-structured methods "
                                 f"({', '.join(NONSTRUCTURED_CRITERIA)}); --method {self.method} takes --ratio")
        elif given:
            raise LoramError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to structured methods "
                             f"({', '.join(STRUCTURED_CRITERIA)}); --method {self.method} takes --sparsity S "
                             "or --nm N:M")
        else:
            self.target  # noqa: B018  (validates --sparsity / --nm)
        for name in ("ratio", "attn_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise LoramError(f"--{name.replace('_', '-')} must lie in [0, 1), got {value}")
        if (self.samples is not None and self.samples < 1) or (self.seq_len is not None and self.seq_len < 2):
            raise LoramError("--samples must be >= 1 and --seq-len >= 2")
        if self.calib_batch is not None and self.calib_batch < 1:
            raise LoramError(f"--calib-batch must be >= 1, got {self.calib_batch}")
        if self.device is not None:
            if self.device_map is not None:
                raise LoramError("--device and --device-map exclude each other: give one")
            self.compute_device  # noqa: B018  (validates --device)
        if self.kv_score is not None and (self.method != "taylor" or self.scores is not None):
            raise LoramError("--kv-score applies to --method taylor when it calibrates (not with --scores)")
        if self.kv_samples is not None:
            if self.method != "taylor" or self.scores is not None or self.kv_score == "taylor":
                raise LoramError("--kv-samples applies to --method taylor with --kv-score loss (the default)")
            if self.kv_samples < 1:
                raise LoramError(f"--kv-samples must be >= 1, got {self.kv_samples}")
            samples = self.calibration_size[0]
            if self.kv_samples > samples:  # the record would name more than the loss is measured on
                raise LoramError(f"--kv-samples {self.kv_samples} exceeds the {samples} calibration samples "
                                 f"(--samples); give at most {samples}, or more --samples")
        if self.query_fold is not None and (self.method != "taylor" or self.scores is not None
                                            or self.kv_score != "taylor"):
            raise LoramError("--query-fold applies to --method taylor --kv-score taylor when it calibrates (the "
                             "default --kv-score loss scores KV groups without folding query heads)")
        if self.scores is not None and not Path(self.scores).is_file():
            raise LoramError(f"--scores file {self.scores} not found")

    @property
    def kv_scoring(self) -> dict | None:
        """How --method taylor scores KV groups when it calibrates: {"score": "loss", "samples": n} or
        {"score": "taylor", "query_fold": f}; None otherwise (the scores come from elsewhere)."""
        if self.method != "taylor" or self.scores is not None:
            return None
        if (self.kv_score or "loss") == "loss":
            return {"score": "loss", "samples": min(self.kv_samples or KV_SAMPLES, self.calibration_size[0])}
        return {"score": "taylor", "query_fold": self.query_fold or "strided"}

    @property
    def structured(self) -> bool:
        return self.method in STRUCTURED_CRITERIA

    @property
    def compute_device(self) -> torch.device:
        """--device; by default cuda when available, but cpu for the structured criteria that compute nothing
        heavy (random, l1, l2, or --scores): loading a model onto a GPU for them only risks running out of memory."""
        light = self.structured and (self.method not in NEEDS_CALIBRATION or self.scores is not None)
        name = self.device or ("cuda" if torch.cuda.is_available() and not light else "cpu")
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise LoramError(f"--device must be cpu, cuda or cuda:N; got {name!r}") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise LoramError(f"--device {name}: no such CUDA device on this machine "
                             f"({torch.cuda.device_count()} available); use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise LoramError(f"--device must be cpu, cuda or cuda:N; got {name!r}")
        return device

    @property
    def target(self) -> Target:
        return Target(self.sparsity, None if self.nm is None else parse_nm(self.nm))

    @property
    def base_ratio(self) -> float:
        """--ratio, or the structured default 0.5."""
        return DEFAULT_RATIO if self.ratio is None else self.ratio

    @property
    def ratios(self) -> tuple[float, float]:
        return (self.base_ratio if self.attn_ratio is None else self.attn_ratio,
                self.base_ratio if self.mlp_ratio is None else self.mlp_ratio)

    @property
    def calibration_size(self) -> tuple[int, int]:
        samples, seq_len = CALIBRATION_DEFAULTS.get(self.method, (32, 128))
        return (samples if self.samples is None else self.samples,
                seq_len if self.seq_len is None else self.seq_len)


@dataclass
class PruneResult:
    out: Path
    original_params: int
    pruned_params: int  # parameters the pruned checkpoint holds (zeros included)
    kept: dict[int, tuple[int, int]]  # structured: layer -> (kept KV groups, kept MLP channels)
    seconds: float
    nonzero_params: int | None = None  # non-structured: parameters that are not exactly zero
    sparsity: dict[str, float] = field(default_factory=dict)  # non-structured: module -> achieved sparsity

    @property
    def reduction(self) -> float:
        """Original over pruned parameters; for non-structured pruning over non-zero ones (nominal)."""
        return self.original_params / (self.nonzero_params or self.pruned_params)


def _log(msg: str) -> None:
    print(f"[loram prune] {msg}", file=sys.stderr, flush=True)


def prune(config: PruneConfig | None = None, **kwargs) -> PruneResult:
    """Prune `config.base` and write the pruned checkpoint to `config.out` (see the module docstring)."""
    cfg = PruneConfig.given(config, **kwargs)
    started = time.time()
    threads = configure_threads()
    check_output_dir(cfg.out, cfg.overwrite)  # fail before any heavy work
    check_not_an_input(cfg.out, {"the model": cfg.base, "--calib": cfg.calib, "--scores": cfg.scores})
    source = resolve_model(cfg.base, cfg.revision, cfg.endpoint)
    stock_config = load_config(source.path)
    if is_pruned_config(stock_config) or (source.path / MANIFEST_JSON).is_file():
        raise LoramError(f"{cfg.base} is already a LoRAM pruned checkpoint; prune the original model instead")
    family_of(stock_config)
    shape = Shape.of(stock_config)
    if cfg.structured:
        start, stop = pruned_layer_range(cfg.layers, shape.num_layers)
        select_kept({}, shape, *cfg.ratios)  # refuses ratios that remove everything, before loading
        check_removal(shape, *cfg.ratios)  # ... or nothing
    else:
        start, stop = pruned_layer_range(cfg.layers, shape.num_layers, structured=False)
        _check_widths(cfg.target, shape)
    if cfg.method in NEEDS_CALIBRATION + NEEDS_INPUTS and cfg.scores is None:
        check_source(str(cfg.calib))  # a missing calibration file fails now, not after loading the model
        check_positions(stock_config, cfg.calibration_size[1], f"calibration --seq-len {cfg.calibration_size[1]}")
    _log(f"loading {source.id} ({threads} CPU thread{'s' if threads > 1 else ''})")
    model = _load_structured(cfg, source.path) if cfg.structured else from_pretrained(source.path, dtype="auto")
    tokenizer = _tokenizer_or_none(source.path)
    base = BaseModelInfo(source.id, source.revision, fingerprint(source.path))
    run = _structured if cfg.structured else _nonstructured
    result, manifest, write_extra = run(cfg, model, tokenizer, stock_config, shape, range(start, stop), base)
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as out:
        write_extra(out)
        cfg.save(out / PRUNE_CONFIG)
        manifest.save(out)
    result.seconds = round(time.time() - started, 2)
    return result


def _structured(cfg, model, tokenizer, stock_config, shape: Shape, layers: range, base: BaseModelInfo):
    attn_ratio, mlp_ratio = cfg.ratios
    original_params = sum(p.numel() for p in model.parameters())
    if cfg.scores is not None:
        scores, calibration = read_scores(cfg.scores, layers, shape)
    else:
        try:
            scores, calibration = _score(cfg, model, tokenizer, layers)
        except torch.OutOfMemoryError as e:
            raise LoramError("out of memory while scoring; use a smaller --calib-batch, fewer --samples or a shorter "
                             "--seq-len, or --device-map auto to spread the model over more memory") from e
    kept = select_kept(scores, shape, attn_ratio, mlp_ratio)
    pruned = _meta_pruned(model, build_pruned_config(stock_config, {i: (len(u.kv_heads), len(u.mlp_channels))
                                                                     for i, u in kept.items()}))
    tensors = sliced_tensors(model, pruned, kept)
    manifest = Manifest(
        base=base, architecture=shape,
        method=Method(kind="structured", criterion=cfg.method, ratio=cfg.base_ratio,
                      attn_ratio=attn_ratio, mlp_ratio=mlp_ratio, layers=[layers.start, layers.stop],
                      calibration=calibration, seed=cfg.seed),
        kept_kv_heads={i: u.kv_heads for i, u in kept.items()},
        kept_mlp_channels={i: u.mlp_channels for i, u in kept.items()},
    )

    def write(out: Path) -> None:
        save_pruned_checkpoint(pruned, out, tokenizer, tensors=tensors)
        write_scores(out / SCORES_FILE, scores, cfg.method, calibration, cfg.kv_scoring)

    result = PruneResult(Path(cfg.out), original_params, sum(p.numel() for p in pruned.parameters()),
                         {i: (len(u.kv_heads), len(u.mlp_channels)) for i, u in kept.items()}, 0.0)
    return result, manifest, write


def _nonstructured(cfg, model, tokenizer, stock_config, shape: Shape, layers: range, base: BaseModelInfo):
    target, calib, calibration = cfg.target, None, Calibration()
    if cfg.method in NEEDS_INPUTS:
        calib, calibration = _calibration_blocks(cfg, tokenizer)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = f"{target.sparsity:.0%} unstructured" if target.nm is None else f"{target.nm[0]}:{target.nm[1]}"
    _log(f"pruning {what} with {cfg.method}, layers [{layers.start}, {layers.stop}), one layer at a time on {device}")
    try:
        done = prune_layerwise(model, layers, cfg.method, target, calib, device)
    except torch.OutOfMemoryError as e:
        raise LoramError(f"out of memory on {device} while pruning one layer; use fewer --samples or a shorter "
                         "--seq-len") from e
    params = sum(p.numel() for p in model.parameters())
    zeros = sum(math.prod(m.shape) - m.kept for m in done.masks.values())
    if zeros == 0:
        warn(f"--sparsity {target.sparsity:g} zeroes no weight of these layers (it rounds to none per row); the "
             "checkpoint is the original's weights: give a larger --sparsity")
    manifest = Manifest(
        base=base, architecture=shape,
        method=Method(kind="non-structured", criterion=cfg.method, sparsity=target.sparsity,
                      nm=None if target.nm is None else list(target.nm), layers=[layers.start, layers.stop],
                      calibration=calibration, seed=cfg.seed),
        masks=done.masks,
    )

    def write(out: Path) -> None:
        save_pruned_checkpoint(model, out, tokenizer)

    result = PruneResult(Path(cfg.out), params, params, {}, 0.0, nonzero_params=params - zeros,
                         sparsity={name: m.sparsity for name, m in manifest.masks.items()})
    return result, manifest, write


def sparsity_table(sparsity: dict[str, float]) -> str:
    """Achieved sparsity (%) of every pruned module: one row per layer, one column per projection."""
    columns = [spec.path for spec in PRUNED_MODULES]
    rows: dict[int, dict[str, float]] = {}
    for name, value in sparsity.items():
        layer, path = name.removeprefix("model.layers.").split(".", 1)
        rows.setdefault(int(layer), {})[path] = value
    header = "layer " + " ".join(f"{spec.short:>6}" for spec in PRUNED_MODULES)
    lines = ["achieved sparsity (% of weights zeroed)", header]
    for layer in sorted(rows):
        cells = (f"{100 * rows[layer][c]:6.1f}" if c in rows[layer] else f"{'-':>6}" for c in columns)
        lines.append(f"{layer:>5} " + " ".join(cells))
    mean = sum(sparsity.values()) / len(sparsity)
    lines.append(f"mean over {len(sparsity)} modules: {100 * mean:.2f}%")
    return "\n".join(lines)


def _check_widths(target: Target, shape: Shape) -> None:
    for spec in PRUNED_MODULES:  # N:M groups run along each weight's input columns
        target.check_width(shape.weight_shape(spec)[1], spec.name)


def _tokenizer_or_none(path: Path):
    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None


def _calibration_blocks(cfg: PruneConfig, tokenizer):
    if tokenizer is None:
        raise LoramError(f"{cfg.base} has no tokenizer, which --method {cfg.method} needs for calibration")
    samples, seq_len = cfg.calibration_size
    _log(f"calibrating {cfg.method} on {samples} x {seq_len} tokens of {cfg.calib}")
    return token_blocks(tokenizer, cfg.calib, samples, seq_len), Calibration(str(cfg.calib), samples, seq_len)


def _load_structured(cfg: PruneConfig, path: Path):
    """The model in its checkpoint's dtype, on --device, or placed by accelerate with --device-map auto.

    `auto` is accelerate's placement (balanced over the accelerators, the CPU for what does not fit) applied
    by moving each module to its device; accelerate's own dispatch is not used, because it would keep the
    CPU's share as meta tensors streamed to an accelerator at each call, which can neither hold the
    gradients Taylor needs nor be sliced.
    """
    if cfg.device_map is None:
        device = cfg.compute_device
        try:
            if device.type == "cpu":
                return from_pretrained(path, dtype="auto")
            return from_pretrained(path, dtype="auto", device_map={"": str(device)})
        except torch.OutOfMemoryError as e:
            raise LoramError(f"the model does not fit on {device}; use --device-map auto to spread it over the "
                             "accelerators and the CPU, or --device cpu") from e
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = from_pretrained(path, dtype="auto")
    no_split = model._no_split_modules or []
    memory = get_balanced_memory(model, dtype=model.dtype, no_split_module_classes=no_split)
    placement = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=model.dtype)
    if "disk" in placement.values():
        raise LoramError("--device-map auto: the model does not fit in the accelerators' and the CPU's memory")
    devices = sorted({str(d) for d in placement.values()})
    _log(f"placing the model on {', '.join(devices)} (--device-map auto)")
    for name, device in placement.items():
        if str(device) != "cpu":
            model.get_submodule(name).to(device)
    decoder = model.get_decoder()
    if getattr(decoder, "rotary_emb", None) is not None:  # buffers only: keep it with the embeddings it follows
        decoder.rotary_emb.to(decoder.embed_tokens.weight.device)
    return model


def _score(cfg: PruneConfig, model, tokenizer, layers: range):
    calib, calibration = None, Calibration()
    if cfg.method in NEEDS_CALIBRATION:
        calib, calibration = _calibration_blocks(cfg, tokenizer)
    criterion = get_criterion(cfg.method)
    if cfg.method == "taylor":
        batch = cfg.calib_batch or CALIB_BATCH
        scores = criterion(model, layers, calib, cfg.seed, batch=batch, query_fold=cfg.query_fold or "strided")
        if cfg.kv_scoring["score"] == "loss":
            rows = calib[: cfg.kv_scoring["samples"]]
            _log(f"scoring KV groups by the loss with each removed ({Shape.of(model.config).num_kv_heads} per "
                 f"layer, {len(rows)} calibration samples)")
            for i, kv in kv_loss_scores(model, layers, rows, batch).items():
                scores[i].kv = kv
        return scores, calibration
    return criterion(model, layers, calib, cfg.seed), calibration


def _meta_pruned(model, pruned_config):
    """The LoRAM per-layer model of `pruned_config` on the meta device (names, shapes, tied weights, saving
    order), in `model`'s dtype and with its generation config: what the checkpoint is written from."""
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(pruned_config, dtype=model.dtype)
    pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned


def write_scores(path: Path, scores: dict[int, LayerScores], criterion: str, calibration: Calibration,
                 kv_scoring: dict | None = None) -> None:
    """Importance scores (float64) per layer, so `--scores` can re-prune at another ratio; `kv_scoring` (taylor:
    how the KV groups were scored) goes into the metadata."""
    tensors = {}
    for i, s in scores.items():
        tensors[f"layers.{i}.kv"] = s.kv.contiguous()
        tensors[f"layers.{i}.mlp"] = s.mlp.contiguous()
    # One metadata key: safetensors writes its metadata map in no fixed order, and the file must be
    # byte-identical for identical inputs.
    record = {"criterion": criterion, "calibration": asdict(calibration), **({"kv": kv_scoring} if kv_scoring else {})}
    meta = {"loram_scores": json.dumps(record, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)


def read_scores(path: Path, layers: range, shape: Shape):
    """Scores saved by an earlier prune, checked against the model and the requested layer range."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise LoramError(f"--scores {path} is not a readable safetensors scores file ({e})") from e
    stray = next((k for k in tensors if not re.fullmatch(r"layers\.\d+\.(kv|mlp)", k)), None)
    if stray is not None:
        raise LoramError(f"--scores {path} is not an importance scores file (it holds {stray}); pass the "
                         "importance.safetensors an earlier `loram publish prune` wrote")
    scores = {}
    for i in layers:
        kv, mlp = tensors.get(f"layers.{i}.kv"), tensors.get(f"layers.{i}.mlp")
        if kv is None or mlp is None:
            raise LoramError(f"--scores {path} has no scores for layer {i}; it covers layers "
                             f"{sorted({int(k.split('.')[1]) for k in tensors})}")
        if not (kv.is_floating_point() and mlp.is_floating_point() and kv.isfinite().all() and mlp.isfinite().all()):
            raise LoramError(f"--scores {path}: the scores of layer {i} are not all finite numbers; recompute them "
                             "(prune without --scores)")
        if kv.shape != (shape.num_kv_heads,) or mlp.shape != (shape.intermediate,):
            raise LoramError(f"--scores {path} does not match this model: layer {i} has {kv.numel()} KV groups "
                             f"and {mlp.numel()} channels, the model {shape.num_kv_heads} and {shape.intermediate}")
        scores[i] = LayerScores(kv, mlp)
    calibration = Calibration(**json.loads(meta.get("loram_scores", "{}")).get("calibration", {}))
    return scores, calibration
