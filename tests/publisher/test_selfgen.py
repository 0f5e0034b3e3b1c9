"""`loram publish selfgen`: the original's own answers to prompts, written as chat-form alignment text."""

import json
import os

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
    cut = 0
    for ask, text in zip(prompt_order(ASKS, 5, 0), texts, strict=True):
        prompt = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
        cut += tok.eos_token_id not in greedy[0, ids.shape[1]:].tolist()  # 12 tokens and no end: cut
        # the ask is the user turn, the original's own continuation (batched, left-padded) the assistant turn
        assert text == tok.apply_chat_template([{"role": "user", "content": ask},
                                                {"role": "assistant", "content": answer}], tokenize=False)
    assert result.cut == cut > 0  # and said: test_cut_answers_are_counted_and_said
    blocks = list(iter_blocks(str(out), tok, 16))  # `loram publish align --data gen.jsonl` reads it
    assert blocks and next(iter(mixture([Source(str(out))], tok, 16)))["input_ids"] in [b["input_ids"] for b in blocks]


def test_cut_answers_are_counted_and_said(original, prompts, tmp_path, loram_warnings):
    """An answer cut at --max-new-tokens stops mid-sentence in the file (the template closes the turn): said."""
    result = selfgen(model=str(original), prompts=str(prompts), count=3, max_new_tokens=4, batch=3,
                     out=tmp_path / "short.jsonl")
    assert result.cut == 3  # 4 tokens of a random tiny model: none ends
    assert loram_warnings() == ["3 of the 3 answers reached --max-new-tokens 4 before their end and stop mid-sentence "
                                "in the text (the chat template closes each turn); raise --max-new-tokens for whole "
                                "answers"]
    proc = run_loram("publish", "selfgen", original, "--prompts", prompts, "--count", 1, "--max-new-tokens", 4,
                     "--out", tmp_path / "one.jsonl")
    assert proc.returncode == 0 and "wrote 1 conversation (" in proc.stdout, proc.stderr
    assert "warning: 1 of the 1 answers reached --max-new-tokens 4" in proc.stderr


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
    ({"prompts": "poetry"}, r"^--prompts poetry is neither a built-in prompt set nor a .txt file: give a built-in "
                            r"prompt set \(math\) or a .txt file with one prompt per line$"),
    ({"prompts": "{tmp}/missing.txt"}, r"missing.txt: no such file; give a .txt file with one prompt per line"),
    ({"prompts": "{tmp}/prompts.md"}, r"prompts.md is not a .txt file: give a built-in prompt set \(math\) or a .txt"),
    ({"model": "{pruned}"}, r"pruned is a LoRAM pruned checkpoint; the alignment text is the original's own: give the "
                            r"model it was pruned from"),
    ({"prompts": "{empty}"}, r"holds no prompt; write one prompt per line"),
    ({"prompts": "{binary}"}, r"is not UTF-8 text"),
    ({"temperature": 0.0}, r"--temperature must be a number > 0"),
    ({"top_p": 1.5}, r"--top-p must lie in \(0, 1\]"),
    ({"count": 0}, r"--count must be >= 1"),
    ({"max_new_tokens": 128}, r"--max-new-tokens 128 with a prompt of one token or more exceeds the model's "
                              r"max_position_embeddings \(128\)"),
    ({"out": "{tmp}/gen.json"}, r"write a .jsonl file"),
])
def test_bad_input_is_one_line_and_writes_nothing(original, tmp_path, kwargs, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "prompts.md").write_text("Count to three.\n")
    if kwargs.get("model"):
        import shutil

        shutil.copytree(original, tmp_path / "pruned")
        (tmp_path / "pruned" / "loram_manifest.json").write_text("{}")  # a LoRAM checkpoint (non-structured: stock config)
    fill = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt", "tmp": tmp_path,
            "pruned": tmp_path / "pruned"}
    kwargs = {k: v.format(**fill) if isinstance(v, str) else v for k, v in kwargs.items()}
    before = sorted(tmp_path.iterdir())
    with pytest.raises(LoramError, match=message):
        selfgen(**{"model": str(original), "count": 2, "out": tmp_path / "gen.jsonl", **kwargs})
    assert sorted(tmp_path.iterdir()) == before


def test_a_model_without_a_chat_template_or_a_failed_run_writes_nothing(original, tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    save_tiny_checkpoint(plain, "llama-gqa")
    with pytest.raises(LoramError, match="its tokenizer has no chat template, and selfgen writes conversations"):
        selfgen(model=str(plain), count=2, max_new_tokens=8, out=tmp_path / "gen.jsonl")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("transformers.GenerationMixin.generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        selfgen(model=str(original), count=2, max_new_tokens=8, out=tmp_path / "gen.jsonl")
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
        selfgen(model=str(model_dir), count=2, max_new_tokens=8, out=tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def _interrupt_after(monkeypatch, calls: int) -> None:
    """generate() runs `calls` times and is then interrupted, as by Ctrl-C."""
    from transformers import GenerationMixin

    real, count = GenerationMixin.generate, [0]

    def generate(self, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(GenerationMixin, "generate", generate)


def test_resume_writes_the_file_an_uninterrupted_run_writes(original, prompts, tmp_path, monkeypatch, capsys):
    from loram.publisher.selfgen_progress import progress_folder

    kwargs = {"model": str(original), "prompts": str(prompts), "count": 7, "max_new_tokens": 10, "batch": 2,
              "temperature": 1.0}
    whole = selfgen(**kwargs, out=tmp_path / "whole.jsonl")
    out = tmp_path / "gen.jsonl"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt) as interrupt:
            selfgen(**kwargs, out=out)
    assert "interrupted with 4 of 7 conversations committed; rerun the same command with --resume to continue" in \
        capsys.readouterr().err.splitlines() and interrupt.value.already_said
    progress = progress_folder(out)
    assert not out.exists() and sorted(p.name for p in progress.iterdir()) == [
        "conversations.jsonl", "progress.json", "rng-4.safetensors"]
    assert json.loads((progress / "progress.json").read_text())["done"] == 4  # two batches of 2 committed
    with open(progress / "conversations.jsonl", "ab") as f:
        f.write(b'{"text": "a batch cut off while being appen')  # not committed: dropped on resume
    # a new run next to the interrupted one's progress is refused, as is resuming with other options
    with pytest.raises(LoramError, match=r"holds an interrupted run's conversations for --out .*; continue it with "
                                         r"--resume, or start again with --overwrite$"):
        selfgen(**kwargs, out=out)
    with pytest.raises(LoramError, match=r"^--resume: --max-new-tokens \(10 then, 12 now\), --seed \(0 then, 1 now\) "
                                         r"differ from the interrupted run's"):
        selfgen(**{**kwargs, "max_new_tokens": 12, "seed": 1}, out=out, resume=True)
    result = selfgen(**kwargs, out=out, resume=True)
    assert out.read_bytes() == whole.out.read_bytes() and not progress.exists()
    assert (result.conversations, result.resumed, result.tokens, result.cut) == (7, 4, whole.tokens, whole.cut)
    assert 0 < result.new_tokens < result.tokens


def test_resume_refuses_what_it_cannot_trust(original, prompts, tmp_path, monkeypatch):
    from loram.publisher.selfgen_progress import progress_folder

    kwargs = {"model": str(original), "prompts": str(prompts), "count": 4, "max_new_tokens": 6, "batch": 2}
    out = tmp_path / "gen.jsonl"
    with pytest.raises(LoramError, match=r"^--resume: no interrupted run to continue for --out .*; run without "
                                         r"--resume$"):
        selfgen(**kwargs, out=out, resume=True)
    with pytest.raises(LoramError, match="--resume and --overwrite contradict each other"):
        selfgen(**kwargs, out=out, resume=True, overwrite=True)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            selfgen(**kwargs, out=out)
    records = progress_folder(out) / "conversations.jsonl"
    committed = records.read_bytes()
    records.write_bytes(committed.replace(b"[user]", b"[USER]", 1))  # a committed record changed on disk
    with pytest.raises(LoramError, match=r"do not match the hashes progress.json recorded; .* start again with "
                                         r"--overwrite$"):
        selfgen(**kwargs, out=out, resume=True)
    assert records.exists() and not out.exists()  # refused: nothing touched
    result = selfgen(**kwargs, out=out, overwrite=True)  # starts again, and the stale progress goes
    assert result.resumed == 0 and len(_records(out)) == 4 and not progress_folder(out).exists()


def test_resume_on_the_command_line(original, prompts, tmp_path, monkeypatch):
    """Resumed from another folder, the model named by a relative path is still the same model."""
    out = tmp_path / "gen.jsonl"
    relative = os.path.relpath(original, tmp_path)
    args = ("publish", "selfgen", relative, "--prompts", prompts, "--count", 3, "--batch", 1, "--max-new-tokens", 6,
            "--out", out)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            selfgen(model=str(original), prompts=str(prompts), count=3, batch=1, max_new_tokens=6, out=out)
    proc = run_loram(*args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 3 conversations" in proc.stdout and "resumed after 2)" in proc.stdout and len(_records(out)) == 3


def test_an_interruption_inside_a_commit_leaves_a_resumable_run(original, prompts, tmp_path, monkeypatch):
    """Cut off after the second batch's records and generator state are written but before progress.json names
    them: the run resumes from the first batch, and the file is still an uninterrupted run's."""
    from loram.publisher import selfgen_progress

    kwargs = {"model": str(original), "prompts": str(prompts), "count": 6, "max_new_tokens": 8, "batch": 2,
              "temperature": 1.0}
    whole = selfgen(**kwargs, out=tmp_path / "whole.jsonl").out.read_bytes()
    out = tmp_path / "gen.jsonl"
    real, states = selfgen_progress._replace, [0]

    def replace(path, data):
        if path.name == selfgen_progress.STATE:
            states[0] += 1
            if states[0] == 2:
                raise KeyboardInterrupt
        real(path, data)
    with monkeypatch.context() as m:
        m.setattr(selfgen_progress, "_replace", replace)
        with pytest.raises(KeyboardInterrupt):
            selfgen(**kwargs, out=out)
    progress = selfgen_progress.progress_folder(out)
    assert {p.name for p in progress.glob("rng-*")} == {"rng-2.safetensors", "rng-4.safetensors"}
    assert json.loads((progress / "progress.json").read_text())["done"] == 2
    result = selfgen(**kwargs, out=out, resume=True)
    assert result.resumed == 2 and out.read_bytes() == whole and not progress.exists()
