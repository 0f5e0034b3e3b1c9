"""Non-structured pruning of the real SmolLM2 at 2:4: the quality order of the references.

docs/method.md §9 (reference implementations, held-out Wikipedia, relative to dense): SparseGPT 2:4
about 3.8x, Wanda 2:4 about 7.3x; magnitude is far worse. A smaller calibration (16 x 256) and
evaluation (24 windows) than the benchmark keep this test to a couple of minutes.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loram.perplexity import perplexity, text_windows
from loram.publisher.prune import prune
from loram.shared import assets


@pytest.mark.slow
def test_sparsegpt_beats_wanda_beats_magnitude_at_2_4(tmp_path):
    base = assets.model_dir()
    windows = text_windows(AutoTokenizer.from_pretrained(base), assets.read_texts("wiki-heldout"), 256, 24)

    def ppl(path) -> float:
        return perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), windows, progress=False)

    dense = ppl(base)
    relative = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = prune(base=str(base), out=tmp_path / method, method=method, nm="2:4", samples=16, seq_len=256).out
        relative[method] = ppl(out) / dense
        for f in out.glob("*.safetensors"):  # keep the disk footprint of the test small
            f.unlink()
    assert relative["sparsegpt"] <= relative["wanda"] < relative["magnitude"], relative
    assert 2.0 < relative["sparsegpt"] < 6.0 and 4.0 < relative["wanda"] < 12.0, relative
