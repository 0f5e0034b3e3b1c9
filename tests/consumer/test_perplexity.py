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


def test_dataset_perplexity_batches_longest_first_and_equals_one_row_at_a_time():
    import datasets

    from loram.perplexity import dataset_perplexity
    from loram.sft_format import SFTCollator

    model = tiny_model("llama-mha")
    lengths = [5, 17, 6, 16, 7, 15]  # in this order, every batch of two pads a short row to a long one
    rows = []
    for i, n in enumerate(lengths):
        ids = tiny_batch(batch=1, seq=n, seed=i)[0].tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})
    data = datasets.Dataset.from_list(rows)
    collator = SFTCollator(pad_token_id=0)
    widths = []

    def collate(batch):
        out = collator(batch)
        widths.append(tuple(out["input_ids"].shape))
        return out

    one, tokens = dataset_perplexity(model, data, collator, batch_size=1, progress=False)
    two, tokens2 = dataset_perplexity(model, data, collate, batch_size=2, progress=False)
    assert tokens == tokens2 == sum(n - 2 for n in lengths)
    assert math.isclose(one, two, rel_tol=1e-5)
    assert widths == [(2, 17), (2, 15), (2, 6)]  # 76 positions; in the given order 2 x (17 + 16 + 15) = 96
