"""`loram publish align` on tiny pruned models: outputs, frozen lm_head, masks kept, resume, mixing, errors."""

import json
import math
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import save_masked_checkpoint, save_tiny_checkpoint, tiny_tokenizer
from transformers import AutoModelForCausalLM

import loram
from loram.publisher.align import AlignConfig, align
from loram.publisher.align_data import CHAT_RUN, Source, chat_texts, collate_blocks, eval_blocks, mixture
from loram.publisher.prune import prune
from loram.shared.assets import read_records
from loram.shared.errors import LoramError
from loram.shared.manifest import Manifest, sha256_file, verify_files
from loram.shared.model_cards import pruned_card
from loram.shared.records import iter_texts

loram.register()  # pruned checkpoints load with the Auto classes

LORAM = str(Path(sys.executable).parent / "loram")
TEXT = "LoRAM trains a low-rank adapter on a pruned model, then recovers it for the original model. " * 150


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    save_tiny_checkpoint(root / "base", "llama-gqa")  # tied embeddings
    prune(base=str(root / "base"), out=root / "pruned", method="l2", ratio=0.5, layers="1:5")
    save_tiny_checkpoint(root / "base-untied", "llama-mha")
    prune(base=str(root / "base-untied"), out=root / "pruned-untied", method="l2", ratio=0.5, layers="1:5")
    save_tiny_checkpoint(root / "gone-base", "llama-gqa")  # a pruned model whose base is no longer there
    prune(base=str(root / "gone-base"), out=root / "pruned-moved", method="l2", ratio=0.5, layers="1:5")
    shutil.rmtree(root / "gone-base")
    save_tiny_checkpoint(root / "base-wide", "llama-gqa", hidden_size=64)  # not the original: other shapes
    save_tiny_checkpoint(root / "base-short", "llama-gqa", num_hidden_layers=4)
    (root / "text.txt").write_text(TEXT)
    return root


def _align(root, out, **kwargs):
    args = dict(pruned=str(root / "pruned"), data=[str(root / "text.txt")], steps=6, seq_len=32, batch=4, lr=1e-3,
                save_every=3, out=root / out, distill_from="none")  # the LM loss alone unless a test distills
    return align(AlignConfig(**{**args, **kwargs}))


def _state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_output_and_every_checkpoint_are_pruned_checkpoints_with_an_alignment_record(root):
    result = _align(root, "a", eval_data=str(root / "text.txt"), eval_limit=4, eval_every=3)
    out = result.out
    before, after = _state(root / "pruned"), _state(out)
    # the aligned model keeps the pruned shapes and trains every weight but the (tied) lm_head
    assert after.keys() == before.keys() and all(after[k].shape == before[k].shape for k in after)
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # tied: frozen too
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert "model.layers.2.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed
    assert result.report["frozen"] == ["model.embed_tokens.weight", "lm_head.weight"]

    for folder, steps, complete in [(out, 6, True), (out / "checkpoints" / "checkpoint-3", 3, False)]:
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "loram_llama"
        manifest = Manifest.load(folder, model.config)
        verify_files(folder)  # the sha256 list covers every file, checkpoint state included
        record = manifest.alignment[-1]
        assert (record["steps"], record["complete"], record["tokens"]) == (steps, complete, steps * 4 * 32)
        # a file by its name, size and hash, never by the local path the model card would publish
        assert record["data"] == [{"source": "text.txt", "sha256": sha256_file(root / "text.txt"),
                                   "bytes": (root / "text.txt").stat().st_size, "weight": 1.0}]
        assert (record["lr"], record["seq_len"], record["global_batch"], record["lm_head"]) == (1e-3, 32, 4, "frozen")
        assert record["eval"]["step"] == steps and record["eval"]["blocks"] == 4
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in out.rglob("*"))

    report = json.loads((out / "align_report.json").read_text())
    assert [r["step"] for r in report["losses"]] == [1, 2, 3, 4, 5, 6]
    assert report["losses"][-1]["loss"] < report["losses"][0]["loss"]  # it learns
    assert [e["step"] for e in report["evals"]] == [0, 3, 6]
    assert report["evals"][-1]["perplexity"] < report["evals"][0]["perplexity"]
    assert result.perplexities == [(e["step"], e["perplexity"]) for e in report["evals"]]
    assert report["record"]["eval"]["perplexity"] == report["evals"][-1]["perplexity"]
    assert report["tokens_seen"] == 6 * 4 * 32 and report["tokens_per_second"] > 0
    assert report["peak_memory_bytes"] > 2**20 and report["wall_time_s"] > 0
    assert report["config"]["data"] == [str(root / "text.txt")]
    assert AlignConfig.resolve(out / "align_config.yaml") == AlignConfig.resolve(**report["config"])
    # the manifest is carried forward: same plan, one more record
    original = Manifest.load(root / "pruned")
    aligned = Manifest.load(out)
    assert aligned.pruned_layers == original.pruned_layers and len(aligned.alignment) == len(original.alignment) + 1
    assert all(torch.equal(aligned.kept_mlp_channels[i], original.kept_mlp_channels[i]) for i in original.pruned_layers)
    # so is how it was pruned: the recipe and scores, listed and hashed, and the card quotes both recipes
    carried = [n for n in ("prune_config.yaml", "importance.safetensors") if n in original.files]
    assert "prune_config.yaml" in carried
    for folder in (out, out / "checkpoints" / "checkpoint-3"):  # each is a pruned checkpoint one may publish
        assert all((folder / n).read_bytes() == (root / "pruned" / n).read_bytes() and n in Manifest.load(folder).files
                   for n in carried)
    made = pruned_card(out, aligned).split("## How it was made")[1]
    assert made.index("loram publish prune") < made.index("loram publish align")


@pytest.mark.parametrize("freeze", [True, False])
def test_untied_model_freezes_only_lm_head(root, freeze):
    result = _align(root, f"untied-{freeze}", pruned=str(root / "pruned-untied"), steps=2, freeze_lm_head=freeze)
    before, after = _state(root / "pruned-untied"), _state(result.out)
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"]) == freeze
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert result.report["frozen"] == (["lm_head.weight"] if freeze else [])
    assert Manifest.load(result.out).alignment[-1]["lm_head"] == ("frozen" if freeze else "trained")


def test_train_layers_pruned_updates_only_the_pruned_layers(root):
    result = _align(root, "train-pruned", steps=2, distill_from="base", hidden_weight=1.0, train_layers="pruned")
    before, after = _state(root / "pruned"), _state(result.out)
    pruned = Manifest.load(root / "pruned").pruned_layers  # layers 1..4 of 6
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(int(k.split(".")[2]) in pruned for k in changed if k.startswith("model.layers."))
    assert {int(k.split(".")[2]) for k in changed} == set(pruned)  # every pruned layer trained
    assert not any(k.startswith(("model.norm", "model.embed")) for k in changed)
    assert result.report["frozen"][-1] == "everything outside decoder layers 1..4"
    assert Manifest.load(result.out).alignment[-1]["train_layers"] == "pruned"
    with pytest.raises(LoramError, match="--train-layers must be all or pruned"):
        AlignConfig(pruned="x", data=["wiki"], steps=1, seq_len=8, out=root / "never", train_layers="some")


def test_nonstructured_masks_keep_their_zeros(root, monkeypatch):
    masks = save_masked_checkpoint(root / "sparse")
    dense = _state(root / "sparse")
    result = _align(root, "sparse-out", pruned=str(root / "sparse"), steps=5, lr=1e-2, save_every=2)
    for folder in (result.out, result.out / "checkpoints" / "checkpoint-4"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"  # the stock architecture, zeros in the weights
        manifest = Manifest.load(folder, model.config)
        assert manifest.method.kind == "non-structured" and manifest.masks.keys() == masks.keys()
        for name, keep in masks.items():
            weight = model.get_submodule(name).weight
            assert torch.equal(weight == 0, ~keep), name  # the same zeros, no new ones
            assert not torch.equal(weight, dense[f"{name}.weight"]), name  # the kept weights did train
    # Without re-applying, the same run fills the zeros in: the check above is not vacuous.
    from loram.publisher.align_trainer import MaskKeeper

    monkeypatch.setattr(MaskKeeper, "apply", lambda self: None)
    leaky = _align(root, "sparse-leaky", pruned=str(root / "sparse"), steps=2, lr=1e-2)
    weight = AutoModelForCausalLM.from_pretrained(leaky.out).get_submodule("model.layers.1.mlp.up_proj").weight
    assert int((weight == 0).sum()) < int((~masks["model.layers.1.mlp.up_proj"]).sum())


@pytest.mark.parametrize("inputs", ["pruned", "original"])
def test_hidden_state_distillation_is_the_same_under_activation_checkpointing(root, inputs):
    # the layer outputs are recorded in the forward only, not again when checkpointing recomputes them; a layer
    # fed the original's inputs is fed them again in the recomputation
    runs = [_align(root, f"hs-gc-{inputs}-{gc}", steps=3, distill_from="base", hidden_weight=1.0,
                   hidden_inputs=inputs, gradient_checkpointing=gc) for gc in (False, True)]
    plain, checkpointed = ([v for r in run.report["losses"] for v in (r["loss"], r["grad_norm"])] for run in runs)
    assert plain == pytest.approx(checkpointed, rel=1e-5) and min(plain) > 0


def test_hidden_layers_pruned_are_the_layers_the_plan_or_the_masks_change(root):
    from loram.publisher.distill import hidden_layers

    structured = Manifest.load(root / "pruned")  # pruned with layers="1:5" of 6
    assert hidden_layers(structured, 6, "pruned") == [1, 2, 3, 4] and hidden_layers(structured, 6, "all") == list(
        range(6))
    masks = save_masked_checkpoint(root / "sparse-layers")
    layers = sorted({int(name.split(".")[2]) for name in masks})
    assert hidden_layers(Manifest.load(root / "sparse-layers"), 6, "pruned") == layers


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(root):
    text = dict(eval_data=str(root / "text.txt"), eval_limit=2, eval_every=3)
    full = _align(root, "full", **text)
    # An interrupted run: what existed after step 3 (checkpoint-3), nothing later.
    (root / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.out / "checkpoints" / "checkpoint-3", root / "cut" / "checkpoints" / "checkpoint-3")
    resumed = _align(root, "cut", resume=True, **text)
    assert resumed.steps == 6 and resumed.losses == full.losses
    assert resumed.perplexities == full.perplexities
    a, b = _state(full.out), _state(resumed.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = Manifest.load(resumed.out).alignment[-1]
    assert record["steps"] == 6 and record["tokens"] == 6 * 4 * 32
    with pytest.raises(LoramError, match="the alignment in .* already reached step 6"):  # not a seventh step
        _align(root, "cut", resume=True, **text)
    assert all(torch.equal(a[k], v) for k, v in _state(resumed.out).items())


def test_resume_refuses_text_that_changed_since_the_checkpoint(root, tmp_path):
    text = tmp_path / "text.txt"
    shutil.copy(root / "text.txt", text)
    first = _align(root, "changed", data=[str(text)], steps=2, save_every=1)
    shutil.rmtree(first.out / "checkpoints" / "checkpoint-2")  # interrupted after step 1
    text.write_text(text.read_text() + "\n\nOne more paragraph, added after the run started.\n")
    weights = (first.out / "model.safetensors").read_bytes()
    changed = r"--resume: data source text.txt changed since the run .* \(sha256 [0-9a-f]{12}... then, [0-9a-f]{12}"
    with pytest.raises(LoramError, match=changed):
        _align(root, "changed", data=[str(text)], steps=2, save_every=1, resume=True)
    assert (first.out / "model.safetensors").read_bytes() == weights  # nothing touched


def test_distillation_adds_a_kl_term_that_is_zero_against_itself(root):
    # Teacher = the pruned model itself: KL(p || p) = 0 at the first step, and the LM part is the plain loss.
    plain = _align(root, "kd-none", steps=1)
    same = _align(root, "kd-self", steps=1, distill_from=str(root / "pruned"), kd_weight=0.5, hidden_weight=0.0)
    first = same.report["losses"][0]
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["lm_loss"] == pytest.approx(plain.losses[0], rel=1e-5)
    assert first["loss"] == pytest.approx(0.5 * plain.losses[0], rel=1e-5)
    # Teacher = the original (dense) model, pure distillation: the KL term is what gets minimized.
    kd = _align(root, "kd", steps=4, distill_from=str(root / "base"), kd_weight=1.0, hidden_weight=0.0)
    rows = kd.report["losses"]
    assert all(r["kd_loss"] > 0 for r in rows) and rows[-1]["kd_loss"] < rows[0]["kd_loss"]
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-4) for r in rows)
    assert Manifest.load(kd.out).alignment[-1]["distill"] == {"from": str(root / "base"), "kd_weight": 1.0}
    # --distill-from base: the model the manifest names (here the same folder), so the same first step
    named = _align(root, "kd-base", steps=1, distill_from="base", kd_weight=1.0, hidden_weight=0.0)
    assert named.report["losses"][0]["kd_loss"] == pytest.approx(rows[0]["kd_loss"], rel=1e-6)
    assert _align(root, "kd-off", steps=1, distill_from="none").report["record"]["distill"] is None


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_distillation_matches_the_originals_layer_outputs(root, kind):
    # Against itself every layer output is equal: the hidden term is 0 and the LM loss gets 1 - 0.5.
    plain = _align(root, f"hs-none-{kind}", steps=1)
    same = _align(root, f"hs-self-{kind}", steps=1, distill_from=str(root / "pruned"), kd_weight=0.0,
                  hidden_weight=0.5, hidden_loss=kind)
    first = same.report["losses"][0]
    assert first["hidden_loss"] == pytest.approx(0.0, abs=1e-6) and "kd_loss" not in first
    assert first["lm_loss"] == pytest.approx(plain.losses[0], rel=1e-5)
    assert first["loss"] == pytest.approx(0.5 * plain.losses[0], rel=1e-5)
    # Against the original, only at the pruned layers (1..4): the first step's term is the definition,
    # computed here from transformers' own hidden states (entry i + 1 is the output of layer i).
    run = _align(root, f"hs-{kind}", steps=4, distill_from=str(root / "base"), kd_weight=0.25, hidden_weight=0.5,
                 hidden_loss=kind, hidden_layers="pruned", shuffle_buffer=0)
    tokenizer = tiny_tokenizer()
    batch = collate_blocks(list(islice(mixture([Source(str(root / "text.txt"))], tokenizer, 32, 0, 0), 4)))["input_ids"]
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(root / "pruned")(batch, output_hidden_states=True).hidden_states
        t = AutoModelForCausalLM.from_pretrained(root / "base")(batch, output_hidden_states=True).hidden_states
    per_layer = []
    for i in range(1, 5):
        a, b = s[i + 1][:, :-1], t[i + 1][:, :-1]
        per_layer.append(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean() if kind == "mse"
                         else (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())
    rows = run.report["losses"]
    assert rows[0]["hidden_loss"] == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-4)
    assert all(r["loss"] == pytest.approx(0.25 * (r["lm_loss"] + r["kd_loss"]) + 0.5 * r["hidden_loss"], rel=1e-4)
               for r in rows)
    assert rows[-1]["hidden_loss"] < rows[0]["hidden_loss"]
    assert Manifest.load(run.out).alignment[-1]["distill"] == {
        "from": str(root / "base"), "kd_weight": 0.25, "hidden": {"weight": 0.5, "loss": kind, "layers": "pruned",
                                                      "inputs": "pruned"}}


def test_layer_local_reconstruction_fits_each_pruned_layer_to_the_originals_inputs(root):
    """--hidden-inputs original: each pruned layer runs on the original's input to it; the loss is, per layer,
    the relative error of its output against the original layer's output; only those layers train."""
    run = _align(root, "hs-local", steps=6, distill_from="base", hidden_weight=1.0, hidden_inputs="original",
                 shuffle_buffer=0)
    tokenizer = tiny_tokenizer()
    batch = collate_blocks(list(islice(mixture([Source(str(root / "text.txt"))], tokenizer, 32, 0, 0), 4)))["input_ids"]
    student, teacher = (AutoModelForCausalLM.from_pretrained(root / f) for f in ("pruned", "base"))
    with torch.no_grad():
        t = teacher(batch, output_hidden_states=True).hidden_states  # t[l]: the input of layer l, t[l + 1] its output
        positions = torch.arange(batch.shape[1])[None]
        rotary = student.model.rotary_emb(t[0], positions)
        per_layer = []
        for i in range(1, 5):
            s = student.model.layers[i](t[i], attention_mask=None, position_ids=positions, position_embeddings=rotary)
            s, target = s[:, :-1], t[i + 1][:, :-1]
            per_layer.append(((s - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean())
    rows = run.report["losses"]
    assert rows[0]["hidden_loss"] == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-4)
    end_to_end = _align(root, "hs-e2e", steps=1, distill_from="base", hidden_weight=1.0, shuffle_buffer=0)
    assert end_to_end.report["losses"][0]["hidden_loss"] != pytest.approx(rows[0]["hidden_loss"], rel=1e-3)
    assert rows[-1]["hidden_loss"] < rows[0]["hidden_loss"]
    before, after = _state(root / "pruned"), _state(run.out)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")} == {1, 2, 3, 4}
    assert all(k.startswith("model.layers.") for k in changed)
    assert run.report["frozen"][-1] == "everything outside decoder layers 1..4"
    assert Manifest.load(run.out).alignment[-1]["distill"]["hidden"]["inputs"] == "original"
    with pytest.raises(LoramError, match="--hidden-inputs original trains each matched layer"):
        AlignConfig(pruned="x", data=["wiki"], steps=1, seq_len=8, out=root / "never", hidden_inputs="original",
                    kd_weight=0.5, hidden_weight=0.5)


def test_pure_hidden_distillation_skips_the_vocabulary_projection_and_trains_the_same(root, monkeypatch):
    """The default objective: the student projects only the last position onto the vocabulary; the result is
    the one of the full forward with an LM term of weight 0."""
    from loram.publisher.align_trainer import AlignTrainer

    fast = _align(root, "hs-pure-fast", steps=3, distill_from="base", hidden_weight=1.0, shuffle_buffer=0)
    rows = fast.report["losses"]
    assert all(r["loss"] == pytest.approx(r["hidden_loss"], rel=1e-5) and "lm_loss" not in r for r in rows)
    monkeypatch.setattr(AlignTrainer, "hidden_only", property(lambda self: False))
    full = _align(root, "hs-pure-full", steps=3, distill_from="base", hidden_weight=1.0, shuffle_buffer=0)
    assert [r["hidden_loss"] for r in full.report["losses"]] == pytest.approx([r["hidden_loss"] for r in rows],
                                                                            rel=1e-5)
    a, b = _state(fast.out), _state(full.out)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the final norm only feeds the vocabulary projection, which this objective does not score: untouched
    assert torch.equal(a["model.norm.weight"], _state(root / "pruned")["model.norm.weight"])


def test_sources_are_streamed_from_every_supported_form(tmp_path):
    docs = [f"Document number {i} talks about pruning." for i in range(20)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs]))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.txt", "a.jsonl", "a.json", "a.parquet", "saved"):
        assert list(iter_texts(str(tmp_path / name))) == docs, name
    tok = tiny_tokenizer()
    blocks = eval_blocks(str(tmp_path / "a.jsonl"), tok, 16, 5)
    assert len(blocks) == 5 and all(len(b["input_ids"]) == 16 for b in blocks)
    joined = "".join(d + "\n\n" for d in docs)
    packed = sum((b["input_ids"] for b in blocks), [])
    assert packed == tok(joined, add_special_tokens=False)["input_ids"][:80]  # packed across documents
    stream = mixture([Source(str(tmp_path / "a.parquet"))], tok, 16)
    assert isinstance(stream, datasets.IterableDataset)  # never materialized
    assert len(list(islice(stream, 500))) == 500  # endless: a small source repeats


CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"


def test_wiki_chat_renders_every_paragraph_of_wiki_in_the_models_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    docs = list(chat_texts("wiki-chat", tok))
    answers: dict[str, list[str]] = {}
    for doc in docs:
        ask, _, rest = doc.removeprefix("<user>").partition("</user><assistant>")
        assert doc.startswith("<user>Tell me ") and rest.endswith("</assistant>")
        title = ask.removeprefix("Tell me more about ").removeprefix("Tell me about ").removesuffix(".")
        assert ask.startswith("Tell me more") == (title in answers)  # "more" on every run after an article's first
        answers.setdefault(title, []).append(rest.removesuffix("</assistant>"))
    wiki = read_records("wiki")
    assert list(answers) == [r["title"] for r in wiki]
    for r in wiki:  # every paragraph, in order, once; a run closes once it passes CHAT_RUN characters
        paragraphs = [p for p in r["text"].split("\n\n") if p.strip()]
        assert "\n\n".join(answers[r["title"]]) == "\n\n".join(paragraphs)
        assert all(sum(map(len, a.split("\n\n"))) > CHAT_RUN for a in answers[r["title"]][:-1])
    blocks = eval_blocks("wiki-heldout-chat", tok, 64, 3)
    assert tok.decode(blocks[0]["input_ids"]).startswith("<user>Tell me about " + read_records("wiki-heldout")[0]["title"])


def test_wiki_chat_without_a_working_chat_template_is_a_one_line_error(root):
    with pytest.raises(LoramError, match="data source wiki-chat renders wiki in the model's chat template, and "
                                         "this tokenizer has none; use wiki instead"):
        _align(root, "bad-chat", data=["wiki-chat"])
    assert not (root / "bad-chat").exists()
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(LoramError, match=r"data source wiki-heldout-chat: the tokenizer's chat template failed .*"
                                         "only user turns.*use wiki-heldout instead"):
        eval_blocks("wiki-heldout-chat", tok, 16, 1)


def test_sources_are_mixed_by_weight(tmp_path):
    (tmp_path / "lower.txt").write_text("only lower case letters here. " * 400)
    (tmp_path / "upper.jsonl").write_text(json.dumps({"text": "ONLY UPPER CASE LETTERS HERE. " * 400}) + "\n")
    sources = [Source.parse(f"{tmp_path / 'lower.txt'}:1"), Source.parse(f"{tmp_path / 'upper.jsonl'}:3")]
    tok = tiny_tokenizer()
    blocks = list(islice(mixture(sources, tok, 8, seed=1), 1500))
    upper = sum(any(c.isupper() for c in tok.decode(b["input_ids"])) for b in blocks) / len(blocks)
    assert upper == pytest.approx(0.75, abs=0.035)
    again = list(islice(mixture(sources, tok, 8, seed=1), 50))
    assert again == blocks[:50]  # seeded: the same stream every time (what makes resume exact)


@pytest.mark.parametrize("replay_tokens", [1 << 24, 40])  # the small source held in memory / streamed every pass
def test_a_small_source_is_read_once_and_the_stream_is_what_repeating_it_gives(tmp_path, monkeypatch, replay_tokens):
    from loram.publisher import align_data

    (tmp_path / "big.txt").write_text("\n\n".join(f"paragraph {i} of the big source." for i in range(300)))
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": f"SMALL RECORD {i}."}) + "\n" for i in range(4)))
    sources = [Source(str(tmp_path / "big.txt")), Source(str(tmp_path / "small.jsonl"))]
    tok = tiny_tokenizer()

    def repeating(s):  # what the stream was before replay: the datasets library re-reading the source every pass
        return align_data._blocks_dataset(s.name, tok, 8).repeat(None)
    reads = []
    real = align_data.iter_texts
    monkeypatch.setattr(align_data, "iter_texts", lambda name: reads.append(name) or real(name))
    monkeypatch.setattr(align_data, "REPLAY_TOKENS", replay_tokens)
    stream = list(islice(mixture(sources, tok, 8, seed=3, shuffle_buffer=50), 400))
    passes = reads.count(str(tmp_path / "small.jsonl")) - 1  # less mixture's check of the first block
    assert passes == 1 if replay_tokens > 40 else passes > 20  # 8 blocks a pass, about 200 drawn
    mixed = datasets.interleave_datasets([repeating(s) for s in sources], probabilities=[0.5, 0.5], seed=3,
                                         stopping_strategy="first_exhausted").shuffle(seed=3, buffer_size=50)
    assert stream == list(islice(mixed, 400))  # the same blocks in the same order: resume and results unchanged
    assert list(align_data.repeated_blocks(str(tmp_path / "small.jsonl"), tok, 1000)) == []  # no block: no loop


@pytest.mark.parametrize("spec,message", [
    ("text.txt:0", "weight must be a positive number"),
    ("text.txt:-2", "weight must be a positive number"),
    ("text.txt:abc", "weight 'abc' is not a number"),
    ("empty.txt", "data source .*empty.txt holds no text records"),
    ("empty.jsonl", "data source .*empty.jsonl holds no text records"),
    ("blank.jsonl", "data source .*blank.jsonl holds no text records"),
    ("short.txt", "empty or shorter than one block"),
    ("missing.jsonl", "neither a file"),
    ("text.csv", "must be .txt, .jsonl, .json, .parquet"),
    ("titles.jsonl", "every record needs a string field 'text' .found title."),
    ("numbers.jsonl", "every record needs a string field 'text' .a record's 'text' is int."),
    ("broken.jsonl", "could not read data source .*broken.jsonl"),
])
def test_bad_sources_are_one_line_errors_and_write_nothing(root, spec, message):
    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    (root / "short.txt").write_text("hi\n")
    (root / "text.csv").write_text("text\nhello\n")
    (root / "titles.jsonl").write_text(json.dumps({"title": "no text"}) + "\n")
    (root / "numbers.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (root / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(LoramError, match=message):
        _align(root, "bad", data=[str(root / spec)])
    assert not (root / "bad").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"seq_len": 129}, r"--seq-len 129 exceeds the model's max_position_embeddings \(128\)"),
    ({"pruned": "base"}, "not a LoRAM pruned checkpoint .no loram_manifest.json"),
    ({"data": []}, "--data: give at least one source"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"kd_weight": 1.5}, r"--kd-weight must lie in \[0, 1\]"),
    ({"hidden_weight": -1.0}, r"--hidden-weight must lie in \[0, 1\]"),
    ({"distill_from": "base", "kd_weight": 0.6, "hidden_weight": 0.5}, "exceed 1 .the LM loss gets 1 minus"),
    ({"distill_from": "base", "hidden_weight": 0.0}, "distills nothing; set either weight"),
    ({"distill_from": "base", "pruned": "pruned-moved"}, "--distill-from base: model .* is neither an existing "
                                                         "folder.*the manifest's base model.*--distill-from none"),
    ({"eval_data": "nowhere.txt"}, "neither a file"),
    ({"data": ["wiki_chat"]}, r"neither a file.*built-in name \(wiki, .*wiki-chat, wiki-heldout-chat\)"),
    ({"lr": float("inf")}, "--lr must be a finite number > 0"),
    ({"eval_data": "wiki-heldout:2"}, "--eval-data wiki-heldout:2: the held-out text takes no :WEIGHT; give one "
                                      "source, e.g. --eval-data wiki-heldout"),
    ({"seed": -1}, r"--seed must lie in \[0, 2\^32\)"),
    # hidden states are matched by layer index and size: a teacher of other shapes is refused before training
    ({"distill_from": "base-wide", "hidden_weight": 1.0}, "base-wide has a hidden size of 64, the pruned model 48; "
                                                          "distill from the original model it was pruned from"),
    ({"distill_from": "base-short", "hidden_weight": 1.0}, "base-short has 4 decoder layers, the pruned model 6"),
])
def test_bad_input_is_a_clear_error(root, kwargs, message):
    if "pruned" in kwargs:
        kwargs["pruned"] = str(root / kwargs["pruned"])
    if kwargs.get("distill_from", "base") != "base":  # "base": the manifest's base model, not a folder
        kwargs["distill_from"] = str(root / kwargs["distill_from"])
    with pytest.raises(LoramError, match=message):
        _align(root, "bad2", **kwargs)
    assert not (root / "bad2").exists()


def test_logit_distillation_alone_takes_a_teacher_of_other_hidden_shapes(root):
    """Only the vocabulary must agree when no hidden state is matched (e.g. a wider model of the same family)."""
    run = _align(root, "kd-wide", steps=1, distill_from=str(root / "base-wide"), kd_weight=1.0, hidden_weight=0.0)
    assert run.steps == 1 and math.isfinite(run.losses[0])


def test_existing_output_needs_resume_or_overwrite(root):
    (root / "exists").mkdir()
    (root / "exists" / "x").write_text("x")
    with pytest.raises(LoramError, match="already exists; choose another --out, or pass --overwrite"):  # no checkpoint: no --resume
        _align(root, "exists")
    with pytest.raises(LoramError, match="no complete checkpoint"):
        _align(root, "exists", resume=True)
    result = _align(root, "exists", overwrite=True, steps=1)
    assert not (result.out / "x").exists() and Manifest.load(result.out).alignment[-1]["steps"] == 1


def test_cli_mixes_sources_from_repeated_flags_and_reports_one_line_errors(root):
    (root / "more.jsonl").write_text(json.dumps({"text": TEXT.upper()}) + "\n")
    cmd = [LORAM, "publish", "align", str(root / "pruned"), "--data", f"{root / 'text.txt'}:1",
           "--data", f"{root / 'more.jsonl'}:3", "--steps", "2", "--seq-len", "32", "--train-lm-head",
           "--out", str(root / "cli")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "aligned 2 steps (256 tokens)" in proc.stdout and "aligned pruned checkpoint" in proc.stdout
    assert "aligning" in proc.stderr  # the progress bar
    record = Manifest.load(root / "cli").alignment[-1]
    assert [d["weight"] for d in record["data"]] == [0.25, 0.75] and record["lm_head"] == "trained"
    # the default objective: hidden-state distillation from the manifest's base model at the pruned layers,
    # no LM term
    assert record["distill"] == {"from": "base", "kd_weight": 0.0,
                                 "hidden": {"weight": 1.0, "loss": "mse", "layers": "pruned", "inputs": "pruned"}}
    losses = json.loads((root / "cli" / "align_report.json").read_text())["losses"]
    assert all(r["hidden_loss"] > 0 and r["loss"] == pytest.approx(r["hidden_loss"], rel=1e-5) for r in losses)
    from typer.testing import CliRunner

    from loram.cli import app

    bad = CliRunner().invoke(app, cmd[1:-2] + ["--out", str(root / "cli-bad"), "--seq-len", "1000"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: --seq-len 1000 exceeds the model's max_position_embeddings (128)"
    assert not (root / "cli-bad").exists()


@pytest.mark.slow
def test_smollm2_alignment_lowers_held_out_perplexity(tmp_path):
    from loram.shared import assets

    prune(base=str(assets.model_dir()), out=tmp_path / "p50", method="l2", ratio=0.5)
    result = align(pruned=str(tmp_path / "p50"), data=["wiki"], steps=4, seq_len=64, batch=2, lr=2e-4,
                   eval_data="wiki-heldout", eval_limit=4, eval_every=4, out=tmp_path / "aligned")
    (start, before), (end, after) = result.perplexities[0], result.perplexities[-1]
    assert (start, end) == (0, 4) and after < before
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied, and frozen


def test_only_the_first_process_hashes_the_text(tmp_path, monkeypatch):
    """The record is written (and --resume checked) by the first process: the others do not read the corpus again."""
    import importlib

    align, align_data = (importlib.import_module(f"loram.publisher.{m}") for m in ("align", "align_data"))
    (tmp_path / "text.txt").write_text("some text\n")
    cfg = align.AlignConfig(pruned="p", data=[f"{tmp_path / 'text.txt'}:3", "wiki:1"], steps=1, seq_len=8,
                            out=tmp_path / "out", eval_data=str(tmp_path / "text.txt"))
    data, evaluated = align._data_records(cfg)
    assert data == [{"source": "text.txt", "sha256": sha256_file(tmp_path / "text.txt"), "bytes": 10, "weight": 0.75},
                    {"source": "wiki", "weight": 0.25}] and evaluated == {k: data[0][k] for k in ("source", "sha256",
                                                                                                 "bytes")}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for reader in ("sha256_file", "visible_file_hashes"):
        monkeypatch.setattr(align_data, reader, lambda *a: pytest.fail("a second process hashed the text"))
    data, evaluated = align._data_records(cfg)
    assert [d["weight"] for d in data] == [0.75, 0.25] and not any("sha256" in d for d in [*data, evaluated])


def test_source_record_names_a_file_by_its_hash_not_its_path(tmp_path, monkeypatch):
    from loram.publisher.align_data import source_record

    (tmp_path / "text.txt").write_text("some text\n")
    assert source_record(str(tmp_path / "text.txt")) == {
        "source": "text.txt", "sha256": sha256_file(tmp_path / "text.txt"), "bytes": 10}
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a b c", "d e"]}).save_to_disk(folder)
    record = source_record(str(folder) + "/")
    assert record["source"] == "saved" and record["bytes"] == sum(f.stat().st_size for f in folder.rglob("*"))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("local state")  # hidden files are left out, as in a checkpoint's hashes
    assert source_record(str(folder)) == record
    (folder / "dataset_info.json").write_text((folder / "dataset_info.json").read_text() + " ")
    assert source_record(str(folder))["sha256"] != record["sha256"]  # any file of the folder changes it
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "text.txt")  # named as given, not as the link resolves
    assert source_record(str(tmp_path / "link.jsonl"))["source"] == "link.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wiki").mkdir()  # a built-in name is the built-in, as the reader takes it, even beside such a folder
    assert source_record("wiki") == {"source": "wiki"} and source_record("wiki-chat") == {"source": "wiki-chat"}
