"""End to end through the loopback Hub (tests/hub_server.py) on tiny models:
prune -> push v1 and v2 -> pull v1 -> train on the Hub id -> recover -> push the adapter -> vanilla
peft loads it through the endpoint. Then the CLI (pull, push, publish push) and token hygiene."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from tiny_models import save_tiny_checkpoint

from loram.hub_commands import pull
from loram.hub_commands import push as push_adapter
from loram.publisher.prune import prune
from loram.publisher.push import push as publish
from loram.recover import recover
from loram.shared.errors import LoramError
from loram.shared.hub import push_files
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, Manifest
from loram.shared.model_cards import card_metadata
from loram.train import TrainConfig, train

QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}
      for a in range(5) for b in range(4)]


def _original_on_hub(hub, root: Path) -> Path:
    """The original tiny model, published as org/tiny (the base every pruned checkpoint names)."""
    save_tiny_checkpoint(root / "base", "llama-gqa")
    push_files("org/tiny", {p.name: p for p in (root / "base").iterdir()}, endpoint=hub.url, message="original")
    return root / "base"


def _child_env(hub, home: Path, **extra) -> dict:
    """A child process with its own Hugging Face home, talking to the loopback Hub (HF_TOKEN inherited)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ENDPOINT": hub.url,
            "LORAM_THREADS": "1", **extra}


def test_prune_push_pull_train_recover_push_then_vanilla_peft_loads_it(hub, tmp_path):
    base = _original_on_hub(hub, tmp_path)
    original_sha = hub.head("org/tiny")
    v1 = prune(base="org/tiny", endpoint=hub.url, method="random", ratio=0.5, layers="1:5", out=tmp_path / "p-v1")
    one = publish(folder=v1.out, repo_id="org/tiny-p50", tag="v1", endpoint=hub.url)
    v2 = prune(base="org/tiny", endpoint=hub.url, method="random", ratio=0.25, layers="1:5", seed=1,
               out=tmp_path / "p-v2")
    two = publish(folder=v2.out, repo_id="org/tiny-p50", tag="v2", endpoint=hub.url)
    assert one.changed and two.changed and two.commit != one.commit == hub.repos["org/tiny-p50"].tags["v1"]

    # pull at v1 gives v1's files exactly
    pulled = pull(repo_id="org/tiny-p50", revision="v1", endpoint=hub.url, out=tmp_path / "pulled-v1")
    assert pulled.revision == one.commit
    names = set(Manifest.load(v1.out).files) | {MANIFEST_JSON, MANIFEST_TENSORS}
    for name in names:
        assert (pulled.path / name).read_bytes() == (v1.out / name).read_bytes(), name
    assert (pulled.path / "config.json").read_bytes() != (v2.out / "config.json").read_bytes()
    card = card_metadata((pulled.path / "README.md").read_text())
    assert card["base_model"] == "org/tiny" and card["loram"]["base"] == {"id": "org/tiny", "revision": original_sha}

    # train on the Hub id at v1: the adapter names the pruned repo and v1's commit
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    trained = train(TrainConfig(model="org/tiny-p50", revision="v1", endpoint=hub.url, data=str(tmp_path / "qa.jsonl"),
                                out=tmp_path / "adapter-p50", columns="prompt=question,response=answer",
                                seq_len=48, batch=4, steps=2, lr=1e-2, save_every=100))
    trained_cfg = json.loads((trained.out / "adapter_config.json").read_text())
    assert (trained_cfg["base_model_name_or_path"], trained_cfg["revision"]) == ("org/tiny-p50", one.commit)

    # recover: the adapter now names the original repo at its commit; push it with its card
    recovered = recover(adapter=str(trained.out), out=tmp_path / "adapter", endpoint=hub.url)
    recovered_cfg = json.loads((recovered.out / "adapter_config.json").read_text())
    assert (recovered_cfg["base_model_name_or_path"], recovered_cfg["revision"]) == ("org/tiny", original_sha)
    pushed = push_adapter(folder=recovered.out, repo_id="org/tiny-lora", tag="v1", endpoint=hub.url)
    assert pushed.changed
    card = card_metadata(hub.file("org/tiny-lora", "README.md").decode())
    assert card["base_model"] == "org/tiny" and card["base_model_relation"] == "adapter"
    assert card["loram"]["trained_on"] == "org/tiny-p50" and card["loram"]["trained_on_revision"] == one.commit

    # vanilla peft, in a fresh process with an empty cache, loads the original through the endpoint
    code = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM, PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "hub = AutoPeftModelForCausalLM.from_pretrained('org/tiny-lora')\n"
        f"local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), "
        f"{str(recovered.out)!r})\n"
        "assert not any(k.startswith('loram') for k in sys.modules)\n"
        "x = torch.tensor([[5, 6, 7, 8, 9]])\n"
        "assert torch.equal(hub(x).logits, local(x).logits)\n"
        "print('ok', type(hub.base_model.model).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_child_env(hub, tmp_path / "fresh-home"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "LlamaForCausalLM"]
    resolved = [path for method, path, status in hub.requests if "/org/tiny/resolve/" in path and status == 200]
    assert any(f"/resolve/{original_sha}/model.safetensors" in p for p in resolved)  # the original, at its commit

    # `loram eval` reaches both the adapter and its original through the same endpoint
    from loram.evaluate import evaluate

    rows = evaluate(models=["original=org/tiny", "loram=org/tiny+org/tiny-lora"], data=str(tmp_path / "qa.jsonl"),
                    columns="prompt=question,response=answer", limit=4, seq_len=48, endpoint=hub.url)
    assert [r["name"] for r in rows] == ["original", "loram"] and rows[0]["perplexity"] != rows[1]["perplexity"]


CLI_SCRIPT = """
import sys
from loram.cli import app
for i, args in enumerate(COMMANDS):
    print(f"=== {i}", flush=True)
    print(f"=== {i}", file=sys.stderr, flush=True)
    try:
        app(args, prog_name="loram")
    except SystemExit as e:
        print(f"rc={e.code}", flush=True)
"""


def _run_cli(hub, tmp_path, commands, **env) -> tuple[list[str], list[str], list[int]]:
    """Run several `loram` commands in one child process (one start-up); per-command stdout, stderr, exit code."""
    script = f"COMMANDS = {commands!r}\n{CLI_SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=_child_env(hub, tmp_path / "hf-home", **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.split("=== ")[1:]
    err = proc.stderr.split("=== ")[1:]
    codes = [int(o.rsplit("rc=", 1)[1].split()[0]) if "rc=" in o else 0 for o in out]
    return out, err, codes


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
def test_cli_push_pull_offline_errors_and_the_token_never_leaks(hub, tmp_path):
    _original_on_hub(hub, tmp_path)
    prune(base=str(tmp_path / "base"), method="random", ratio=0.5, layers="1:5", out=tmp_path / "pruned")
    url = hub.url
    out, err, codes = _run_cli(hub, tmp_path, [
        ["publish", "push", "pruned", "--repo-id", "org/p", "--tag", "v1", "--base-model", "org/tiny",
         "--endpoint", url],
        ["publish", "push", "pruned", "--repo-id", "org/p", "--tag", "v1", "--base-model", "org/tiny",
         "--endpoint", url],
        ["pull", "org/p", "--revision", "v1", "--endpoint", url, "--out", "pulled"],
        ["pull", "org/nope", "--endpoint", url],
        ["pull", "org/p", "--revision", "v7", "--endpoint", url],
        ["push", "pruned", "--repo-id", "org/x", "--endpoint", url],
        ["pull", "--help"], ["push", "--help"], ["publish", "push", "--help"],
    ])
    assert codes[:3] == [0, 0, 0], err
    assert "org/p@main: committed" in out[0] and "tag v1" in out[0]
    assert "org/p@main: no changes" in out[1]
    assert f"org/p@{hub.head('org/p')}: verified" in out[2] and (tmp_path / "pulled" / MANIFEST_JSON).is_file()
    for i, expected in ((3, "Hub repository org/nope not found"), (4, "revision 'v7' not found"),
                        (5, "is not a recovered adapter")):
        lines = [line for line in err[i].splitlines()[1:] if line.strip()]
        assert codes[i] == 2 and lines == [lines[0]] and lines[0].startswith("error: ") and expected in lines[0], err[i]
    for i in (6, 7, 8):
        assert codes[i] == 0 and "Examples:" in out[i]

    # offline (the environment variable, as users set it): the pulled revision comes from the cache
    calls = len(hub.requests)
    off_out, off_err, off_codes = _run_cli(hub, tmp_path, [["pull", "org/p", "--revision", "v1"],
                                                          ["pull", "org/p", "--revision", "v2"]], HF_HUB_OFFLINE="1")
    assert off_codes == [0, 2] and "verified" in off_out[0] and "HF_HUB_OFFLINE=1" in off_err[1]
    assert len(hub.requests) == calls

    # the token was sent (the server requires it) and appears nowhere: output, logs, files, uploads
    assert f"Bearer {HUB_TOKEN}" in hub.authorizations
    for text in out + err + off_out + off_err:
        assert HUB_TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert HUB_TOKEN.encode() not in path.read_bytes(), path
    assert not any(HUB_TOKEN.encode() in blob for blob in hub.blobs.values())


def test_align_distills_from_a_hub_original_through_the_endpoint(hub, tmp_path):
    """--distill-from a Hub id reaches the same --endpoint as the pruned model (it used to fall back to the
    default Hub, which does not exist here)."""
    from loram.publisher.align import align

    _original_on_hub(hub, tmp_path)
    pruned = prune(base="org/tiny", endpoint=hub.url, method="random", ratio=0.5, layers="1:5", out=tmp_path / "p")
    (tmp_path / "text.txt").write_text("\n\n".join(f"paragraph {i} " + "words " * 30 for i in range(30)))
    before = len(hub.requests)
    result = align(pruned=str(pruned.out), data=[str(tmp_path / "text.txt")], steps=2, seq_len=16, batch=2,
                   distill_from="org/tiny", endpoint=hub.url, kd_weight=0.5, hidden_weight=0.0, save_every=100,
                   out=tmp_path / "aligned")
    assert result.report["record"]["distill"] == {"from": "org/tiny", "kd_weight": 0.5}
    assert all("kd_loss" in r and r["kd_loss"] >= 0 for r in result.report["losses"]), result.report["losses"]
    teacher_calls = [path for _, path, _ in hub.requests[before:] if "/org/tiny/" in path]
    assert teacher_calls, hub.requests[before:]  # the teacher (the local pruned model needs none) came from it


@pytest.mark.parametrize("broken, message", [
    ("adapter_config.json", "adapter_config.json is not valid JSON"),
    ("loram_recovery.json", "loram_recovery.json is not valid JSON .*; recover the adapter again"),
    ("adapter_model.safetensors", "adapter_model.safetensors is not a complete safetensors file"),
])
def test_push_refuses_a_damaged_adapter_before_going_online(tmp_path, broken, message):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "recovered"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "o/b"}))
    (folder / "loram_recovery.json").write_text(json.dumps({"pruned_model": {"id": "o/p"}}))
    (folder / broken).write_bytes(b"{\n" if broken.endswith(".json") else b"\x10\x00")
    with pytest.raises(LoramError, match=message):  # an unreachable endpoint: never contacted
        push_adapter(folder=folder, repo_id="org/name", endpoint="http://127.0.0.1:9")


def test_push_refuses_an_adapter_edited_after_recovery_before_going_online(tmp_path):
    """The card names the recovery's base: an adapter_config.json pointing elsewhere would publish an adapter
    whose card and config disagree."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "recovered"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "revision": "abc",
                                                            "base_model_name_or_path": "org/doesnotexist"}))
    (folder / "loram_recovery.json").write_text(json.dumps({"pruned_model": {"id": "o/p"},
                                                            "original_model": {"id": "org/base", "revision": "abc"}}))
    with pytest.raises(LoramError, match="names the base org/doesnotexist@abc, but loram_recovery.json records the "
                                         "recovery for org/base@abc; the adapter was edited after recovery"):
        push_adapter(folder=folder, repo_id="org/name", endpoint="http://127.0.0.1:9")
    with pytest.raises(LoramError, match="is not a folder; give the folder `loram recover` wrote"):
        push_adapter(folder=tmp_path / "missing", repo_id="org/name", endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
def test_eval_compares_a_local_model_with_hub_models_at_their_own_revisions(hub, tmp_path):
    """`eval $BASE org/x --revision v1` was refused ("--revision applies to Hub repositories, but ... is a local
    folder"), and `org/x@v1` was not a model: comparing one's original with a published model at a tag could not be
    written. --revision now applies to the Hub models only, and MODEL@REV names one per model."""
    from loram.evaluate import evaluate
    from loram.shared.errors import LoramError

    base = _original_on_hub(hub, tmp_path)  # org/tiny main = the local base
    push_files("org/tiny", {p.name: p for p in base.iterdir()}, tag="v1", endpoint=hub.url)  # v1 = the local base
    other = tmp_path / "other"
    save_tiny_checkpoint(other, "llama-gqa", seed=7)
    push_files("org/tiny", {p.name: p for p in other.iterdir()}, endpoint=hub.url, message="other weights on main")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"q{i} ?", "answer": f"a{i}."}) + "\n"
                                               for i in range(4)))
    common = dict(data=str(tmp_path / "qa.jsonl"), columns="prompt=question,response=answer", seq_len=48,
                  endpoint=hub.url)
    rows = evaluate(models=[f"local={base}", "v1=org/tiny@v1", "main=org/tiny"], **common)
    ppl = {r["name"]: r["perplexity"] for r in rows}
    assert ppl["v1"] == ppl["local"] != ppl["main"]
    rows = evaluate(models=[f"local={base}", "tagged=org/tiny"], revision="v1", **common)  # local takes none
    assert rows[0]["perplexity"] == rows[1]["perplexity"] == ppl["local"]
    with pytest.raises(LoramError, match="--revision applies to Hub repositories .ORG/NAME., but no MODEL here is"):
        evaluate(models=[str(base)], revision="v1", **common)
    with pytest.raises(LoramError, match="names no revision after '@'"):
        evaluate(models=["org/tiny@"], **common)
