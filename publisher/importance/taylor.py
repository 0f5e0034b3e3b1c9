"""`taylor` (LoRAM-Stru): first-order Taylor salience s = |W * dL/dW|, summed over each unit's group.

L is the mean causal-LM loss over all calibration tokens and dL/dW its gradient, exact (to float
rounding) whatever the chunk size. It is computed layer by layer from the top, so the gradients of
only one decoder layer exist at any time:

1. Forward, without gradients, in chunks of `batch` calibration rows through the model's own
   decoder. Pre-hooks record what every layer from the first scored one is called with (rotary
   embeddings, mask) and keep the hidden states entering the final norm and the first layer of
   each segment: the n layers from the first scored one to the end are cut into segments of
   m, m - 1, ..., 1 layers, m ~ sqrt(2 n) (`segment_starts`).
2. dL/dh at the final norm's input, chunk by chunk; the vocabulary projection runs over chunks of
   HEAD_CHUNK positions, so full logits never exist.
3. From the last layer down to the first scored one, segment by segment: recompute the hidden
   states entering the segment's layers from its stored input (no gradients); then for each of its
   layers, top down, run every chunk through the layer with gradients and backpropagate the chunk's
   dL/d(output). The chunk's dL/d(input) goes to the layer below; a post-accumulate-grad hook moves
   each weight's gradient into a float32 sum over the chunks and frees it. After the last chunk the
   sums are the gradients of the total loss: |W * dL/dW| is folded into the layer's unit scores
   (float32 products, float64 sums) and the sums are freed.

Calibration samples never interact (causal attention within a sample), so the chunks' gradients add
up to the whole calibration's: the scores do not depend on `batch`. Layers before the first scored
one only run forward; layers after the range are backpropagated through with frozen weights. Only
the scored weights (and q/k/v biases) require gradients.

Memory beyond the weights: m + 1 hidden-state tensors of [samples, seq_len, hidden] in the weights'
dtype (the dL/dh being backpropagated is written over the input it belongs to), one layer's gradient
sums (float32), one chunk's activations of one layer, and one [HEAD_CHUNK, vocab] float32 buffer.
Compute: the forward with gradients and the backward of training with checkpointing, plus two
forward passes without gradients (the first, and the recomputed segments) instead of one.

Every layer runs where its weights are (one device, or several after `--device-map auto`): inputs
are moved to it by the pre-hooks and the layer calls.
"""

import math

import torch
from tqdm.auto import tqdm

from loram.publisher.importance import LayerScores, add_unit_scores_
from loram.shared.architectures import PRUNED_MODULES, TAYLOR_CALIB_BATCH, TAYLOR_HEAD_CHUNK, Shape

CALIB_BATCH, HEAD_CHUNK = TAYLOR_CALIB_BATCH, TAYLOR_HEAD_CHUNK  # loram.shared.architectures: `plan` counts them


def scores(model, layers: range, calib: torch.Tensor, seed: int, batch: int = CALIB_BATCH,
           query_fold: str = "strided") -> dict[int, LayerScores]:
    """calib: LongTensor [n_samples, seq_len] of calibration tokens; `batch` rows per chunk; `query_fold`: how
    query heads enter the KV-group scores (`importance.add_unit_scores_`)."""
    if len(layers) == 0:
        return {}
    shape = Shape.of(model.config)
    blocks = model.get_decoder().layers
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()  # the families' dropout is 0 either way
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        scored = {i: _scored_tensors(blocks[i]) for i in layers}
        for tensors in scored.values():
            for _, p, _ in tensors:
                p.requires_grad_(True)
        n_tokens = calib.shape[0] * (calib.shape[1] - 1)
        top = len(blocks)  # position `top` is the final norm's input
        starts = segment_starts(layers.start, top)
        stored, calls = _forward(model, calib, batch, starts)
        delta = _head_grads(model, stored.pop(top), calib, batch, n_tokens)
        out, spare = {}, []  # spare: [n, t, h] buffers no longer used, reused rather than reallocated
        progress = tqdm(total=top - layers.start, desc="taylor backward", unit="layer", leave=False)
        for a, b in zip(reversed(starts), reversed([*starts[1:], top]), strict=True):
            inputs = {a: stored.pop(a)}
            with torch.no_grad():
                for j in range(a, b - 1):  # recompute the inputs of the segment's upper layers
                    inputs[j + 1] = _take(spare, inputs[j])
                    for x, kw, y in zip(inputs[j].split(batch), calls[j], inputs[j + 1].split(batch), strict=True):
                        y.copy_(_output(blocks[j], x, kw))
            for j in range(b - 1, a - 1, -1):
                params = [p for _, p, _ in scored.get(j, [])]
                below, grads = _backward(blocks[j], inputs.pop(j), calls.pop(j), delta, batch, j > layers.start, params)
                spare.append(delta)
                delta = below
                if j in scored:
                    out[j] = _fold(scored[j], grads, shape, query_fold)
                del grads
                progress.update()
        progress.close()
        return dict(sorted(out.items()))
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def segment_starts(first: int, top: int) -> list[int]:
    """First layers of the recomputation segments covering [first, top): sizes m, m - 1, ..., 1 from the
    bottom, m the smallest with m (m + 1) / 2 >= top - first. While segment s (from 0) is backpropagated,
    the inputs of s + 1 segments and of the segment's other layers are live: at most m hidden-state tensors."""
    n = top - first
    size = math.ceil((math.sqrt(8 * n + 1) - 1) / 2)
    starts, at = [], first
    while at < top:
        starts.append(at)
        at, size = at + size, max(1, size - 1)
    return starts


def _scored_tensors(layer) -> list[tuple]:
    """(spec, tensor, is_bias) for every weight of `PRUNED_MODULES` and the biases of `out`-axis modules."""
    found = []
    for spec in PRUNED_MODULES:
        module = layer.get_submodule(spec.path)
        found.append((spec, module.weight, False))
        if spec.axis == "out" and module.bias is not None:
            found.append((spec, module.bias, True))
    return found


def _take(spare: list, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like `like`: a spare one when there is one on its device (the allocator then
    sees no churn of these large tensors, which would fragment the CPU heap), else a new one."""
    for k, t in enumerate(spare):
        if t.device == like.device and t.dtype == like.dtype and t.shape == like.shape:
            return spare.pop(k)
    return torch.empty_like(like)


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _to(value, device):
    """`value` with every tensor in it (nested in tuples, lists, dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _output(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _forward(model, calib: torch.Tensor, batch: int, starts: list[int]):
    """Run the calibration through the decoder in chunks of `batch` rows.

    Returns ({position: hidden states [n, t, h] entering it}, {layer: [its keyword arguments per chunk]})
    for the positions `starts` and the top (the final norm's input), the keyword arguments of every
    layer from starts[0] on. Each kept tensor is allocated once, then filled chunk by chunk.
    """
    decoder = model.get_decoder()
    blocks, top, start = decoder.layers, len(decoder.layers), starts[0]
    stored = dict.fromkeys([*starts, top])
    calls = {j: [] for j in range(start, top)}
    rows = slice(0, 0)

    def before(j):
        def hook(module, args, kwargs):
            device = _device(module)
            args, kwargs = _to(args, device), _to(kwargs, device)
            if j >= start:
                hidden = args[0] if args else kwargs["hidden_states"]
                if j in stored:
                    if stored[j] is None:
                        stored[j] = hidden.new_empty((len(calib), *hidden.shape[1:]))
                    stored[j][rows] = hidden
                if j < top:
                    calls[j].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            return args, kwargs
        return hook

    handles = [block.register_forward_pre_hook(before(j), with_kwargs=True) for j, block in enumerate(blocks)]
    handles.append(decoder.norm.register_forward_pre_hook(before(top), with_kwargs=True))
    try:
        embed = _device(decoder.embed_tokens)
        for first in tqdm(range(0, len(calib), batch), desc="taylor forward", unit="chunk", leave=False):
            rows = slice(first, first + batch)
            decoder(input_ids=calib[rows].to(embed), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stored, calls


def _head_grads(model, hidden: torch.Tensor, calib: torch.Tensor, batch: int, n_tokens: int) -> torch.Tensor:
    """dL/dh at the final norm's input [n, t, h], L = sum of the token NLLs / n_tokens, written over `hidden`
    chunk by chunk. The vocabulary projection runs over HEAD_CHUNK positions at a time (`_nll_grad`)."""
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    device = head.weight.device
    for h, rows in zip(hidden.split(batch), calib.split(batch), strict=True):
        x = h.detach().requires_grad_(True)
        with torch.enable_grad():
            normed = norm(x)[:, :-1]                                             # [b, t-1, h]
        flat = normed.detach().to(device).reshape(-1, normed.shape[-1])
        targets = rows[:, 1:].reshape(-1).to(device)
        grad = torch.empty_like(flat)
        for i in range(0, len(targets), HEAD_CHUNK):
            grad[i: i + HEAD_CHUNK] = _nll_grad(head, flat[i: i + HEAD_CHUNK], targets[i: i + HEAD_CHUNK], n_tokens)
        normed.backward(grad.view(normed.shape).to(normed.device))
        h.copy_(x.grad)
    return hidden


@torch.no_grad()
def _nll_grad(head: torch.nn.Linear, x: torch.Tensor, targets: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """d(sum of the NLLs of `targets` / n_tokens)/dx for logits = head(x): ((softmax - onehot) / n_tokens) W.

    As autograd computes it (logits in the weights' dtype, softmax in float32, the logits' gradient cast
    back), but in one [chunk, vocab] float32 buffer turned into the gradient in place, where autograd's
    cross-entropy holds three.
    """
    p = head(x).float()
    p.sub_(p.amax(dim=-1, keepdim=True)).exp_()
    p.div_(p.sum(dim=-1, keepdim=True))
    p[torch.arange(len(targets), device=p.device), targets] -= 1
    p.div_(n_tokens)
    return p.to(head.weight.dtype) @ head.weight


def _backward(layer, inputs: torch.Tensor, calls: list, deltas: torch.Tensor, batch: int, input_grads: bool,
              params: list):
    """Backpropagate dL/d(output) [n, t, h] through `layer`, chunk by chunk.

    Returns (dL/d(input), written over `inputs` chunk by chunk, or None when not `input_grads`;
    {param: float32 gradient of the total loss}).
    """
    sums = {}

    def collect(p):  # post-accumulate-grad hook: move the chunk's gradient into the float32 sum
        g, p.grad = p.grad, None
        if p in sums:
            sums[p].add_(g)
        else:
            sums[p] = g.float()  # the gradient itself when it is float32 already

    handles = [p.register_post_accumulate_grad_hook(collect) for p in params]
    try:
        for x_in, kwargs, d in zip(inputs.split(batch), calls, deltas.split(batch), strict=True):
            x = x_in.detach().requires_grad_(input_grads)
            with torch.enable_grad():
                y = _output(layer, x, kwargs)
                y.backward(d.to(y.device))
            if input_grads:
                x_in.copy_(x.grad)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in params if p not in sums]
    if missing:
        raise RuntimeError(f"taylor: {len(missing)} scored weights received no gradient")
    return (inputs if input_grads else None), sums


@torch.no_grad()
def _fold(tensors: list, grads: dict, shape: Shape, query_fold: str) -> LayerScores:
    """Unit scores of one layer from its weights and their total-loss gradients (freed as they are used)."""
    out = LayerScores.zeros(shape)
    for spec, p, is_bias in tensors:
        salience = (p.float() * grads.pop(p)).abs_()
        dim = 0 if spec.axis == "out" else 1
        per_index = salience.double() if is_bias else salience.sum(dim=1 - dim, dtype=torch.float64)
        add_unit_scores_(out, shape, spec, per_index, query_fold)
    return out
