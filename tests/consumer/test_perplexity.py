import math

import torch
from tiny_models import tiny_batch, tiny_model

from loram.perplexity import IGNORE, nll_sum, perplexity


def test_labelled_positions_only_equals_full_forward_loss():
    model = tiny_model("qwen2")
    ids = tiny_batch(seq=20)
    labels = ids.clone()
    labels[:, :7] = IGNORE  # a masked prompt
    total, count = nll_sum(model, ids, labels)
    full = model(input_ids=ids, labels=labels).loss.item()  # mean over labelled next-token positions
    assert count == 2 * (20 - 7)
    assert math.isclose(total / count, full, rel_tol=1e-5)


def test_perplexity_of_windows_batches_consistently():
    model = tiny_model("llama-gqa")
    windows = torch.cat([tiny_batch(seq=12, seed=s) for s in range(3)])
    a = perplexity(model, windows, batch_size=1, progress=False)
    b = perplexity(model, windows, batch_size=4, progress=False)
    assert math.isclose(a, b, rel_tol=1e-5)
    assert 1 < a < 3 * model.config.vocab_size  # a random model is near-uniform over the vocabulary
