"""benchmarks/notation_loss.py's split of the GSM8K metric: which response tokens are GSM8K's notation."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import notation_loss  # noqa: E402


def test_notation_tokens_are_the_annotations_and_the_final_line():
    from transformers import AutoTokenizer

    from loram.shared.assets import model_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    answer = "Half of 48 is 48/2 = <<48/2=24>>24 clips.\n#### 24"
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    kinds = notation_loss.token_kinds(tokenizer, ids)
    notation = "".join(tokenizer.decode([i]) for i, k in zip(ids, kinds, strict=True) if k)
    rest = "".join(tokenizer.decode([i]) for i, k in zip(ids, kinds, strict=True) if not k)
    assert notation.replace(" ", "") == "<<48/2=24>>####24"
    assert rest.replace(" ", "") == "Halfof48is48/2=24clips.\n"  # a token may carry the space before `<<`
    assert not any(notation_loss.token_kinds(tokenizer, tokenizer("No notation here.").input_ids))
