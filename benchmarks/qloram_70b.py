"""QLoRAM on LLaMA-3.1-70B pruned at 0.85: measured peak memory of a few training steps, against the plan.

The paper's claim (docs/method.md §5, §7): LoRA training of LLaMA-3.1-70B structurally pruned at p=0.85
(16 q / 2 KV heads and 4,300 MLP channels in layers [4, 78)), with NF4 base weights, fits a 20 GB GPU.
This script builds that model with random weights, runs `--steps` QLoRAM steps and writes the measured
peak next to `loram.memory_plan.plan_memory` for the same settings, with a "fits 20 GiB" verdict.

    GPU, the claim (one call; ~1-2 min expected on an H200 or A100 80GB, see "Time" below):
        python benchmarks/qloram_70b.py --scale full --device cuda
    CPU, scaled down (CI runs it through tests/test_qloram_70b_benchmark.py; seconds):
        python benchmarks/qloram_70b.py --scale tiny --device cpu --steps 2
    The plan and the parameter check only, no weights (any machine, seconds):
        python benchmarks/qloram_70b.py --scale full --plan-only

Build (no 16-bit copy of the model ever exists, on the device or on the host):
    stock LlamaConfig -> kept KV heads / MLP channels by the paper's rounding (architectures.py)
    -> build_pruned_config -> LoramLlamaForCausalLM on the meta device
    -> layer by layer, each of the 7 projections becomes a bitsandbytes Linear4bit (NF4, double
       quantization) whose weight is N(0, initializer_range) drawn on the target device a chunk of rows
       at a time (`--chunk-elems`), each chunk quantized by `bnb.functional.quantize_4bit`, and the
       chunks joined into the one QuantState `quantize_4bit(W, compress_statistics=True)` would give
       (`quantize_nf4`; the test checks it bit for bit)
    -> embeddings, lm_head and norms in the compute dtype (bf16 on CUDA, fp32 on CPU), as bitsandbytes keeps them
    -> `disable_cpu_packed_4bit`, activation checkpointing (non-reentrant), peft LoRA r=8 on q,k,v,o,gate,up,down.

Not `peft.prepare_model_for_kbit_training`: it casts every non-4-bit parameter to fp32, which here means
embeddings and lm_head, 2 x 128256 x 8192: 8 GiB in fp32 instead of 4 GiB in bf16, i.e. +4 GiB that
neither the paper's setting nor the memory plan (non-quantized weights in the compute dtype) holds.
What it adds besides is not needed: the base is already frozen, and activation checkpointing in
transformers already registers the input-embedding hook that `enable_input_require_grads` would.

Checks (assert): the built model's parameters (a 4-bit weight counted as out x in) equal the
accounting's `training_params`; its NF4 storage equals `accounting.nf4_bytes` summed over the decoder
linears; its LoRA parameters equal the plan's `lora_params`. Per step: loss, time, which LoRA tensors got
a non-zero gradient (lora_A's are all zero at step 1, since lora_B starts at zero), peak memory.

Memory: on CUDA `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the training steps (peaks
reset after the build), and the device-level use (`mem_get_info`: CUDA context + what the caching
allocator holds) right after them, which is what a 20 GiB card must hold; the verdict uses that. On CPU,
the process's peak RSS over the steps (VmHWM, reset through /proc/self/clear_refs where Linux allows).

Time (measured on CPU, extrapolated): bitsandbytes' CPU quantization runs at ~27 M weights/s on 2 cores,
so the 15.7 G decoder-linear weights of the full model would take ~10 min on CPU; on a GPU its kernel is
memory-bound (31 GB of bf16 read), well under a minute with the per-chunk Python overhead. A step of the
full model is ~3 forward passes of 17.8 G parameters over 512 tokens (forward, recompute, backward),
~60 TFLOP, a few seconds on an H200 or A100 including the dequantization of every weight. Expected
wall time at full scale: imports and plan ~15 s, build under a minute, 3 steps well under a minute.
"""

import argparse
import math
import re
import resource
import sys
import time
from pathlib import Path

import _common
import torch

GiB, MiB = 2**30, 2**20
BUDGET = 20 * GiB
# LLaMA-3.1-70B's public config.json (shapes, RoPE and ids; nothing here changes a parameter count but the shapes).
LLAMA31_70B = dict(
    hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
    intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
    rms_norm_eps=1e-5, initializer_range=0.02, bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    dtype="bfloat16",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# CPU scale: the same head layout (64 q / 8 KV heads, G = 8, hidden = 64 x head_dim) and I / H = 3.5, so the
# paper's rounding keeps 2 KV groups of 8 as at full scale; 8 layers, so [4, -2) prunes two of them.
TINY = {**LLAMA31_70B, "hidden_size": 512, "num_hidden_layers": 8, "head_dim": 8, "intermediate_size": 1792,
        "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2}
SCALES = {"full": LLAMA31_70B, "tiny": TINY}
CHUNK_ELEMS = 2**26  # 64 M weights per random chunk: 128 MiB in bf16


class Log:
    """Stage lines with the seconds since the start, flushed at once (the run may be read live)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {msg}", flush=True)


def stock_config(scale: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SCALES[scale])


def pruned_config(stock, ratio: float, layers: str):
    """The LoRAM config: every layer in `layers` keeps the paper's rounded KV groups and MLP channels."""
    from loram.shared.architectures import Shape, kept_kv_heads, kept_mlp_channels, parse_layer_range
    from loram.shared.pruned_model import build_pruned_config

    shape = Shape.of(stock)
    start, stop = parse_layer_range(layers, shape.num_layers)
    kept = (kept_kv_heads(shape, ratio), kept_mlp_channels(shape.intermediate, ratio))
    return build_pruned_config(stock, {i: kept for i in range(start, stop)}), kept


def quantize_nf4(chunks, shape: tuple[int, int]):
    """NF4 + double quantization of a weight given as consecutive row chunks -> (packed, QuantState).

    Equal, bit for bit, to `bnb.functional.quantize_4bit(W, compress_statistics=True, quant_type="nf4")`
    on the concatenated W: each chunk (a multiple of the 64-weight block, but the last) yields its packed
    codes and fp32 block absmax; the absmax of the whole weight is then double-quantized once, as
    quantize_4bit does (offset = mean, 8-bit blockwise in blocks of 256). Only one chunk is ever 16-bit.
    """
    from bitsandbytes.functional import QuantState, quantize_4bit, quantize_blockwise

    packed, absmax, states = [], [], []
    for chunk in chunks:
        codes, state = quantize_4bit(chunk, compress_statistics=False, quant_type="nf4")
        packed.append(codes)
        absmax.append(state.absmax)
        states.append(state)
    first = states[0]
    absmax = torch.cat(absmax)
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    state = QuantState(absmax=qabsmax, shape=torch.Size(shape), code=first.code, blocksize=first.blocksize,
                       quant_type="nf4", dtype=first.dtype, offset=offset, state2=state2)
    return torch.cat(packed), state


def random_linear4bit(linear, dtype, device, generator, std: float, chunk_elems: int):
    """A bitsandbytes Linear4bit of `linear`'s shape holding NF4 codes of N(0, std) weights, drawn on `device`."""
    import bitsandbytes as bnb

    rows, cols = linear.out_features, linear.in_features
    step = max(64, chunk_elems // cols // 64 * 64)  # rows per chunk; 64 rows keep every chunk whole 64-blocks

    def chunks():
        for r in range(0, rows, step):
            n = min(step, rows - r)
            yield torch.randn(n, cols, generator=generator, device=device, dtype=dtype).mul_(std)

    packed, state = quantize_nf4(chunks(), (rows, cols))
    layer = bnb.nn.Linear4bit(cols, rows, bias=linear.bias is not None, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                     compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                     module=layer, bnb_quantized=True)
    layer.quant_state = state
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(torch.zeros(rows, dtype=dtype, device=device), requires_grad=False)
    return layer


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int, chunk_elems: int, log):
    """The LoRAM causal LM of `config` with random weights: decoder linears NF4, the rest in `dtype`."""
    from loram.loading import disable_cpu_packed_4bit
    from loram.shared.architectures import PRUNED_MODULES
    from loram.shared.modeling_loram import LoramLlamaForCausalLM

    with torch.device("meta"):
        model = LoramLlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        for spec in PRUNED_MODULES:
            parent_path, name = spec.path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            setattr(parent, name, random_linear4bit(getattr(parent, name), dtype, device, generator, std, chunk_elems))
        if (i + 1) % max(1, len(layers) // 8) == 0 or i + 1 == len(layers):
            log(f"  layer {i + 1}/{len(layers)} in NF4")
    for module in model.modules():  # embeddings, lm_head, norms: whatever is still on the meta device
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.empty(p.shape, dtype=dtype, device=device)
                if name == "weight" and p.dim() == 1:  # RMSNorm scale
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, std, generator=generator)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
    with torch.device(device):  # RoPE frequencies were computed on the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"still on the meta device: {left[:5]}"
    model.is_loaded_in_4bit = True  # peft wraps Linear4bit layers with its 4-bit LoRA only when this is set
    disable_cpu_packed_4bit(model)
    return model


def count_model(model) -> tuple[int, int]:
    """(parameters with a 4-bit weight counted as out x in, NF4 bytes of the decoder linears' weights)."""
    import bitsandbytes as bnb

    params = nf4 = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                s = p.quant_state
                params += module.in_features * module.out_features
                nf4 += sum(t.numel() * t.element_size() for t in
                           (p.data, s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code))
            else:
                params += p.numel()
    return params, nf4


def host_peak_rss() -> int:
    """Peak RSS of this process in bytes (VmHWM, which `reset_host_peak` restarts; else ru_maxrss)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:  # not Linux: the peak since the process started
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024
    return peak


def _proc_status_bytes(field: str) -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    except (OSError, TypeError):
        return None


def reset_host_peak() -> bool:
    """Restart the peak RSS at the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_peaks(device: torch.device) -> None:
    reset_host_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peaks(device: torch.device) -> dict:
    out = {"host_peak_rss_bytes": host_peak_rss()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out.update(cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                   cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(),
                   cuda_allocated_bytes=torch.cuda.memory_allocated(), cuda_device_used_bytes=total - free)
    return out


def train_steps(model, args, device: torch.device, vocab: int, log) -> list[dict]:
    """`args.steps` AdamW steps on random tokens; per step: loss, seconds, LoRA tensors with a gradient, peaks."""
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora.values(), lr=args.lr)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    steps = []
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator, device=device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        names = list(lora)
        grad_max = torch.stack([lora[n].grad.detach().abs().amax().float() for n in names]).cpu()
        grad_norm = torch.linalg.vector_norm(torch.stack([lora[n].grad.detach().float().norm() for n in names]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        with_grad = {n for n, g in zip(names, grad_max.tolist(), strict=True) if g > 0}
        row = {"step": step, "loss": loss.item(), "seconds": round(seconds, 3), "grad_norm": grad_norm.item(),
               "lora_A_with_grad": sum("lora_A" in n for n in with_grad),
               "lora_B_with_grad": sum("lora_B" in n for n in with_grad),
               "lora_A_tensors": sum("lora_A" in n for n in names),
               "lora_B_tensors": sum("lora_B" in n for n in names), **peaks(device)}
        steps.append(row)
        mem = (f"max allocated {row['cuda_max_allocated_bytes'] / GiB:.2f} GiB" if device.type == "cuda"
               else f"peak RSS {row['host_peak_rss_bytes'] / MiB:,.0f} MiB")
        log(f"step {step}/{args.steps}: loss {row['loss']:.4f}, {seconds:.2f} s, LoRA tensors with a gradient "
            f"A {row['lora_A_with_grad']}/{row['lora_A_tensors']} B {row['lora_B_with_grad']}/"
            f"{row['lora_B_tensors']}, {mem}")
    return steps


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=tuple(SCALES), default="full",
                    help="full: LLaMA-3.1-70B's shapes; tiny: the same head layout, small, for CPU")
    ap.add_argument("--ratio", type=float, default=0.85, help="structured pruning ratio (attention and MLP)")
    ap.add_argument("--layers", default="4:-2", help="pruned layers, half-open A:B")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (docs/method.md §5's reference)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--chunk-elems", type=int, default=CHUNK_ELEMS, help="weights drawn and quantized at a time")
    ap.add_argument("--out", default=None, help="results name (default qloram_70b, or qloram_70b_tiny)")
    ap.add_argument("--results-dir", type=Path, default=_common.RESULTS)
    ap.add_argument("--plan-only", action="store_true", help="print the plan and the parameter count; build nothing")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available() and not args.plan_only:
        ap.error("--device cuda: no CUDA device is available (--plan-only works without one)")
    args.out = args.out or ("qloram_70b" if args.scale == "full" else f"qloram_70b_{args.scale}")
    return args


def main(argv=None) -> dict:
    from loram.accounting import nf4_bytes, plan_params
    from loram.loading import compute_dtype
    from loram.memory_plan import TARGETS, plan_memory
    from loram.shared.architectures import LINEAR_NAMES
    from loram.shared.runtime import configure_threads

    args = parse_args(argv)
    log = Log()
    device = torch.device(args.device)
    # QLoRAM's compute dtype (loading.py): bf16 on CUDA (assumed for a --plan-only without a GPU), fp32 on CPU.
    dtype = torch.float32 if device.type == "cpu" else compute_dtype() if torch.cuda.is_available() else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        configure_threads()
    stock = stock_config(args.scale)
    config, (kv, channels) = pruned_config(stock, args.ratio, args.layers)
    accounting = plan_params(stock, "structured", args.ratio, layers=args.layers)
    memory = plan_memory(config, quant="nf4", rank=args.rank, targets=TARGETS, lora_dropout=args.dropout,
                         batch=args.batch, seq_len=args.seq_len, gradient_checkpointing=True, optimizer="adamw",
                         dtype=dtype_name, device=device.type, budget=BUDGET)
    start, stop = accounting.layer_range
    log(f"{args.scale}: {stock.num_hidden_layers} layers; [{start}, {stop}) keep {accounting.kept_q_heads} q / "
        f"{kv} KV heads and {channels} MLP channels; training params {accounting.training_params:,} "
        f"(original {accounting.original_params:,})")
    log(f"memory plan ({device.type}, nf4, {dtype_name}, r={args.rank}, batch {args.batch} x {args.seq_len}, "
        f"checkpointing, adamw): {memory.total_bytes / GiB:.2f} GiB")
    if args.plan_only:
        return {"training_params": accounting.training_params, "plan": memory.to_dict()}

    import bitsandbytes  # fails here, before any allocation, when it is missing
    from peft import LoraConfig, get_peft_model

    log(f"building on {device} ({dtype_name}), weights drawn {args.chunk_elems:,} at a time")
    reset_peaks(device)
    rss_before = _proc_status_bytes("VmRSS")
    built = time.perf_counter()
    model = build_model(config, device, dtype, args.seed, args.chunk_elems, log)
    build_s = time.perf_counter() - built
    build_peaks = peaks(device)
    params, nf4 = count_model(model)
    nf4_expected = sum(nf4_bytes(m.in_features * m.out_features) for m in model.modules()
                       if isinstance(m, bitsandbytes.nn.Linear4bit))
    log(f"built in {build_s:.1f} s: {params:,} parameters, NF4 weights {nf4 / GiB:.2f} GiB")
    assert params == accounting.training_params, \
        f"built model has {params:,} parameters, the accounting says {accounting.training_params:,}"
    assert nf4 == nf4_expected, f"NF4 storage {nf4:,} B, the accounting says {nf4_expected:,} B"

    # The current transformers name; older 5.x releases only have gradient_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    torch.manual_seed(args.seed)  # LoRA A init
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                             target_modules=list(LINEAR_NAMES),
                                             task_type="CAUSAL_LM"))
    model.train()
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params == memory.lora_params, f"{lora_params:,} LoRA parameters, the plan says {memory.lora_params:,}"
    log(f"LoRA r={args.rank} on {len(TARGETS)} targets: {lora_params:,} trainable parameters")

    reset_peaks(device)
    steps = train_steps(model, args, device, config.vocab_size, log)
    data = results(args, device, dtype_name, accounting, memory, params, nf4, lora_params, build_s,
                   rss_before, build_peaks, steps, model)
    default, _common.RESULTS = _common.RESULTS, args.results_dir  # write() puts <name>.json / .md there
    try:
        _common.write(args.out, data, table(data))
    finally:
        _common.RESULTS = default
    return data


def results(args, device, dtype_name, accounting, memory, params, nf4, lora_params, build_s, rss_before,
            build_peaks, steps, model) -> dict:
    last = steps[-1]
    plan = memory.to_dict()
    if device.type == "cuda":
        measured = max(s["cuda_max_allocated_bytes"] for s in steps)
        device_used = max(s["cuda_device_used_bytes"] for s in steps)
        fits = device_used <= BUDGET
        verdict = (f"fits 20 GiB: {'yes' if fits else 'no'} (device use {device_used / GiB:.2f} GiB: CUDA context + "
                   f"reserved; max allocated {measured / GiB:.2f} GiB; plan {memory.total_bytes / GiB:.2f} GiB)")
    else:
        measured, device_used, fits = max(s["host_peak_rss_bytes"] for s in steps), None, None
        verdict = (f"fits 20 GiB: n/a (no CUDA measurement; CPU peak RSS {measured / MiB:,.0f} MiB, plan "
                   f"{(memory.total_bytes - memory.mapped_bytes) / MiB:,.0f} MiB without its checkpoint-mapping "
                   "term, as no checkpoint is read here)")
    return {
        "machine": _common.machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": device.type, "compute_dtype": dtype_name,
        "attn_implementation": model.config._attn_implementation,
        "shape": {"stock": {k: SCALES[args.scale][k] for k in ("hidden_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "head_dim", "intermediate_size", "vocab_size")},
                  "layer_range": list(accounting.layer_range), "kept_q_heads": accounting.kept_q_heads,
                  "kept_kv_heads": accounting.kept_kv_heads, "kept_channels": accounting.kept_channels},
        "params": {"original": accounting.original_params, "training_model": params,
                   "training_accounting": accounting.training_params, "lora": lora_params,
                   "nf4_weight_bytes": nf4},
        "build": {"seconds": round(build_s, 2), "host_rss_before_bytes": rss_before, **build_peaks},
        "steps": steps,
        "losses": [s["loss"] for s in steps],
        "loss_finite": all(math.isfinite(s["loss"]) for s in steps),
        "lora_grads_nonzero": last["lora_A_with_grad"] == last["lora_A_tensors"]
        and last["lora_B_with_grad"] == last["lora_B_tensors"],
        "measured": {"kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
                     "peak_bytes": measured, "device_used_bytes": device_used,
                     "step_seconds_mean": sum(s["seconds"] for s in steps) / len(steps)},
        "plan": plan,
        "plan_total_bytes": memory.total_bytes,
        # No checkpoint is read here: the plan's CPU "mapped" term (checkpoint pages) does not apply.
        "plan_total_without_mapped_bytes": memory.total_bytes - memory.mapped_bytes,
        "budget_bytes": BUDGET,
        "fits_20gib": fits,
        "verdict": verdict,
    }


def table(d: dict) -> list[str]:
    s, p = d["settings"], d["plan"]
    shape = d["shape"]
    rows = [
        f"# QLoRAM, LLaMA-3.1-70B shapes ({s['scale']}) pruned at {s['ratio']}: measured vs planned memory", "",
        f"{d['device']} ({d['machine']['cuda'] or d['machine']['cpu']}), {d['compute_dtype']} compute, NF4 + double "
        f"quantization, LoRA r={s['rank']} alpha={s['alpha']} dropout={s['dropout']} on q,k,v,o,gate,up,down, batch "
        f"{s['batch']} x {s['seq_len']} tokens, activation checkpointing, AdamW, {s['steps']} steps, random weights "
        "and tokens.", "",
        f"Layers [{shape['layer_range'][0]}, {shape['layer_range'][1]}) keep {shape['kept_q_heads']} q / "
        f"{shape['kept_kv_heads']} KV heads and {shape['kept_channels']} MLP channels. Parameters: "
        f"{d['params']['training_model']:,} built = {d['params']['training_accounting']:,} accounted "
        f"(original {d['params']['original']:,}); LoRA {d['params']['lora']:,}.", "",
        "| memory | GiB |", "|---|---|",
    ]
    if d["device"] == "cuda":
        last = d["steps"][-1]
        rows += [f"| measured: max allocated | {d['measured']['peak_bytes'] / GiB:.2f} |",
                 f"| measured: max reserved | {max(x['cuda_max_reserved_bytes'] for x in d['steps']) / GiB:.2f} |",
                 f"| measured: device use (context + reserved) | {d['measured']['device_used_bytes'] / GiB:.2f} |",
                 f"| measured: allocated after the build | {d['build']['cuda_allocated_bytes'] / GiB:.2f} |",
                 f"| host peak RSS while training | {last['host_peak_rss_bytes'] / GiB:.2f} |"]
    else:
        rows += [f"| measured: process peak RSS while training | {d['measured']['peak_bytes'] / GiB:.3f} |"]
    rows += [f"| host peak RSS while building | {d['build']['host_peak_rss_bytes'] / GiB:.3f} |",
             f"| plan: total | {p['total_bytes'] / GiB:.3f} |"]
    for key in ("weights", "lora", "gradient", "optimizer", "activation", "overhead", "slack", "mapped"):
        rows.append(f"| plan: {key} | {p[f'{key}_bytes'] / GiB:.3f} |")
    rows += ["", "| step | loss | seconds |", "|---|---|---|"]
    rows += [f"| {x['step']} | {x['loss']:.4f} | {x['seconds']} |" for x in d["steps"]]
    rows += ["", f"Build: {d['build']['seconds']} s. **{d['verdict']}**"]
    return rows


if __name__ == "__main__":
    main()
