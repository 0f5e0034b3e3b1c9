"""The fine-tuning loss, with the vocabulary projection only where a next token carries a label.

Supervised fine-tuning scores the response tokens alone: the prompt and the padding carry the label -100.
The stock causal-LM loss still projects every position onto the vocabulary and then throws most of the
logits away. Here `lm_head` sees only the hidden states whose next token is labelled, so the loss and its
gradient are the same (the same cross-entropy sum, divided by the same token count) while the projection,
the fp32 logits and their softmax cost only what the labelled tokens need: for a 49k-word vocabulary on
SmolLM2 pruned at 0.5 the projection is 30% of a forward's FLOPs; at 70B the three fp32 copies of the
128k-word logits are 0.73 GiB of the 20 GiB plan at batch 1 x 512 (docs/memory.md) and grow with batch x
sequence.

How: a forward pre-hook on the output embedding gathers the labelled positions out of the [batch, seq,
hidden] states the model hands it, and the Trainer's `compute_loss_func` takes the cross-entropy of the
resulting [labelled, vocab] logits. The model is still called through the Trainer's (possibly DDP-wrapped)
forward, and the Trainer still does the gradient-accumulation and cross-process token averaging it does
for any model that normalizes by `num_items_in_batch`.
"""

import contextlib

import torch

from loram.perplexity import backbone_and_head, next_token_targets
from loram.shared.checkpoints import SafeCheckpointTrainer
from loram.shared.errors import LoramError


@contextlib.contextmanager
def project_labelled_only(head: torch.nn.Module, keep: torch.Tensor):
    """While inside, `head` is applied only to the hidden states at `keep`'s positions: [k, hidden]."""
    def gather(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != (keep.shape[0], keep.shape[1] + 1):
            raise LoramError(f"the output embedding got hidden states of shape {tuple(hidden.shape)}, not the "
                             f"[batch, seq, hidden] of labels {tuple(keep.shape)} plus one position: this model's "
                             "forward does not hand lm_head every position, which the labelled-only loss needs")
        return (hidden[:, :-1][keep.to(hidden.device)],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def labelled_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy summed over the labelled next tokens, divided by `num_items_in_batch` (the labelled
    tokens of the whole accumulated batch, counted by the Trainer) or, without it, by this batch's count."""
    _, targets = next_token_targets(labels)
    logits = outputs["logits"].float()
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise LoramError(f"logits of shape {tuple(logits.shape)} for {targets.numel()} labelled tokens: the loss "
                         "takes the [labelled, vocab] logits of `project_labelled_only`, not a model's full output")
    total = torch.nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


class LabelledLossTrainer(SafeCheckpointTrainer):
    """`SafeCheckpointTrainer` whose causal-LM loss projects only the labelled positions (see the module)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, compute_loss_func=labelled_loss, **kwargs)
        if self.args.n_gpu > 1:  # the Trainer would wrap the model in nn.DataParallel, splitting each batch
            raise LoramError(f"{self.args.n_gpu} GPUs are visible to one process: start one process per GPU with "
                             f"`torchrun --nproc_per_node {self.args.n_gpu} -m loram train ...`, or make one GPU "
                             "visible (CUDA_VISIBLE_DEVICES=0)")
        self._head = backbone_and_head(self.model)[1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep, _ = next_token_targets(inputs["labels"])
        with project_labelled_only(self._head, keep):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
