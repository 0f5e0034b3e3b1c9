"""Cost of layer-sequential Wanda and SparseGPT on SmolLM2-135M: time per layer and peak memory.

Each step runs in its own fresh process (peak RSS is that step's alone), calibrating on the same
blocks of the Wikipedia split at 50% unstructured sparsity over all 30 layers:
- `wanda`, `sparsegpt`: `loram.publisher.layerwise.prune_layerwise` as the command runs it;
- `reference`: SparseGPT's physical floor per layer: one pass through the layer accumulating the
  Hessians of its linears' inputs, one Cholesky factorization per Hessian, and the pass that
  produces the next layer's inputs (which any layer-sequential method pays). SparseGPT's ratio to it
  is the price of its column-by-column Optimal Brain Surgeon update.
Memory beyond the weights is the process's peak RSS minus its RSS right after loading the model
(every weight page touched: safetensors weights are memory-mapped and count only once read) and
the calibration tokens; the expectation is one layer (fp32), the calibration activations (the
inputs and outputs of a layer, samples x seq_len x hidden x 4 bytes each), the layer's statistics,
the transient activations of one chunk of 8 samples inside the layer, and the masks (1 bit per
weight).
Usage: python benchmarks/prune_sparse.py [--samples 32 --seq-len 256]
"""

import argparse

from _common import machine, run_measured, write

SETUP = """
import time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from loram.shared import assets
from loram.shared.runtime import configure_threads
from loram.publisher.calibration import token_blocks
from loram.publisher.layerwise import prune_layerwise, capture_layer_inputs, _collect, _run
from loram.publisher.sparsity import Target, damped_inverse_factor

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024

configure_threads()
path = assets.model_dir()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
calib = token_blocks(AutoTokenizer.from_pretrained(path), 'wiki', {samples}, {seq_len})
for p in model.parameters():  # fault the (memory-mapped) weights in, so the baseline holds them
    float(p.detach().sum())
layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
result = dict(layer_mib=round(layer_bytes / 2**20, 1), rss_after_load_mib=round(rss() / 2**20, 1))
"""

PRUNE = SETUP + """
start = time.perf_counter()
done = prune_layerwise(model, range(len(model.model.layers)), '{method}', Target(sparsity=0.5), calib, 'cpu')
result['seconds'] = round(time.perf_counter() - start, 2)
result['per_layer'] = [round(s, 3) for s in done.seconds.values()]
"""

REFERENCE = SETUP + """
start = time.perf_counter()
chunks = capture_layer_inputs(model, calib, torch.device('cpu'), 8)
per_layer = []
for layer in model.model.layers:
    t = time.perf_counter()
    with torch.no_grad():
        for name, h in _collect(layer, chunks, 'sparsegpt').items():
            torch.linalg.cholesky(h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0]))
        outs = _run(layer, chunks)
    chunks = [(o, kw) for o, (_, kw) in zip(outs, chunks)]
    per_layer.append(round(time.perf_counter() - t, 3))
result['seconds'] = round(time.perf_counter() - start, 2)
result['per_layer'] = per_layer
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    fmt = {"samples": args.samples, "seq_len": args.seq_len}
    # A fixed glibc mmap threshold returns freed temporaries to the system; with the default dynamic
    # threshold, heap fragmentation made the same run's peak vary between +90 and +700 MiB.
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = {"reference": run_measured(REFERENCE.format(**fmt), env)}
    for method in ("wanda", "sparsegpt"):
        runs[method] = run_measured(PRUNE.format(method=method, **fmt), env)
    hidden, inter, heads_dim, kv_dim, heads, layers = 576, 1536, 576, 192, 9, 30  # SmolLM2-135M
    activations = 2 * args.samples * args.seq_len * hidden * 4
    stats = {"wanda": 4 * (2 * hidden + heads_dim + inter), "sparsegpt": 4 * (2 * hidden ** 2 + heads_dim ** 2 + inter ** 2)}
    masks = layers * hidden * (2 * heads_dim + 2 * kv_dim + 3 * inter) // 8  # 1 bit per weight
    chunk = 8 * args.seq_len  # tokens of one chunk run through the layer at a time
    transient = 4 * chunk * (4 * inter + 4 * hidden) + 2 * 4 * 8 * heads * args.seq_len ** 2  # MLP, q/k/v/o, scores
    rows = []
    for name, r in runs.items():
        per = r["per_layer"]
        beyond = r["peak_rss_mib"] - r["rss_after_load_mib"]
        expected = r["layer_mib"] + (activations + stats.get(name, stats["sparsegpt"]) + transient
                                     + (masks if name != "reference" else 0)) / 2**20
        rows.append({"step": name, "seconds": r["seconds"], "mean_layer_s": round(sum(per) / len(per), 3),
                     "max_layer_s": max(per), "peak_rss_mib": r["peak_rss_mib"],
                     "rss_after_load_mib": r["rss_after_load_mib"], "beyond_weights_mib": round(beyond, 1),
                     "one_layer_plus_activations_mib": round(expected, 1),
                     "time_vs_reference": round(r["seconds"] / runs["reference"]["seconds"], 2)})
    table = [f"# Layer-sequential non-structured pruning cost, SmolLM2-135M (30 layers), 50% unstructured, "
             f"calibration {args.samples} x {args.seq_len} tokens", "",
             "Fresh process per row, fp32, CPU. `reference`: one Hessian accumulation + one Cholesky per Hessian + "
             "the forward that feeds the next layer, per layer. `beyond weights`: peak RSS minus RSS after loading "
             "the model (weights resident); `expected`: one layer + calibration inputs and outputs + the layer's "
             "statistics + the transient activations of one chunk of 8 samples inside the layer + the bit-packed "
             "masks of all layers. Processes run with `MALLOC_MMAP_THRESHOLD_=131072` (see the script).", "",
             "| step | total (s) | mean per layer (s) | max per layer (s) | time vs reference | peak RSS (MiB) | "
             "beyond weights (MiB) | expected (MiB) |", "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['step']} | {r['seconds']} | {r['mean_layer_s']} | {r['max_layer_s']} | {r['time_vs_reference']}x | "
              f"{r['peak_rss_mib']} | {r['beyond_weights_mib']} | {r['one_layer_plus_activations_mib']} |" for r in rows]
    write("prune_sparse", {"machine": machine(), "samples": args.samples, "seq_len": args.seq_len, "rows": rows}, table)


if __name__ == "__main__":
    main()
