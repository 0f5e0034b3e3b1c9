"""`taylor` (LoRAM-Stru): first-order Taylor salience s = |W * dL/dW|, summed over each unit's group.

L is the mean causal-LM loss over the calibration tokens. Gradients are needed only for the
prunable weights of the layers being scored: everything else is frozen, so no gradient is kept for
the embeddings, norms or layers outside the range. The calibration set is processed in
micro-batches whose gradients accumulate (the criterion needs the gradient of the *total* loss, so
each weight's running gradient is kept until the end), with gradient checkpointing so activations
stay at about one layer's worth.
"""

import torch
from tqdm.auto import tqdm

from loram.publisher.importance import LayerScores, group_scores
from loram.shared.architectures import PRUNED_MODULES, Shape

MICRO_BATCH = 4
HEAD_CHUNK = 128  # positions per vocabulary-projection chunk


def scores(model, layers: range, calib: torch.Tensor, seed: int) -> dict[int, LayerScores]:
    """calib: LongTensor [n_samples, seq_len] of calibration tokens."""
    shape = Shape.of(model.config)
    decoder = model.get_decoder().layers
    trainable = [p for i in layers for spec in PRUNED_MODULES
                 for p in decoder[i].get_submodule(spec.path).parameters()]
    if not trainable:
        return {}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training, was_ckpt = model.training, model.is_activation_checkpointing
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in trainable:
            p.requires_grad_(True)
        model.train()  # dropout is 0 in these families; train mode enables checkpointing
        model.activation_checkpointing_enable({"use_reentrant": False})
        n_tokens = calib.shape[0] * (calib.shape[1] - 1)
        for start in tqdm(range(0, len(calib), MICRO_BATCH), desc="taylor calibration", leave=False):
            _accumulate_grads(model, calib[start: start + MICRO_BATCH], n_tokens)
        out = {}
        for i in layers:
            out[i] = group_scores(decoder[i], shape, lambda p: (p.detach() * p.grad).abs())
            for p in decoder[i].parameters():
                p.grad = None  # free each layer's gradients as soon as it is scored
        return out
    finally:
        if not was_ckpt:
            model.activation_checkpointing_disable()
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def _accumulate_grads(model, batch: torch.Tensor, n_tokens: int) -> None:
    """Add d(sum of token NLLs / n_tokens)/dW of one micro-batch [b, t] to each trainable weight's .grad.

    The micro-batch gradients add up to dL/dW of the mean loss over all calibration tokens. The
    vocabulary projection is done in chunks of positions, each backpropagated at once into the
    detached hidden states, so full [b, t, vocab] logits and their softmax never exist together.
    """
    hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # [b, t-1, h]
    hidden_leaf = hidden.detach().requires_grad_(True)
    flat, targets = hidden_leaf.reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    for i in range(0, len(targets), HEAD_CHUNK):
        logits = head(flat[i: i + HEAD_CHUNK]).float()  # [chunk, vocab]
        loss = torch.nn.functional.cross_entropy(logits, targets[i: i + HEAD_CHUNK], reduction="sum") / n_tokens
        loss.backward()
    hidden.backward(hidden_leaf.grad)
