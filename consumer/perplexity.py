"""Perplexity: exp(mean negative log-likelihood) over the tokens that carry a label.

Labels of -100 are ignored (prompt tokens, padding). The loss is computed only at labelled
positions: hidden states go through `lm_head` only there, which gives the same number as a full
forward and is much cheaper with a 49k-token vocabulary.
"""

import math

import torch
from tqdm.auto import tqdm

IGNORE = -100


def text_windows(tokenizer, texts: list[str], window: int, max_windows: int | None = None,
                 separator: str = "\n\n") -> torch.Tensor:
    """Concatenate `texts`, tokenize once, cut into full windows: LongTensor [n, window]."""
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def backbone_and_head(model):
    """(callable returning last hidden states, lm_head) for a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [b, t-1] bool: the positions whose next token is labelled, their targets [k]) for labels [b, t]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return keep, targets[keep]


@torch.no_grad()
def nll_sum(model, input_ids: torch.Tensor, labels: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum of NLL over labelled next-token positions and their count, for one batch [b, t]."""
    decoder, head = backbone_and_head(model)
    device = head.weight.device
    input_ids, labels = input_ids.to(device), labels.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [b, t, h]
    keep, targets = next_token_targets(labels)                                                # [b, t-1], [k]
    logits = head(hidden[:, :-1][keep]).float()                                               # [k, vocab]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return nll.item(), int(keep.sum())


def perplexity(model, windows: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of `model` over token windows [n, t] (labels default to the inputs)."""
    model.eval()
    labels = windows if labels is None else labels
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        s, c = nll_sum(model, windows[i: i + batch_size], labels[i: i + batch_size])
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return math.exp(total / count)


def dataset_perplexity(model, dataset, collator, batch_size: int = 4, progress: bool = True,
                       desc: str = "perplexity") -> tuple[float, int]:
    """(perplexity, labelled tokens) over a tokenized dataset with input_ids / labels columns.

    The rows are batched longest first: a batch pads to its longest row, so neighbours of similar length
    waste less (benchmarks/eval_order.py); the sum does not depend on the order; and the largest batch
    comes first, where a GPU that cannot hold it fails at once."""
    model.eval()
    total, count = 0.0, 0
    rows = sorted((dataset[i] for i in range(len(dataset))), key=lambda row: -len(row["input_ids"]))
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
        batch = collator(rows[i: i + batch_size])
        s, c = nll_sum(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return math.exp(total / count), count
