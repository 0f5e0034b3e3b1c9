"""Taylor pruning of SmolLM2-135M at ratio 0.5, side by side with its irreducible cost.

Each step runs in its own fresh process so peak RSS is that step's alone:
- load only: a process that only loads the model. Its safetensors weights are memory-mapped and count
  only once read, so this baseline holds a fraction of them;
- weights resident: load, read the calibration tokens, read every weight once. The floor of any
  criterion that runs the model on the calibration text;
- reference: one forward + backward pass over the same calibration tokens in chunks of the same
  size, with gradient checkpointing, as training would run it (gradients of every weight);
- `loram publish prune --method taylor --kv-score taylor` (score, slice, save), with the sha256 of its
  manifest's tensors (the kept indices), to compare runs of different code;
- the same with the default `--kv-score loss` (the Taylor pass, then the KV-group losses on 8 samples).
Usage: python benchmarks/prune_taylor.py [--samples 32 --seq-len 128 --calib-batch 4]
"""

import argparse
import tempfile

from _common import machine, run_measured, write

from loram.publisher.importance.taylor import CALIB_BATCH

SETUP = """
import time, torch, loram
from transformers import AutoModelForCausalLM, AutoTokenizer
from loram.shared import assets
from loram.shared.runtime import configure_threads
configure_threads()
path = assets.model_dir()
result = dict()
"""

LOAD_ONLY = SETUP + """
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
result['weights_mib'] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
"""

RESIDENT = SETUP + """
from loram.publisher.calibration import token_blocks
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
calib = token_blocks(AutoTokenizer.from_pretrained(path), 'wiki', {samples}, {seq_len})
for p in model.parameters():  # fault the (memory-mapped) weights in
    float(p.detach().sum())
"""

REFERENCE = SETUP + """
from loram.publisher.calibration import token_blocks
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
calib = token_blocks(AutoTokenizer.from_pretrained(path), 'wiki', {samples}, {seq_len})
model.train(); model.activation_checkpointing_enable({{'use_reentrant': False}})
start = time.perf_counter()
for i in range(0, len(calib), {calib_batch}):
    b = calib[i:i + {calib_batch}]
    model(input_ids=b, labels=b, use_cache=False).loss.backward()
result['seconds'] = round(time.perf_counter() - start, 2)
"""

PRUNE = SETUP + """
from loram.publisher.prune import prune
start = time.perf_counter()
r = prune(base=str(path), out='{out}', method='taylor', ratio=0.5, samples={samples}, seq_len={seq_len},
          calib_batch={calib_batch}, device='cpu', kv_score='{kv_score}')
result['seconds'] = round(time.perf_counter() - start, 2)
result['params'] = [r.original_params, r.pruned_params]
import hashlib
result['kept_sha256'] = hashlib.sha256(open('{out}/loram_manifest.safetensors', 'rb').read()).hexdigest()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=CALIB_BATCH)
    args = ap.parse_args()
    fmt = {"samples": args.samples, "seq_len": args.seq_len, "calib_batch": args.calib_batch}
    base = run_measured(LOAD_ONLY)
    resident = run_measured(RESIDENT.format(**fmt))
    ref = run_measured(REFERENCE.format(**fmt))
    with tempfile.TemporaryDirectory() as tmp:
        pruned = run_measured(PRUNE.format(out=f"{tmp}/p50", kv_score="taylor", **fmt))
        loss = run_measured(PRUNE.format(out=f"{tmp}/p50-loss", kv_score="loss", **fmt))
    from transformers import AutoConfig

    from loram.shared import assets

    cfg = AutoConfig.from_pretrained(assets.model_dir())
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    layer_mib = round((2 * h * h + 2 * h * kv + 3 * h * i) * 4 / 2**20, 1)
    data = {"machine": machine(), "calibration": fmt, "load_only": base, "weights_resident": resident,
            "reference_fwd_bwd": ref, "taylor_prune": pruned, "default_prune": loss, "one_layer_mib": layer_mib,
            "time_ratio": round(pruned["seconds"] / ref["seconds"], 2),
            "peak_ratio": round(pruned["peak_rss_mib"] / ref["peak_rss_mib"], 2)}
    over = lambda r, b=base: round(r["peak_rss_mib"] - b["peak_rss_mib"], 1)  # noqa: E731
    cells = lambda r: f"{r['peak_rss_mib']} | {over(r)} | {over(r, resident)}"  # noqa: E731
    table = [
        f"# Taylor pruning of SmolLM2-135M (ratio 0.5, {args.samples} x {args.seq_len} calibration tokens, "
        f"chunks of {args.calib_batch} samples)", "",
        "| step | time (s) | peak RSS (MiB) | peak above load-only (MiB) | peak above weights resident (MiB) |",
        "|---|---|---|---|---|",
        f"| load only (baseline process; weights memory-mapped, mostly unread) | - | {base['peak_rss_mib']} | 0 | - |",
        f"| weights resident: load, calibration tokens, every weight read | - | {cells(resident)} |",
        f"| reference: one fwd+bwd over the calibration tokens | {ref['seconds']} | {cells(ref)} |",
        f"| `loram publish prune --method taylor --kv-score taylor` (score, slice, save) | {pruned['seconds']} | "
        f"{cells(pruned)} |",
        f"| the default `--kv-score loss` (+ KV-group losses on 8 samples) | {loss['seconds']} | {cells(loss)} |",
        "", f"time ratio prune / reference: **{data['time_ratio']}x**; peak ratio: **{data['peak_ratio']}x**. "
        f"Weights: {base['weights_mib']} MiB fp32; one decoder layer: {layer_mib} MiB. "
        f"Kept units (sha256 of loram_manifest.safetensors): `{pruned['kept_sha256'][:16]}` (taylor), "
        f"`{loss['kept_sha256'][:16]}` (loss).",
    ]
    write("prune_taylor", data, table)


if __name__ == "__main__":
    main()
