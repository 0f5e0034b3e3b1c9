"""KV groups scored by the loss itself (`--kv-score loss`, the default of `--method taylor`).

The score of KV group g of layer i is the mean calibration loss of the model with that one group
removed (its KV head, its G query heads: their `o_proj` columns contribute nothing) and everything
else dense. Higher means the group matters more. With few groups per layer (SmolLM2 has 3, LLaMA 8)
each choice is a large step, and the first-order Taylor estimate of it ranks them poorly: on
SmolLM2 at ratio 0.5 (32 x 128 calibration, the loss on 8 samples) this choice takes held-out
perplexity from 5.5x dense to 3.4x (docs/results.md, `benchmarks/prune_quality.py --variants`).
MLP channels are too many to remove one at a time; they keep their Taylor scores.

Cost: one forward of the calibration, then, for each scored layer i and group g, layers i..L-1 and
the vocabulary projection again, starting from the dense hidden states entering layer i (kept from
the walk up: one [samples, seq_len, hidden] tensor, read, never written, by each group's pass). That is
n_kv * sum_i (L - i) layer passes without gradients, about n_kv * (L - first) / 2 forwards of the
model. Every layer runs where its weights are (`--device-map auto` included).
"""

import torch
from tqdm.auto import tqdm

from loram.publisher.importance.taylor import HEAD_CHUNK, _device, _forward, _output
from loram.shared.architectures import PRUNED_MODULES, Shape, kept_index

KV_SAMPLES = 8  # calibration samples the loss is measured on, by default (docs/results.md: 4 to 32 measured)
KV_SCORES = ("loss", "taylor")  # how `--method taylor` scores KV groups; MLP channels are always Taylor
_O_PROJ = next(spec for spec in PRUNED_MODULES if spec.unit == "q" and spec.axis == "in")


@torch.no_grad()
def kv_loss_scores(model, layers: range, calib: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:
    """{layer: [n_kv] float64 mean calibration loss with that KV group removed}; `batch` rows per chunk."""
    if len(layers) == 0:
        return {}
    shape = Shape.of(model.config)
    blocks = model.get_decoder().layers
    was_training = model.training
    model.eval()
    try:
        stored, calls = _forward(model, calib, batch, [layers.start])
        hidden = stored.pop(layers.start)  # dense hidden states entering the current layer
        stored.clear()  # the final norm's input, not needed here
        out = {}
        for i in tqdm(layers, desc="kv-group loss", unit="layer", leave=False):
            losses = torch.zeros(shape.num_kv_heads, dtype=torch.float64)
            o_proj = blocks[i].get_submodule(_O_PROJ.path)
            for g in range(shape.num_kv_heads):
                removed = kept_index(shape, _O_PROJ, [g], [])
                handle = o_proj.register_forward_pre_hook(_zero_columns(removed))
                try:
                    losses[g] = _loss_from(model, i, hidden, calls, calib, batch)
                finally:
                    handle.remove()
            out[i] = losses
            for x, kw in zip(hidden.split(batch), calls[i], strict=True):  # advance, dense
                x.copy_(_output(blocks[i], x, kw))
        return out
    finally:
        model.train(was_training)


def _zero_columns(columns: torch.Tensor):
    def hook(_module, args):
        x = args[0].clone()
        x[..., columns.to(x.device)] = 0
        return (x, *args[1:])
    return hook


def _loss_from(model, first: int, hidden: torch.Tensor, calls: dict, calib: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over the calibration when `hidden` (left as it is) enters layer `first`."""
    decoder = model.get_decoder()
    norm, head = decoder.norm, model.get_output_embeddings()
    total, n_tokens = 0.0, calib.shape[0] * (calib.shape[1] - 1)
    for c, (x, rows) in enumerate(zip(hidden.split(batch), calib.split(batch), strict=True)):
        for j in range(first, len(decoder.layers)):
            x = _output(decoder.layers[j], x, calls[j][c])
        flat = norm(x.to(_device(norm)))[:, :-1].to(head.weight.device).reshape(-1, x.shape[-1])
        targets = rows[:, 1:].reshape(-1).to(head.weight.device)
        for k in range(0, len(targets), HEAD_CHUNK):
            logits = head(flat[k: k + HEAD_CHUNK]).float()
            total += torch.nn.functional.cross_entropy(logits, targets[k: k + HEAD_CHUNK], reduction="sum").item()
    return total / n_tokens
