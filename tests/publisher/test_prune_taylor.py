"""Taylor scores computed layer by layer (publisher/importance/taylor.py) against the previous
accumulate-then-score computation; devices, bf16 and the options of the structured path."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import KINDS, save_tiny_checkpoint, tiny_model
from transformers import AutoModelForCausalLM

from loram.publisher.importance import group_scores, taylor
from loram.publisher.prune import SCORES_FILE, PruneConfig, prune
from loram.publisher.structured import select_kept
from loram.shared.architectures import PRUNED_MODULES, Shape
from loram.shared.errors import LoramError
from loram.shared.manifest import MANIFEST_TENSORS


def _calib(vocab=97, samples=7, seq_len=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (samples, seq_len), generator=g)


def _accumulate_then_score(model, layers: range, calib: torch.Tensor, micro_batch: int = 4, query_fold="strided"):
    """The previous computation: micro-batches accumulate .grad on every prunable weight of the scored
    layers through the whole model (full logits), then |W * grad| is summed per unit."""
    shape, blocks = Shape.of(model.config), model.get_decoder().layers
    params = [p for i in layers for spec in PRUNED_MODULES for p in blocks[i].get_submodule(spec.path).parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    for rows in calib.split(micro_batch):
        logits = model(input_ids=rows).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                 reduction="sum") / n_tokens
        loss.backward()
    out = {i: group_scores(blocks[i], shape, lambda p: (p.detach() * p.grad).abs(), query_fold) for i in layers}
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return out


def _assert_same_scores_and_kept(mine, reference, shape, rtol=1e-5):
    assert mine.keys() == reference.keys()
    for i in reference:
        torch.testing.assert_close(mine[i].kv, reference[i].kv, rtol=rtol, atol=1e-12)
        torch.testing.assert_close(mine[i].mlp, reference[i].mlp, rtol=rtol, atol=1e-12)
    for ratio in (0.3, 0.5):
        a, b = select_kept(mine, shape, ratio, ratio), select_kept(reference, shape, ratio, ratio)
        for i in a:
            assert torch.equal(a[i].kv_heads, b[i].kv_heads) and torch.equal(a[i].mlp_channels, b[i].mlp_channels)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [range(1, 5), range(0, 6), range(3, 6)])
def test_scores_equal_the_accumulate_then_score_reference(kind, layers):
    model = tiny_model(kind)
    calib = _calib()
    reference = _accumulate_then_score(model, layers, calib)
    for batch in (1, 3, 7):  # any chunk size gives the gradient of the loss over all calibration tokens
        _assert_same_scores_and_kept(taylor.scores(model, layers, calib, 0, batch=batch), reference,
                                     Shape.of(model.config))
    coupled = _accumulate_then_score(model, layers, calib, query_fold="coupled")
    _assert_same_scores_and_kept(taylor.scores(model, layers, calib, 0, batch=3, query_fold="coupled"), coupled,
                                 Shape.of(model.config))


def test_scores_with_per_layer_attention_masks():
    # Qwen2 with sliding-window attention in its upper layers: every layer keeps its own mask.
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert len(set(model.config.layer_types)) == 2
    calib = _calib(seq_len=16)
    reference = _accumulate_then_score(model, range(1, 6), calib)
    _assert_same_scores_and_kept(taylor.scores(model, range(1, 6), calib, 0, batch=2), reference,
                                 Shape.of(model.config))


def test_no_gradient_is_left_and_requires_grad_flags_are_restored():
    model = tiny_model("llama-gqa")
    model.model.layers[2].mlp.up_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    taylor.scores(model, range(1, 5), _calib(), 0, batch=2)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training
    assert taylor.scores(model, range(3, 3), _calib(), 0) == {}


@pytest.mark.parametrize("first,top", [(0, 1), (0, 2), (4, 30), (2, 6), (4, 80), (0, 126)])
def test_segments_cover_the_layers_with_few_live_inputs(first, top):
    starts = taylor.segment_starts(first, top)
    assert starts[0] == first and starts == sorted(set(starts)) and starts[-1] < top
    ends = [*starts[1:], top]
    live = max(s + (b - a) for s, (a, b) in enumerate(zip(starts, ends, strict=True)))  # starts kept + inner inputs
    n = top - first
    assert live * (live - 1) / 2 < n <= live * (live + 1) / 2


def test_bf16_weights_are_scored_in_bf16_with_float_scores(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "mistral").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    calib = _calib(samples=8, seq_len=24)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto")
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)  # the same (rounded) weights
    assert bf16.dtype == torch.bfloat16
    seen = []
    bf16.model.layers[3].mlp.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    low, high = taylor.scores(bf16, range(1, 5), calib, 0), taylor.scores(fp32, range(1, 5), calib, 0)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    shape = Shape.of(bf16.config)
    for i in high:
        for a, b in ((low[i].kv, high[i].kv), (low[i].mlp, high[i].mlp)):
            assert a.dtype == torch.float64 and bool(torch.isfinite(a).all())
            torch.testing.assert_close(a, b, rtol=0.03, atol=0)
    # Units whose fp32 score is far from the keep/remove threshold are kept or removed alike.
    kept_low, kept_high = select_kept(low, shape, 0.5, 0.5), select_kept(high, shape, 0.5, 0.5)
    for i in high:
        for part, n_kept in (("mlp", len(kept_high[i].mlp_channels)), ("kv", len(kept_high[i].kv_heads))):
            s = getattr(high[i], part)
            cut = s.sort(descending=True).values[n_kept - 1: n_kept + 1].mean()
            clear = (s - cut).abs() > 0.05 * cut
            mine = torch.zeros_like(s, dtype=torch.bool)
            ref = torch.zeros_like(s, dtype=torch.bool)
            mine[getattr(kept_low[i], "mlp_channels" if part == "mlp" else "kv_heads")] = True
            ref[getattr(kept_high[i], "mlp_channels" if part == "mlp" else "kv_heads")] = True
            assert torch.equal(mine[clear], ref[clear]), (i, part)


def test_bf16_checkpoint_prunes_into_a_bf16_checkpoint(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    result = prune(PruneConfig(base=str(tmp_path / "base"), out=tmp_path / "out", method="taylor", ratio=0.5,
                               layers="1:5", calib=str(_calib_file(tmp_path)), samples=4, seq_len=32))
    weights = load_file(str(result.out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    pruned = AutoModelForCausalLM.from_pretrained(result.out, dtype="auto")
    assert pruned.dtype == torch.bfloat16 and result.kept == {i: (2, 20) for i in range(1, 5)}


def _calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("Pruned models are trained small and used large. " * 80)
    return path


@pytest.mark.parametrize("method", ["taylor", "l2"])
def test_device_cpu_and_device_map_auto_keep_the_units_of_the_default(tmp_path, method):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    common = dict(base=str(tmp_path / "base"), method=method, ratio=0.5, layers="1:5", calib=str(_calib_file(tmp_path)),
                  samples=6, seq_len=24)
    runs = [prune(PruneConfig(out=tmp_path / "default", **common)),
            prune(PruneConfig(out=tmp_path / "cpu", device="cpu", **common)),
            prune(PruneConfig(out=tmp_path / "auto", device_map="auto", **common))]
    if method == "taylor":
        runs.append(prune(PruneConfig(out=tmp_path / "chunks", calib_batch=1, **common)))
    first = runs[0].out
    for run in runs[1:]:
        assert (run.out / MANIFEST_TENSORS).read_bytes() == (first / MANIFEST_TENSORS).read_bytes(), run.out
        assert (run.out / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
        if method != "taylor" or run.out.name != "chunks":  # chunking changes the float rounding only
            assert (run.out / SCORES_FILE).read_bytes() == (first / SCORES_FILE).read_bytes()


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "wanda", "sparsity": 0.5, "device_map": "auto"}, "--device-map applies to structured methods"),
    ({"method": "magnitude", "sparsity": 0.5, "calib_batch": 2}, "--calib-batch applies to structured methods"),
    ({"device_map": "balanced"}, "--device-map must be one of auto"),
    ({"device": "cpu", "device_map": "auto"}, "--device and --device-map exclude each other"),
    ({"device": "tpu"}, "--device must be cpu, cuda or cuda:N"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "no such CUDA device"),
    ({"calib_batch": 0}, "--calib-batch must be >= 1"),
])
def test_bad_device_options_are_clear_errors(tmp_path, kwargs, message):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    kwargs = {"method": "taylor", **kwargs}
    if kwargs["method"] == "taylor":
        kwargs["ratio"] = 0.5
    with pytest.raises(LoramError, match=message):
        prune(PruneConfig.resolve(base=str(tmp_path / "base"), out=tmp_path / "out", **kwargs))
    assert not (tmp_path / "out").exists()


def test_query_folds_put_each_query_head_in_its_group():
    """coupled: query head h scores KV group h // G (the group it attends with); strided: group h mod n_kv
    (LLM-Pruner's fold). k/v rows always score their own group, o_proj columns fold like q rows."""
    from loram.publisher.importance import LayerScores, add_unit_scores_

    model = tiny_model("llama-gqa")
    shape = Shape.of(model.config)
    assert shape.num_kv_heads > 1 and shape.group_size > 1
    q, o = PRUNED_MODULES[0], PRUNED_MODULES[3]
    for spec in (q, o):
        per_head = torch.arange(shape.num_heads, dtype=torch.float64)
        per_index = per_head.repeat_interleave(shape.head_dim) / shape.head_dim  # head h's rows sum to h
        for fold, owner in (("coupled", lambda h: h // shape.group_size), ("strided", lambda h: h % shape.num_kv_heads)):
            scores = LayerScores.zeros(shape)
            add_unit_scores_(scores, shape, spec, per_index, fold)
            want = torch.zeros(shape.num_kv_heads, dtype=torch.float64)
            for h in range(shape.num_heads):
                want[owner(h)] += h
            torch.testing.assert_close(scores.kv, want)
    with pytest.raises(LoramError, match="unknown query fold 'x'"):
        add_unit_scores_(LayerScores.zeros(shape), shape, q, per_index, "x")
    for wrong in (dict(method="l2"), dict(method="taylor", scores="x", kv_score="taylor")):
        with pytest.raises(LoramError, match="applies to --method taylor"):
            PruneConfig(base="b", out="o", query_fold="coupled", **wrong)


def _brute_force_group_losses(model, calib: torch.Tensor, layer: int) -> torch.Tensor:
    """Mean calibration loss of the whole model with each KV group's query heads zeroed in o_proj, one
    model call each (the definition of `--kv-score loss`)."""
    import copy

    shape = Shape.of(model.config)
    width = shape.group_size * shape.head_dim
    losses = []
    for g in range(shape.num_kv_heads):
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            m.model.layers[layer].self_attn.o_proj.weight[:, g * width: (g + 1) * width] = 0
            losses.append(m(input_ids=calib, labels=calib).loss.double())
    return torch.stack(losses)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_kv_loss_scores_are_the_loss_with_each_group_removed(kind, batch):
    from loram.publisher.importance.group_loss import kv_loss_scores

    model = tiny_model(kind)
    calib = _calib(model.config.vocab_size, samples=5)
    layers = range(1, 4)
    got = kv_loss_scores(model, layers, calib, batch)
    assert sorted(got) == list(layers)
    dense = model(input_ids=calib, labels=calib).loss.item()
    for i in layers:
        want = _brute_force_group_losses(model, calib, i)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
        assert got[i].dtype == torch.float64 and not torch.allclose(got[i], torch.full_like(got[i], dense))
    assert all(p.grad is None for p in model.parameters())


def test_prune_default_scores_kv_groups_by_the_loss_on_kv_samples(tmp_path):
    """The command's default: KV scores are the group-removed losses on the first --kv-samples calibration
    rows (saved in importance.safetensors, kept = the highest), MLP scores stay Taylor's."""
    from transformers import AutoTokenizer

    from loram.publisher.calibration import token_blocks

    original = save_tiny_checkpoint(tmp_path / "base", "llama-gqa", num_attention_heads=8, num_key_value_heads=4)
    calib_file = _calib_file(tmp_path)
    common = dict(base=str(tmp_path / "base"), method="taylor", ratio=0.5, layers="1:3", calib=str(calib_file),
                  samples=6, seq_len=16)
    loss = prune(PruneConfig(out=tmp_path / "loss", kv_samples=4, **common))
    first = prune(PruneConfig(out=tmp_path / "taylor", kv_score="taylor", **common))
    calib = token_blocks(AutoTokenizer.from_pretrained(tmp_path / "base"), str(calib_file), 6, 16)
    saved, taylor_saved = load_file(str(loss.out / SCORES_FILE)), load_file(str(first.out / SCORES_FILE))
    kept = load_file(str(loss.out / MANIFEST_TENSORS))
    for i in (1, 2):
        want = _brute_force_group_losses(original, calib[:4], i)
        torch.testing.assert_close(saved[f"layers.{i}.kv"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved[f"layers.{i}.mlp"], taylor_saved[f"layers.{i}.mlp"])
        assert torch.equal(kept[f"layers.{i}.kept_kv_heads"], want.argsort(descending=True)[:2].sort().values)
    from safetensors import safe_open

    def recorded(out):
        with safe_open(str(out / SCORES_FILE), "pt") as f:
            return json.loads(f.metadata()["loram_scores"])["kv"]

    assert recorded(loss.out) == {"score": "loss", "samples": 4}
    assert recorded(first.out) == {"score": "taylor", "query_fold": "strided"}
    assert PruneConfig(samples=3, **{k: v for k, v in common.items() if k != "samples"}, out="o").kv_scoring == {
        "score": "loss", "samples": 3}  # at most the calibration


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="l2", kv_score="loss"), "--kv-score applies to --method taylor when it calibrates"),
    (dict(method="taylor", scores="x", kv_score="taylor"), "--kv-score applies to --method taylor when it"),
    (dict(method="taylor", kv_score="taylor", kv_samples=4), "--kv-samples applies to --method taylor with "
                                                                "--kv-score loss"),
    (dict(method="taylor", kv_samples=0), "--kv-samples must be >= 1, got 0"),
    (dict(method="taylor", samples=4, kv_samples=8), r"--kv-samples 8 exceeds the 4 calibration samples \(--samples\); "
                                                    "give at most 4, or more --samples"),
    (dict(method="taylor", query_fold="coupled"), "--query-fold applies to --method taylor --kv-score taylor"),
])
def test_kv_score_options_are_checked(kwargs, message):
    with pytest.raises(LoramError, match=message):
        PruneConfig(base="b", out="o", **kwargs)
