"""Recovering a LLaMA-3.1-70B-shaped LoRAM adapter (ratio 0.85, layers [4, 78), r = 8, the seven
projections + lm_head, 80 layers), side by side with the physical reference: loading and saving the
same output bytes with safetensors. Random tensors and a random (valid) manifest are made here; no
model weights are needed, only config.json and the manifest, as in real use.
Targets: recovery within 2x of the reference's time; peak memory below 2x the output adapter's size.
Usage: python benchmarks/recover_70b.py [--scale full|small]
"""

import argparse
import json
import tempfile
from pathlib import Path

from _common import machine, run_measured, write

BUILD = """
import json, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import LlamaConfig
import loram
from loram.shared.architectures import Shape, kept_kv_heads, kept_mlp_channels
from loram.shared.manifest import BaseModelInfo, Manifest, Method
from loram.shared.pruned_model import build_pruned_config
root = Path({root!r})
stock = LlamaConfig(hidden_size={hidden}, num_hidden_layers={layers}, num_attention_heads=64, num_key_value_heads=8,
                    head_dim={head_dim}, intermediate_size={inter}, vocab_size={vocab}, tie_word_embeddings=False)
shape = Shape.of(stock)
start, stop = 4, {layers} - 2
g = torch.Generator().manual_seed(0)
kv = {{i: torch.randperm(8, generator=g)[:kept_kv_heads(shape, 0.85)].sort().values for i in range(start, stop)}}
ch = {{i: torch.randperm({inter}, generator=g)[:kept_mlp_channels({inter}, 0.85)].sort().values
      for i in range(start, stop)}}
pruned = root / 'pruned'
pruned.mkdir(parents=True)
config = build_pruned_config(stock, {{i: (len(kv[i]), len(ch[i])) for i in kv}})
config.save_pretrained(pruned)
Manifest(base=BaseModelInfo('meta-llama/Llama-3.1-70B', 'main', {{}}), architecture=shape,
         method=Method(kind='structured', criterion='random', ratio=0.85, layers=[start, stop], seed=0),
         kept_kv_heads=kv, kept_mlp_channels=ch).save(pruned)
tensors = {{}}
r = 8
for i in range({layers}):
    pcfg = config.per_layer_config[i] if i in kv else stock
    q, k = pcfg.num_attention_heads * {head_dim}, pcfg.num_key_value_heads * {head_dim}
    I = pcfg.intermediate_size
    shapes = dict(q_proj=({hidden}, q), k_proj=({hidden}, k), v_proj=({hidden}, k), o_proj=(q, {hidden}),
                  gate_proj=({hidden}, I), up_proj=({hidden}, I), down_proj=(I, {hidden}))
    for name, (fin, fout) in shapes.items():
        group = 'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'
        p = f'base_model.model.model.layers.{{i}}.{{group}}.{{name}}'
        tensors[p + '.lora_A.weight'] = torch.randn(r, fin, generator=g)
        tensors[p + '.lora_B.weight'] = torch.randn(fout, r, generator=g)
tensors['base_model.model.lm_head.lora_A.weight'] = torch.randn(r, {hidden}, generator=g)
tensors['base_model.model.lm_head.lora_B.weight'] = torch.randn({vocab}, r, generator=g)
adapter = root / 'adapter'
adapter.mkdir()
save_file(tensors, str(adapter / 'adapter_model.safetensors'))
(adapter / 'adapter_config.json').write_text(json.dumps(dict(peft_type='LORA', r=r, lora_alpha=16,
    base_model_name_or_path=str(pruned), revision=None, task_type='CAUSAL_LM',
    target_modules=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj','lm_head'])))
result = dict(input_bytes=(adapter / 'adapter_model.safetensors').stat().st_size)
"""

BASELINE_REF = """
import torch
from safetensors.torch import load_file, save_file
result = dict()
"""

BASELINE_OURS = """
import loram
from loram.recover import recover
result = dict()
"""

RECOVER = """
import time, loram
from loram.recover import recover
start = time.perf_counter()
r = recover(adapter={adapter!r}, out={out!r})
result = dict(seconds=round(time.perf_counter() - start, 2), expanded=r.expanded)
"""

REFERENCE = """
import time
from safetensors.torch import load_file, save_file
start = time.perf_counter()
save_file(load_file({src!r}), {dst!r})
result = dict(seconds=round(time.perf_counter() - start, 2))
"""

SCALES = {"full": dict(hidden=8192, layers=80, head_dim=128, inter=28672, vocab=128256),
          "small": dict(hidden=1024, layers=12, head_dim=16, inter=3584, vocab=16000)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=tuple(SCALES), default="full")
    args = ap.parse_args()
    dims = SCALES[args.scale]
    with tempfile.TemporaryDirectory() as tmp:
        built = run_measured(BUILD.format(root=tmp, **dims))
        base_ref, base = run_measured(BASELINE_REF), run_measured(BASELINE_OURS)
        ours = run_measured(RECOVER.format(adapter=f"{tmp}/adapter", out=f"{tmp}/recovered"))
        out_bytes = (Path(tmp) / "recovered" / "adapter_model.safetensors").stat().st_size
        ref = run_measured(REFERENCE.format(src=f"{tmp}/recovered/adapter_model.safetensors", dst=f"{tmp}/copy"))
    mib = 2**20
    over = lambda r, b=base: r["peak_rss_mib"] - b["peak_rss_mib"]  # noqa: E731
    data = {"machine": machine(), "scale": args.scale, "dims": dims, "input_bytes": built["input_bytes"],
            "output_bytes": out_bytes, "baseline": base, "baseline_reference": base_ref, "recover": ours, "reference": ref,
            "time_ratio": round(ours["seconds"] / ref["seconds"], 2),
            "peak_over_output": round(over(ours) * mib / out_bytes, 2)}
    table = [f"# Recovering a LLaMA-3.1-70B-shaped adapter ({args.scale}: {json.dumps(dims)})", "",
             f"Input (pruned-space) adapter {built['input_bytes'] / mib:,.0f} MiB; recovered {out_bytes / mib:,.0f} MiB "
             f"({ours['expanded']} tensors expanded).", "",
             "| step | time (s) | peak RSS (MiB) | above its import-only baseline (MiB) |", "|---|---|---|---|",
             f"| import-only baselines: torch + safetensors / loram | - | {base_ref['peak_rss_mib']:,.0f} / "
             f"{base['peak_rss_mib']:,.0f} | 0 |",
             f"| reference: safetensors load + save of the output bytes | {ref['seconds']} | "
             f"{ref['peak_rss_mib']:,.0f} | {over(ref, base_ref):,.0f} |",
             f"| `loram recover` | {ours['seconds']} | {ours['peak_rss_mib']:,.0f} | {over(ours):,.0f} |", "",
             f"time ratio recover / reference: **{data['time_ratio']}x** (target <= 2); recovery peak above baseline "
             f"/ output size: **{data['peak_over_output']}x** (target < 2)."]
    write(f"recover_70b{'' if args.scale == 'full' else '_' + args.scale}", data, table)


if __name__ == "__main__":
    main()
