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

import contextlib
import json
import logging
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
from loram.shared.pruned_model import PICKLE_SUFFIXES as WEIGHT_PICKLE_SUFFIXES
from loram.shared.pruned_model import WEIGHTS, WEIGHTS_INDEX
from loram.shared.safetensors_stream import saved_tensors

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # `.checkpoint-N.partial`: hidden, and never matched by `checkpoint-*`
# pickle weights, plus torch.distributed.checkpoint's default (pickled) files
PICKLE_SUFFIXES = (*WEIGHT_PICKLE_SUFFIXES, ".distcp", ".metadata")
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


def checkpoint_step(checkpoint: Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(Path(checkpoint).name[len(PREFIX_CHECKPOINT_DIR) + 1:])


RNG_STATE = "rng_state"  # rng_state.json of a lone process, rng_state_<rank>.json of each process of a job


def rng_state_writers(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint`'s random-number states (0: none saved)."""
    checkpoint = Path(checkpoint)
    return len(list(checkpoint.glob(f"{RNG_STATE}_*.json"))) or int((checkpoint / f"{RNG_STATE}.json").is_file())


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
    (the newest complete checkpoint in `args.output_dir`). Single process, DDP, or a model sharded with
    FSDP2's `fully_shard` before the Trainer is built (DTensor parameters: full weights streamed by rank 0,
    optimizer shards through DCP's Hugging Face safetensors writer); DeepSpeed, accelerate's own FSDP plugin,
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
        # A model sharded with `fully_shard` before the Trainer (FSDP2, DTensor parameters): the Trainer's own
        # path for models that own their placement and gradient reduction (no DDP wrap, no second sharding);
        # its checkpoints are full streamed weights + DCP optimizer shards (see the FSDP2 section below).
        self.sharded = is_sharded(self.model)
        if self.sharded:
            self.is_distributed_loading_by_transformers = True

    def _move_model_to_device(self, model, device) -> None:
        if not is_sharded(model):  # FSDP2 placed the shards already; `.to()` would go through DTensor `_apply`
            super()._move_model_to_device(model, device)

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """`no_sync` for a `fully_shard` model during gradient accumulation: reduce-scatter on the last micro-batch."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.sharded:
            return super().save_model(output_dir, _internal_call=_internal_call)
        self._save_sharded(Path(output_dir if output_dir is not None else self.args.output_dir))  # every rank
        self.accelerator.wait_for_everyone()

    def _save_sharded(self, out: Path) -> None:
        """A sharded model saved as `save_pruned_checkpoint` saves any model (safetensors, config, processor; a
        LoRAM model's `auto_map` and modeling file), the weights gathered one tensor at a time and written by
        rank 0 only. Collective."""
        from loram.shared.pruned_model import save_pruned_checkpoint

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        save_pruned_checkpoint(model, out, processor, tensors=saved_tensors(model), writer=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_into_shards(self.model, resume_from_checkpoint)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Stock warnings, less the false alarm for tied weights: `lm_head.weight` tied to the embeddings is not
        saved, so a resumed run "misses" it while it shares the loaded embedding's storage."""
        model = self.accelerator.unwrap_model(self.model)
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {p.data_ptr() for name, p in params.items() if name not in load_result.missing_keys}
        missing = [k for k in load_result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

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
        if self.sharded:
            save_sharded_optimizer(self.model, self.optimizer, output_dir)  # every rank writes its shard
        elif self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
        if self.args.should_save:
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if (Path(checkpoint) / OPTIMIZER_SHARDS).is_dir():  # written by an FSDP run, of any world size
            load_sharded_optimizer(self.model, self.optimizer, checkpoint)
            self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))
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
        return RNG_STATE if self.args.world_size <= 1 else f"{RNG_STATE}_{self.args.process_index}"

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
            if (Path(checkpoint) / OPTIMIZER_SHARDS).is_dir() and rng_state_writers(Path(checkpoint)):
                logger.warning(f"{checkpoint} was written by another number of processes: model, optimizer and "
                               "schedule resume, the random number generators start afresh")
                return
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


# ---- FSDP2 (DTensor parameters): full weights streamed by rank 0, optimizer shards through DCP ----

OPTIMIZER_SHARDS = "optimizer"  # checkpoint-N/optimizer/: DCP's Hugging Face safetensors shards, one file per rank
OPTIMIZER_REST = "optimizer_groups"  # checkpoint-N/optimizer_groups.json: the non-tensor part (param groups)


def is_sharded(model) -> bool:
    """True when `model` holds DTensor parameters (sharded by `fully_shard`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rows(t: torch.Tensor) -> slice:
    """The rows (dim 0) of the global tensor that this rank's shard of DTensor `t` holds (FSDP2's Shard(0),
    `torch.chunk` sizes); all rows for a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return slice(0, t.shape[0] if t.dim() else 0)
    if len(t.placements) != 1 or not isinstance(t.placements[0], Shard) or t.placements[0].dim != 0:
        raise LoramError(f"unsupported sharding {t.placements}: FSDP2 shards dim 0 on a 1-D mesh")
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    rows = slice(start, min(start + chunk, n))
    if t.to_local().shape[0] != rows.stop - rows.start:
        raise LoramError(f"local shard of {list(t.shape)} has {t.to_local().shape[0]} rows, expected "
                         f"{rows.stop - rows.start}")
    return rows


@torch.no_grad()
def load_weights_into_shards(model, folder: str | os.PathLike) -> None:
    """Copy a checkpoint's full safetensors weights into `model`'s parameters: each rank reads only the rows of
    its own shards (any world size), one tensor at a time."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    files = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(safetensors.safe_open(str(folder / WEIGHTS), "pt").keys(), WEIGHTS))
    handles = {}
    try:
        for name, t in saved_tensors(model):
            if name not in files:
                raise LoramError(f"checkpoint {folder} has no tensor {name}")
            f = handles.get(files[name]) or handles.setdefault(
                files[name], safe_open(str(folder / files[name]), framework="pt", device="cpu"))
            target = t.to_local() if isinstance(t, DTensor) else t
            if t.dim() == 0:
                target.copy_(f.get_tensor(name))
            else:
                rows = local_rows(t)
                target.copy_(f.get_slice(name)[rows.start:rows.stop])
    finally:
        handles.clear()


def materialize_(model, device, folder: str | os.PathLike) -> None:
    """Give a model whose parameters are on the meta device (plain or sharded by `fully_shard`) its memory
    on `device` and its weights from the safetensors in `folder`, each process reading only its shards' rows.
    Buffers (computed at construction, not stored) are kept; tied embeddings stay one parameter."""
    tied = (model.get_output_embeddings() is not None
            and model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    buffers = {name: b.to(device) for name, b in model.named_buffers()}
    model.to_empty(device=device)  # replaces buffers too, and re-creates each module's parameter
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    load_weights_into_shards(model, folder)


def _optimizer_of(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def save_sharded_optimizer(model, optimizer, out: str | os.PathLike) -> None:
    """Every rank writes its optimizer shards as safetensors with `torch.distributed.checkpoint`'s Hugging
    Face writer (the DCP offsets live in each file's header: no `.metadata` pickle); rank 0 adds the param
    groups as JSON. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    out = Path(out)
    flat = get_optimizer_state_dict(model, _optimizer_of(optimizer),
                                    options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(out / OPTIMIZER_SHARDS), save_distributed=True))
    if _rank() == 0:
        save_state({k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}, out, OPTIMIZER_REST)


def load_sharded_optimizer(model, optimizer, checkpoint: str | os.PathLike) -> None:
    """Inverse of `save_sharded_optimizer`, for any world size (DCP reshards). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    checkpoint = Path(checkpoint)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    optimizer = _optimizer_of(optimizer)
    flat = get_optimizer_state_dict(model, optimizer, options=options)  # initialises the state to load into
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(checkpoint / OPTIMIZER_SHARDS)))
    rest = load_state(checkpoint, OPTIMIZER_REST)
    set_optimizer_state_dict(model, optimizer, {**rest, **tensors}, options=options)
