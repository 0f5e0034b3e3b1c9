"""benchmarks/alignment_data.py's diagnostic bound, `gsm8k-oracle.jsonl` (and its `-plain` copy): GSM8K items in
chat form that neither the grid's LoRA runs nor its evaluation see. `loram train` draws its items at random from all of `gsm8k-train`, so the
oracle comes from the held-out items the grid does not evaluate, and the grid refuses to evaluate them."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import alignment_data  # noqa: E402


@pytest.mark.slow
def test_oracle_items_are_neither_trained_on_nor_evaluated():
    from transformers import AutoTokenizer

    from loram.shared.assets import model_dir, read_records

    heldout, train = read_records("gsm8k-heldout"), read_records("gsm8k-train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    texts = alignment_data.oracle(tokenizer)
    items = alignment_data.ORACLE_ITEMS
    assert len(texts) == len(items) == len(heldout) - items.start  # every held-out item past the evaluated ones
    evaluated = {r["question"] for r in heldout[:items.start]}  # the grid's --items default
    trained = {r["question"] for r in train}
    for text, i in zip(texts, items, strict=True):
        question, answer = heldout[i]["question"], heldout[i]["answer"]
        assert question not in evaluated and question not in trained
        user, assistant = text.index(question), text.index(answer)  # one user turn, then the assistant's answer
        assert text.count("<|im_start|>user") == 1 and user < text.index("<|im_start|>assistant") < assistant
    plain = alignment_data.oracle(tokenizer, notation=False)
    assert [t.split("<|im_start|>assistant")[0] for t in plain] == [t.split("<|im_start|>assistant")[0] for t in texts]
    assert not any("<<" in t or "####" in t for t in plain) and all("The answer is " in t for t in plain)


def test_plain_answers_drop_gsm8k_notation_and_keep_the_words():
    answer = "Half is 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert alignment_data.plain(answer) == "Half is 48/2 = 24 clips.\nIn all 48+24 = 72 clips.\nThe answer is 72."
    assert alignment_data.plain("No final line, <<1+1=2>>2.") == "No final line, 2."


@pytest.mark.parametrize("cell", ["taylor50/oracle-gsm8k/40/0", "taylor50/gradmatch-oracle-gsm8k-plain/40/0"])
def test_grid_refuses_to_evaluate_the_oracle_items(tmp_path, cell):
    grid = BENCHMARKS / "alignment_grid.py"
    proc = subprocess.run([sys.executable, str(grid), "--work", str(tmp_path), "--items", "101",
                           "--cells", cell], capture_output=True, text=True, cwd=BENCHMARKS)
    assert proc.returncode != 0
    assert "--items 101" in proc.stderr and "at most 100 items" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow  # build() reads SmolLM2's tokenizer
def test_python_source_is_the_standard_library_text_the_code_cell_aligned_on(tmp_path):
    """code.jsonl: one record per module, the module's text as this interpreter ships it, built by the grid's own
    `build` (so `alignment_grid.py --cells taylor50/hidden-mse-pruned-code+demo-math-batch1/80/0` can re-run)."""
    import fractions
    import json

    alignment_data.build(tmp_path, files=["code"])
    texts = [json.loads(line)["text"] for line in (tmp_path / "code.jsonl").read_text().splitlines()]
    assert len(texts) == len(alignment_data.CODE_MODULES) == 20
    assert texts[0] == Path(fractions.__file__).read_text(encoding="utf-8")
    assert all("def " in t or "class " in t for t in texts)


def test_self_generated_answers_every_ask_in_chat_form_as_the_command_samples():
    """self_generated (selfgen.jsonl, mathgen.jsonl) goes through `loram publish selfgen`'s own sampler: one chat record
    per ask, in order, the same text for the same seed as the sampler it wraps."""
    import torch
    from tiny_models import tiny_model, tiny_tokenizer

    from loram.publisher.selfgen import conversations

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    model, asks = tiny_model(), ["What is 2+2?", "Name a colour.", "Count to 3."]
    torch.manual_seed(0)
    texts = alignment_data.self_generated(model, tok, asks, batch=2, new_tokens=4)
    torch.manual_seed(0)
    expected = [t for part in conversations(model, tok, asks, 2, 4) for t in part.texts]
    assert texts == expected and len(texts) == 3
    assert all(t.startswith(f"[user] {ask}\n[assistant] ") for t, ask in zip(texts, asks, strict=True))


def test_calculator_annotates_each_arithmetic_step_with_its_computed_value():
    """mathgen-calc.jsonl: Toolformer's calculator calls at each step, the value computed, not GSM8K's `<<...>>`."""
    text = "Half is 48/2 = 24 clips. 3 x $5.50 = $16.50, 1,200 + 300 = 1,600 (sic). 7 = 7. 5 / 0 = 1."
    assert alignment_data.calculator(text) == (
        "Half is 48/2 = [Calculator(48/2) → 24] 24 clips. 3 x $5.50 = [Calculator(3 * 5.50) → 16.5] $16.50, "
        "1,200 + 300 = [Calculator(1200 + 300) → 1500] 1,600 (sic). 7 = 7. 5 / 0 = 1.")
    assert "<<" not in alignment_data.calculator(text)
