"""Records -> input_ids + labels: each format labels exactly its response; each mistake is one LoramError.

Labels are checked by decoding the labelled tokens and comparing with the response text: the tiny
tokenizer is character-level (and maps "\\n" to <pad>), SmolLM2's is the real byte-level BPE.
"""

import warnings

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_model, tiny_tokenizer

from loram.perplexity import IGNORE, nll_sum
from loram.sft_format import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    SFTCollator,
    TruncationWarning,
    format_name,
    parse_columns,
    tokenize_sft,
)
from loram.shared.errors import LoramError

# a chat template for the tiny tokenizer: "[role]content</s>\n" per turn, "[assistant]" as generation prompt
TINY_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def chat_tok():
    tok = tiny_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    return tok


def one(records, tokenizer, seq_len=512, **kwargs) -> dict:
    out = tokenize_sft(Dataset.from_list(records), tokenizer, seq_len, **kwargs)
    assert out.column_names == ["input_ids", "attention_mask", "labels"] and len(out) == len(records)
    ex = out[0]
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
    assert set(ex["attention_mask"]) == {1}
    return ex


def labelled(tokenizer, ex) -> str:
    """The labelled tokens decoded; also checks each label is its token or IGNORE."""
    assert all(lab in (tok, IGNORE) for tok, lab in zip(ex["input_ids"], ex["labels"], strict=True))
    return tokenizer.decode([t for t in ex["labels"] if t != IGNORE])


def first_labelled(ex) -> int:
    return next(k for k, t in enumerate(ex["labels"]) if t != IGNORE)


# --- formats without a chat template --------------------------------------------------------------

def test_text_is_plain_language_modelling_with_eos(tok):
    ex = one([{"text": "The cat sat."}], tok)
    assert ex["input_ids"] == tok("The cat sat.")["input_ids"] + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"]


def test_prompt_response_masks_the_prompt_and_labels_response_and_eos(tok):
    ex = one([{"prompt": "What is 2+2?", "response": "It is 4."}], tok)
    prompt_ids = tok("What is 2+2?\n")["input_ids"]
    assert ex["input_ids"] == prompt_ids + tok("It is 4.")["input_ids"] + [tok.eos_token_id]
    assert first_labelled(ex) == len(prompt_ids) and labelled(tok, ex) == "It is 4.</s>"


@pytest.mark.parametrize("extra", ["12 + 30", "", None])
def test_alpaca_uses_the_stanford_template(tok, extra):
    record = {"instruction": "Add the numbers.", "input": extra, "output": "42"}
    ex = one([record], tok)
    prompt = (ALPACA_PROMPT.format(instruction="Add the numbers.", input=extra) if extra
              else ALPACA_PROMPT_NO_INPUT.format(instruction="Add the numbers."))
    assert ex["input_ids"][: first_labelled(ex)] == tok(prompt + "\n")["input_ids"]
    assert labelled(tok, ex) == "42</s>"
    no_input_column = one([{"instruction": "Say hi.", "output": "hi"}], tok)
    assert labelled(tok, no_input_column) == "hi</s>"


def test_train_on_prompt_labels_everything(tok, chat_tok):
    for tokenizer, record in [(tok, {"prompt": "Q?", "response": "A."}),
                              (tok, {"instruction": "Do it.", "input": "x", "output": "done"}),
                              (chat_tok, {"prompt": "Q?", "response": "A."}),
                              (chat_tok, {"messages": CONVERSATION})]:
        ex = one([record], tokenizer, train_on_prompt=True)
        assert ex["labels"] == ex["input_ids"]
        assert ex["input_ids"] == one([record], tokenizer)["input_ids"]  # same tokens, only the labels differ


def test_a_tokenizer_that_adds_bos_gets_it_in_front_and_unlabelled(tok, monkeypatch):
    monkeypatch.setattr("loram.sft_format._adds_bos", lambda tokenizer: True)
    ex = one([{"prompt": "Q?", "response": "A."}], tok)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == IGNORE
    assert labelled(tok, ex) == "A.</s>"


# --- chat templates -------------------------------------------------------------------------------

def test_messages_label_exactly_the_assistant_turns_and_their_end_of_turn(chat_tok):
    ex = one([{"messages": CONVERSATION}], chat_tok)
    full = chat_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex["input_ids"] == chat_tok(full, add_special_tokens=False)["input_ids"]  # tokenized as a whole
    assert labelled(chat_tok, ex) == "Hello!</s>4</s>"  # not the "\n" after each end-of-turn
    # the labels form two runs, each right after a generation prompt "[assistant]"
    runs = "".join("L" if t != IGNORE else "." for t in ex["labels"])
    assert runs.count(".L") == 2
    for k in (i for i in range(1, len(runs)) if runs[i - 1: i + 1] == ".L"):
        assert chat_tok.decode(ex["input_ids"][k - len("[assistant]"): k]) == "[assistant]"


def test_prompt_response_with_a_chat_template_is_one_user_and_one_assistant_turn(chat_tok):
    ex = one([{"prompt": "What is 2+2?", "response": "4"}], chat_tok)
    # the tiny tokenizer has no "\n": it becomes <pad>
    assert chat_tok.decode(ex["input_ids"]) == "[user]What is 2+2?</s><pad>[assistant]4</s><pad>"
    assert labelled(chat_tok, ex) == "4</s>"
    ex = one([{"instruction": "Add.", "input": "2+2", "output": "4"}], chat_tok)
    turns = [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]  # blank line
    assert ex["input_ids"] == chat_tok(chat_tok.apply_chat_template(turns, tokenize=False))["input_ids"]


def test_a_conversation_without_an_assistant_turn_is_dropped_and_counted(chat_tok):
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}]
    with pytest.warns(TruncationWarning, match="^1 of 2 examples had no labelled token at all and were dropped$"):
        out = tokenize_sft(Dataset.from_list(records), chat_tok, 512)
    assert len(out) == 1


# --- column mapping and detection -----------------------------------------------------------------

GSM8K_LIKE = [{"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = 2\n#### 2"},
              {"question": "What is 5 * 4?", "answer": "5 * 4 = 20\n#### 20"}]


def test_a_column_mapping_makes_gsm8k_records_prompt_response(tok):
    columns = parse_columns("prompt=question,response=answer")
    assert columns == {"prompt": "question", "response": "answer"}
    dataset = Dataset.from_list(GSM8K_LIKE)
    assert format_name(dataset, columns) == "prompt/response"
    out = tokenize_sft(dataset, tok, 512, columns=columns)
    for ex, record in zip(out, GSM8K_LIKE, strict=True):
        assert labelled(tok, ex) == record["answer"].replace("\n", "<pad>") + "</s>"
        assert ex["input_ids"][: first_labelled(ex)] == tok(record["question"] + "\n")["input_ids"]


def test_parse_columns_accepts_spaces_and_rejects_bad_items():
    assert parse_columns(" text = body ") == {"text": "body"}
    assert parse_columns("messages=conversation") == {"messages": "conversation"}
    for bad, hint in [("prompt", "NAME=COLUMN"), ("=question", "NAME=COLUMN"), ("", "NAME=COLUMN"),
                      ("question=prompt", "not a format name"), ("prompt=a,prompt=b", "twice")]:
        with pytest.raises(LoramError, match=hint):
            parse_columns(bad)


@pytest.mark.parametrize("columns, expected", [
    (["messages", "text", "prompt"], "messages"),
    (["prompt", "response", "text"], "prompt/response"),
    (["instruction", "input", "output", "text"], "alpaca"),  # tatsu-lab/alpaca's columns
    (["text", "title"], "text"),
])
def test_detection_prefers_structured_formats_over_text(columns, expected):
    assert format_name(Dataset.from_dict({c: ["x"] for c in columns})) == expected


def test_a_mapping_picks_its_format_even_when_another_is_present():
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]], "q": ["x"], "a": ["y"]})
    assert format_name(dataset) == "messages"
    assert format_name(dataset, {"prompt": "q", "response": "a"}) == "prompt/response"
    dataset = Dataset.from_dict({"prompt": ["x"], "completion": ["y"]})  # TRL's prompt/completion
    assert format_name(dataset, {"response": "completion"}) == "prompt/response"


def _error(records, tokenizer, seq_len=512, **kwargs) -> str:
    with pytest.raises(LoramError) as err:
        tokenize_sft(Dataset.from_list(records), tokenizer, seq_len, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_columns_list_what_was_found_and_what_is_accepted(tok):
    message = _error(GSM8K_LIKE, tok)
    assert "question, answer" in message and "prompt + response" in message and "--columns" in message


def test_a_mapping_to_a_missing_column_lists_the_columns(tok):
    message = _error(GSM8K_LIKE, tok, columns={"prompt": "query", "response": "answer"})
    assert "no column 'query'" in message and "question, answer" in message
    message = _error(GSM8K_LIKE, tok, columns={"prompt": "question"})  # response still missing
    assert "prompt=question" in message and "question, answer" in message
    assert "which no format uses" in _error(GSM8K_LIKE, tok, columns={"query": "question"})


def test_messages_need_a_chat_template(tok):
    message = _error([{"messages": CONVERSATION}], tok)
    assert "no chat template" in message and "prompt/response" in message


def test_malformed_records_name_the_record_and_column(tok, chat_tok):
    message = _error([{"q": "a", "answer": 1}], tok, columns={"prompt": "q", "response": "answer"})
    assert "record 0: column 'answer' holds int, not text" in message
    message = _error([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}], tok)
    assert "record 1: column 'response' holds NoneType, not text" in message
    no_content = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    message = _error([{"messages": no_content}], chat_tok)
    assert "record 0" in message and "'role' and 'content'" in message
    message = _error([{"messages": [{"role": "assistant", "content": "hi"}]}], chat_tok)
    assert "opens with an assistant turn" in message


def test_a_template_that_does_not_render_prefix_by_prefix_is_refused(tok):
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}"  # marks the last turn
                         "[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert "prefix by prefix" in _error([{"messages": CONVERSATION}], tok)


def test_a_template_that_raises_is_one_error(tok):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    message = _error([{"messages": CONVERSATION}], tok)
    assert "record 0" in message and "roles must alternate" in message


def test_seq_len_below_two_is_refused(tok):
    with pytest.raises(LoramError, match="seq_len must be at least 2 tokens, got 1"):
        tokenize_sft(Dataset.from_list([{"text": "abc"}]), tok, 1)


# --- truncation -----------------------------------------------------------------------------------

def test_truncation_keeps_the_start_drops_the_unlearnable_and_warns_once(tok):
    records = [{"prompt": "P", "response": "short"},                   # 1 + 1 + 5 + 1 = 8 tokens: kept whole
               {"prompt": "P", "response": "a longer response"},       # 20 tokens: cut, still labelled
               {"prompt": "a prompt longer than ten", "response": "x"},  # cut inside the prompt: dropped
               {"prompt": "", "response": ""}]                         # "\n" + eos: eos is labelled, kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize_sft(Dataset.from_list(records), tok, 10)
    assert len(caught) == 1 and caught[0].category is TruncationWarning
    assert str(caught[0].message) == ("2 of 4 examples were longer than seq_len=10 tokens and were cut to "
                                      "their first 10, 1 of them with no labelled token left, dropped")
    assert len(out) == 3 and all(len(ids) <= 10 for ids in out["input_ids"])
    assert tok.decode(out[1]["input_ids"]) == "P<pad>a longer"
    assert labelled(tok, out[1]) == "a longer" and labelled(tok, out[0]) == "short</s>"


def test_empty_texts_are_dropped_in_the_same_warning(tok):
    with pytest.warns(TruncationWarning) as caught:
        out = tokenize_sft(Dataset.from_list([{"text": "abcdef"}, {"text": ""}, {"text": "ab"}]), tok, 4)
    assert len(caught) == 1 and len(out) == 2
    assert str(caught[0].message).startswith("1 of 3 examples were longer than seq_len=4")
    assert str(caught[0].message).endswith("were cut to their first 4; 1 more had no labelled token at all and "
                                           "were dropped")  # no "0 of them" clause


def test_no_warning_when_everything_fits(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_sft(Dataset.from_list([{"prompt": "Q", "response": "A"}] * 3), tok, 64)


def test_nothing_left_is_an_error_that_suggests_a_longer_seq_len(tok):
    with pytest.warns(TruncationWarning):
        message = _error([{"prompt": "a long prompt", "response": "x"}], tok, seq_len=4)
    assert "seq_len=4" in message and "--seq-len" in message


# --- batching -------------------------------------------------------------------------------------

def test_the_collator_right_pads_and_masks_padding(tok):
    tok.padding_side = "left"  # ignored: training batches are always right-padded
    records = [{"prompt": "Q?", "response": "Yes."}, {"prompt": "Q", "response": "A"}]
    out = tokenize_sft(Dataset.from_list(records), tok, 64)
    batch = SFTCollator.for_tokenizer(tok)([out[0], out[1]])
    n0, n1 = len(out[0]["input_ids"]), len(out[1]["input_ids"])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, n0) for k in out.column_names}
    assert batch["input_ids"][1].tolist() == out[1]["input_ids"] + [tok.pad_token_id] * (n0 - n1)
    assert batch["labels"][1].tolist() == out[1]["labels"] + [IGNORE] * (n0 - n1)
    assert batch["attention_mask"].tolist() == [[1] * n0, [1] * n1 + [0] * (n0 - n1)]
    assert SFTCollator.for_tokenizer(tok, pad_to_multiple_of=8)([out[1]])["input_ids"].shape == (1, 8)


def test_the_collator_falls_back_to_eos_without_a_pad_token(tok):
    tok.pad_token = None
    assert SFTCollator.for_tokenizer(tok).pad_token_id == tok.eos_token_id


def test_a_collated_batch_gives_the_response_only_loss(tok):
    """The model's own loss on a padded batch equals the NLL over exactly the labelled targets."""
    records = [{"prompt": "2+2?", "response": "4"}, {"prompt": "Name a colour.", "response": "Blue, or red."}]
    out = tokenize_sft(Dataset.from_list(records), tok, 64)
    batch = SFTCollator.for_tokenizer(tok)(list(out))
    model = tiny_model("llama-gqa")
    with torch.no_grad():
        loss = model(**batch).loss.item()
    total, count = nll_sum(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert count == len("4") + 1 + len("Blue, or red.") + 1  # characters + eos of each response
    assert loss == pytest.approx(total / count, rel=1e-5)


# --- the real SmolLM2 tokenizer -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from loram.shared import assets

    return AutoTokenizer.from_pretrained(assets.model_dir())


@pytest.mark.slow
def test_smollm2_messages_label_the_assistant_contents_and_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conversation = CONVERSATION + [{"role": "user", "content": "And 3 * 7?"},
                                   {"role": "assistant", "content": "21, since 3 * 7 = 21.\nDone."}]
    ex = one([{"messages": conversation}], tok)
    full = tok.apply_chat_template(conversation, tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert labelled(tok, ex) == "".join(reply + "<|im_end|>" for reply in replies)
    assert tok.decode(ex["input_ids"][: first_labelled(ex)]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_gsm8k_with_the_mapping_labels_exactly_the_answers(smollm2_tokenizer):
    from loram.shared.records import load_records

    tok = smollm2_tokenizer
    records = load_records("gsm8k-train").select(range(64))
    out = tokenize_sft(records, tok, 1024, columns=parse_columns("prompt=question,response=answer"))
    assert len(out) == 64
    for ex, record in zip(out, records, strict=True):
        assert labelled(tok, ex) == record["answer"] + "<|im_end|>"
        k = first_labelled(ex)
        assert all(t != IGNORE for t in ex["labels"][k:-1]) and ex["labels"][-1] == IGNORE  # the final "\n"
        prompt = tok.apply_chat_template([{"role": "user", "content": record["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        assert tok.decode(ex["input_ids"][:k]) == prompt
