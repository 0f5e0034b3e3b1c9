"""A candidate alignment option, measured by the alignment grid and not (yet) in `loram publish align`.

Quantization-aware alignment: a QLoRA consumer (`loram train --quant nf4`, what `loram demo` runs when
bitsandbytes is installed) trains its adapter on the aligned model's decoder linears quantized to NF4, not on
the weights alignment wrote. This prototype aligns the model as the consumer will run it: every decoder linear
of the student computes with its weight NF4-quantized and dequantized (blocks of 64 along the flattened weight,
absmax scale, nearest of the 16 NF4 levels: bitsandbytes' scheme), the gradient passing straight through to the
full-precision weight (the straight-through estimator). The teacher (the original) stays in full precision, so
what is matched is the quantized pruned model against the original.

    python benchmarks/quant_aware.py -- publish align PRUNED --data wiki-chat ... --out ALIGNED

The arguments after `--` are those of `loram publish align` (one process). The output is an ordinary aligned
checkpoint of full-precision weights. The grid runs it for the objectives in `alignment_grid.PROTOTYPES`.

How much NF4 adds to what alignment has to match, first (results/quant_aware_error.md):

    python benchmarks/quant_aware.py --error NAME=MODEL ...

the relative squared error ||h - h_orig||^2 / ||h_orig||^2 of every decoder layer's output against the
original's in full precision, per position, averaged over the positions of 16 GSM8K training items in chat form
(items the demo's adapter trains on; no held-out item), for each model loaded in full precision and in NF4 as
`loram train --quant nf4` loads it (double quantization, which this prototype's round trip leaves out).
"""

import sys
import types

import torch
import torch.nn.functional as F
from _common import align_argv, before_first_loss, gsm8k_chat_ids, run_loram

# bitsandbytes' NF4 code (bitsandbytes.functional.get_4bit_type("nf4"))
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2
BLOCK = 64


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """`w` quantized to NF4 in blocks of 64 of its flattened entries and dequantized (no double quantization)."""
    flat = w.detach().float().flatten()
    pad = (-flat.numel()) % BLOCK
    blocks = F.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    levels, mids = NF4.to(w.device), MIDPOINTS.to(w.device)
    q = levels[torch.bucketize(blocks / absmax, mids)] * absmax
    return q.flatten()[:flat.numel()].view_as(w).to(w.dtype)


def fake_quant_forward(self, x):
    w = self.weight
    return F.linear(x, w + (nf4_roundtrip(w) - w).detach(), self.bias)


def quantize_student(model) -> int:
    """Every decoder layer's nn.Linear computes with its NF4 round trip (straight-through); returns how many."""
    n = 0
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.forward = types.MethodType(fake_quant_forward, m)
                n += 1
    return n


def hidden_error(models: dict[str, str], items: int = 16) -> dict:
    """Per model and precision: the relative hidden-state error of each decoder layer against the original."""
    from transformers import AutoTokenizer

    from loram.loading import load_causal_lm
    from loram.shared.assets import model_dir
    from loram.shared.runtime import configure_threads

    configure_threads()
    base = str(model_dir())
    tok = AutoTokenizer.from_pretrained(base)
    ids = gsm8k_chat_ids(tok, items)

    def states(path: str, quant: str) -> list[torch.Tensor]:
        model = load_causal_lm(path, quant)
        with torch.no_grad():
            return [torch.stack(model(x, output_hidden_states=True).hidden_states[1:])[:, 0] for x in ids]
    reference = states(base, "none")
    out = {}
    for name, path in {"original": base, **models}.items():
        for quant in ("none", "nf4"):
            if name == "original" and quant == "none":
                continue
            per_layer = torch.stack([((h - r) ** 2).sum(-1).div((r ** 2).sum(-1)).mean(-1)
                                     for h, r in zip(states(path, quant), reference, strict=True)]).mean(0)
            out[f"{name}/{quant}"] = {"mean": round(per_layer.mean().item(), 4),
                                      "per_layer": [round(x, 4) for x in per_layer.tolist()]}
            print(f"{name}/{quant}: mean {out[f'{name}/{quant}']['mean']}", flush=True)
    return out


def write_error(models: dict[str, str]) -> None:
    from _common import machine, write

    errors = hidden_error(models)
    layers = len(next(iter(errors.values()))["per_layer"])
    table = ["Relative hidden-state error against the original in full precision (`python benchmarks/quant_aware.py "
             "--error ...`), per decoder layer output, mean over the positions of 16 GSM8K training items:", "",
             "| model | weights | mean over layers | layers 0-3 | last layer |", "|---|---|---|---|---|"]
    for key, e in errors.items():
        name, quant = key.split("/")
        table.append(f"| {name} | {'NF4' if quant == 'nf4' else 'fp32'} | {e['mean']:.4f} | "
                     f"{sum(e['per_layer'][:4]) / 4:.4f} | {e['per_layer'][layers - 1]:.4f} |")
    write("quant_aware_error", {"machine": machine(), "models": models, "errors": errors}, table)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--error"]:
        return write_error(dict(a.split("=", 1) for a in argv[1:]))
    argv = align_argv(argv, "quant_aware.py -- publish align PRUNED ... (see the docstring)")
    before_first_loss(lambda model: print(f"quant_aware: {quantize_student(model)} decoder linears compute in NF4 "
                                          "(straight-through)", file=sys.stderr))
    run_loram(argv)


if __name__ == "__main__":
    main()
