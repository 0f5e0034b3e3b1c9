"""Trainer checkpoints that are pickle-free, atomic and exactly resumable.

Stock `transformers.Trainer` (5.x) writes `optimizer.pt`, `scheduler.pt`, `rng_state.pth`,
`scaler.pt` and `training_args.bin`: pickles, which we never write or load. `SafeCheckpointTrainer`
overrides only the hooks that write or read those files, plus `_save_checkpoint`, so that a
checkpoint holds safetensors and JSON only:

    checkpoint-N/
      adapter_model.safetensors | model.safetensors   (save_pretrained, as stock)
      optimizer.safetensors + optimizer.json          (state tensors + everything else)
      scheduler.json, scaler.json (fp16 only)
      rng_state.safetensors + rng_state.json          (torch CPU/CUDA + python/numpy)
      trainer_state.json, tokenizer and config files (as stock)

Stock Trainer writes straight into `checkpoint-N`, so Ctrl-C mid-save leaves a partial folder that
`resume_from_checkpoint=True` would pick. Here every file is written into a hidden sibling
`.checkpoint-N.partial` that is renamed to `checkpoint-N` once complete.

The hooks overridden are private Trainer methods, read off transformers 5.24; if a later version
renames them or stops calling them, tests/shared/test_checkpoints.py fails (pickles reappear, or
the resumed losses drift).
"""

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.training_args import ParallelMode
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

from loram.shared.errors import LoramError

PARTIAL_SUFFIX = ".partial"  # `.checkpoint-N.partial`: hidden, and never matched by `checkpoint-*`
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint, as in stock Trainer

# Tags for what JSON cannot hold natively; a state dict key never starts with "__".
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


# ---- state dicts as safetensors + JSON ----


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """Replace each tensor in `obj` by a reference into `tensors` (keyed by its dotted path).

    Tuples and dicts with non-str keys (the optimizer's {param_id: state}) are tagged, so that
    `_join` gives back the same types; JSON alone would turn them into lists and str keys.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(ptr)
        tensors[path] = t
        return {_TENSOR: path}

    def child(key, value):
        return _split(value, f"{path}.{key}" if path else str(key), tensors, storages)

    if isinstance(obj, tuple):
        return {_TUPLE: [child(i, v) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [child(i, v) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: child(k, v) for k, v in obj.items()}
        return {_ITEMS: [[child(f"{k}:key", k), child(k, v)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} (at {path or 'top level'}) as JSON or safetensors")


def _join(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_split`."""
    if isinstance(node, list):
        return [_join(v, tensors) for v in node]
    if isinstance(node, dict):
        if _TENSOR in node:
            return tensors[node[_TENSOR]]
        if _TUPLE in node:
            return tuple(_join(v, tensors) for v in node[_TUPLE])
        if _ITEMS in node:
            return {_join(k, tensors): _join(v, tensors) for k, v in node[_ITEMS]}
        return {k: _join(v, tensors) for k, v in node.items()}
    return node


def save_state(state: Any, folder: str | os.PathLike, name: str) -> None:
    """Write a (nested) state dict as `name.json`, plus `name.safetensors` when it holds tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, "", tensors, set())
    if tensors:
        safetensors.torch.save_file(tensors, str(folder / f"{name}.safetensors"))
    # float repr round-trips exactly, so learning rates and betas come back bit for bit
    (folder / f"{name}.json").write_text(json.dumps(tree, indent=1) + "\n")


def load_state(folder: str | os.PathLike, name: str) -> Any:
    """Read what `save_state` wrote; tensors are loaded on the CPU."""
    folder = Path(folder)
    tree = json.loads((folder / f"{name}.json").read_text())
    tensor_file = folder / f"{name}.safetensors"
    tensors = safetensors.torch.load_file(str(tensor_file), device="cpu") if tensor_file.exists() else {}
    return _join(tree, tensors)


# ---- finding checkpoints ----


def pickle_files(folder: str | os.PathLike) -> list[Path]:
    """Files under `folder` whose suffix says pickle (`.pt`, `.pth`, `.bin`, `.pkl`, ...)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` in `run_dir`, or None; partial or hidden folders are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    steps = {}
    for p in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        # a folder without trainer_state.json was cut short by a writer that does not rename (stock Trainer)
        if step.isdigit() and p.is_dir() and (p / TRAINER_STATE).is_file():
            steps[int(step)] = p
    return steps[max(steps)] if steps else None


def _sync_tree(folder: Path) -> None:
    """fsync every file, so that the rename cannot outlive the data on a crash of the machine."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---- the Trainer ----


class SafeCheckpointTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints are safetensors + JSON, written atomically.

    Use it exactly like `Trainer`. Resume with `train(resume_from_checkpoint=path)` or `=True`
    (the newest complete checkpoint in `args.output_dir`). Single process or DDP; DeepSpeed, FSDP,
    XLA, SageMaker and tensor-parallel loading write their own pickled checkpoints and are refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available()
                or is_sagemaker_mp_enabled() or getattr(self, "is_distributed_loading_by_transformers", False)):
            raise LoramError("pickle-free checkpoints support single-process or DDP training only; "
                             "turn off DeepSpeed/FSDP/tensor parallelism")
        if self.args.push_to_hub:
            raise LoramError("push_to_hub is not supported here (it uploads training_args.bin, a pickle); "
                             "publish with loram's own hub commands")

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` means `latest_checkpoint(args.output_dir)`."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise LoramError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            resume_from_checkpoint = str(resume_from_checkpoint)
            found = pickle_files(resume_from_checkpoint)
            if found:  # stock Trainer's _load_from_checkpoint would torch.load a pytorch_model.bin
                raise LoramError(f"checkpoint {resume_from_checkpoint} holds pickle files ({found[0].name}, ...); "
                                 "only checkpoints written by loram can be resumed")
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    # -- the folder: staged, then renamed (replaces stock Trainer._save_checkpoint) --

    def _save_checkpoint(self, model, trial) -> None:
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{final.name}{PARTIAL_SUFFIX}"  # one name, so every rank finds it
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-save
        self.accelerator.wait_for_everyone()
        try:
            self._write_checkpoint(staging, run_dir)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                _sync_tree(staging)
                old = run_dir / f".{final.name}.old"
                if final.exists():  # the same step saved again (e.g. a resumed run): swap, then drop
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                staging.rename(final)
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, out: Path, run_dir: Path) -> None:
        """What stock `_save_checkpoint` writes, in the same order, into `out`."""
        self.save_model(str(out), _internal_call=True)
        save_strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy in save_strategies and self.state.best_global_step:
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best.exists() or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = str(best)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(out))
            self._save_scaler(str(out))
            self._save_rng_state(str(out))
        if self.args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(out / TRAINER_STATE))

    def _tune_save_checkpoint(self, checkpoint_dir: str) -> None:
        raise LoramError("hyperparameter search with Ray Tune checkpoints is not supported (it writes pickles)")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock `_save` (save_pretrained + processing class) without `training_args.bin`."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not hasattr(model, "save_pretrained"):
            raise LoramError(f"cannot checkpoint a {type(model).__name__}: it has no save_pretrained")
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)  # safetensors in v5
        processor = self.processing_class
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)

    # -- optimizer, scheduler, scaler --

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not (Path(checkpoint) / "optimizer.json").is_file():
            raise LoramError(f"checkpoint {checkpoint} has no optimizer state (saved with save_only_model?); "
                             "it cannot be resumed exactly")
        # On the CPU, as stock Trainer does; load_state_dict moves each state to its parameter's device.
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / "scaler.json").is_file():
            scaler.load_state_dict(load_state(checkpoint, "scaler"))

    # -- random number generators --

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                 "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
            state["cuda"] = torch.cuda.get_rng_state_all() if distributed else torch.cuda.get_rng_state()
        save_state(state, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not (Path(checkpoint) / f"{self._rng_name()}.json").is_file():
            raise LoramError(f"checkpoint {checkpoint} has no {self._rng_name()}.json; it cannot be resumed "
                             "exactly (was it written with another number of processes?)")
        state = load_state(checkpoint, self._rng_name())
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.random.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            if isinstance(state["cuda"], list):
                torch.cuda.set_rng_state_all(state["cuda"])
            else:
                torch.cuda.set_rng_state(state["cuda"])
