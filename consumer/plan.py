"""`loram plan`: how many parameters and bytes training holds, before downloading any weight.

    from loram.plan import memory, plan
    p = plan(model="meta-llama/Llama-3.1-70B", ratio=0.85)   # reads config.json only
    p.training_params, p.reduction, p.reduction_4bit           # 17,849,982,976  3.95x  15.81x
    m = memory(model="meta-llama/Llama-3.1-70B", ratio=0.85, quant="nf4", batch=1,
               gradient_checkpointing=True, budget="20GiB")
    m.total_bytes, m.fits                                      # ~15.3 GiB, True (docs/memory.md)

The counting lives in `loram.accounting` (docs/method.md §7) and the training-memory estimate in
`loram.memory_plan`; this module only finds the config (a checkpoint directory, a bare
config.json, or a Hub repo id) and prints the result. The memory section is always printed (with the
training options' defaults, those of `loram train`). A LoRAM pruned checkpoint is planned as it is:
training holds exactly that model, so the pruning options do not apply to it.

`--publisher` (implied by `--devices` or `--device-memory`) adds the publisher's memory (`loram.publisher_plan`):
Taylor pruning of the stock model, and aligning the pruned model with DDP and with FSDP over N devices.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from loram.accounting import ParamPlan, check_fraction, gib, plan_params
from loram.lora_options import dropout_option, lm_head_option, rank_option, targets_option
from loram.memory_plan import (
    DEVICES,
    DTYPE_CHOICES,
    OPTIMIZERS,
    QUANTS,
    MemoryPlan,
    check_options,
    dtype_name,
    parse_bytes,
    parse_targets,
    plan_memory,
    training_config,
)
from loram.publisher_plan import (
    CALIB_BATCH,
    CALIBRATION,
    PublisherPlan,
    check_calibration,
    check_devices,
    publisher_plan,
)
from loram.publisher_table import print_publisher
from loram.shared.architectures import DEFAULT_RATIO, ratio_options
from loram.shared.cli_support import add_config_command, print_table
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, hub_error, revision_option
from loram.shared.manifest import KINDS, MANIFEST_JSON
from loram.shared.pruned_model import is_pruned_config, original_config, param_count

RATIO, ATTN_RATIO, MLP_RATIO = ratio_options()


@dataclass
class PlanConfig(Config):
    """Options of `loram plan`."""

    model: str = option(help="Checkpoint directory, config.json file, or Hub repo id (only config.json is read).",
                        argument=True)
    revision: str | None = revision_option("MODEL")
    endpoint: str | None = endpoint_option()
    kind: str = option("structured", "Pruning kind (`loram publish prune --method` picks a criterion of one).",
                       choices=KINDS)
    ratio: float | None = RATIO
    attn_ratio: float | None = ATTN_RATIO
    mlp_ratio: float | None = MLP_RATIO
    layers: str | None = option(None, "Pruned layers, half-open A:B (e.g. 4:-2). Default: 4:-2 structured, "
                                      "all layers non-structured.")
    sparsity: float | None = option(None, "Non-structured: fraction of each linear weight zeroed, in (0, 1) "
                                          "(N:M counts as N/M).")
    # Training options of the memory estimate (docs/memory.md); defaults are those of `loram train`.
    quant: str = option("none", "Base weights in training: none (the dtype), int8, or nf4 (QLoRA).", choices=QUANTS)
    rank: int = rank_option()
    targets: list[str] = targets_option()
    lm_head: bool = lm_head_option()
    dropout: float = dropout_option()  # the estimate counts the copy of each target's input it keeps
    batch: int = option(4, "Sequences per micro-batch.")
    seq_len: int = option(512, "Tokens per sequence.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass.")
    optimizer: str = option("adamw", "Optimizer of the LoRA parameters.", choices=OPTIMIZERS)
    dtype: str = option("auto", "Compute dtype (auto: the config's).", choices=("auto", *DTYPE_CHOICES))
    device: str = option("cuda", "Where training runs: cuda (GPU memory) or cpu (process RSS).", choices=DEVICES)
    budget: str | None = option(None, "Memory to fit in, e.g. 20GiB, 512MiB, 24GB: prints whether the estimate fits.")
    # The publisher's memory (docs/memory.md, "The publisher's memory"): Taylor pruning and alignment, on --device.
    publisher: bool = option(False, "Also estimate the publisher's memory: Taylor pruning of the stock model and "
                                    "aligning the pruned one with DDP and FSDP (--batch, --seq-len and "
                                    "--gradient-checkpointing apply to alignment too).")
    devices: list[str] | None = option(None, "Device counts to plan alignment for, e.g. 8 or 1,2,4,8 (default "
                                             "1,2,4,8); implies --publisher.", counts=True)
    device_memory: str | None = option(None, "Memory of one device, e.g. 80GiB: whether Taylor, DDP and FSDP fit, and "
                                             "the smallest FSDP device count; implies --publisher.")
    calib_samples: int = option(CALIBRATION[0], "Taylor calibration samples (as `loram publish prune --samples`).")
    calib_seq_len: int = option(CALIBRATION[1], "Tokens per Taylor calibration sample (as `publish prune --seq-len`).")
    calib_batch: int = option(CALIB_BATCH, "Taylor calibration samples per forward/backward chunk (as `publish prune "
                                           "--calib-batch`).")
    grad_accum: int = option(1, "Alignment: micro-batches per optimizer step (as `publish align --grad-accum`); "
                                "above 1 the gradients stay alive through the next forward.")
    freeze_lm_head: bool = option(True, "Alignment: lm_head frozen (the `publish align` default) or trained.",
                                  flag="freeze-lm-head/train-lm-head")
    distill: bool = option(True, "Alignment: count the original model held for distillation (the `publish align` "
                                 "default, hidden states from the base model; --no-distill: `--distill-from none`).",
                           flag="distill/no-distill")
    json: bool = option(False, "Print one JSON object instead of the table.")

    def check(self):
        if self.kind == "structured" and self.sparsity is not None:
            raise LoramError("--sparsity applies to --kind non-structured; structured plans take --ratio")
        if self.kind == "non-structured":
            if self.ratio is not None or self.attn_ratio is not None or self.mlp_ratio is not None:
                raise LoramError("--ratio/--attn-ratio/--mlp-ratio apply to --kind structured; "
                                 "non-structured plans take --sparsity")
            if self.sparsity is None:
                raise LoramError("--kind non-structured needs --sparsity S, e.g. --sparsity 0.5")
        elif self.ratio is None:
            self.ratio = DEFAULT_RATIO
        for name in ("ratio", "attn_ratio", "mlp_ratio", "sparsity"):
            check_fraction(f"--{name.replace('_', '-')}", getattr(self, name))
        check_options(quant=self.quant, rank=self.rank, lora_dropout=self.dropout, batch=self.batch,
                      seq_len=self.seq_len, optimizer=self.optimizer, device=self.device)
        self.dtype = dtype_name(self.dtype)  # its choices are checked with the option
        self.targets = list(parse_targets(",".join(map(str, self.targets)) if isinstance(self.targets, list)
                                          else self.targets))
        for flag, size in (("--budget", self.budget), ("--device-memory", self.device_memory)):
            if parse_bytes(size) == 0:  # refuse a bad size now, with the other options
                raise LoramError(f"{flag} {size} is no memory at all; give the memory a device has, e.g. 24GB or "
                                 "80GiB")
        check_calibration(self.calib_samples, self.calib_seq_len, self.calib_batch)
        if self.grad_accum < 1:
            raise LoramError(f"--grad-accum must be a whole number >= 1, got {self.grad_accum}")
        if self.devices is not None:
            self.devices = [str(n) for n in check_devices(self.devices)]
        if self.devices is not None or self.device_memory is not None:
            self.publisher = True


def read_model_config(model: str, revision: str | None = None, endpoint: str | None = None) -> dict:
    """The config.json of a checkpoint directory, a config file, or a Hub repo (config.json only;
    `endpoint` defaults to `HF_ENDPOINT`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise LoramError(f"{model} has no config.json")
    elif not path.is_file():
        if model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1:
            raise LoramError(f"model {model!r} is neither an existing folder or config file nor a Hub repo id "
                             "(ORG/NAME)")
        path = _hub_config(model, revision, endpoint)
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoramError(f"{path} is not a readable JSON config: {str(e).splitlines()[0]}") from e
    if not isinstance(values, dict):
        raise LoramError(f"{path} must hold a JSON object")
    return values


def _hub_config(repo_id: str, revision: str | None, endpoint: str | None) -> Path:
    import logging

    from huggingface_hub import hf_hub_download

    # The client logs each retry; the user gets one line, the final error. Every client error is an
    # OSError (HTTP error, not found, offline, unreachable) or, for a malformed repo id, a ValueError.
    retries = logging.getLogger("huggingface_hub.utils._http")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, endpoint=endpoint))
    except Exception as e:  # the messages every command gives, and what plan takes instead of the Hub
        if (error := hub_error(e, repo_id, revision, endpoint, file="config.json")) is None:
            raise
        raise LoramError(f"{error}; or plan from a local copy of its config.json (MODEL may be the file)") from e
    finally:
        retries.setLevel(level)


def is_loram_checkpoint(values: dict, model: str, revision: str | None = None, endpoint: str | None = None) -> bool:
    """A LoRAM pruned checkpoint, planned as it is: a structured one by its config's model type, a non-structured
    one (a stock config) by the loram_manifest.json beside its config.json, in its folder or Hub repo."""
    if is_pruned_config(values):
        return True
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        return ((path if path.is_dir() else path.parent) / MANIFEST_JSON).is_file()
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model, MANIFEST_JSON, revision=revision, endpoint=endpoint)
    except (OSError, ValueError):  # not there (a stock model), or the Hub gave config.json but not this
        return False
    return True


def plan(config: PlanConfig | dict | None = None, **kwargs) -> ParamPlan:
    """Count a plan: `plan(PlanConfig(...))`, `plan({"model": ...})` or `plan(model=..., ratio=...)`."""
    config = _config(config, kwargs)
    return _param_plan(read_model_config(config.model, config.revision, config.endpoint), config)


def memory(config: PlanConfig | dict | None = None, **kwargs) -> MemoryPlan:
    """Estimate peak training memory, called like `plan`. A stock model is pruned as the plan says; a
    LoRAM pruned checkpoint is trained as it is."""
    config = _config(config, kwargs)
    values = read_model_config(config.model, config.revision, config.endpoint)
    checkpoint = is_loram_checkpoint(values, config.model, config.revision, config.endpoint)
    param_plan = None if checkpoint else _param_plan(values, config)
    return _memory_plan(values, param_plan, config)


def publisher(config: PlanConfig | dict | None = None, **kwargs) -> PublisherPlan:
    """Estimate the publisher's memory (Taylor pruning, alignment with DDP and FSDP), called like `plan`."""
    config = _config(config, kwargs)
    values = read_model_config(config.model, config.revision, config.endpoint)
    checkpoint = is_loram_checkpoint(values, config.model, config.revision, config.endpoint)
    param_plan = None if checkpoint else _param_plan(values, config)
    return _publisher_plan(values, param_plan, config)


def _config(config, kwargs) -> PlanConfig:
    if isinstance(config, PlanConfig):
        return PlanConfig.given(config, **kwargs)
    return PlanConfig.from_dict({**(config or {}), **kwargs})


def _param_plan(values: dict, config: PlanConfig) -> ParamPlan:
    return plan_params(values, config.kind, config.ratio, attn_ratio=config.attn_ratio,
                       mlp_ratio=config.mlp_ratio, layers=config.layers, sparsity=config.sparsity)


def _memory_plan(values: dict, param_plan: ParamPlan | None, c: PlanConfig) -> MemoryPlan:
    return plan_memory(training_config(values, param_plan), quant=c.quant, rank=c.rank, targets=c.targets,
                       lm_head=c.lm_head, lora_dropout=c.dropout, batch=c.batch, seq_len=c.seq_len,
                       gradient_checkpointing=c.gradient_checkpointing, optimizer=c.optimizer, dtype=c.dtype,
                       device=c.device, budget=c.budget)


def _publisher_plan(values: dict, param_plan: ParamPlan | None, c: PlanConfig) -> PublisherPlan:
    """Taylor pruning of a stock config over the plan's layers (not for a pruned checkpoint or non-structured
    pruning), and alignment of the model the plan gives (a pruned checkpoint: itself), holding the original as the
    teacher unless --no-distill: a pruned config keeps every original global size (`original_config`), and its
    pruned layers (`per_layer_config`) are the matched ones; a non-structured checkpoint has the original's shapes
    and matches every layer."""
    structured = param_plan is not None and param_plan.kind == "structured"
    layers = range(*param_plan.layer_range) if structured else None
    teacher, matched = None, None
    if c.distill and param_plan is not None:  # a stock config: it is the teacher
        teacher = values
    elif c.distill:  # a pruned checkpoint: align distils from the original it was pruned from (the manifest's base)
        teacher, matched = original_config(values), len(values.get("per_layer_config") or {}) or None
    return publisher_plan(values if structured else None, training_config(values, param_plan), layers,
                          samples=c.calib_samples, calib_seq_len=c.calib_seq_len, calib_batch=c.calib_batch,
                          batch=c.batch, seq_len=c.seq_len,
                          gradient_checkpointing=c.gradient_checkpointing, grad_accum=c.grad_accum,
                          freeze_lm_head=c.freeze_lm_head,
                          device=c.device, devices=c.devices or (1, 2, 4, 8), device_memory=c.device_memory,
                          teacher=teacher, matched_layers=matched)


def table_rows(p: ParamPlan) -> list[dict]:
    """The readable table: original against what training holds, and their ratio."""
    def row(what, original, training, ratio=""):
        return {"": what, "original": original, "training": training, "reduction": ratio}

    def n(v):
        return f"{v:,}"

    rows = []
    if p.kind == "structured":
        rows += [row("q heads / pruned layer", p.shape.num_heads, p.kept_q_heads),
                 row("kv heads / pruned layer", p.shape.num_kv_heads, p.kept_kv_heads),
                 row("MLP channels / pruned layer", p.shape.intermediate, p.kept_channels)]
    rows += [row("parameters", n(p.original_params), n(p.training_params), f"{p.reduction:.2f}x")]
    if p.kind == "non-structured":
        rows.append(row("non-zero parameters", n(p.original_params), n(p.nonzero_params),
                        f"{p.original_params / p.nonzero_params:.2f}x"))
    rows += [
        row("params, 4-bit paper (training / 4)", n(p.original_params), f"{p.training_params / 4:,.0f}",
            f"{p.reduction_4bit:.2f}x"),
        row("HBM GiB, 16-bit", f"{gib(p.original_bytes_16bit):.2f}", f"{gib(p.training_bytes_16bit):.2f}",
            f"{p.reduction:.2f}x"),
        row("HBM GiB, 4-bit paper", f"{gib(p.original_bytes_16bit):.2f}", f"{gib(p.training_bytes_16bit) / 4:.2f}",
            f"{p.reduction_4bit:.2f}x"),
        row("GiB, bitsandbytes NF4 training", f"{gib(p.original_bytes_16bit):.2f}",
            f"{gib(p.training_bytes_4bit_bnb):.2f}", f"{p.reduction_4bit_bnb:.2f}x"),
    ]
    return rows


def memory_rows(m: MemoryPlan) -> list[dict]:
    """The memory section of the readable table: each term of the estimate, then the total."""
    terms = [("weights", m.weights_bytes), ("LoRA parameters", m.lora_bytes), ("gradients", m.gradient_bytes),
             ("optimizer states", m.optimizer_bytes), ("activations", m.activation_bytes),
             ("runtime overhead", m.overhead_bytes), ("allocator slack", m.slack_bytes),
             ("mapped checkpoint", m.mapped_bytes), ("total", m.total_bytes)]
    return [{"memory": name, "MiB": f"{v / 2**20:,.1f}", "GiB": f"{gib(v):.2f}",
             "share": f"{100 * v / m.total_bytes:.1f}%"} for name, v in terms]


def verdict(m: MemoryPlan, budget: str | None) -> str | None:
    """One line: does the estimate fit the budget, and by how much."""
    if m.budget_bytes is None:
        return None
    margin = gib(abs(m.budget_bytes - m.total_bytes))
    how = f"fits, {margin:.2f} GiB to spare" if m.fits else f"does not fit, {margin:.2f} GiB over"
    return f"budget {budget} ({gib(m.budget_bytes):.2f} GiB): {how}"


def _run(cfg: PlanConfig) -> None:
    values = read_model_config(cfg.model, cfg.revision, cfg.endpoint)
    pruned = is_loram_checkpoint(values, cfg.model, cfg.revision, cfg.endpoint)
    p = None if pruned else _param_plan(values, cfg)
    m = _memory_plan(values, p, cfg)
    if pruned:
        original = param_count(original_config(values))
        summary = {"model_type": values["model_type"], "pruned_checkpoint": True, "original_params": original,
                   "training_params": m.training_params, "reduction": original / m.training_params}
    else:
        summary = p.to_dict()
    pub = _publisher_plan(values, p, cfg) if cfg.publisher else None
    if cfg.json:
        extra = {"publisher": pub.to_dict()} if pub is not None else {}
        typer.echo(json.dumps({**summary, "memory": m.to_dict(), **extra}))
        return
    if pruned:
        zeros = "" if is_pruned_config(values) else " (non-structured: its zeros are stored, every weight held)"
        typer.echo(f"{cfg.model}: {values['model_type']}, a LoRAM pruned checkpoint{zeros}, trained as it is "
                   "(pruning options do not apply)\n")
        print_table([{"": "parameters", "original": f"{original:,}", "training": f"{m.training_params:,}",
                      "reduction": f"{original / m.training_params:.2f}x"}])
    else:
        start, stop = p.layer_range
        how = (f"attn ratio {p.attn_ratio}, mlp ratio {p.mlp_ratio}" if p.kind == "structured"
               else f"sparsity {p.sparsity}")
        typer.echo(f"{cfg.model}: {p.model_type}, {p.shape.num_layers} layers; {p.kind} ({how}) "
                   f"on layers [{start}, {stop})\n")
        print_table(table_rows(p))
    weights = f"{m.quant} weights" if m.quant != "none" else f"{m.dtype} weights"
    typer.echo(f"\nestimated peak training memory ({m.device}; {weights}, {m.dtype} compute; LoRA r={m.rank} on "
               f"{','.join(m.targets)}{' + lm_head' if m.lm_head else ''}, dropout {m.lora_dropout}; "
               f"batch {m.batch} x {m.seq_len} tokens; gradient checkpointing "
               f"{'on' if m.gradient_checkpointing else 'off'}; {m.optimizer}):\n")
    print_table(memory_rows(m))
    line = verdict(m, cfg.budget)
    if line:
        typer.echo(f"\n{line}")
    if pub is not None:
        print_publisher(pub, cfg.device_memory)


def register(app: typer.Typer) -> None:
    add_config_command(
        app, "plan", PlanConfig, _run,
        help="Count the parameters LoRAM training holds for a model and estimate its peak training memory "
             "(with --publisher also Taylor pruning and alignment), from the config alone.",
        examples=["loram plan meta-llama/Llama-3.1-70B --ratio 0.85",
                  "loram plan meta-llama/Llama-3.1-70B --ratio 0.85 --quant nf4 --batch 1 --seq-len 512 "
                  "--gradient-checkpointing --budget 20GiB",
                  "loram plan ./pruned-checkpoint --device cpu --batch 2 --seq-len 256 --json",
                  "loram plan meta-llama/Llama-3.1-70B --ratio 0.85 --devices 1,2,4,8 --device-memory 80GiB "
                  "--gradient-checkpointing",
                  "loram plan ./Llama-2-13b-hf --attn-ratio 0.65 --mlp-ratio 0.65 --layers 4:-2 --json",
                  "loram plan config.json --kind non-structured --sparsity 0.55"],
    )
