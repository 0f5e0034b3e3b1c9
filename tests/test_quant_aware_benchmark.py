"""benchmarks/quant_aware.py: its NF4 round trip is bitsandbytes' (without double quantization), and a patched
linear computes with the round-tripped weight while its gradient reaches the full-precision weight unchanged."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import quant_aware  # noqa: E402


@pytest.mark.parametrize("shape", [(96, 64), (130, 100), (7, 9)])  # blocks crossing rows; a partial last block
def test_nf4_roundtrip_equals_bitsandbytes(shape):
    from bitsandbytes.functional import dequantize_4bit, get_4bit_type, quantize_4bit

    assert torch.equal(quant_aware.NF4, get_4bit_type("nf4", device="cpu"))
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    expected = dequantize_4bit(packed, state)
    got = quant_aware.nf4_roundtrip(w)
    assert torch.equal(got, expected)
    assert 0 < (got - w).abs().max() < 0.02  # it does quantize


def test_fake_quant_linear_is_straight_through():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    plain = torch.nn.Linear(64, 32)
    plain.load_state_dict(layer.state_dict())
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Sequential(layer)])
    assert quant_aware.quantize_student(model) == 1
    x = torch.randn(5, 64)
    out = layer(x)
    assert torch.allclose(out, torch.nn.functional.linear(x, quant_aware.nf4_roundtrip(layer.weight), layer.bias))
    assert not torch.allclose(out, plain(x))
    out.sum().backward()
    plain(x).sum().backward()
    assert torch.allclose(layer.weight.grad, plain.weight.grad)  # d out / d W is x either way
