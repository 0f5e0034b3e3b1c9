"""Distillation terms of `loram publish align`: the original model as teacher (docs/alignment.md).

- Logit distillation: KL(softmax(teacher) || softmax(student)) on the vocabulary, temperature 1.
- Hidden-state distillation: a structurally pruned model keeps the original's hidden size, so the
  residual stream after decoder layer l of the pruned model can be compared with the original's at
  the same positions. Per position p and chosen layer l, with s, t the student's and teacher's layer
  outputs:

      mse:     ||s - t||^2 / ||t||^2        (relative squared error: scale-free, so the large-norm
                                             first positions and deep layers do not dominate)
      cosine:  1 - cos(s, t)

  averaged over the chosen layers. The aim: the layers a LoRA adapter is trained in see, on the
  pruned model, the inputs they see on the original, so the adapter transfers.

Both terms are returned as sums over the next-token positions [b, t-1] (the positions of the LM loss),
for the caller to normalize exactly as the Trainer normalizes the LM loss.
"""

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("mse", "cosine")
HIDDEN_LAYERS = ("all", "pruned")
HIDDEN_INPUTS = ("pruned", "original")  # what each matched layer runs on: its own model's stream, or the original's


class LayerOutputs:
    """Records the output of the given decoder layers of `model` while `capturing` is set.

    Forward hooks, so the model's own forward (and FSDP's) runs unchanged; recording is switched on
    only around the training forward, so recomputation under activation checkpointing records nothing.
    """

    def __init__(self, model, layers: list[int], inputs: bool = False):
        self.outputs: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}  # each layer's input too, when `inputs` (the teacher's, to feed)
        self.capturing = False
        blocks = model.model.layers
        for i in layers:
            blocks[i].register_forward_hook(self._hook(i))
            if inputs:
                blocks[i].register_forward_pre_hook(self._input_hook(i))

    def _hook(self, index: int):
        def hook(module, args, output):
            if self.capturing:
                self.outputs[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def _input_hook(self, index: int):
        def hook(module, args):
            if self.capturing:
                self.inputs[index] = args[0]
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def take_inputs(self) -> dict[int, torch.Tensor]:
        inputs, self.inputs = self.inputs, {}
        return inputs


class LayerFeed:
    """Layer-local reconstruction (`--hidden-inputs original`): the given decoder layers of `model` run on
    the inputs in `feed` (the original's inputs to the same layers, same positions) instead of their own
    stream, so each one learns to reproduce the original layer's output from the original layer's input.

    A forward pre-hook, active in training mode only: evaluation runs the model as it is, and the recomputation
    of activation checkpointing (training mode, in the backward pass) is fed the same inputs again, since a feed
    stays until the next one replaces it."""

    def __init__(self, model, layers: list[int]):
        self.feed: dict[int, torch.Tensor] = {}
        blocks = model.model.layers
        for i in layers:
            blocks[i].register_forward_pre_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(module, args):
            fed = self.feed.get(index)
            if not module.training or fed is None:
                return None
            if fed.shape != args[0].shape:
                raise RuntimeError(f"decoder layer {index}: fed {list(fed.shape)}, runs on {list(args[0].shape)}")
            return (fed.to(args[0].dtype), *args[1:])
        return hook


def kd_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions [b, t-1] of KL(teacher || student) on the vocabulary."""
    student = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def hidden_sum(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], kind: str) -> torch.Tensor:
    """Sum over positions [b, t-1] of the per-position hidden-state loss, averaged over the layers."""
    if set(student) != set(teacher) or not student:
        raise ValueError(f"layer outputs differ: student {sorted(student)}, teacher {sorted(teacher)}")
    total = 0.0
    for i in sorted(student):
        s, t = student[i][:, :-1].float(), teacher[i][:, :-1].float()
        if kind == "mse":
            per_position = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        else:
            per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)
        total = total + per_position.sum()
    return total / len(student)


def hidden_layers(manifest, num_layers: int, which: str) -> list[int]:
    """Decoder layers whose outputs are matched: every layer, or the pruned ones (structured: the layers
    the plan shrinks; non-structured: the layers holding masks; every layer when no layer was pruned)."""
    if which == "all":
        return list(range(num_layers))
    pruned = sorted(i for i in {*manifest.pruned_layers, *manifest.masked_layers} if i < num_layers)
    return pruned or list(range(num_layers))  # nothing pruned (e.g. a layer range too short to shrink): every layer
