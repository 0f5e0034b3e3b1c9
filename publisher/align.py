"""`loram publish align`: continual pre-training of a pruned model on a data mixture (docs/method.md §4).

    loram publish align PRUNED --data wiki:1 --data corpus.jsonl:3 --steps 400 --seq-len 512 --out aligned/

The recipe, top to bottom: resolve PRUNED (folder or Hub id; it must carry `loram_manifest.json`), read
its manifest, stream the sources into packed blocks of `--seq-len` tokens mixed by weight
(`align_data.py`), load the model in fp32 and freeze `lm_head`, then train every other parameter with the
Trainer (AdamW, cosine schedule, bf16 autocast on GPUs; DDP when started by torchrun / accelerate launch, FSDP2
with `--fsdp`: `fully_shard` on every decoder layer, see docs/alignment.md),
re-applying non-structured masks after every step. The objective (publisher/distill.py): by default the pruned
model learns to reproduce the original's residual stream after every decoder layer (hidden-state distillation
from the base model named in the manifest: the objective measured best for what LoRAM gains,
docs/alignment.md); `--distill-from none` is the paper's LM loss; `--kd-weight` / `--hidden-weight` mix LM,
logit distillation and hidden states.
Held-out perplexity is evaluated at the start, every `--eval-every` steps and at the end.

Frozen with `--freeze-lm-head` (the default): the `lm_head` weight. When the model ties its input and
output embeddings (SmolLM2, Qwen2-0.5B, Llama-3.2-1B...) that weight *is* the embedding matrix, so the
input embeddings stay frozen too; with untied embeddings (Llama-2/3-70B) only `lm_head` is frozen.

Output folder (written by rank 0 only):
    config.json, model.safetensors, modeling_loram.py, tokenizer files   the aligned pruned checkpoint
    loram_manifest.json / .safetensors    the input's manifest + one alignment record (data, weights,
                                          steps, tokens, lr, held-out perplexity)
    align_report.json                     config, per-step loss, perplexities, tokens/s, peak memory, time
    align_config.yaml                     the resolved config (`--config` repeats the run)
    prune_config.yaml, importance.safetensors   carried from the input when its manifest lists them: how
                                          the checkpoint was pruned (the model card quotes both recipes)
    checkpoints/checkpoint-N/             every `--save-every` steps: a loadable pruned checkpoint with its
                                          own manifest record, plus the optimizer state for `--resume`
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from loram.publisher.align_data import Source, check_text_source, probabilities, source_record
from loram.publisher.distill import HIDDEN_INPUTS, HIDDEN_LAYERS, HIDDEN_LOSSES
from loram.shared.architectures import check_positions
from loram.shared.configs import Config, option
from loram.shared.errors import LoramError
from loram.shared.hub import endpoint_option, revision_option, verify_option
from loram.shared.outputs import check_not_an_input

BASE = "base"  # --distill-from base: the original model named in the manifest
REPORT = "align_report.json"
CONFIG = "align_config.yaml"
RESUME_SAME = ("data", "lr", "seq_len", "batch", "grad_accum", "seed", "warmup", "freeze_lm_head", "distill_from",
               "kd_weight", "hidden_weight", "hidden_loss", "hidden_layers", "hidden_inputs",
               "train_layers", "shuffle_buffer")  # --resume refuses other values of these


@dataclass
class AlignConfig(Config):
    pruned: str = option(help="The pruned checkpoint to align: a folder or Hub repo id with loram_manifest.json.",
                         argument=True)
    data: list[str] = option(help="Training text as SOURCE[:WEIGHT]; repeat to mix sources by weight. SOURCE: a "
                                  ".txt/.jsonl/.json/.parquet file, a saved datasets folder, wiki / news, or "
                                  "wiki-chat (wiki in the model's chat template: measured better than wiki for "
                                  "LoRAM on an instruct model).")
    steps: int = option(help="Optimizer steps.")
    seq_len: int = option(help="Tokens per packed training block (at most the model's max_position_embeddings).")
    out: Path = option(help="Output folder: the aligned pruned checkpoint, its report and its checkpoints.")
    lr: float = option(5e-5, "Peak learning rate (AdamW, cosine schedule, no weight decay).")
    warmup: int = option(0, "Linear warm-up steps (the paper: 100 of 400).")
    batch: int = option(4, "Blocks per micro-batch, per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    freeze_lm_head: bool = option(True, "Freeze lm_head (the paper's setting); with tied embeddings that is the "
                                        "shared embedding matrix.", flag="freeze-lm-head/train-lm-head")
    eval_data: str | None = option(None, "Held-out text evaluated periodically (same forms as --data, no "
                                         "weight), e.g. wiki-heldout or wiki-heldout-chat.")
    eval_limit: int = option(80, "Held-out blocks of --seq-len tokens (the first N of --eval-data).")
    eval_every: int = option(50, "Evaluate held-out perplexity every N steps (with --eval-data).")
    save_every: int = option(200, "Write a checkpoint every N steps (each one a loadable pruned checkpoint).")
    keep_checkpoints: int = option(2, "Keep the newest N checkpoints (0 keeps all).")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    distill_from: str | None = option(BASE, "Original model whose outputs the pruned model learns to match: base "
                                            "(default: the model the manifest was pruned from), a folder or Hub id, "
                                            "or none (the paper's LM loss alone; --kd-weight and --hidden-weight "
                                            "are then unused).")
    kd_weight: float = option(0.0, "Weight of the logit-distillation term (KL to the original's next-token "
                                   "distribution), in [0, 1]; the LM loss gets 1 - --kd-weight - --hidden-weight.")
    hidden_weight: float = option(1.0, "Weight of the hidden-state term (each matched decoder layer's output against "
                                       "the original's at the same positions), in [0, 1]. The default, pure "
                                       "hidden-state distillation, is the objective measured best for LoRAM "
                                       "(docs/alignment.md).")
    hidden_loss: str = option("mse", "Hidden-state loss per position: mse (||s - t||^2 / ||t||^2) or cosine "
                                     "(1 - cos(s, t)), averaged over the matched layers.", choices=HIDDEN_LOSSES)
    hidden_layers: str = option("pruned", "Decoder layers whose outputs are matched: pruned (the layers the pruning "
                                          "changed; the default, measured best) or all.", choices=HIDDEN_LAYERS)
    hidden_inputs: str = option("pruned", "What each matched layer runs on: pruned (the pruned model's own stream, "
                                          "matched end to end) or original (the original's input to that layer: "
                                          "layer-local reconstruction; only the matched layers train).",
                                choices=HIDDEN_INPUTS)
    train_layers: str = option("all", "Decoder layers whose weights alignment updates: all, or pruned (only the layers "
                                      "pruning changed; every other weight stays the original's, as LoRA will see it).")
    shuffle_buffer: int = option(1000, "Blocks in the seeded shuffle buffer of the training stream (0: off).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    fsdp: bool = option(False, "Shard the model, gradients and optimizer over the processes (FSDP2, one unit per "
                               "decoder layer); start with torchrun or accelerate launch.")
    seed: int = option(0, "Seed for data mixing, shuffling and training.")
    revision: str | None = revision_option("PRUNED")
    endpoint: str | None = endpoint_option()
    verify: bool = verify_option()
    overwrite: bool = option(False, "Replace an existing --out.")

    def check(self):
        from loram.shared.training import recipe_checks  # the training core, imported when used

        if self.distill_from is None or self.distill_from.lower() == "none":
            self.distill_from = "none"  # kept as written, so the saved config repeats the run
        if not self.data:
            raise LoramError("--data: give at least one source, e.g. --data wiki")
        self.sources  # noqa: B018  (parses every SOURCE[:WEIGHT]; raises on a bad one)
        if self.eval_data and not Path(self.eval_data).expanduser().exists():
            name, _, weight = self.eval_data.rpartition(":")
            if name and weight.replace(".", "", 1).isdigit():
                raise LoramError(f"--eval-data {self.eval_data}: the held-out text takes no :WEIGHT; give one "
                                 f"source, e.g. --eval-data {name}")
        checks = [*recipe_checks(self),
                  (self.eval_limit >= 1, "--eval-limit must be >= 1"),
                  (self.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
                  (0 <= self.kd_weight <= 1, "--kd-weight must lie in [0, 1]"),
                  (0 <= self.hidden_weight <= 1, "--hidden-weight must lie in [0, 1]"),
                  (not self.distills or self.kd_weight + self.hidden_weight <= 1 + 1e-9,
                   f"--kd-weight {self.kd_weight} + --hidden-weight {self.hidden_weight} exceed 1 (the LM loss gets "
                   "1 minus their sum); lower one"),
                  (not self.distills or self.kd_weight > 0 or self.hidden_weight > 0,
                   "--distill-from with --kd-weight 0 and no --hidden-weight distills nothing; set either weight"),
                  (self.hidden_inputs == "pruned" or (self.distills and self.kd_weight == 0
                                                       and self.hidden_weight == 1),
                   "--hidden-inputs original trains each matched layer on the original's inputs alone, with no LM or "
                   "logit term: use it with --distill-from (default base), --kd-weight 0 and --hidden-weight 1"),
                  (self.train_layers in ("all", "pruned"), f"--train-layers must be all or pruned, got "
                                                             f"{self.train_layers!r}"),
                  (self.shuffle_buffer >= 0, "--shuffle-buffer must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise LoramError(message)

    @property
    def distills(self) -> bool:
        return self.distill_from is not None and self.distill_from.lower() != "none"

    @property
    def sources(self) -> list[Source]:
        return [Source.parse(spec) for spec in self.data]


@dataclass
class AlignResult:
    out: Path
    steps: int
    losses: list[float]
    perplexities: list[tuple[int, float]]  # (step, held-out perplexity), the first at the starting step
    tokens_seen: int
    tokens_per_second: float
    peak_memory_bytes: int
    seconds: float
    report: dict = field(repr=False)
    main: bool = True  # False on the other ranks of a distributed run (they write nothing)


def align(config: AlignConfig | None = None, **kwargs) -> AlignResult:
    """Align a pruned checkpoint as configured (see the module docstring); returns an AlignResult."""
    import torch

    from loram.publisher.align_data import collate_blocks, eval_blocks, mixture
    from loram.publisher.align_trainer import AlignTrainer, MaskKeeper
    from loram.publisher.distill import hidden_layers
    from loram.shared import training
    from loram.shared.hub import resolve_model
    from loram.shared.manifest import MANIFEST_JSON
    from loram.shared.progress import TrainingProgress, reset_peak_memory
    from loram.shared.pruned_model import (
        check_pruned_checkpoint,
        empty_model,
        from_pretrained,
        load_config,
        load_tokenizer,
    )
    from loram.shared.runtime import configure_threads

    cfg = AlignConfig.given(config, **kwargs)
    started = time.time()
    reset_peak_memory()  # this run's peak, not the process's so far
    teacher_named = cfg.distill_from if cfg.distills and cfg.distill_from != BASE else None
    check_not_an_input(cfg.out, {"the pruned model": cfg.pruned, "--distill-from": teacher_named,
                                 "--eval-data": cfg.eval_data, **{f"--data {s.name}": s.name for s in cfg.sources}})
    folder = training.run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, what="alignment",
                                 steps=cfg.steps)
    training.check_resumable(folder, sharded=cfg.fsdp)
    folder, cfg = training.pin_options(folder, cfg, RESUME_SAME)
    configure_threads()
    source = resolve_model(cfg.pruned, cfg.revision, cfg.endpoint)
    if not (source.path / MANIFEST_JSON).is_file():
        raise LoramError(f"{cfg.pruned} is not a LoRAM pruned checkpoint (no {MANIFEST_JSON}); prune it first "
                         "with `loram publish prune`")
    manifest = check_pruned_checkpoint(source.path, verify=cfg.verify and not source.verified)  # before anything heavy
    model_config = load_config(source.path)
    check_positions(model_config, cfg.seq_len, f"--seq-len {cfg.seq_len}")
    for s in cfg.sources + ([Source(cfg.eval_data)] if cfg.eval_data else []):
        check_text_source(s.name)
    try:
        tokenizer = load_tokenizer(source.path)
    except (OSError, ValueError) as e:
        raise LoramError(f"{cfg.pruned} has no tokenizer; alignment needs one to read text") from e

    train_set = mixture(cfg.sources, tokenizer, cfg.seq_len, cfg.seed, cfg.shuffle_buffer)
    data, evaluated = _data_records(cfg)
    if folder.resume_from is not None:
        _check_same_text(folder.resume_from, data, cfg.out)
    eval_set = eval_blocks(cfg.eval_data, tokenizer, cfg.seq_len, cfg.eval_limit) if cfg.eval_data else None
    teacher, teacher_path = _load_teacher(cfg, manifest, model_config) if cfg.distills else (None, None)
    # FSDP: every process builds the model empty and later reads only its shards' rows (no full copy per process)
    model = (empty_model if cfg.fsdp else from_pretrained)(source.path, dtype=torch.float32)
    frozen = _freeze_lm_head(model) if cfg.freeze_lm_head else []
    matched = hidden_layers(manifest, model_config.num_hidden_layers, cfg.hidden_layers)
    if cfg.hidden_inputs == "original":  # layer-local: nothing outside the matched layers gets a gradient
        frozen += _freeze_all_but(model, matched, "--hidden-inputs original")
    elif cfg.train_layers == "pruned":
        frozen += _freeze_all_but(model, sorted({*manifest.pruned_layers, *manifest.masked_layers}))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reshard = _accelerate_fsdp_options(cfg)  # before the Trainer's accelerator reads the environment
    args = training.training_arguments(
        folder, max_steps=cfg.steps, batch=cfg.batch, grad_accum=cfg.grad_accum, lr=cfg.lr, warmup=cfg.warmup,
        seed=cfg.seed, evaluate=eval_set is not None, eval_every=cfg.eval_every, save_every=cfg.save_every,
        keep_checkpoints=cfg.keep_checkpoints, gradient_checkpointing=cfg.gradient_checkpointing,
        eval_on_start=eval_set is not None and folder.resume_from is None, prediction_loss_only=True,
        include_num_input_tokens_seen="all")  # starts the process group
    sharding = None
    if cfg.fsdp:
        from loram.publisher.align_trainer import shard_model

        sharding = shard_model(model, device=args.device, bf16=args.bf16, reshard_after_forward=reshard,
                               weights=source.path)
        if teacher is not None:  # sharded the same way: 1/N of the teacher per rank, gathered layer by layer
            shard_model(teacher, device=args.device, bf16=args.bf16, reshard_after_forward=True,
                        weights=teacher_path)
        sharding["local_numel_per_rank"] = training.gather_ints(sharding["local_numel"], args.device)
    keeper = MaskKeeper(model, manifest.masks) if manifest.masks else None
    _log(f"aligning {trainable:,} parameters of {source.id} on "
         + ", ".join(f"{s.name} ({p:.0%})" for s, p in zip(cfg.sources, probabilities(cfg.sources), strict=True))
         + (f"; frozen: {', '.join(frozen)}" if frozen else "")
         + (f"; re-applying {len(manifest.masks)} masks after every step" if keeper else ""))
    progress = TrainingProgress("aligning") if args.process_index == 0 else None

    def write_checkpoint_manifest(checkpoint: Path, step: int) -> None:
        _carry_pruning_files(source.path, manifest, checkpoint)
        _carry_manifest(manifest, _record(cfg, source, trainer, data, evaluated, final=False)).save(checkpoint)

    trainer = AlignTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate_blocks,
        processing_class=tokenizer, callbacks=[c for c in (progress, keeper) if c is not None],
        write_manifest=write_checkpoint_manifest, teacher=teacher, kd_weight=cfg.kd_weight,
        hidden_weight=cfg.hidden_weight, hidden_loss=cfg.hidden_loss, hidden_layers=matched,
        hidden_inputs=cfg.hidden_inputs)
    training.begin(folder, trainer)
    training.run(trainer, folder)

    record = _record(cfg, source, trainer, data, evaluated, final=True)
    report = training.training_report(cfg, source, trainer, progress, trainable=trainable, started=started,
                                      record=record, frozen=frozen, **({"fsdp": sharding} if sharding else {}))
    gathered = folder.work / ".final-weights.partial"  # FSDP: every rank joins the gather, rank 0 writes here
    if sharding:
        if training.is_main(trainer):
            shutil.rmtree(gathered, ignore_errors=True)  # left by a run killed during its final gather
        trainer.save_model(str(gathered))

    def write(tmp: Path) -> None:
        if sharding:
            for f in sorted(gathered.iterdir()):
                f.replace(tmp / f.name)
            gathered.rmdir()
        else:
            trainer.save_model(str(tmp))
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        cfg.save(tmp / CONFIG)
        _carry_pruning_files(source.path, manifest, tmp)
        _carry_manifest(manifest, record).save(tmp)

    training.finish(folder, trainer, write, last=MANIFEST_JSON)  # a loadable folder only at the very end
    return AlignResult(folder.out, trainer.state.global_step, [r["loss"] for r in report["losses"]],
                       [(e["step"], e["perplexity"]) for e in report["evals"]], report["tokens_seen"],
                       report["tokens_per_second"], report["peak_memory_bytes"], report["wall_time_s"], report,
                       training.is_main(trainer))


def _log(msg: str) -> None:
    from loram.shared.training import log

    log("loram align", msg)


def _accelerate_fsdp_options(cfg: AlignConfig) -> bool:
    """`accelerate launch` with an FSDP config: its options, read from the environment accelerate sets, apply to
    our own `fully_shard` (`--fsdp`); accelerate is then told not to shard again (its plugin would wrap the
    model a second time, and loram's checkpoints replace its pickled ones). Returns reshard_after_forward."""
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if from_accelerate and not cfg.fsdp:
        raise LoramError("accelerate launch with an FSDP config: pass --fsdp to `loram publish align`")
    if not from_accelerate:
        return True
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise LoramError(f"the accelerate config asks for FSDP version {version}; set fsdp_version: 2 (FSDP2)")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "0")


def _freeze_lm_head(model) -> list[str]:
    """Freeze the output projection; returns the names of every parameter that shares its weight."""
    head = model.get_output_embeddings()
    if head is None:
        raise LoramError("the model has no output embeddings (lm_head) to freeze; pass --train-lm-head")
    head.weight.requires_grad_(False)
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p is head.weight]


def _freeze_all_but(model, layers: list[int], why: str = "--train-layers pruned") -> list[str]:
    """Freeze every parameter outside decoder layers `layers` (--train-layers pruned, --hidden-inputs original);
    returns one line naming what stays frozen."""
    if not layers:
        raise LoramError(f"{why}: the manifest records no pruned layer; use --train-layers all")
    keep = {id(p) for i in layers for p in model.model.layers[i].parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    return [f"everything outside decoder layers {layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
            else f"everything outside decoder layers {', '.join(map(str, layers))}"]


def _load_teacher(cfg: AlignConfig, manifest, pruned_config):
    """The original model for distillation, frozen (same vocabulary as the pruned model), and its folder;
    on the meta device with --fsdp (sharded, then read row by row from that folder, as the student)."""
    import torch

    from loram.shared.hub import resolve_model
    from loram.shared.pruned_model import empty_model, from_pretrained, load_config

    name, revision = cfg.distill_from, None
    if name == BASE:  # the model the manifest says this checkpoint was pruned from, at its recorded revision
        name = manifest.base.id
        revision = None if Path(name).expanduser().exists() else manifest.base.revision
    try:
        source = resolve_model(name, revision, cfg.endpoint)
    except LoramError as e:
        raise LoramError(f"--distill-from {cfg.distill_from}: {e}" + (
            " (the manifest's base model); pass --distill-from PATH to the original model, or "
            "--distill-from none for the LM loss alone" if cfg.distill_from == BASE else "")) from e
    _check_teacher_shape(cfg, load_config(source.path), pruned_config)  # before its weights are read
    # bf16 on GPUs that support it (no gradients or optimizer state: half the memory of fp32; at 70B 141 GB
    # instead of 282, sharded with --fsdp); fp32 on CPUs, where bf16 matmuls are slow
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    teacher = (empty_model if cfg.fsdp else from_pretrained)(source.path, dtype=dtype)
    try:
        manifest.check_base(source.path)
    except LoramError as e:
        _log(f"warning: {e}; distilling from it anyway")
    return teacher.requires_grad_(False).eval(), source.path


def _check_teacher_shape(cfg: AlignConfig, teacher, pruned) -> None:
    """Logit distillation needs the pruned model's vocabulary; matching hidden states (decoder-layer outputs,
    by index) needs its hidden size and number of layers too."""
    shape = [("vocab_size", "a vocabulary of {}")]
    if cfg.hidden_weight > 0:
        shape += [("hidden_size", "a hidden size of {}"), ("num_hidden_layers", "{} decoder layers")]
    for key, what in shape:
        theirs, ours = getattr(teacher, key, None), getattr(pruned, key, None)
        if theirs != ours:
            raise LoramError(f"--distill-from {cfg.distill_from} has {what.format(theirs)}, the pruned model "
                             f"{ours}; distill from the original model it was pruned from")


def _data_records(cfg: AlignConfig) -> tuple[list[dict], dict | None]:
    """The alignment record's training sources (with their weights) and held-out source, each file hashed once per
    run: every checkpoint records them. Only the first process writes records (and checks `--resume` against
    them), so the other processes of a distributed run do not read a corpus of many GB again: theirs name the
    sources only."""
    from loram.shared.runtime import first_process

    record = source_record if first_process() else (lambda name: {"source": name})
    data = [{**record(s.name), "weight": round(p, 6)}
            for s, p in zip(cfg.sources, probabilities(cfg.sources), strict=True)]
    return data, record(cfg.eval_data) if cfg.eval_data else None


def _check_same_text(checkpoint: Path, data: list[dict], out) -> None:
    """`--resume` skips the blocks already trained on, which is exact only on the same text: a file source whose
    hash differs from the one the checkpoint recorded is refused (a checkpoint without hashes is not checked)."""
    from loram.shared.manifest import MANIFEST_JSON

    try:
        recorded = json.loads((checkpoint / MANIFEST_JSON).read_text())["alignment"][-1]["data"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return
    for now, then in zip(data, recorded, strict=False):
        if now.get("sha256") and then.get("sha256") and now["sha256"] != then["sha256"]:
            raise LoramError(f"--resume: data source {now['source']} changed since the run in {out} recorded it "
                             f"(sha256 {then['sha256'][:12]}... then, {now['sha256'][:12]}... now); resume with the "
                             "same text, or start again with --overwrite")


def _record(cfg: AlignConfig, source, trainer, data: list[dict], evaluated: dict | None, final: bool) -> dict:
    """The alignment record appended to the manifest (of a checkpoint, or of the final output)."""
    from loram.shared.training import evaluations

    state, evals = trainer.state, evaluations(trainer.state)
    record = {
        "tool": "loram publish align", "model": {"id": source.id, "revision": source.revision},
        "data": data,
        "steps": state.global_step, "max_steps": cfg.steps, "complete": final,
        "tokens": int(state.num_input_tokens_seen), "seq_len": cfg.seq_len,
        "global_batch": cfg.batch * cfg.grad_accum * trainer.args.world_size,
        "lr": cfg.lr, "schedule": "cosine", "warmup": cfg.warmup, "seed": cfg.seed,
        "lm_head": "frozen" if cfg.freeze_lm_head else "trained", "train_layers": cfg.train_layers,
        "distill": _distill_record(cfg),
        "eval": None,
    }
    if cfg.eval_data and evals:
        record["eval"] = {**evaluated, "blocks": cfg.eval_limit, "step": evals[-1]["step"],
                          "perplexity": evals[-1]["perplexity"], "perplexity_at_start": evals[0]["perplexity"]}
    return record


def _distill_record(cfg: AlignConfig) -> dict | None:
    if not cfg.distills:
        return None
    record = {"from": cfg.distill_from, "kd_weight": cfg.kd_weight}
    if cfg.hidden_weight > 0:
        record["hidden"] = {"weight": cfg.hidden_weight, "loss": cfg.hidden_loss, "layers": cfg.hidden_layers,
                            "inputs": cfg.hidden_inputs}
    return record


def _carry_pruning_files(pruned: Path, manifest, out: Path) -> None:
    """The pruning's recipe and scores, copied from the input when its manifest lists them (so they were checked
    with it): the aligned checkpoint then says how it was pruned as well as how it was aligned."""
    from loram.publisher.prune import PRUNE_CONFIG, SCORES_FILE

    for name in (PRUNE_CONFIG, SCORES_FILE):
        if name in manifest.files and (Path(pruned) / name).is_file():
            shutil.copy2(Path(pruned) / name, out / name)


def _carry_manifest(manifest, record: dict):
    """The input's manifest with one more alignment record (files are re-hashed when it is saved)."""
    from loram.shared.manifest import Manifest

    return Manifest(base=manifest.base, architecture=manifest.architecture, method=manifest.method,
                    kept_kv_heads=manifest.kept_kv_heads, kept_mlp_channels=manifest.kept_mlp_channels,
                    masks=manifest.masks, alignment=[*manifest.alignment, record])
