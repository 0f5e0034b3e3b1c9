"""The Trainer behind `loram publish align`: checkpoints that are pruned checkpoints, masks kept, optional KD.

- `AlignTrainer` extends `SafeCheckpointTrainer` (pickle-free, atomic, exactly resumable checkpoints) so
  that every `checkpoint-N` is also a loadable pruned checkpoint: the weights are written by
  `save_pruned_checkpoint` (config with `auto_map`, `modeling_loram.py`, tokenizer) and, once every rank
  has written its files, rank 0 adds the manifest carried forward with an alignment record for step N.
- Distillation (optional, beyond the paper): with a teacher (the original model), the training loss is

      loss = (1 - w_kd - w_hidden) * CE(student, next token) + w_kd * KL(softmax(teacher) || softmax(student))
             + w_hidden * hidden-state loss (distill.py: per matched decoder layer, MSE or cosine)

  averaged over the same next-token positions as the LM loss. Evaluation reports the LM loss alone,
  so held-out perplexity means the same with and without distillation.
- `MaskKeeper` re-applies non-structured pruning masks after every optimizer step (docs/method.md §3,
  ours): AdamW moves pruned weights away from zero on the first step otherwise.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from loram.publisher.distill import LayerFeed, LayerOutputs, hidden_sum, kd_sum
from loram.shared.checkpoints import SafeCheckpointTrainer, local_rows, materialize_
from loram.shared.errors import LoramError
from loram.shared.manifest import PackedMask
from loram.shared.pruned_model import save_pruned_checkpoint


class AlignTrainer(SafeCheckpointTrainer):
    """`SafeCheckpointTrainer` whose checkpoints carry the pruning manifest; optional distillation.

    `write_manifest(folder, step)` is called on rank 0 after every rank has written its part of a
    checkpoint, before the checkpoint is renamed into place (so its sha256 list covers every file).
    """

    def __init__(self, *args, write_manifest: Callable[[Path, int], None], teacher=None, kd_weight: float = 0.0,
                 hidden_weight: float = 0.0, hidden_loss: str = "mse", hidden_layers: list[int] | None = None,
                 hidden_inputs: str = "pruned", **kwargs):
        super().__init__(*args, **kwargs)
        self.write_manifest = write_manifest
        self.teacher, self.kd_weight = teacher, kd_weight
        self.hidden_weight, self.hidden_loss = hidden_weight, hidden_loss
        self._parts = {"lm_loss": [], "kd_loss": [], "hidden_loss": []}  # per micro-batch, drained into each log line
        self._hidden = self._feed = None
        if teacher is not None and hidden_weight > 0:
            layers = list(range(len(teacher.model.layers))) if hidden_layers is None else hidden_layers
            local = hidden_inputs == "original"
            self._hidden = (LayerOutputs(self.model, layers), LayerOutputs(teacher, layers, inputs=local))
            if local:
                self._feed = LayerFeed(self.model, layers)

    # -- checkpoints --

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The weights as a pruned checkpoint (safetensors, auto_map, modeling file, tokenizer)."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_pruned_checkpoint(model, output_dir or self.args.output_dir, self.processing_class)

    def _write_checkpoint(self, out: Path, run_dir: Path) -> None:
        super()._write_checkpoint(out, run_dir)
        self.accelerator.wait_for_everyone()  # every rank's rng_state_<i> is in `out` before it is hashed
        if self.args.should_save:
            self.write_manifest(out, self.state.global_step)

    # -- loss --

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distilling = self.teacher is not None and model.training
        # the teacher first: with --hidden-inputs original its layer inputs are what the student's layers run on
        teacher_logits = self._teacher_forward(inputs["input_ids"]) if distilling else None
        if distilling and self._hidden:
            self._hidden[0].capturing = True
        try:
            if distilling and self.hidden_only:
                # pure hidden-state distillation: the LM and KD terms weigh 0, so the student projects only the
                # last position onto the vocabulary (a third of SmolLM2's step); 0 x that logit keeps the final
                # norm in the graph, as DDP expects of every trainable parameter
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                logits_to_keep=1)
                loss = 0.0 * outputs.logits.sum()
            else:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                     num_items_in_batch=num_items_in_batch)
        finally:
            if self._hidden:
                self._hidden[0].capturing = False
        if distilling:
            loss = self._distill(loss, outputs.logits, teacher_logits, inputs["input_ids"], num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _teacher_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (only the last position's unless logit distillation needs them all), its matched
        layers' outputs recorded and, for layer-local reconstruction, their inputs handed to the student's feed."""
        if next(self.teacher.parameters()).device != input_ids.device:
            self.teacher.to(input_ids.device)
        if self._hidden:
            self._hidden[1].capturing = True
        try:
            with torch.no_grad():
                # only hidden states matched: the vocabulary projection of the last position alone (the whole
                # model is still called, so FSDP's root unit gathers the embeddings)
                out = self.teacher(input_ids=input_ids, **({} if self.kd_weight > 0 else {"logits_to_keep": 1}))
        finally:
            if self._hidden:
                self._hidden[1].capturing = False
        if self._feed:
            self._feed.feed = self._hidden[1].take_inputs()
        return out.logits

    @property
    def hidden_only(self) -> bool:
        """The objective is hidden-state distillation alone (no LM, no logit term)."""
        return self._hidden is not None and self.kd_weight == 0 and self.hidden_weight >= 1.0

    def _distill(self, lm: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 input_ids: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """(1 - w_kd - w_hidden) * LM + w_kd * KL + w_hidden * hidden, each normalized as the Trainer normalized LM."""
        b, t = input_ids.shape
        positions = b * (t - 1)
        # The Trainer normalized the LM loss by the number of target tokens of the whole accumulated (and,
        # across ranks, gathered) batch when it is known; the distillation sums get the same scale.
        scale = 1.0 / positions
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            scale = 1.0 / float(num_items_in_batch)
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
        per_token = 1.0 / (scale * positions)  # the logged parts are per-position means
        if self.hidden_only:
            loss = lm  # 0 x the last logit (compute_loss); no LM loss was computed to log
        else:
            self._parts["lm_loss"].append(lm.detach().float() * per_token)
            loss = (1.0 - self.kd_weight - (self.hidden_weight if self._hidden else 0.0)) * lm
        if self.kd_weight > 0:
            kd = kd_sum(student_logits, teacher_logits) * scale
            self._parts["kd_loss"].append(kd.detach().float() * per_token)
            loss = loss + self.kd_weight * kd
        if self._hidden:
            hidden = hidden_sum(self._hidden[0].take(), self._hidden[1].take(), self.hidden_loss) * scale
            self._parts["hidden_loss"].append(hidden.detach().float() * per_token)
            loss = loss + self.hidden_weight * hidden
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the mean LM, KD and hidden-state losses since the last log line (distillation only), averaged over
        the processes as the Trainer averages `loss` (every process logs at the same steps)."""
        if "loss" in logs and any(self._parts.values()):
            for key, values in self._parts.items():
                if values:
                    mean = torch.stack(values).mean().to(self.args.device)
                    logs[key] = round(self.accelerator.reduce(mean, reduction="mean").item(), 6)
                    values.clear()
        super().log(logs, *args, **kwargs)


class MaskKeeper(TrainerCallback):
    """Zero the pruned weights of a non-structured model at the start and after every optimizer step.

    Holds one bool tensor per masked weight (1 byte per weight, next to 16 bytes of fp32 weight,
    gradient and Adam state), on the weight's device.
    """

    def __init__(self, model, masks: dict[str, PackedMask]):
        self.pruned: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for name, packed in sorted(masks.items()):
            try:
                weight = model.get_submodule(name).weight
            except AttributeError as e:
                raise LoramError(f"mask {name}: the model has no such module with a weight") from e
            if tuple(weight.shape) != tuple(packed.shape):
                raise LoramError(f"mask {name}: shape {list(packed.shape)} does not match the weight "
                                 f"{list(weight.shape)}")
            pruned = ~packed.unpack()
            if isinstance(weight, DTensor):  # FSDP2: this rank's rows of the mask, for its local shard
                pruned = pruned[local_rows(weight)].clone()
            self.pruned.append((weight, pruned))

    @torch.no_grad()
    def apply(self) -> None:
        for i, (param, pruned) in enumerate(self.pruned):
            weight = param.to_local() if isinstance(param, DTensor) else param
            if pruned.device != weight.device:
                pruned = pruned.to(weight.device)
                self.pruned[i] = (param, pruned)
            weight.masked_fill_(pruned, 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()


# ---- FSDP2 ----


def shard_model(model, *, device, bf16: bool, reshard_after_forward: bool = True, weights=None) -> dict:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`, the call accelerate's FSDP2 plugin
    makes): one FSDP unit per decoder layer (every LoRAM per-layer class), then the root (embeddings, final
    norm, lm_head). Parameters become DTensors sharded on dim 0 over every process; bf16 compute with fp32
    gradient reduction when `bf16`. A model built on the meta device (`pruned_model.empty_model`) is sharded
    as it is, then each process allocates its shards on `device` and reads their rows from the safetensors
    in folder `weights`: no process ever holds the whole model. Returns this run's sharding, read off the
    parameter objects."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise LoramError("--fsdp needs a distributed launch: torchrun --nproc_per_node N -m loram publish align "
                         "... --fsdp, or accelerate launch with an FSDP config")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    empty = any(p.is_meta for p in model.parameters())
    if empty and weights is None:
        raise LoramError("internal error: a model on the meta device needs the folder of its weights")
    if not empty:
        model.to(device)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if empty:
        materialize_(model, device, weights)
    return sharding_record(model, units=len(layers) + 1)


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise LoramError(f"--fsdp: {type(model).__name__} has no model.layers to shard")
    return list(layers)


def sharding_record(model, units: int) -> dict:
    """How the parameters are sharded, from the parameter objects themselves: DTensor or not, the mesh size,
    placements, and this rank's local elements."""
    params = list(dict(model.named_parameters()).values())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    return {"fsdp_version": 2, "units": units, "parameters": len(params), "dtensor_parameters": len(dtensors),
            "mesh_sizes": sorted({p.device_mesh.size() for p in dtensors}),
            "placements": sorted({str(p.placements) for p in dtensors}),
            "global_numel": sum(p.numel() for p in params),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "param_dtype": str(next(iter(params)).dtype)}
