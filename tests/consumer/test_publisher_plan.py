"""The publisher's memory plan (loram.publisher_plan): the per-layer activations against what autograd saves, the
counts against real tiny models, the documented LLaMA verdicts, and (slow) the estimates against the measured
peak RSS of `loram publish prune --method taylor` and `loram publish align` (one process, and FSDP over two)
on SmolLM2 on the CPU."""

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import KINDS, tiny_config, tiny_model

from loram.accounting import plan_params
from loram.memory_plan import MiB, layer_dims, training_config
from loram.plan import publisher, read_model_config
from loram.publisher_plan import (
    CALIB_BATCH,
    CALIBRATION,
    HEAD_CHUNK,
    OVERHEAD_BYTES,
    align_memory,
    check_devices,
    hidden_tensors,
    layer_activations_full,
    publisher_plan,
    taylor_memory,
)
from loram.shared.architectures import PRUNED_MODULES
from loram.shared.errors import LoramError

LORAM = str(Path(sys.executable).parent / "loram")
TORCHRUN = Path(sys.executable).parent / "torchrun"
LLAMA31_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
               "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
               "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16"}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
              "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16"}
MODES = {  # name: (activation mode, norms trained, model dtype, autocast, Taylor's trained layers or None: align)
    "align, fp32 (CPU)": ("fp32", True, torch.float32, False, None),
    "align, bf16 autocast (DDP on GPU)": ("autocast", True, torch.float32, True, None),
    "align, bf16 weights (FSDP2 mixed precision)": ("bf16", True, torch.bfloat16, False, None),
    "taylor, fp32": ("fp32", False, torch.float32, False, range(1, 5)),
    "taylor, bf16": ("bf16", False, torch.bfloat16, False, range(1, 5)),
}


def _saved_per_layer(model, autocast: bool, batch: int = 2, seq: int = 16):
    """Bytes of the tensors each decoder layer saves for backward (each storage once), and separately the
    16-bit copies of linear weights that autocast saves."""
    layers = model.model.layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(sorted(m.weight.shape)) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    current, saved, casts = [None], {}, collections.Counter()
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in saved:
            saved[key] = (current[0], t.untyped_storage().nbytes())
            if autocast and t.dtype == torch.bfloat16 and t.dim() == 2 and batch * seq not in t.shape \
                    and tuple(sorted(t.shape)) in weight_shapes:
                casts[current[0]] += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids)
    per_layer = collections.Counter()
    for layer, nbytes in saved.values():
        per_layer[layer] += nbytes
    return {k: per_layer[k] - casts[k] for k in per_layer}, casts, batch * seq


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_layer_activations_equal_what_autograd_saves(kind, mode):
    """Full-parameter training (align) and Taylor's trained projections: the formula == autograd's saved bytes
    per token for every layer whose input needs a gradient; autocast's weight copies are 2 bytes a weight."""
    act_mode, norms, dtype, autocast, taylor_layers = MODES[mode]
    model = tiny_model(kind).to(dtype).train()
    if taylor_layers is None:  # align: everything but lm_head (with tied embeddings, those too)
        model.get_output_embeddings().weight.requires_grad_(False)
    else:  # Taylor: only the seven projections of the pruned layers
        model.requires_grad_(False)
        for i in taylor_layers:
            for spec in PRUNED_MODULES:
                model.model.layers[i].get_submodule(spec.path).requires_grad_(True)
    per_layer, casts, tokens = _saved_per_layer(model, autocast)
    layers = model.model.layers
    expected = [tokens * layer_activations_full(layer_dims(layer, model.config.head_dim), act_mode,
                                                trained_norms=norms) for layer in layers]
    exact = range(2, 5) if taylor_layers is not None else range(1, len(layers))
    assert [per_layer[i] for i in exact] == [expected[i] for i in exact]
    # The first layer with a trained weight saves less when its input needs no gradient, or the RoPE cos/sin
    # (2 x head_dim per token, shared by every layer) when it does.
    first = exact.start - 1
    assert per_layer[first] <= expected[first] + tokens * 8 * model.config.head_dim
    if autocast:
        weights = [2 * sum(layer.get_submodule(s.path).weight.numel() for s in PRUNED_MODULES) for layer in layers]
        assert [casts[i] for i in range(len(layers))] == weights


@pytest.mark.parametrize("kind", KINDS)
def test_taylor_counts_match_the_model(kind):
    """Weights: every parameter in the stored dtype; gradients: one scored layer's float32 sums (biases too) and
    one chunk gradient, or every scored layer's with the accumulating code; activations: m hidden-state tensors
    and the larger of one head chunk and one layer chunk."""
    config = tiny_config(kind).to_dict() | {"dtype": "float32"}
    model, layers = tiny_model(kind), range(1, 5)
    shape = model.config
    scored = [model.model.layers[i] for i in layers]
    projections = [sum(p.numel() for s in PRUNED_MODULES for p in layer.get_submodule(s.path).parameters())
                   for layer in scored]
    largest = max(layer.get_submodule(s.path).weight.numel() for layer in scored for s in PRUNED_MODULES)
    e = taylor_memory(config, layers, samples=8, seq_len=16, device="cpu")
    assert e.terms["weights"] == 4 * sum(p.numel() for p in model.parameters())
    assert e.terms["gradients"] == 4 * max(projections) + 4 * largest
    dims = [layer_dims(layer, shape.head_dim) for layer in model.model.layers[1:]]
    one_layer = 2 * max(layer_activations_full(d, "fp32", trained_norms=False) for d in dims)
    m = hidden_tensors(6 - 1)  # 6 layers, the first scored one is 1
    assert m == 4  # segments of 3 and 2 layers: at the lower one, its 3 inputs and dL/dh
    assert e.terms["activations"] == m * 8 * 16 * shape.hidden_size * 4 + max(
        HEAD_CHUNK * shape.vocab_size * 4, CALIB_BATCH * 16 * one_layer)
    old = taylor_memory(config, layers, samples=8, seq_len=16, device="cpu", accumulate=True)
    assert old.terms["gradients"] == 4 * sum(projections) and old.terms["weights"] == e.terms["weights"]
    bf16 = taylor_memory({**config, "dtype": "bfloat16"}, layers, samples=8, seq_len=16, device="cpu")
    assert 2 * bf16.terms["weights"] == e.terms["weights"]
    assert bf16.terms["gradients"] == 4 * max(projections) + 2 * largest  # the sums stay float32
    longer = taylor_memory(config, layers, samples=8, seq_len=32, device="cpu", calib_batch=8)
    assert longer.terms["activations"] > e.terms["activations"]
    assert e.total_bytes == sum(e.terms.values()) and e.terms["overhead"] == OVERHEAD_BYTES["cpu"]["prune"]
    with pytest.raises(LoramError, match="at least one layer"):
        taylor_memory(config, range(2, 2))


@pytest.mark.parametrize("n", [1, 2, 5, 26, 74, 80])
def test_hidden_tensors_is_what_taylor_holds(n):
    """The most [samples, seq_len, hidden] tensors alive while the Taylor code runs on a tiny model, counted
    at every decoder-layer call, equals `hidden_tensors(n)` (n = layers from the first scored one on)."""
    import weakref

    from loram.publisher.importance import taylor

    if not hasattr(taylor, "CALIB_BATCH"):
        pytest.skip("the Taylor code in place accumulates every gradient (no stored hidden states)")
    model = tiny_model("llama-gqa", num_hidden_layers=n + 1)
    samples, seq_len, hidden = 3, 8, model.config.hidden_size
    alive, most = [], [0]
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty

    def track(t):
        if tuple(t.shape) == (samples, seq_len, hidden):
            alive.append(weakref.ref(t))
        return t

    def count(module, args):
        most[0] = max(most[0], sum(r() is not None for r in alive))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(count)
    calib = torch.randint(3, 97, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty_like", lambda *a, **k: track(empty_like(*a, **k)))
        mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: track(new_empty(self, *a, **k)))
        taylor.scores(model, range(1, n + 1), calib, seed=0, batch=2)
    assert most[0] == hidden_tensors(n)


@pytest.mark.parametrize("kind", KINDS)
def test_align_counts_match_the_model(kind):
    """Trained = all but lm_head (and the tied embeddings); FSDP shards = torch.chunk's first chunk (dim 0,
    padded); the smallest N is the first whose total fits."""
    config = tiny_config(kind).to_dict() | {"dtype": "float32"}
    model = tiny_model(kind)
    model.get_output_embeddings().weight.requires_grad_(False)
    params = list(model.parameters())
    total, trained = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    devices = (1, 2, 3, 4, 8)
    ddp, fsdp, _, facts = align_memory(config, batch=2, seq_len=32, device="cpu", devices=devices)
    assert (facts["params"], facts["trained_params"]) == (total, trained)
    assert [e.devices for e in ddp] == [e.devices for e in fsdp] == list(devices)
    d1, d2 = ddp[0].terms, ddp[1].terms
    assert (d1["weights"], d1["gradients"], d1["optimizer"], d1["buckets"]) == (4 * total, 4 * trained, 8 * trained, 0)
    assert d2["buckets"] == 4 * trained and all(e.terms == d2 for e in ddp[1:])
    for e in fsdp:
        local = sum(torch.chunk(p, e.devices)[0].numel() for p in params)
        local_t = sum(torch.chunk(p, e.devices)[0].numel() for p in params if p.requires_grad)
        assert e.terms["weights"] == 4 * local and e.terms["optimizer"] == 8 * local_t
        assert e.terms["checkpoint"] == 8 * local_t  # CPU: the checkpoint save's copy of the optimizer state
    assert fsdp[0].terms["weights"] == d1["weights"] and fsdp[0].terms["activations"] == d1["activations"]
    gpu_ddp, gpu_fsdp, _, _ = align_memory(config, batch=2, seq_len=32, device="cuda", devices=(2,))
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_ddp[0].terms["working"] == 2 * linears and gpu_fsdp[0].terms["checkpoint"] == 0
    ckpt, *_ = align_memory(config, batch=2, seq_len=32, device="cuda", devices=(2,), gradient_checkpointing=True)
    assert ckpt[0].terms["working"] < gpu_ddp[0].terms["working"]
    # One micro-batch a step: the backward frees what the forward saved (all but the last layer's) while it
    # fills the gradients; with gradient accumulation the gradients outlive the next forward. T = 2 x 32.
    last = 2 * 64 * max(layer_activations_full(layer_dims(layer, model.config.head_dim), "fp32", trained_norms=True)
                        for layer in model.model.layers)
    assert d1["overlap"] == -min(d1["gradients"], d1["activations"] - last // 2)
    accumulated, acc_fsdp, _, _ = align_memory(config, batch=2, seq_len=32, device="cpu", devices=devices,
                                               grad_accum=4)
    assert all(e.terms["overlap"] == 0 for e in accumulated + acc_fsdp)
    assert accumulated[0].total_bytes == ddp[0].total_bytes - d1["overlap"]
    ckpt_cpu, *_ = align_memory(config, batch=2, seq_len=32, device="cpu", devices=(1,), gradient_checkpointing=True)
    t = ckpt_cpu[0].terms
    assert t["overlap"] == -min(t["gradients"], t["activations"] - last)
    trained_head, *_ = align_memory(config, device="cpu", devices=(1,), freeze_lm_head=False)
    assert trained_head[0].terms["gradients"] == 4 * total

    budget = (fsdp[2].total_bytes + fsdp[3].total_bytes) // 2  # between N = 3 and N = 4
    _, _, smallest, _ = align_memory(config, batch=2, seq_len=32, device="cpu", devices=devices, budget=budget)
    assert smallest == 4
    assert align_memory(config, device="cpu", budget=1)[2] is None


def test_constants_are_the_publisher_defaults():
    from loram.publisher.importance import taylor
    from loram.publisher.prune import CALIBRATION_DEFAULTS

    assert CALIBRATION_DEFAULTS["taylor"] == CALIBRATION
    assert HEAD_CHUNK == taylor.HEAD_CHUNK
    assert getattr(taylor, "CALIB_BATCH", getattr(taylor, "MICRO_BATCH", None)) == CALIB_BATCH


@pytest.mark.parametrize("text, counts", [("8", [8]), ("1,2,4,8", [1, 2, 4, 8]), (["4", "2,2"], [2, 4]),
                                          ([1024], [1024])])
def test_check_devices(text, counts):
    assert check_devices(text) == counts


@pytest.mark.parametrize("text", ["0", "1025", "two", "1,,2", []])
def test_check_devices_refuses(text):
    with pytest.raises(LoramError, match="--devices"):
        check_devices(text)


@pytest.mark.parametrize("config, ratio, checkpointing, grad_accum, smallest, ddp, smallest_teacher", [
    (LLAMA31_70B, 0.85, True, 1, 4, [], 7), (LLAMA31_70B, 0.85, True, 4, 5, [], 7),
    (LLAMA31_70B, 0.85, False, 1, 7, [], 13), (LLAMA31_70B, 0.85, False, 4, 9, [], 15),
    (LLAMA31_8B, 0.5, True, 1, 1, [1], 2), (LLAMA31_8B, 0.5, True, 4, 2, [1], 2),
    (LLAMA31_8B, 0.5, False, 1, 1, [1], 2), (LLAMA31_8B, 0.5, False, 4, 2, [], 2),
])
def test_documented_verdicts(config, ratio, checkpointing, grad_accum, smallest, ddp, smallest_teacher):
    """docs/memory.md: on 80 GiB GPUs at batch 4 x 512 per device, the smallest FSDP N and the N at which DDP fits,
    without the teacher (`--no-distill`) and with it (the default: DDP then never fits); Taylor fits one device for
    8B, not for 70B."""
    p = plan_params(config, "structured", ratio)
    for teacher, want_fsdp, want_ddp in ((None, smallest, ddp), (config, smallest_teacher, [])):
        pub = publisher_plan(config, training_config(config, p), range(*p.layer_range), batch=4, seq_len=512,
                             gradient_checkpointing=checkpointing, grad_accum=grad_accum, device="cuda",
                             devices=(1, 2, 4, 8, 16), device_memory="80GiB", teacher=teacher)
        assert pub.fsdp_min_devices == want_fsdp
        assert [e.devices for e in pub.ddp if e.fits] == want_ddp
        assert pub.taylor.fits is (config is LLAMA31_8B)
        totals = [e.total_bytes for e in pub.fsdp]
        assert totals == sorted(totals, reverse=True)


# ---- measured on CPU: SmolLM2, `loram publish prune --method taylor` and `loram publish align` -------------------

# Runs the `loram` CLI in this process and writes its peak RSS (VmHWM, which restarts at exec) to argv[1] + RANK.
PEAK_SNIPPET = r"""
import json, os, sys
out = sys.argv[1] + os.environ.get("RANK", "0")
sys.argv = ["loram", *sys.argv[2:]]
from loram.cli import main
try:
    main()
except SystemExit as e:
    if e.code:
        raise
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
with open(out, "w") as f:
    json.dump({"peak_rss_bytes": hwm[0]}, f)
"""
# What the command holds before any weight: its imports, the tokenizer, and the calibration text or the text stream.
BASELINE_SNIPPET = r"""
import json, sys
from loram.cli import app  # noqa: F401
from loram.shared.pruned_model import load_tokenizer
tok = load_tokenizer(sys.argv[2])
if sys.argv[1] == "prune":
    from loram.publisher import prune  # noqa: F401
    from loram.publisher.calibration import token_blocks
    token_blocks(tok, "wiki", 32, 128)
else:
    import transformers  # noqa: F401
    from loram.publisher import align, align_trainer  # noqa: F401
    from loram.publisher.align_data import Source, mixture
    for _ in zip(range(8), mixture([Source.parse("wiki")], tok, 128, 0, 1000)):
        pass
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"peak_rss_bytes": hwm[0]}))
"""
ENV = {**os.environ, "LORAM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _baseline(what: str, model: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", BASELINE_SNIPPET, what, str(model)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert abs(OVERHEAD_BYTES["cpu"][what] / peak - 1) < 0.25, f"{what} baseline {peak / MiB:.0f} MiB"
    return peak


def _peaks(tmp_path: Path, *args, launcher=(sys.executable,), ranks: int = 1) -> list[int]:
    """Peak RSS of each process of `loram ARGS` (one, or `ranks` under `launcher`)."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SNIPPET)
    out = tmp_path / "peak-rank"
    proc = subprocess.run([*launcher, str(script), str(out), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{out}{r}").read_text())["peak_rss_bytes"] for r in range(ranks)]


def _check(name: str, measured: list[int], estimate, baseline: int) -> None:
    total = estimate.total_bytes - estimate.terms["overhead"] + baseline
    report = "; ".join(f"{name}: measured {m / MiB:,.0f} MiB, estimated {total / MiB:,.0f} MiB "
                       f"({100 * (total / m - 1):+.1f}%)" for m in measured)
    print(f"baseline {baseline / MiB:.0f} MiB; {report}; terms (MiB): "
          + ", ".join(f"{k} {v / MiB:.0f}" for k, v in estimate.terms.items()))
    assert all(abs(total / m - 1) <= 0.25 for m in measured), report


def taylor_accumulates_every_gradient() -> bool:
    """True while the Taylor code in place is the earlier one (one checkpointed backward per micro-batch, every
    gradient kept); False for the layer-by-layer one `loram plan` estimates."""
    from loram.publisher.importance import taylor

    return hasattr(taylor, "MICRO_BATCH") and not hasattr(taylor, "CALIB_BATCH")


@pytest.mark.slow
def test_taylor_prune_peak_within_25_percent(tmp_path):
    """`loram publish prune SmolLM2 --method taylor --ratio 0.5 --kv-score taylor` (32 x 128 calibration
    tokens): its peak RSS within 25% of `taylor_memory` for the Taylor code in place (the layer-by-layer one
    `loram plan` prints, or the earlier one that accumulates every gradient while that is still in place).

    `--kv-score taylor` measures the Taylor pass alone, what `taylor_memory` counts: the default loss-scored
    KV pass runs after it without gradients and holds less (one hidden-state tensor); with it the command
    measured within the same 25% (and took 263 s of this test's time instead of 87)."""
    from loram.shared import assets

    base = assets.model_dir()
    baseline = _baseline("prune", base)
    measured = _peaks(tmp_path, "publish", "prune", base, "--method", "taylor", "--ratio", "0.5",
                      "--kv-score", "taylor", "--out", tmp_path / "pruned")
    config = read_model_config(str(base))
    layers = range(*plan_params(config, "structured", 0.5).layer_range)
    accumulate = taylor_accumulates_every_gradient()
    estimate = taylor_memory(config, layers, device="cpu", accumulate=accumulate)
    _check(f"taylor ({'accumulating every gradient' if accumulate else 'layer by layer'})", measured, estimate,
           baseline)


ALIGN = ["--data", "wiki", "--steps", "3", "--seq-len", "128", "--batch", "2",
         "--distill-from", "none"]  # the runs measured hold no teacher: the estimates say distill=False


@pytest.mark.slow
def test_align_peak_within_25_percent(smollm2_pruned, tmp_path):
    """`loram publish align` on SmolLM2 pruned at 0.5, one process, 3 steps of 2 x 128 tokens: peak RSS within
    25% of the DDP estimate for one device (`loram plan PRUNED --publisher --device cpu --batch 2 --seq-len 128`)."""
    baseline = _baseline("align", smollm2_pruned)
    measured = _peaks(tmp_path, "publish", "align", smollm2_pruned, *ALIGN, "--out", tmp_path / "aligned")
    pub = publisher(model=str(smollm2_pruned), device="cpu", batch=2, seq_len=128, devices=["1"], distill=False)
    assert pub.taylor is None  # a pruned checkpoint: nothing left to prune
    report = json.loads((tmp_path / "aligned" / "align_report.json").read_text())
    assert report["peak_memory_bytes"] <= measured[0]
    _check("align, 1 process", measured, pub.ddp[0], baseline)


def _has_fsdp() -> bool:
    proc = subprocess.run([LORAM, "publish", "align", "--help"], capture_output=True, text=True, timeout=120)
    return "--fsdp" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_fsdp_two_processes_peak_within_25_percent(smollm2_pruned, tmp_path):
    """torchrun, 2 CPU processes, `--fsdp`: each process's peak RSS within 25% of the FSDP estimate for N = 2."""
    if not _has_fsdp():
        pytest.skip("FSDP alignment not implemented")
    baseline = _baseline("align", smollm2_pruned)
    measured = _peaks(tmp_path, "publish", "align", smollm2_pruned, *ALIGN, "--fsdp", "--out", tmp_path / "fsdp",
                      launcher=(str(TORCHRUN), "--standalone", "--nproc_per_node", "2"), ranks=2)
    pub = publisher(model=str(smollm2_pruned), device="cpu", batch=2, seq_len=128, devices=["2"], distill=False)
    fsdp = pub.fsdp[0]
    sharding = json.loads((tmp_path / "fsdp" / "align_report.json").read_text())["fsdp"]
    assert 4 * sharding["local_numel_per_rank"][0] == fsdp.terms["weights"]  # rank 0 holds the larger chunks
    assert math.isclose(sum(sharding["local_numel_per_rank"]), pub.extra["params"])
    _check("FSDP, 2 processes", measured, fsdp, baseline)
