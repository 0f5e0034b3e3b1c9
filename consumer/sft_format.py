"""Supervised fine-tuning examples: records -> input_ids, attention_mask, labels (-100 = no loss).

Formats, detected from the column names in this order (the first whose columns are present wins):

| format            | columns                                | labelled (the loss)                          |
|-------------------|----------------------------------------|----------------------------------------------|
| `messages`        | messages: [{"role", "content"}, ...]   | each assistant turn's content + end-of-turn  |
| `prompt/response` | prompt, response                       | response + eos / end-of-turn                 |
| `alpaca`          | instruction, output (input optional)   | output + eos / end-of-turn                   |
| `text`            | text                                   | every token (plain language modelling) + eos |

Structured formats come before `text` because datasets often carry a pre-rendered `text` column next to
their structured ones (tatsu-lab/alpaca does), and only the structured columns say what to mask.

Other column names go through a mapping from these names to the dataset's columns:
`columns={"prompt": "question", "response": "answer"}` (GSM8K), on the command line
`--columns prompt=question,response=answer` (`parse_columns`). Mapped names join any of the names above
that the dataset already has; only formats using a mapped name are considered.

Rendering. `messages` needs the tokenizer's chat template. For `prompt/response` and `alpaca`:

- with a chat template: the prompt is one user turn followed by the generation prompt, the response
  is the assistant turn's content (so it ends with the template's end-of-turn); for `alpaca` the user
  turn is the instruction, plus a blank line and the input when there is one;
- without: `prompt + "\\n" + response` then the eos token, where the `alpaca` prompt is the Stanford
  Alpaca template (`ALPACA_PROMPT`, ending in "### Response:"); the `text` format is `text` + eos. These
  plain renderings start with bos when the tokenizer adds one by itself (Llama does, SmolLM does not).

Masking. The rendered string is tokenized once, as the model will see it, and a token is labelled when
its last character lies in a labelled span (character offsets from a fast tokenizer), so a token that
straddles the prompt/response boundary is one the model has to produce and is learned. Assistant spans
come from rendering prefixes: the turn runs from the end of `template(messages[:i], generation prompt)`
to the end of `template(messages[:i+1])`, minus trailing whitespace (the "\\n" after `<|im_end|>` is not
the model's to produce). Both renderings must be prefixes of the whole conversation's, else LoramError.
With `train_on_prompt=True` every token is labelled.

Truncation. Examples longer than `seq_len` keep their first `seq_len` tokens. An example left without a
labelled token after position 0 (which is never a target: labels shift by one) is dropped. One
`TruncationWarning` (a python warning) reports how many of how many were truncated and dropped.
"""

import bisect
import warnings
from dataclasses import dataclass

import datasets
import torch

from loram.perplexity import IGNORE
from loram.shared.errors import LoramError, LoramWarning, warn

FORMATS = {  # name -> (required names, optional names), in detection order
    "messages": (("messages",), ()),
    "prompt/response": (("prompt", "response"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}
NAMES = ("messages", "prompt", "response", "instruction", "input", "output", "text")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                          "### Response:")
_ACCEPTED = ("messages; prompt + response; instruction + output (+ input); text; or other columns mapped "
             "with --columns prompt=<column>,response=<column>")

Pieces = list[tuple[str, bool]]  # consecutive substrings of the rendered example, and whether labelled


class TruncationWarning(LoramWarning):
    """Some examples were longer than seq_len (and some of those may have been dropped)."""


# --- formats --------------------------------------------------------------------------------------

def parse_columns(spec: str) -> dict[str, str]:
    """`"prompt=question,response=answer"` -> {"prompt": "question", "response": "answer"}."""
    mapping = {}
    for item in spec.split(","):
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not name or not column:
            raise LoramError(f"--columns {spec!r}: each item must be NAME=COLUMN, e.g. "
                             f"--columns prompt=question,response=answer")
        if name not in NAMES:
            raise LoramError(f"--columns {spec!r}: {name!r} is not a format name; map one of "
                             f"{', '.join(NAMES)} to a column of the dataset, e.g. prompt=question")
        if name in mapping:
            raise LoramError(f"--columns {spec!r} maps {name!r} twice; give each name once")
        mapping[name] = column
    return mapping


GSM8K_COLUMNS = "prompt=question,response=answer"


def builtin_columns(data: str) -> str | None:
    """The column mapping a built-in split needs (`gsm8k-train`, `gsm8k-heldout`: question/answer), so that
    `--columns` is needed only for one's own files; None for anything else."""
    return GSM8K_COLUMNS if str(data).startswith("gsm8k-") else None


def format_name(dataset: datasets.Dataset, columns: dict[str, str] | None = None) -> str:
    """The detected format of `dataset` ("messages", "prompt/response", "alpaca" or "text"), for logging."""
    return _detect(dataset.column_names, columns)[0]


def _detect(found: list[str], columns: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """(format, {format name: dataset column}) for a dataset with columns `found`."""
    columns = dict(columns or {})
    for name, column in columns.items():
        if name not in NAMES:
            raise LoramError(f"column mapping names {name!r}, which no format uses; map some of "
                             f"{', '.join(NAMES)} to the dataset's columns ({', '.join(found)})")
        if column not in found:
            raise LoramError(f"column mapping {name}={column}: the dataset has no column {column!r}; "
                             f"its columns are {', '.join(found)}")
    view = {name: name for name in NAMES if name in found} | columns
    for fmt, (required, optional) in FORMATS.items():
        if columns and not set(columns) & set(required + optional):
            continue
        if all(name in view for name in required):
            return fmt, {name: view[name] for name in required + optional if name in view}
    mapped = f" with the mapping {', '.join(f'{k}={v}' for k, v in columns.items())}" if columns else ""
    raise LoramError(f"cannot tell the record format from the columns {', '.join(found) or '(none)'}"
                     f"{mapped}; accepted: {_ACCEPTED}")


# --- rendering ------------------------------------------------------------------------------------

def _field(record: dict, column: str, index: int, optional: bool = False) -> str:
    value = record[column]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise LoramError(f"record {index}: column {column!r} holds {type(value).__name__}, not text; "
                         f"fix the record or map another column with --columns")
    return value


def _render(record: dict, index: int, fmt: str, view: dict[str, str], tokenizer) -> tuple[Pieces, bool]:
    """The example as labelled pieces, and whether it is plain text (bos/eos ids still to add)."""
    if fmt == "text":
        return [(_field(record, view["text"], index), True)], True
    if fmt == "messages":
        return _chat_pieces(tokenizer, _messages(record[view["messages"]], index), index), False
    chat = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "prompt/response":
        prompt = _field(record, view["prompt"], index)
        response = _field(record, view["response"], index)
    else:
        instruction = _field(record, view["instruction"], index)
        extra = _field(record, view["input"], index, optional=True) if "input" in view else ""
        response = _field(record, view["output"], index)
        if chat:
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
        else:
            template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=instruction, input=extra)
    if chat:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _chat_pieces(tokenizer, turns, index), False
    return [(prompt + "\n", False), (response, True)], True


def _messages(value, index: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise LoramError(f"record {index}: 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LoramError(f"record {index}: every message needs a string 'role' and 'content', got {m!r}")
        turns.append({k: v for k, v in m.items() if v is not None})  # Arrow fills absent keys with None
    return turns


def _chat_pieces(tokenizer, messages: list[dict], index: int) -> Pieces:
    """The conversation rendered by the chat template, assistant turns labelled (see the docstring)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LoramError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, "
                         f"which 'messages' records need; use an instruct model's tokenizer, or records "
                         f"with prompt/response columns (rendered as prompt, newline, response without one)")
    full = _apply_template(tokenizer, messages, False, index)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise LoramError(f"record {index}: the conversation opens with an assistant turn, which has no "
                             f"prompt to answer; start it with a system or user message")
        start = _apply_template(tokenizer, messages[:i], True, index)
        end = _apply_template(tokenizer, messages[: i + 1], False, index)
        if not (full.startswith(start) and full.startswith(end) and done <= len(start) < len(end)):
            raise LoramError(f"record {index}: the chat template does not render this conversation prefix "
                             f"by prefix, so the assistant turns cannot be located; use a tokenizer whose "
                             f"template does, or flatten the records to prompt/response columns")
        reply = full[len(start): len(end)].rstrip()
        pieces += [(full[done: len(start)], False), (reply, True)]
        done = len(start) + len(reply)
    pieces.append((full[done:], False))
    return [(text, labelled) for text, labelled in pieces if text]


def _apply_template(tokenizer, messages: list[dict], generation_prompt: bool, index: int) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise LoramError(f"record {index}: the chat template rejects this conversation ({e}); fix the "
                         f"record (e.g. roles must alternate user/assistant)") from e


# --- tokenization ---------------------------------------------------------------------------------

def tokenize_sft(dataset: datasets.Dataset, tokenizer, seq_len: int, columns: dict[str, str] | None = None,
                 train_on_prompt: bool = False, batch: int = 1000) -> datasets.Dataset:
    """Examples with input_ids, attention_mask and labels (lists of ints, at most `seq_len` long)."""
    if seq_len < 2:
        raise LoramError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise LoramError(f"tokenizer {type(tokenizer).__name__} cannot report character offsets, which the "
                         f"label masks need; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    fmt, view = _detect(dataset.column_names, columns)
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    bos_labels = bos if train_on_prompt or fmt == "text" else [IGNORE] * len(bos)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped_truncated = dropped_other = answered = 0
    for first in range(0, len(dataset), batch):
        records = dataset[first: first + batch]  # columnar: {column: [values]}
        rows = [{c: records[c][k] for c in records} for k in range(min(batch, len(dataset) - first))]
        rendered = [_render(row, first + k, fmt, view, tokenizer) for k, row in enumerate(rows)]
        answered += sum(bool(_response(row, fmt, view).strip()) for row in rows)
        texts = ["".join(text for text, _ in pieces) for pieces, _ in rendered]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        tokens = zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True)
        for (pieces, plain), ids, offsets in tokens:
            labels = _labels(pieces, ids, offsets, train_on_prompt)
            if plain:
                ids, labels = bos + ids + eos, bos_labels + labels + eos
            cut = len(ids) > seq_len
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += cut
            if all(t == IGNORE for t in labels[1:]):
                dropped_truncated += cut
                dropped_other += not cut
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
    dropped = dropped_truncated + dropped_other
    if truncated or dropped:
        parts = []
        if truncated:
            parts.append(f"{truncated} of {len(dataset)} examples were longer than seq_len={seq_len} tokens and "
                         f"were cut to their first {seq_len}" + (f", {dropped_truncated} of them with no labelled "
                                                                 "token left, dropped" if dropped_truncated else ""))
        if dropped_other:
            parts.append(f"{dropped_other} {'more' if truncated else f'of {len(dataset)} examples'} had no labelled "
                         "token at all and were dropped")
        warnings.warn("; ".join(parts), TruncationWarning, stacklevel=2)
    silent = fmt != "text" and not train_on_prompt and answered == 0  # only end-of-turn tokens are labelled
    if not out["input_ids"]:
        if silent:
            raise LoramError(f"every response of the {len(dataset)} examples is empty, so there is nothing to "
                             f"learn; check the data and --columns (the {_response_name(fmt, view)} column)")
        raise LoramError(f"none of the {len(dataset)} examples keeps a labelled token within "
                         f"seq_len={seq_len}; raise --seq-len or use records with non-empty responses")
    if silent:
        warn(f"every response of the {len(dataset)} examples is empty, so the loss is only on the end-of-turn "
             f"token; check the data and --columns (the {_response_name(fmt, view)} column)")
    return datasets.Dataset.from_dict(out)


def _response(record: dict, fmt: str, view: dict[str, str]) -> str:
    """The text a structured record asks the model to produce (every assistant turn for `messages`)."""
    if fmt == "messages":
        turns = record[view["messages"]] or []
        return "".join(m.get("content") or "" for m in turns if isinstance(m, dict) and m.get("role") == "assistant")
    value = record.get(view["response" if fmt == "prompt/response" else "output"]) if fmt != "text" else None
    return value if isinstance(value, str) else ""


def _response_name(fmt: str, view: dict[str, str]) -> str:
    return repr(view.get({"messages": "messages", "prompt/response": "response", "alpaca": "output"}.get(fmt, ""), ""))


def _labels(pieces: Pieces, ids: list[int], offsets: list[tuple[int, int]],
            train_on_prompt: bool) -> list[int]:
    """Each token's label: itself where its last character lies in a labelled piece, else IGNORE."""
    if train_on_prompt:
        return list(ids)
    ends, labelled, position = [], [], 0
    for text, flag in pieces:
        position += len(text)
        ends.append(position)
        labelled.append(flag)
    labels = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        piece = bisect.bisect_right(ends, max(end - 1, start))  # the piece holding the token's last character
        labels.append(token if piece < len(pieces) and labelled[piece] else IGNORE)
    return labels


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts bos in front of plain text by itself (Llama: yes; SmolLM, Qwen: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]


# --- batching -------------------------------------------------------------------------------------

@dataclass
class SFTCollator:
    """Right-pads examples to the longest in the batch: input_ids with `pad_token_id`, attention_mask
    with 0, labels with IGNORE; returns LongTensors [batch, longest (rounded up to pad_to_multiple_of)].

    Ours rather than transformers' DataCollatorForSeq2Seq, which pads on the tokenizer's padding_side
    (left for some checkpoints) and fails on tokenizers without a pad token (Llama).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> "SFTCollator":
        """Pads with the tokenizer's pad token, else its eos (padding is masked, so any id works)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad if pad is not None else 0, pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids, gap = list(f["input_ids"]), longest - len(f["input_ids"])
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * gap)
            batch["attention_mask"].append([1] * len(ids) + [0] * gap)
            batch["labels"].append(labels + [IGNORE] * gap)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
