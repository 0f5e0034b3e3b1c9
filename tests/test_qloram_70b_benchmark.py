"""benchmarks/qloram_70b.py: the chunked NF4 build equals bitsandbytes' own quantization, the full-scale
plan and counts match the paper, and the scaled-down QLoRAM run trains and writes its results (CPU, ~10 s)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import qloram_70b  # noqa: E402

from loram.accounting import plan_params  # noqa: E402

RESULT_KEYS = {"machine", "settings", "device", "compute_dtype", "shape", "params", "build", "steps", "losses",
               "loss_finite", "lora_grads_nonzero", "measured", "plan", "plan_total_bytes",
               "plan_total_without_mapped_bytes", "budget_bytes", "fits_20gib", "verdict"}


@pytest.mark.parametrize("rows, cols, chunk_rows", [(130, 100, 64), (256, 96, 128), (64, 33, 64)])
def test_quantize_nf4_in_chunks_equals_bitsandbytes(rows, cols, chunk_rows):
    """Row chunks (the last one partial, blocks crossing rows) give quantize_4bit's packed codes and state."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = qloram_70b.quantize_nf4(w.split(chunk_rows), (rows, cols))
    ref_packed, ref = quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.offset, ref.offset)
    assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.code, ref.code)
    assert (state.shape, state.blocksize, state.dtype) == (ref.shape, ref.blocksize, ref.dtype)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(ref_packed, ref))


def test_full_scale_plan_matches_the_paper():
    """--plan-only at full scale: LLaMA-3.1-70B at 0.85 keeps 16/2 heads and 4300 channels, 17.85 B parameters
    (docs/method.md §7), and the memory plan for batch 1 x 512 with checkpointing is under 20 GiB."""
    out = qloram_70b.main(["--scale", "full", "--plan-only", "--device", "cuda"])
    assert out["training_params"] == 17_849_982_976
    assert out["plan"]["fits"] is True and out["plan"]["total_bytes"] < 20 * 2**30
    assert (out["plan"]["quant"], out["plan"]["dtype"], out["plan"]["gradient_checkpointing"]) == \
        ("nf4", "bfloat16", True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    data = qloram_70b.main(["--scale", "tiny", "--device", "cpu", "--steps", "2", "--seq-len", "128",
                            "--chunk-elems", "65536", "--results-dir", str(results), "--out", "tiny"])
    return data, results


def test_tiny_run_trains(tiny_run):
    data, _ = tiny_run
    vocab = qloram_70b.TINY["vocab_size"]
    assert data["loss_finite"] and len(data["losses"]) == 2
    for loss in data["losses"]:  # random weights and tokens: about ln(V)
        assert math.isfinite(loss) and abs(loss - math.log(vocab)) < 1.0
    first, second = data["steps"]
    # Step 1: every lora_B gets a gradient, every lora_A exactly none (B starts at zero); step 2: all of them.
    assert first["lora_B_with_grad"] == first["lora_B_tensors"] == 8 * 7
    assert first["lora_A_with_grad"] == 0
    assert second["lora_A_with_grad"] == second["lora_A_tensors"] == 8 * 7
    assert second["lora_B_with_grad"] == second["lora_B_tensors"]
    assert data["lora_grads_nonzero"] is True


def test_tiny_run_counts_equal_the_accounting(tiny_run):
    data, _ = tiny_run
    accounting = plan_params({**qloram_70b.TINY, "model_type": "llama"}, "structured", 0.85, layers="4:-2")
    assert data["params"]["training_model"] == accounting.training_params == data["params"]["training_accounting"]
    assert data["params"]["training_model"] < data["params"]["original"]
    # The paper's rounding at this head layout keeps what it keeps at 70B: 2 KV groups of 8 query heads.
    assert (data["shape"]["kept_kv_heads"], data["shape"]["kept_q_heads"]) == (2, 16)
    assert data["shape"]["kept_channels"] == int(qloram_70b.TINY["intermediate_size"] * (1 - 0.85))
    assert data["params"]["lora"] == data["plan"]["lora_params"]


def test_tiny_run_writes_results(tiny_run):
    data, results = tiny_run
    written = json.loads((results / "tiny.json").read_text())
    assert set(written) >= RESULT_KEYS
    assert written["losses"] == data["losses"]
    assert written["measured"]["kind"] == "process_peak_rss" and written["measured"]["peak_bytes"] > 0
    assert written["plan_total_bytes"] == written["plan"]["total_bytes"] > 0
    assert written["plan"]["device"] == "cpu" and written["plan"]["batch"] == 1 and written["plan"]["seq_len"] == 128
    assert written["fits_20gib"] is None and written["verdict"].startswith("fits 20 GiB: n/a")
    markdown = (results / "tiny.md").read_text()
    assert "fits 20 GiB" in markdown and "| plan: total |" in markdown
