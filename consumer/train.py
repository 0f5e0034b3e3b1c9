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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from loram.loading import QUANTS
from loram.lora_options import check_lora_options, dropout_option, lm_head_option, rank_option, targets_option
from loram.recover import TRAIN_REPORT
from loram.shared.architectures import LINEAR_NAMES, check_positions, parse_targets
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, revision_option, verify_option
from loram.shared.outputs import check_not_an_input

REPORT = TRAIN_REPORT
CONFIG = "train_config.yaml"
ADAPTER_CONFIG = "adapter_config.json"  # written last: a folder with it is a complete adapter
RESUME_SAME = ("data", "columns", "train_on_prompt", "lr", "rank", "alpha", "dropout", "targets", "lm_head", "quant",
               "seq_len", "batch", "grad_accum", "seed", "warmup")  # --resume refuses other values of these


@dataclass
class TrainConfig(Config):
    model: str = option(help="The model to train on: a pruned checkpoint folder or Hub repo id.", argument=True)
    data: str = option(help="Training data: a .jsonl/.json/.parquet/.csv file, a saved datasets folder, "
                            "or a built-in split (gsm8k-train).")
    out: Path = option(help="Output folder for the adapter, report and checkpoints.")
    quant: str = option("none", "Base-model precision: none (model dtype), int8, or nf4 (QLoRA).", choices=QUANTS)
    rank: int = rank_option()
    alpha: float = option(16.0, "LoRA alpha (scale alpha/r).")
    dropout: float = dropout_option()
    targets: list[str] = targets_option()
    lm_head: bool = lm_head_option()
    steps: int | None = option(None, "Optimizer steps (overrides --epochs).")
    epochs: float = option(1.0, "Epochs over the data when --steps is not given.")
    batch: int = option(4, "Sequences per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float = option(2e-4, "Peak learning rate (cosine schedule).")
    warmup: int = option(0, "Warm-up steps.")
    seq_len: int = option(512, "Maximum tokens per sequence (longer ones are truncated, with one warning).")
    columns: str | None = option(None, "Map your columns to a format, e.g. prompt=question,response=answer (the "
                                       "built-in gsm8k-train and gsm8k-heldout are mapped already).")
    train_on_prompt: bool = option(False, "Put loss on prompt tokens too (default: response tokens only).")
    eval_data: str | None = option(None, "Held-out data (same forms as --data) evaluated periodically.")
    eval_every: int = option(50, "Evaluate every N steps (with --eval-data).")
    eval_limit: int | None = option(None, "Evaluate only the first N records of --eval-data (default: all).")
    save_every: int = option(50, "Checkpoint every N steps.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    seed: int = option(0, "Seed for LoRA init, dropout and data order.")
    revision: str | None = revision_option("MODEL")
    endpoint: str | None = endpoint_option()
    verify: bool = verify_option()
    overwrite: bool = option(False, "Replace an existing --out.")

    def check(self):
        from loram.shared.training import recipe_checks  # the training core, imported when used

        self.targets = list(parse_targets(self.targets))  # "q,v" and "q_proj,v_proj" alike
        check_lora_options(rank=self.rank, dropout=self.dropout, alpha=self.alpha)
        checks = [*recipe_checks(self),
                  (math.isfinite(self.epochs) and self.epochs > 0, "--epochs must be a finite number > 0"),
                  (bool(self.targets), "--targets must name at least one module"),
                  (self.eval_limit is None or self.eval_limit >= 1, f"--eval-limit must be >= 1, got {self.eval_limit}")]
        for ok, message in checks:
            if not ok:
                raise LoramError(message)


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
    main: bool = True  # the first process of a distributed run (or the only one): the one that prints


def train(config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """Train a LoRA adapter as configured (see the module docstring); returns a TrainResult."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loram.labelled_loss import LabelledLossTrainer
    from loram.loading import load_causal_lm
    from loram.sft_format import SFTCollator, builtin_columns, format_name, parse_columns, tokenize_sft
    from loram.shared import training
    from loram.shared.hub import resolve_model
    from loram.shared.progress import TrainingProgress, reset_peak_memory
    from loram.shared.pruned_model import check_pruned_checkpoint, load_tokenizer, read_config_json
    from loram.shared.records import load_records
    from loram.shared.runtime import configure_threads

    cfg = TrainConfig.given(config, **kwargs)
    started = time.time()
    reset_peak_memory()  # this run's peak, not the process's so far
    check_not_an_input(cfg.out, {"the model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data})
    folder = training.run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
    training.check_resumable(folder)
    folder, cfg = training.pin_options(folder, cfg, RESUME_SAME)
    if folder.resume_from is not None:
        _check_resumed_adapter(folder.resume_from, cfg)
    configure_threads()
    source = resolve_model(cfg.model, cfg.revision, cfg.endpoint)
    check_pruned_checkpoint(source.path, verify=cfg.verify and not source.verified)  # a stock model: no manifest
    check_positions(read_config_json(source.path), cfg.seq_len, f"--seq-len {cfg.seq_len}")
    tokenizer = load_tokenizer(source.path)
    mapping = cfg.columns or builtin_columns(cfg.data)  # the built-in GSM8K splits need no --columns
    columns = parse_columns(mapping) if mapping else None
    records = load_records(cfg.data)
    _log(f"{len(records):,} records of {cfg.data} ({format_name(records, columns)} format)")
    train_set = tokenize_sft(records, tokenizer, cfg.seq_len, columns, cfg.train_on_prompt)
    eval_set = None
    if cfg.eval_data:
        held_out = load_records(cfg.eval_data)
        if cfg.eval_limit:
            held_out = held_out.select(range(min(cfg.eval_limit, len(held_out))))
        eval_set = tokenize_sft(held_out, tokenizer, cfg.seq_len, columns, cfg.train_on_prompt)

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
    weights = "4-bit NF4 weights (QLoRA)" if cfg.quant == "nf4" else (
        "8-bit weights" if cfg.quant == "int8" else "weights in the model's own dtype")
    _log(f"training {trainable:,} LoRA parameters on {source.id} ({weights})")

    args = training.training_arguments(
        folder, max_steps=cfg.steps, epochs=cfg.epochs, batch=cfg.batch, grad_accum=cfg.grad_accum, lr=cfg.lr,
        warmup=cfg.warmup, seed=cfg.seed, evaluate=eval_set is not None, eval_every=cfg.eval_every,
        save_every=cfg.save_every, keep_checkpoints=2, gradient_checkpointing=cfg.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding", prediction_loss_only=True)
    progress = TrainingProgress() if args.process_index == 0 else None  # one bar, not one per rank
    trainer = LabelledLossTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                  data_collator=SFTCollator.for_tokenizer(tokenizer),
                                  callbacks=[progress] if progress else [])
    training.begin(folder, trainer)
    training.run(trainer, folder)

    # The adapter's base is the pruned checkpoint as the user named it (Hub id or folder) at its revision.
    model.peft_config["default"].base_model_name_or_path = source.id
    model.peft_config["default"].revision = source.revision
    report = training.training_report(cfg, source, trainer, progress, trainable=trainable, started=started)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, save_embedding_layers=False)  # base weights never travel in the adapter
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        cfg.save(tmp / CONFIG)

    training.finish(folder, trainer, write, last=ADAPTER_CONFIG)
    return TrainResult(folder.out, trainer.state.global_step, [r["loss"] for r in report["losses"]],
                       [e["eval_loss"] for e in report["evals"]], report["tokens_per_second"],
                       report["peak_memory_bytes"], report["wall_time_s"], trainable, report,
                       training.is_main(trainer))


def _log(msg: str) -> None:
    from loram.shared.training import log

    log("loram train", msg)


def _check_resumed_adapter(checkpoint: Path, cfg: TrainConfig) -> None:
    """Refuse `--resume` from a checkpoint whose adapter (its adapter_config.json) has other LoRA options than
    this run asks for: peft would meet a wall of size mismatches. Checked before anything is loaded; also
    covers runs made before `checkpoints/run_config.json` pinned the options."""
    path = checkpoint / ADAPTER_CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the Trainer's own checkpoint checks report a broken checkpoint
    targets = sorted(cfg.targets + (["lm_head"] if cfg.lm_head else []))
    saved_targets = saved.get("target_modules")
    pairs = [("--rank", saved.get("r"), cfg.rank), ("--alpha", saved.get("lora_alpha"), cfg.alpha),
             ("--dropout", saved.get("lora_dropout"), cfg.dropout),
             ("--targets", sorted(saved_targets) if isinstance(saved_targets, list) else None, targets)]
    differ = [(flag, old, new) for flag, old, new in pairs if old is not None and old != new]
    if differ:
        shown = "; ".join(f"{flag} {','.join(old) if isinstance(old, list) else old} -> "
                          f"{','.join(new) if isinstance(new, list) else new}" for flag, old, new in differ)
        raise LoramError(f"--resume: the adapter in {checkpoint} was trained with other LoRA options ({shown}); "
                         "resume with the options it was started with, or start a new run (another --out, or "
                         "--overwrite)")


def _check_targets(model, cfg: TrainConfig) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in cfg.targets if t not in names]
    if unknown:
        raise LoramError(f"--targets {', '.join(unknown)} not found in the model; "
                         f"its linear layers are {', '.join(LINEAR_NAMES)} (and lm_head via --lm-head)")
