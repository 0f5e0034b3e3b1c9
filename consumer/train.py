"""`loram train`: LoRA / QLoRA on a (pruned) model with real data, built on transformers' Trainer and peft.

    loram train PRUNED --data gsm8k-train --columns prompt=question,response=answer --out adapter/

The recipe, top to bottom: resolve PRUNED (local folder or Hub id at a revision), load it in the
requested precision (none | int8 | nf4), wrap it with a peft LoRA adapter, tokenize the data with
response-only labels, train with the Trainer (progress bar with loss, tokens/s and ETA; periodic
evaluation; pickle-free atomic checkpoints every N steps; `--resume`), then write the adapter (whose
base is the pruned checkpoint and its revision) and `training_report.json`.

Output folder:
    adapter_config.json, adapter_model.safetensors   the peft adapter (pruned-model shapes)
    training_report.json                              config, losses, tokens/s, peak memory, wall time
    train_config.yaml                                 the resolved config
    checkpoints/checkpoint-N/                         resumable checkpoints (kept: the last two)
"""

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loram.loading import QUANTS
from loram.shared.architectures import LINEAR_NAMES
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError

CHECKPOINTS = "checkpoints"
REPORT = "training_report.json"


@dataclass
class TrainConfig(Config):
    model: str = option(help="The model to train on: a pruned checkpoint folder or Hub repo id.", argument=True)
    data: str = option(help="Training data: a .jsonl/.json/.parquet/.csv file, a saved datasets folder, "
                            "or a built-in split (gsm8k-train).")
    out: Path = option(help="Output folder for the adapter, report and checkpoints.")
    quant: str = option("none", "Base-model precision: none (model dtype), int8, or nf4 (QLoRA).", choices=QUANTS)
    rank: int = option(8, "LoRA rank r.")
    alpha: float = option(16.0, "LoRA alpha (scale alpha/r).")
    dropout: float = option(0.05, "LoRA dropout.")
    targets: list[str] = option(list(LINEAR_NAMES), "Modules to adapt (repeat the flag or comma-separate).")
    lm_head: bool = option(False, "Also adapt lm_head.")
    steps: int | None = option(None, "Optimizer steps (overrides --epochs).")
    epochs: float = option(1.0, "Epochs over the data when --steps is not given.")
    batch: int = option(4, "Sequences per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(2e-4, "Peak learning rate (cosine schedule).")
    warmup: int = option(0, "Warm-up steps.")
    seq_len: int = option(512, "Maximum tokens per sequence (longer ones are truncated, with one warning).")
    columns: str | None = option(None, "Map your columns to a format, e.g. prompt=question,response=answer.")
    train_on_prompt: bool = option(False, "Put loss on prompt tokens too (default: response tokens only).")
    eval_data: str | None = option(None, "Held-out data (same forms as --data) evaluated periodically.")
    eval_every: int = option(50, "Evaluate every N steps (with --eval-data).")
    save_every: int = option(50, "Checkpoint every N steps.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    seed: int = option(0, "Seed for LoRA init, dropout and data order.")
    revision: str | None = option(None, "Hub revision of MODEL.")
    endpoint: str | None = option(None, "Hub endpoint URL.")
    overwrite: bool = option(False, "Replace an existing --out folder.")

    def __post_init__(self):
        self.targets = [t.strip() for item in self.targets for t in str(item).split(",") if t.strip()]
        checks = [(self.rank >= 1, "--rank must be >= 1"), (0 <= self.dropout < 1, "--dropout must lie in [0, 1)"),
                  (self.batch >= 1 and self.grad_accum >= 1, "--batch and --grad-accum must be >= 1"),
                  (self.lr > 0, "--lr must be > 0"), (self.seq_len >= 2, "--seq-len must be >= 2"),
                  (self.steps is None or self.steps >= 1, "--steps must be >= 1"), (self.epochs > 0, "--epochs must be > 0"),
                  (self.eval_every >= 1 and self.save_every >= 1, "--eval-every and --save-every must be >= 1"),
                  (bool(self.targets), "--targets must name at least one module")]
        for ok, message in checks:
            if not ok:
                raise LoramError(message)
        if self.resume and self.overwrite:
            raise LoramError("--resume and --overwrite contradict each other; choose one")


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float]
    eval_losses: list[float]
    tokens_per_second: float
    peak_memory_bytes: int
    seconds: float
    trainable_params: int
    report: dict = field(repr=False)


def _log(msg: str) -> None:
    print(f"[loram train] {msg}", file=sys.stderr, flush=True)


def _prepare_out(cfg: TrainConfig) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from (or None)."""
    from loram.shared.checkpoints import latest_checkpoint

    out = Path(cfg.out)
    exists = out.exists() and any(out.iterdir())
    if cfg.resume:
        checkpoint = latest_checkpoint(out / CHECKPOINTS) if exists else None
        if checkpoint is None:
            raise LoramError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}; run without --resume")
        return checkpoint
    if exists:
        if not cfg.overwrite:
            raise LoramError(f"output directory {out} already exists; choose another --out, pass --resume to "
                             "continue its training, or --overwrite to replace it")
        shutil.rmtree(out)
    return None


def train(config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """Train a LoRA adapter as configured (see the module docstring); returns a TrainResult."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, PrinterCallback, TrainingArguments

    from loram.loading import load_causal_lm
    from loram.sft_format import SFTCollator, format_name, parse_columns, tokenize_sft
    from loram.shared.checkpoints import SafeCheckpointTrainer
    from loram.shared.hub import resolve_model
    from loram.shared.progress import TrainingProgress, peak_memory_bytes
    from loram.shared.records import load_records
    from loram.shared.runtime import configure_threads

    cfg = config or TrainConfig.resolve(**kwargs)
    resume_from = _prepare_out(cfg)
    started = time.time()
    configure_threads()
    source = resolve_model(cfg.model, cfg.revision, cfg.endpoint)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    columns = parse_columns(cfg.columns) if cfg.columns else None
    records = load_records(cfg.data)
    _log(f"{len(records):,} records of {cfg.data} ({format_name(records, columns)} format)")
    train_set = tokenize_sft(records, tokenizer, cfg.seq_len, columns, cfg.train_on_prompt)
    eval_set = None
    if cfg.eval_data:
        eval_set = tokenize_sft(load_records(cfg.eval_data), tokenizer, cfg.seq_len, columns, cfg.train_on_prompt)

    model = load_causal_lm(source.path, cfg.quant)
    _check_targets(model, cfg)
    # No prepare_model_for_kbit_training: it casts embeddings and lm_head to fp32 (about 3.9 GiB more at 70B,
    # which the memory plan and the paper do not count). The base is frozen by peft, and non-reentrant
    # activation checkpointing needs no input-embedding hook.
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=cfg.targets + (["lm_head"] if cfg.lm_head else []))
    torch.manual_seed(cfg.seed)  # LoRA A init
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _log(f"training {trainable:,} LoRA parameters on {source.id} ({cfg.quant})")

    out = Path(cfg.out)
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS), max_steps=cfg.steps or -1, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch, per_device_eval_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, warmup_steps=cfg.warmup,
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=1, seed=cfg.seed, data_seed=cfg.seed,
        eval_strategy="steps" if eval_set is not None else "no", eval_steps=cfg.eval_every,
        save_strategy="steps", save_steps=cfg.save_every, save_total_limit=2,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=model.dtype == torch.bfloat16 or (cfg.quant != "none" and torch.cuda.is_available()),
        use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
    )
    progress = TrainingProgress()
    trainer = SafeCheckpointTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                    data_collator=SFTCollator.for_tokenizer(tokenizer), callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces the printed log dicts
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if eval_set is not None:
        trainer.evaluate()

    # The adapter's base is the pruned checkpoint as the user named it (Hub id or folder) at its revision.
    model.peft_config["default"].base_model_name_or_path = source.id
    model.peft_config["default"].revision = source.revision
    report = _report(cfg, source, trainer.state, progress, trainable, time.time() - started, peak_memory_bytes())
    _save_adapter(model, out, report, cfg)
    return TrainResult(out, trainer.state.global_step, [r["loss"] for r in report["losses"]],
                       [r["eval_loss"] for r in report["eval_losses"]], report["tokens_per_second"],
                       report["peak_memory_bytes"], report["wall_time_s"], trainable, report)


def _check_targets(model, cfg: TrainConfig) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in cfg.targets if t not in names]
    if unknown:
        raise LoramError(f"--targets {', '.join(unknown)} not found in the model; "
                         f"its linear layers are {', '.join(LINEAR_NAMES)} (and lm_head via --lm-head)")


def _report(cfg: TrainConfig, source, state, progress, trainable: int, seconds: float, peak: int) -> dict:
    losses = [{"step": r["step"], "loss": r["loss"], "lr": r.get("learning_rate")}
              for r in state.log_history if "loss" in r]
    evals = [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in state.log_history if "eval_loss" in r]
    return {
        "config": cfg.to_dict(), "model": {"id": source.id, "revision": source.revision},
        "steps": state.global_step, "trainable_params": trainable, "losses": losses, "eval_losses": evals,
        "tokens_seen": int(state.num_input_tokens_seen), "tokens_per_second": round(progress.tokens_per_second, 1),
        "step_seconds": progress.step_seconds,
        "peak_memory_bytes": peak, "peak_memory_kind": progress.memory_kind, "wall_time_s": round(seconds, 2),
    }


def _save_adapter(model, out: Path, report: dict, cfg: TrainConfig) -> None:
    """Write adapter + report + config into a temporary folder, then move the files into `out`."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)  # base weights never travel in the adapter
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        cfg.save(tmp / "train_config.yaml")
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
