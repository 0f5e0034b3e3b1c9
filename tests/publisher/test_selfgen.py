"""`loram publish selfgen`: the original's own answers to prompts, written as chat-form alignment text."""

import json

import pytest
from tiny_models import run_loram, save_tiny_checkpoint, tiny_tokenizer

from loram.publisher.align_data import Source, iter_blocks, mixture
from loram.publisher.selfgen import MATH_PROMPTS, prompt_order, read_prompts, selfgen
from loram.shared.errors import LoramError

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
ASKS = ["What is 2 + 3?", "Count to five.", "Name a fruit."]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("selfgen") / "original"
    save_tiny_checkpoint(folder, "llama-gqa")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(["", *ASKS, "   "]) + "\n")
    return path


def _records(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_built_in_math_prompts_are_distinct_and_ordered_by_seed():
    assert len(MATH_PROMPTS) == len(set(MATH_PROMPTS)) == 128 and all("math" in p or "arithmetic" in p
                                                                      for p in MATH_PROMPTS)
    assert read_prompts("math") == list(MATH_PROMPTS)
    first = prompt_order(list(MATH_PROMPTS), 128, 0)
    assert sorted(first) == sorted(MATH_PROMPTS) and first != list(MATH_PROMPTS)
    assert prompt_order(list(MATH_PROMPTS), 128, 0) == first and prompt_order(list(MATH_PROMPTS), 128, 1) != first
    assert prompt_order(list(MATH_PROMPTS), 10, 0) == first[:10]  # a smaller count is a prefix
    # more conversations than prompts: every prompt once per pass, each pass shuffled anew
    order = prompt_order(ASKS, 7, 0)
    assert sorted(order[:3]) == sorted(order[3:6]) == sorted(ASKS) and order[6] in ASKS


def test_selfgen_writes_the_originals_answers_as_chat_records_align_reads(original, prompts, tmp_path):
    from loram.shared.pruned_model import from_pretrained, load_tokenizer

    out = tmp_path / "gen.jsonl"
    result = selfgen(model=str(original), prompts=str(prompts), count=5, max_new_tokens=12, batch=2,
                     temperature=1e-4, out=out)  # all but greedy
    texts = _records(out)
    assert result.conversations == len(texts) == 5 and result.out == out and result.tokens > 0
    model, tok = from_pretrained(original).eval(), load_tokenizer(original)
    for ask, text in zip(prompt_order(ASKS, 5, 0), texts, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
        # the ask is the user turn, the original's own continuation (batched, left-padded) the assistant turn
        assert text == tok.apply_chat_template([{"role": "user", "content": ask},
                                                {"role": "assistant", "content": answer}], tokenize=False)
    blocks = list(iter_blocks(str(out), tok, 16))  # `loram publish align --data gen.jsonl` reads it
    assert blocks and next(iter(mixture([Source(str(out))], tok, 16)))["input_ids"] in [b["input_ids"] for b in blocks]


def test_selfgen_is_seeded(original, prompts, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        selfgen(model=str(original), prompts=str(prompts), count=3, max_new_tokens=10, batch=3, seed=seed,
                temperature=1.0, out=tmp_path / f"{name}.jsonl")
        runs[name] = (tmp_path / f"{name}.jsonl").read_bytes()
    assert runs["a"] == runs["b"] != runs["c"]


def test_selfgen_command_line(original, prompts, tmp_path):
    out = tmp_path / "cli.jsonl"
    proc = run_loram("publish", "selfgen", original, "--prompts", prompts, "--count", 2, "--max-new-tokens", 8,
                     "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 2 conversations" in proc.stdout and str(out) in proc.stdout
    assert len(_records(out)) == 2
    again = run_loram("publish", "selfgen", original, "--prompts", prompts, "--count", 2, "--out", out)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --out {out} already exists; choose another --out or pass --overwrite"]


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": "poetry"}, r"--prompts poetry: neither a built-in prompt set \(math\) nor a .txt file"),
    ({"prompts": "{empty}"}, r"holds no prompt; write one prompt per line"),
    ({"prompts": "{binary}"}, r"is not UTF-8 text"),
    ({"temperature": 0.0}, r"--temperature must be a number > 0"),
    ({"top_p": 1.5}, r"--top-p must lie in \(0, 1\]"),
    ({"count": 0}, r"--count must be >= 1"),
    ({"out": "{tmp}/gen.json"}, r"write a .jsonl file"),
])
def test_bad_input_is_one_line_and_writes_nothing(original, tmp_path, kwargs, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    fill = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt", "tmp": tmp_path}
    kwargs = {k: v.format(**fill) if isinstance(v, str) else v for k, v in kwargs.items()}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(LoramError, match=message):
        selfgen(**{"model": str(original), "count": 2, "out": tmp_path / "gen.jsonl", **kwargs})
    assert sorted(tmp_path.iterdir()) == before


def test_a_model_without_a_chat_template_or_a_failed_run_writes_nothing(original, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    save_tiny_checkpoint(plain, "llama-gqa")
    with pytest.raises(LoramError, match="its tokenizer has no chat template, and selfgen writes conversations"):
        selfgen(model=str(plain), count=2, out=tmp_path / "gen.jsonl")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("transformers.GenerationMixin.generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        selfgen(model=str(original), count=2, out=tmp_path / "gen.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no file, no temporary left behind


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_a_failing_template_is_one_line(tmp_path):
    model_dir = tmp_path / "no-pad"
    save_tiny_checkpoint(model_dir, "llama-gqa")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.pad_token = None  # as Llama-3's tokenizer
    tok.save_pretrained(model_dir)
    result = selfgen(model=str(model_dir), count=3, batch=3, max_new_tokens=6, out=tmp_path / "gen.jsonl")
    assert result.conversations == len(_records(tmp_path / "gen.jsonl")) == 3
    assert 3 <= result.tokens <= 18  # each answer counted up to its stop token, at most 6 tokens
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    tok.save_pretrained(model_dir)
    with pytest.raises(LoramError, match=r"^the tokenizer's chat template failed on a user turn \(TemplateError: "
                                         r"roles must alternate\); fix the template or use another model$"):
        selfgen(model=str(model_dir), count=2, out=tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
