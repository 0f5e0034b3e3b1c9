"""Model cards of pruned checkpoints and recovered adapters (docs/hub.md, Model cards), and `loram publish push`."""

import json
import re
import shutil

import pytest
import yaml
from tiny_models import save_tiny_checkpoint

from loram.publisher.prune import prune
from loram.publisher.push import push
from loram.shared.errors import LoramError
from loram.shared.manifest import Manifest
from loram.shared.model_cards import adapter_card, card_metadata, parameter_counts, pruned_card

RECORD = {"tool": "loram publish align", "steps": 40,
          "data": [{"source": "wiki", "weight": 0.5}, {"source": "math.jsonl", "sha256": "ab12" * 16, "bytes": 9,
                                                      "weight": 0.5}],
          "tokens": 20480, "eval": {"source": "wiki-heldout", "perplexity": 31.5, "perplexity_at_start": 48.2}}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    result = prune(base=str(root / "base"), out=root / "pruned", method="random", ratio=0.5, layers="1:5")
    return root, result


def test_pruned_card_metadata_mirrors_the_manifest(pruned, tmp_path):
    root, result = pruned
    folder = tmp_path / "pruned"
    shutil.copytree(root / "pruned", folder)
    (folder / "eval_results.json").write_text(json.dumps({"results": [
        {"name": "pruned", "model": "pruned", "adapter": None, "perplexity": 57.25, "tokens": 900}]}))
    manifest = Manifest.load(folder)
    manifest.alignment = [RECORD]
    card = pruned_card(folder, manifest, repo_id="org/tiny-p50", base_model="org/tiny", license="apache-2.0")
    assert card == pruned_card(folder, manifest, repo_id="org/tiny-p50", base_model="org/tiny", license="apache-2.0")
    meta = card_metadata(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["loram", "pruned", "structured-pruning"]
    loram = meta["loram"]
    assert loram["method"]["criterion"] == "random" and loram["method"]["mlp_ratio"] == 0.5
    assert loram["method"]["layers"] == [1, 5] and loram["pruned_layers"] == [1, 2, 3, 4]
    assert loram["parameters"] == {"original": result.original_params, "pruned": result.pruned_params,
                                   "reduction": round(result.original_params / result.pruned_params, 4)}
    assert loram["base"] == {"id": str(root / "base"), "revision": None}
    assert loram["alignment"] == [RECORD] and loram["evaluation"][0]["perplexity"] == 57.25
    # prose: method, counts, alignment, evaluation, the exact recipe, how to use it
    assert f"{result.original_params:,} -> {result.pruned_params:,}" in card
    assert ("40 steps, 20,480 tokens, on wiki (weight 0.5), math.jsonl (weight 0.5, sha256 ab12ab12ab12), "
            "held-out perplexity 31.5") in card
    assert "| pruned | 57.2500 | 900 |" in card
    recipe = (folder / "prune_config.yaml").read_text().rstrip()
    assert f"```yaml\n{recipe}\n```" in card and "loram publish prune --config prune_config.yaml" in card
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-p50")' in card
    assert "loram.register()" in card and "trust_remote_code=True" in card and (folder / "modeling_loram.py").is_file()


def test_a_local_base_is_not_claimed_as_hub_base_model(pruned):
    root, _ = pruned
    card = pruned_card(root / "pruned", Manifest.load(root / "pruned"))
    meta = card_metadata(card)
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta
    assert "--original ORG/NAME" in card


def test_parameter_counts_come_from_the_config(pruned):
    root, result = pruned
    counts = parameter_counts(root / "pruned")
    assert (counts["original"], counts["pruned"]) == (result.original_params, result.pruned_params)


def test_adapter_card_names_the_original_as_base():
    sidecar = {"original_model": {"id": "org/tiny", "revision": "a" * 40},
               "pruned_model": {"id": "org/tiny-p50", "revision": "b" * 40},
               "method": {"kind": "structured", "criterion": "random", "ratio": 0.5, "layers": [1, 5]}, "fill": "zero"}
    card = adapter_card(sidecar, {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]},
                        repo_id="org/tiny-lora")
    meta = card_metadata(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["loram"]["trained_on"] == "org/tiny-p50"
    assert meta["loram"]["trained_on_revision"] == "b" * 40 and meta["loram"]["target_modules"] == ["q_proj", "v_proj"]
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/tiny-lora")' in card


@pytest.mark.parametrize("hub", ["lfs"], indirect=True)
def test_publish_push_uploads_the_manifest_files_and_the_card(pruned, hub, tmp_path, loram_warnings):
    root, _ = pruned
    folder = tmp_path / "pruned"
    shutil.copytree(root / "pruned", folder)
    (folder / "notes.txt").write_text("not in the manifest: stays local")
    result = push(folder=folder, repo_id="org/tiny-p50", tag="v1", endpoint=hub.url, base_model="org/tiny")
    manifest = Manifest.load(folder)
    files = set(hub.repos["org/tiny-p50"].resolve("v1").files)
    assert files == {".gitattributes", "README.md", "loram_manifest.json", "loram_manifest.safetensors", *manifest.files}
    assert {"model.safetensors", "config.json", "modeling_loram.py", "tokenizer.json", "prune_config.yaml"} <= files
    card = hub.file("org/tiny-p50", "README.md").decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "apache-2.0"  # read from the base model's card
    assert result.changed and "org/tiny-p50@main: committed" in result.summary()
    assert not push(folder=folder, repo_id="org/tiny-p50", tag="v1", endpoint=hub.url, base_model="org/tiny").changed

    assert not any("local path" in m for m in loram_warnings())  # --base-model names it
    push(folder=folder, repo_id="org/tiny-p50-local", endpoint=hub.url)  # the manifest's base is a folder
    assert re.search(r"^the manifest names the original model by a local path \(.*base\): the card names no "
                     r"base_model.*pass --base-model ORG/NAME", "\n".join(loram_warnings()))
    assert "--original ORG/NAME" in hub.file("org/tiny-p50-local", "README.md").decode()

    (folder / "config.json").write_text("{}")
    with pytest.raises(LoramError, match="config.json: sha256 does not match the manifest"):
        push(folder=folder, repo_id="org/tiny-p50", endpoint=hub.url)
    with pytest.raises(LoramError, match="has no loram_manifest.json: `loram publish push` publishes pruned"):
        push(folder=root / "base", repo_id="org/tiny-p50", endpoint=hub.url)


def test_non_structured_card(pruned, tmp_path):
    root, _ = pruned
    out = prune(base=str(root / "base"), out=tmp_path / "sparse", method="magnitude", nm="2:4").out
    card = pruned_card(out, Manifest.load(out), base_model="org/tiny")
    meta = card_metadata(card)
    assert meta["tags"] == ["loram", "pruned", "non-structured-pruning"]
    assert meta["loram"]["method"]["nm"] == [2, 4] and meta["loram"]["pruned_layers"] == list(range(6))
    assert meta["loram"]["parameters"]["reduction"] == 1.0
    assert "non-structured, magnitude, 2:4" in card and "shapes unchanged" in card
    # it is a stock checkpoint: no pruned model types to register, no modeling file in the repository
    assert "loram.register()" not in card and "trust_remote_code" not in card and not (out / "modeling_loram.py").exists()
    assert 'AutoModelForCausalLM.from_pretrained("sparse")' in card and "the stock model class" in card


def test_a_bad_repo_id_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    """`publish push FOLDER --repo-id justname` hashed every file (and warned about the local base) before saying
    the id was wrong; at 70B that is minutes."""
    import importlib

    from loram.hub_commands import push as push_adapter

    push_module = importlib.import_module("loram.publisher.push")

    monkeypatch.setattr(push_module, "verify_files", lambda folder: pytest.fail("files were read"))
    for command in (push, push_adapter):
        with pytest.raises(LoramError, match=r"^--repo-id 'justname' must be a Hub repo id ORG/NAME$"):
            command(folder=tmp_path / "not-even-there", repo_id="justname")


def test_evaluation_tables_show_a_missing_adapter_as_a_dash_and_four_decimals(capsys):
    """`loram eval`'s table (and a card's evaluation table): no adapter is `-`, not Python's None, and perplexity
    reads as the progress lines print it (4.8720, not 4.872)."""
    from loram.evaluate import print_rows

    rows = [{"name": "original", "model": "m", "adapter": None, "perplexity": 4.872, "tokens": 1200},
            {"name": "loram", "model": "m", "adapter": "rec", "perplexity": 4.1, "tokens": 1200}]
    print_rows(rows, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "perplexity", "tokens", "model", "adapter"]
    assert lines[2].split() == ["original", "4.8720", "1200", "m", "-"] and lines[3].split()[1] == "4.1000"
    assert "None" not in "\n".join(lines) and rows[0]["perplexity"] == 4.872  # the rows (and --json) keep numbers
