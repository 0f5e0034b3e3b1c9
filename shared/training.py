"""The training core of `loram train` (LoRA on a pruned model) and `loram publish align` (continual
pre-training): one place for what a training recipe does around the Trainer.

    folder = run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)   # checks only, removes nothing
    folder, cfg = pin_options(folder, cfg, RESUME_SAME)                        # --resume: same data, lr, global batch?
    ... every input checked, model and data loaded ...
    args = training_arguments(folder, max_steps=..., batch=..., ...)           # the shared defaults
    trainer = SomeSafeCheckpointTrainer(model, args, ..., callbacks=[progress])
    begin(folder, trainer)                                                     # only now: a stale staging folder goes,
                                                                               # a fresh run pins its options
    run(trainer, folder)                                                       # train (or resume), closing evaluation
    report = training_report(cfg, source, trainer, progress, trainable=..., started=...)
    finish(folder, trainer, write=lambda tmp: ..., last=MANIFEST_JSON)         # one atomic final write

Output folders. A new `--out` is trained into directly (so a killed run can be resumed with `--resume`).
`--overwrite` of an existing, non-empty `--out` trains into a hidden sibling `.NAME.replacing` and swaps
it in only when the run is complete: the old output stays whole until the new one is, and a run killed
midway leaves the old output untouched (its staging folder is removed by the next run to that `--out`), and
`--resume` continues that killed run in its staging folder, not the old output's run.
A run that stopped before its first checkpoint leaves only its pinned options, and the same command starts
it again.

Resuming. A fresh run records the options a resumed run must share (data, learning rate, LoRA shape...)
in `checkpoints/run_config.json` (`pin_options`, written by `begin`); `--resume` with other values is
refused, naming them. Options such as `--steps`, `--save-every` or `--eval-every` may change. The global
batch (--batch x --grad-accum x processes) is pinned rather than its factors, so a run can resume on
another number of processes (`--grad-accum` is adjusted to keep it).
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loram.shared.checkpoints import checkpoint_step, latest_checkpoint
from loram.shared.errors import LoramError, say, warn
from loram.shared.outputs import (
    atomic_file,
    check_not_a_cache,
    check_not_the_working_folder,
    check_writable,
    replace_dir,
    staged_files,
)

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"  # in checkpoints/: the options a resumed run must share
REPLACING_SUFFIX = ".replacing"
LOSS_KEYS = ("loss", "learning_rate", "grad_norm", "lm_loss", "kd_loss", "hidden_loss")


@dataclass(frozen=True)
class RunFolder:
    """Where a training run writes: `work` is `out`, or `.out.replacing` next to it under `--overwrite`."""

    out: Path
    work: Path
    resume_from: Path | None = None
    pinned: dict | None = dataclasses.field(default=None, compare=False)  # options `begin` records (pin_options)

    @property
    def checkpoints(self) -> Path:
        return self.work / CHECKPOINTS

    @property
    def replaces(self) -> bool:
        return self.work != self.out


def run_folder(out: str | Path, *, resume: bool, overwrite: bool, what: str = "training",
               steps: int | None = None) -> RunFolder:
    """Check `--out` against `--resume` / `--overwrite` and return where the run writes; removes nothing.
    `steps` (the run's --steps, when given) must lie past a resumed checkpoint's step: the Trainer would
    otherwise train one step beyond it."""
    out = Path(out)
    if resume and overwrite:
        raise LoramError("--resume and --overwrite contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise LoramError(f"output path {out} exists and is not a directory; choose another --out")
    check_not_a_cache(out)
    check_writable(out, into=True)
    staging = out.parent / f".{out.name}{REPLACING_SUFFIX}"
    stopped = latest_checkpoint(staging / CHECKPOINTS) if staging.is_dir() else None  # a killed --overwrite run's
    if resume:
        if staging.is_dir() and stopped is None:  # resuming `out` would continue the run --overwrite was replacing
            raise LoramError(f"--resume: an --overwrite run into {out} stopped before its first checkpoint "
                             f"({staging}); start it again with --overwrite, or remove {staging} to resume the "
                             f"{what} it was replacing")
        work = staging if stopped is not None else out
        checkpoint = stopped or latest_checkpoint(out / CHECKPOINTS)
        if checkpoint is None:
            raise LoramError(f"--resume: no complete checkpoint in {out / CHECKPOINTS}; run without --resume"
                             + (" to start it again" if _unstarted(out) else ""))
        done = checkpoint_step(checkpoint)
        if steps is not None and done >= steps:
            raise LoramError(f"--resume: the {what} in {work} already reached step {done} ({checkpoint.name}), "
                             f"--steps is {steps}: nothing left to train; pass a --steps above {done} to go on")
        if stopped is not None:
            say(f"--resume: continuing the --overwrite run that stopped at {checkpoint.name} ({staging}); it "
                f"replaces {out} when it completes")
        return RunFolder(out, work, checkpoint)
    if out.is_dir() and any(out.iterdir()) and not _unstarted(out):
        if not overwrite:
            # offered only where --resume would not be refused next
            resumable = stopped is not None or (not staging.is_dir()
                                                and latest_checkpoint(out / CHECKPOINTS) is not None)
            whose = f"the --overwrite run that stopped ({staging})" if stopped is not None else f"its {what}"
            raise LoramError(f"output directory {out} already exists; choose another --out, "
                             + (f"pass --resume to continue {whose}, or --overwrite" if resumable
                                else "or pass --overwrite") + " to replace it")
        check_not_the_working_folder(out)
        return RunFolder(out, staging)
    return RunFolder(out, out)


def _unstarted(out: Path) -> bool:
    """`out` holds only what a run that stopped before its first checkpoint leaves: `checkpoints/` with the
    pinned options (and perhaps a half-written checkpoint's hidden staging folder). Trained into again."""
    try:
        if [p.name for p in out.iterdir()] != [CHECKPOINTS]:
            return False
        return all(p.name == RUN_CONFIG or p.name.startswith(".") for p in (out / CHECKPOINTS).iterdir())
    except OSError:
        return False


def recipe_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) for the options both recipes share (`loram train`, `loram publish align`): each config's
    `check` raises the first message whose test fails, after its own. A bad --seed raises here (`check_seed`,
    every command's rule)."""
    import math

    from loram.shared.configs import check_seed

    check_seed(cfg.seed)
    steps = getattr(cfg, "steps", None)
    return [(steps is None or steps >= 1, "--steps must be >= 1"), (cfg.seq_len >= 2, "--seq-len must be >= 2"),
            (math.isfinite(cfg.lr) and cfg.lr > 0, "--lr must be a finite number > 0"),
            (cfg.warmup >= 0, "--warmup must be >= 0"),
            (cfg.batch >= 1 and cfg.grad_accum >= 1, "--batch and --grad-accum must be >= 1"),
            (cfg.eval_every >= 1 and cfg.save_every >= 1, "--eval-every and --save-every must be >= 1"),
            (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; choose one")]


def world_size() -> int:
    """Processes in this run, as torchrun / accelerate launch announce them (before the process group starts)."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def global_batch(cfg, processes: int | None = None) -> int:
    """Sequences per optimizer step: --batch (per process) x --grad-accum x processes."""
    return cfg.batch * cfg.grad_accum * (world_size() if processes is None else processes)


def check_resumable(folder: RunFolder, *, sharded: bool = False) -> None:
    """Refuse, before anything loads, a checkpoint this run cannot resume. One written without FSDP holds its
    optimizer state in one file and a random-number state per process: it resumes without `--fsdp`, on as many
    processes as wrote it (an FSDP checkpoint's shards resume on any number, with or without `--fsdp`)."""
    from loram.shared.checkpoints import OPTIMIZER_SHARDS, rng_state_writers

    checkpoint = folder.resume_from
    if checkpoint is None or (checkpoint / OPTIMIZER_SHARDS).is_dir():
        return
    start_again = "or start a new run (another --out, or --overwrite)"
    if sharded:
        raise LoramError(f"--resume --fsdp: {checkpoint} was written without --fsdp (its optimizer state is not "
                         f"sharded); resume it without --fsdp, as it was written, {start_again}")
    written = rng_state_writers(checkpoint)
    processes = world_size()
    if written and written != processes:
        how = "as one process (no torchrun)" if written == 1 else f"with torchrun --nproc_per_node {written}"
        raise LoramError(f"--resume: {checkpoint} was written by {written} process(es) and this run has {processes}; "
                         f"without --fsdp a checkpoint resumes only on as many (each wrote its own random-number "
                         f"state): run it {how}, {start_again}")


def pin_options(folder: RunFolder, cfg, names):
    """Options `names` of `cfg` must not change across `--resume`: on a resumed run compare them with the
    ones its first run recorded (LoramError naming every one that differs); on a fresh run return the folder
    with them, for `begin` to record in `checkpoints/run_config.json`. A run recorded before this file
    existed is resumed unchecked. Returns (folder, cfg).

    The global batch (`global_batch`) is pinned instead of --batch and --grad-accum: a run resumed on another
    number of processes keeps it, taking the --grad-accum that makes it up (said on stderr), or is refused
    when no whole --grad-accum does; --batch and --grad-accum may change when their product stays."""
    from loram.shared.configs import flag_name

    values = {name: _comparable(getattr(cfg, name)) for name in names if name not in ("batch", "grad_accum")}
    if folder.resume_from is None:
        return dataclasses.replace(folder, pinned={**values, "global_batch": global_batch(cfg)}), cfg
    path = folder.checkpoints / RUN_CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    if "global_batch" not in saved:  # recorded before the global batch was: its --batch/--grad-accum stay
        values.update({n: getattr(cfg, n) for n in ("batch", "grad_accum")})
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    differ = [n for n in values if n in saved and saved[n] not in (values[n], _comparable(getattr(cfg, n), True))]
    if differ:
        details = "; ".join(f"{flag_name(fields[n])} {_shown(saved[n])} -> {_shown(values[n])}" for n in differ)
        verb = "differs" if len(differ) == 1 else "differ"
        raise LoramError(f"--resume: {', '.join(flag_name(fields[n]) for n in differ)} {verb} from the run being "
                         f"resumed in {folder.out} ({details}); resume with the values it was started with, or "
                         f"start a new run (another --out, or --overwrite)")
    return folder, _keep_global_batch(cfg, saved.get("global_batch"))


def _keep_global_batch(cfg, wanted: int | None):
    """`cfg` with the --grad-accum that keeps the resumed run's global batch `wanted` on this many processes."""
    if wanted is None or global_batch(cfg) == wanted:
        return cfg
    processes = world_size()
    per_step = cfg.batch * processes
    if wanted % per_step:
        raise LoramError(f"--resume: the run being resumed has a global batch of {wanted} sequences per step; "
                         f"{processes} process(es) x --batch {cfg.batch} cannot make it up with a whole "
                         f"--grad-accum; choose --batch and --grad-accum with batch x grad-accum x processes = "
                         f"{wanted}")
    accum = wanted // per_step
    warn(f"resuming on {processes} process(es): --grad-accum {cfg.grad_accum} -> {accum} keeps the global "
        f"batch of {wanted} (--batch {cfg.batch} per process)")
    return dataclasses.replace(cfg, grad_accum=accum)


def _comparable(value, any_path: bool = False):
    """An option's value as JSON; a path as its absolute form when it exists (so ./a.jsonl equals a.jsonl). A bare
    word (no folder separator, no suffix, no leading . or ~) stays a word, even where a folder of that name exists:
    `--distill-from base`, `--hidden-layers pruned`, `--data wiki` mean the same from any working folder.
    `any_path`: every existing path, words included (what runs pinned before this rule recorded)."""
    if isinstance(value, list | tuple):
        return [_comparable(v, any_path) for v in value]
    if (isinstance(value, Path | str) and value != "" and (any_path or isinstance(value, Path) or _path_like(value))
            and Path(value).expanduser().exists()):
        return str(Path(value).expanduser().resolve())
    return json.loads(json.dumps(value, default=str))


def _path_like(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith((".", "~")) or bool(Path(text).suffix)


def _shown(value) -> str:
    text = "none" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def training_arguments(folder: RunFolder, *, max_steps: int | None, batch: int, grad_accum: int, lr: float,
                       warmup: int, seed: int, evaluate: bool, eval_every: int, save_every: int,
                       keep_checkpoints: int | None, gradient_checkpointing: bool, epochs: float = 1.0,
                       **extra):
    """The TrainingArguments both recipes share; `extra` adds or overrides recipe-specific ones.

    AdamW with a cosine schedule and no weight decay; a log entry every step (the report's loss curve);
    seeded initialisation and data order; checkpoints every `save_every` steps into `folder.checkpoints`;
    bf16 autocast on GPUs that support it, fp32 elsewhere (CPU bf16 matmuls are slow on most CPUs);
    no reporting integrations, and no Trainer tqdm (our TrainingProgress draws the bar).
    """
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    values = dict(
        output_dir=str(folder.checkpoints), max_steps=max_steps or -1, num_train_epochs=epochs,
        per_device_train_batch_size=batch, per_device_eval_batch_size=batch, gradient_accumulation_steps=grad_accum,
        learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=1,
        seed=seed, data_seed=seed, eval_strategy="steps" if evaluate else "no", eval_steps=eval_every,
        save_strategy="steps", save_steps=save_every, save_total_limit=keep_checkpoints or None,
        activation_checkpointing=gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
        # every trained parameter takes part in every forward (LoRA's and align's alike): DDP need not search the
        # graph for unused ones each step (for a peft model it would, and warn that it found none)
        ddp_find_unused_parameters=False,
    )
    values.update(extra)
    return TrainingArguments(**values)


def is_main(trainer) -> bool:
    return trainer.args.process_index == 0


def gather_ints(value: int, device) -> list[int]:
    """`value` from every rank, in rank order (the process group must be up)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long, device=device))
    return [int(t.item()) for t in out]


def begin(folder: RunFolder, trainer) -> None:
    """Call once every input is checked: clears a staging folder left by a killed `--overwrite` run, and a
    fresh run records its pinned options (`pin_options`)."""
    if folder.resume_from is not None:
        return
    trainer.accelerator.wait_for_everyone()
    if is_main(trainer):
        if folder.replaces:
            shutil.rmtree(folder.work, ignore_errors=True)
        if folder.pinned is not None:
            with atomic_file(folder.checkpoints / RUN_CONFIG) as tmp:
                tmp.write_text(json.dumps(folder.pinned, indent=2) + "\n", encoding="utf-8")
    trainer.accelerator.wait_for_everyone()


def run(trainer, folder: RunFolder) -> None:
    """Train (or resume), then evaluate at the last step unless the schedule already did."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TrainingProgress replaces the printed log dicts
    if folder.resume_from:
        say(f"resuming from {folder.resume_from} (step {checkpoint_step(folder.resume_from)})")
    try:
        trainer.train(resume_from_checkpoint=str(folder.resume_from) if folder.resume_from else None)
    except KeyboardInterrupt as interrupt:
        interrupted(trainer, folder)
        interrupt.already_said = True  # the CLI's generic "interrupted" line would only repeat it
        raise
    step = trainer.state.global_step
    if trainer.eval_dataset is not None and not any(
            r.get("step") == step and "eval_loss" in r for r in trainer.state.log_history):
        trainer.evaluate()


def interrupted(trainer, folder: RunFolder) -> None:
    """Ctrl-C during training: end the progress bar's line and say where the run stands and how to go on."""
    from loram.shared.progress import TrainingProgress

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrainingProgress) and callback.bar is not None:
            callback.bar.close()
    last = latest_checkpoint(folder.checkpoints)
    step = trainer.state.global_step
    if last is None:
        say(f"interrupted at step {step}, before the first checkpoint (--save-every); nothing to resume: rerun the "
            "same command to start again" + (f" ({folder.out} is untouched)" if folder.replaces else ""))
    elif folder.replaces:
        say(f"interrupted at step {step}; {last.name} is complete: rerun the command with --resume in place of "
            f"--overwrite to continue from step {checkpoint_step(last)} ({folder.out} is untouched until the run "
            "completes)")
    else:
        say(f"interrupted at step {step}; {last.name} is complete: rerun the same command with --resume to continue "
            f"from step {checkpoint_step(last)}")


def evaluations(state) -> list[dict]:
    """Every evaluation of the run: step, eval_loss and its perplexity."""
    import math

    return [{"step": r["step"], "eval_loss": r["eval_loss"], "perplexity": round(math.exp(r["eval_loss"]), 4)}
            for r in state.log_history if "eval_loss" in r]


def model_record(source) -> dict:
    """The model a run trained: id and revision, and for a LoRAM pruned checkpoint its manifest's sha256, by which
    `loram recover`, `eval`, `generate` and `merge` tell the checkpoint an adapter was trained on from another one
    with the same shapes (re-pruned into the same folder, say)."""
    from loram.shared.manifest import MANIFEST_JSON, sha256_file

    record = {"id": source.id, "revision": source.revision}
    if (Path(source.path) / MANIFEST_JSON).is_file():
        record["manifest_sha256"] = sha256_file(Path(source.path) / MANIFEST_JSON)
    return record


def training_report(cfg, source, trainer, progress, *, trainable: int, started: float, **extra) -> dict:
    """The report both recipes write (`training_report.json` / `align_report.json`); `extra` adds fields.

    Memory is this rank's peak (CUDA max allocated, or the process's peak RSS on CPU), and every rank's
    in rank order.
    """
    from loram.shared.progress import peak_memory_bytes

    state, args = trainer.state, trainer.args
    peaks = gather_ints(peak_memory_bytes(), args.device)
    losses = [{"step": r["step"], **{k: r[k] for k in LOSS_KEYS if k in r}} for r in state.log_history if "loss" in r]
    return {
        "config": cfg.to_dict(), "model": model_record(source),
        "world_size": args.world_size, "steps": state.global_step, "trainable_params": trainable,
        "losses": losses, "evals": evaluations(state), "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": round(progress.tokens_per_second, 1) if progress else None,
        "step_seconds": progress.step_seconds if progress else [],
        "peak_memory_bytes": peaks[args.process_index], "peak_memory_bytes_per_rank": peaks,
        "peak_memory_kind": progress.memory_kind if progress else None,
        "wall_time_s": round(time.time() - started, 2), **extra,
    }


def finish(folder: RunFolder, trainer, write: Callable[[Path], None], last: str | None = None) -> None:
    """Rank 0 writes the final files with `write(tmp)` into a hidden folder; they are moved into the run's
    folder together (`last` at the very end), then a replacing run is swapped in for the old `--out`."""
    if is_main(trainer):
        with staged_files(folder.work, last=last) as tmp:
            write(tmp)
        if folder.replaces:
            replace_dir(folder.work, folder.out)
    trainer.accelerator.wait_for_everyone()


def log(tool: str, msg: str) -> None:
    """One progress line on stderr, from rank 0 only (`[loram train] ...`)."""
    say(f"[{tool}] {msg}")
