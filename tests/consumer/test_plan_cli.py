"""`loram plan` and `loram.plan.plan`: the paper's 70B numbers from config.json alone, JSON output, errors."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_config
from typer.testing import CliRunner

from loram.cli import app
from loram.plan import PlanConfig, plan, read_model_config
from loram.shared.errors import LoramError

runner = CliRunner()
LORAM = str(Path(sys.executable).parent / "loram")

# Public config.json numbers of the two 70B models (rope etc. do not change any count).
LLAMA2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672, "vocab_size": 32000, "tie_word_embeddings": False,
              "torch_dtype": "float16"}
LLAMA31_70B = {**LLAMA2_70B, "vocab_size": 128256, "torch_dtype": "bfloat16",
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
EXPECTED = {  # name: (original, training, reduction, 4-bit reduction)
    "llama2": (68_976_648_192, 16_272_924_672, 4.24, 16.95),
    "llama31": (70_553_706_496, 17_849_982_976, 3.95, 15.81),
}
JSON_KEYS = {"original_params", "training_params", "reduction", "reduction_4bit", "nonzero_params",
             "training_bytes_4bit_bnb", "original_bytes_16bit", "training_bytes_16bit", "layers", "kept",
             "per_layer"}


@pytest.fixture
def configs(tmp_path) -> dict[str, Path]:
    """LLaMA-2-70B as a checkpoint directory (config.json, no weights), LLaMA-3.1-70B as a bare file."""
    (tmp_path / "llama2").mkdir()
    (tmp_path / "llama2" / "config.json").write_text(json.dumps(LLAMA2_70B))
    (tmp_path / "llama31.json").write_text(json.dumps(LLAMA31_70B))
    return {"llama2": tmp_path / "llama2", "llama31": tmp_path / "llama31.json"}


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", EXPECTED)
def test_table(configs, name):
    original, training, reduction, reduction_4bit = EXPECTED[name]
    result = runner.invoke(app, ["plan", str(configs[name]), "--ratio", "0.85"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    params = next(line for line in lines if line.startswith("parameters"))
    assert params.split()[1:] == [f"{original:,}", f"{training:,}", f"{reduction:.2f}x"]
    paper_4bit = next(line for line in lines if line.startswith("params, 4-bit paper"))
    assert paper_4bit.endswith(f"{reduction_4bit:.2f}x")
    assert "layers [4, 78)" in lines[0]
    kept = {line.split("/")[0].strip(): line.split()[-2:] for line in lines if "/ pruned layer" in line}
    assert kept == {"q heads": ["64", "16"], "kv heads": ["8", "2"], "MLP channels": ["28672", "4300"]}


@pytest.mark.parametrize("name", EXPECTED)
def test_json_is_one_object(configs, name):
    original, training, reduction, reduction_4bit = EXPECTED[name]
    result = runner.invoke(app, ["plan", str(configs[name]), "--json", "--ratio", "0.85"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)  # nothing else on stdout
    assert set(d) >= JSON_KEYS
    assert (d["original_params"], d["training_params"]) == (original, training)
    assert (round(d["reduction"], 2), round(d["reduction_4bit"], 2)) == (reduction, reduction_4bit)
    assert d["kept"] == {"q_heads": 16, "kv_heads": 2, "channels": 4300}


def test_flags_reach_the_plan(configs):
    result = runner.invoke(app, ["plan", str(configs["llama2"]), "--json", "--attn-ratio", "0.5",
                                 "--mlp-ratio", "0.25", "--layers", "2:-2"])
    d = json.loads(result.stdout)
    assert d["kept"] == {"q_heads": 32, "kv_heads": 4, "channels": 21504}
    assert d["layers"]["start"] == 2 and d["layers"]["stop"] == 78
    result = runner.invoke(app, ["plan", str(configs["llama2"]), "--json", "--kind", "non-structured",
                                 "--sparsity", "0.5"])
    d = json.loads(result.stdout)
    assert d["training_params"] == d["original_params"] > d["nonzero_params"]


def test_dtype_takes_short_names_too(configs):
    # merge's spelling (bf16) and torch's (bfloat16) plan the same
    plans = [json.loads(runner.invoke(app, ["plan", str(configs["llama2"]), "--json", "--dtype", d]).stdout)
             for d in ("bf16", "bfloat16", "fp32")]
    assert plans[0] == plans[1] != plans[2]
    assert plans[0]["memory"]["dtype"] == "bfloat16"


def test_yaml_config_file(configs, tmp_path):
    recipe = tmp_path / "plan.yaml"
    recipe.write_text(f"model: {configs['llama31']}\nratio: 0.85\njson: true\n")
    result = runner.invoke(app, ["plan", "--config", str(recipe)])
    assert json.loads(result.stdout)["training_params"] == EXPECTED["llama31"][1]


def test_python_api(configs):
    by_kwargs = plan(model=str(configs["llama31"]), ratio=0.85)
    by_dict = plan({"model": str(configs["llama31"]), "ratio": 0.85})
    by_config = plan(PlanConfig(model=str(configs["llama31"]), ratio=0.85))
    assert by_kwargs.training_params == by_dict.training_params == by_config.training_params == EXPECTED["llama31"][1]


def test_real_subprocess(configs):
    proc = subprocess.run([LORAM, "plan", str(configs["llama2"] / "config.json"), "--json", "--ratio", "0.85"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert (d["original_params"], d["training_params"]) == EXPECTED["llama2"][:2]


def test_help_has_examples():
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "loram plan" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--ratio", "1.0"], "--ratio must lie in [0, 1)"),
    (["--ratio", "1.5"], "--ratio must lie in [0, 1)"),
    (["--layers", "0:81"], "out of bounds"),
    (["--attn-ratio", "0.9999"], "removes every KV group"),
    (["--mlp-ratio", "0.99999"], "removes every MLP channel"),
    (["--kind", "semi"], "--kind"),
    (["--layers", "10:10"], "layer range 10:10 selects no layer of this 80-layer model"),
])
def test_bad_flags(configs, args, needle):
    _one_line_error(runner.invoke(app, ["plan", str(configs["llama2"]), *args]), needle)


def test_bad_configs(tmp_path):
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    _one_line_error(runner.invoke(app, ["plan", str(gpt2)]), "supported: llama, mistral, qwen2")
    _one_line_error(runner.invoke(app, ["plan", str(tmp_path / "missing.json")]),
                    "is neither an existing folder or config file nor a Hub repo id")
    _one_line_error(runner.invoke(app, ["plan", str(tmp_path)]), "has no config.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    _one_line_error(runner.invoke(app, ["plan", str(broken)]), "not a readable JSON config")
    six = tmp_path / "six.json"  # the default range [4, L-2) of a 6-layer model is empty, as `publish prune` says
    six.write_text(json.dumps(tiny_config("llama-gqa").to_dict()))
    _one_line_error(runner.invoke(app, ["plan", str(six)]), "4:-2 (the default) selects no layer of this 6-layer")


@pytest.fixture
def dead_hub(monkeypatch, tmp_path):
    """A Hub endpoint on a closed local port, an empty cache, no retry waits; returns its URL."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
    return url


def test_unreachable_hub_is_one_line(dead_hub):
    """The Hub's failures read as every command's (`loram publish prune ORG/NAME` likewise), with what plan takes
    instead: a local config.json."""
    local = "; or plan from a local copy of its config.json (MODEL may be the file)"
    _one_line_error(runner.invoke(app, ["plan", "loram-tests/no-such-model"]),
                    "could not reach the Hub for loram-tests/no-such-model@main (")
    with pytest.raises(LoramError, match=r"^could not reach the Hub at \S+ for loram-tests/other@v2 \(.*\) and it is "
                                         r"not in the local cache; check the network or --endpoint" + re.escape(local)):
        read_model_config("loram-tests/other", revision="v2", endpoint=dead_hub)
    _one_line_error(runner.invoke(app, ["plan", "not a repo id!"]), "'not a repo id!' is not a valid Hub repo id")


# ---- the publisher section: Taylor pruning, alignment with DDP and FSDP (loram.publisher_plan) ----------------

PUBLISHER_70B = ["--ratio", "0.85", "--devices", "1,2,4,8", "--device-memory", "80GiB", "--gradient-checkpointing"]


def test_publisher_table(configs):
    result = runner.invoke(app, ["plan", str(configs["llama31"]), *PUBLISHER_70B])
    assert result.exit_code == 0, result.output
    out = result.stdout
    lines = out.splitlines()
    assert "publisher memory (cuda: GPU memory per device):" in lines
    assert any(line.startswith("Taylor pruning of the stock model (bfloat16 weights, layers [4, 78); 32 x 128")
               for line in lines)
    header = next(line for line in lines if line.startswith("GiB per device"))
    assert header.split()[3:] == ["DDP", "1", "DDP", "2+", "FSDP", "1", "FSDP", "2", "FSDP", "4", "FSDP", "8"]
    fits = next(line for line in lines if line.startswith("fits "))
    # the default alignment holds the original (bf16, sharded too) for hidden-state distillation
    assert fits.split()[1:] == ["no", "no", "no", "no", "no", "yes"]
    assert any(line.startswith("teacher (the original)") for line in lines)
    assert lines[-3].startswith("Taylor pruning on one device of 80GiB (80.00 GiB): does not fit")
    assert lines[-2] == "DDP alignment on devices of 80GiB (80.00 GiB): does not fit at any N"
    assert lines[-1] == ("FSDP alignment: smallest N = 7 devices of 80GiB (80.00 GiB) (any whole N; as a power "
                         "of two: 8)")
    # the paper's LM-only alignment (`publish align --distill-from none`) fits on 4
    plain = runner.invoke(app, ["plan", str(configs["llama31"]), *PUBLISHER_70B, "--no-distill"]).stdout.splitlines()
    assert next(line for line in plain if line.startswith("fits ")).split()[1:] == ["no", "no", "no", "no", "yes", "yes"]
    assert plain[-1].startswith("FSDP alignment: smallest N = 4 devices") and not any(
        line.startswith("teacher") for line in plain)
    # the consumer's section is still there, before the publisher's
    assert out.index("estimated peak training memory") < out.index("publisher memory")


def test_publisher_json(configs):
    result = runner.invoke(app, ["plan", str(configs["llama31"]), "--json", *PUBLISHER_70B])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    pub = d["publisher"]
    assert pub["device"] == "cuda" and pub["device_memory_bytes"] == 80 * 2**30
    taylor, align = pub["taylor"], pub["align"]
    assert (taylor["samples"], taylor["seq_len"], taylor["calib_batch"], taylor["layers"], taylor["dtype"]) == (
        32, 128, 4, [4, 78], "bfloat16")
    assert taylor["weights_bytes"] == 2 * EXPECTED["llama31"][0] and taylor["fits"] is False
    assert align["params"] == d["training_params"] == EXPECTED["llama31"][1]
    assert align["trained_params"] == align["params"] - 128256 * 8192  # lm_head frozen, embeddings trained
    assert [e["devices"] for e in align["ddp"]] == [e["devices"] for e in align["fsdp"]] == [1, 2, 4, 8]
    for e in align["ddp"] + align["fsdp"]:
        assert e["total_bytes"] == sum(v for k, v in e.items() if k.endswith("_bytes") and k != "total_bytes")
    assert [e["fits"] for e in align["fsdp"]] == [False, False, False, True]  # the bf16 teacher, sharded too
    assert (align["fsdp_min_devices"], align["fsdp_min_devices_pow2"], align["ddp_fits"]) == (7, 8, False)
    assert align["teacher"] == "original (hidden-state distillation)"
    # DDP: the whole bf16 original (70.6B x 2 bytes) + the outputs of the 74 matched (pruned) layers [4, 78)
    # (4 x 512 tokens x 8192 x 4 bytes each)
    assert align["ddp"][0]["teacher_bytes"] == 2 * EXPECTED["llama31"][0] + 74 * 4 * 512 * 8192 * 4
    assert align["gradient_checkpointing"] is True and align["lm_head"] == "frozen"
    assert "publisher" not in json.loads(runner.invoke(app, ["plan", str(configs["llama31"]), "--json"]).stdout)


def test_publisher_is_implied_by_devices_or_device_memory(configs):
    only_memory = json.loads(runner.invoke(app, ["plan", str(configs["llama31"]), "--json", "--device-memory",
                                                 "80GiB"]).stdout)["publisher"]
    assert [e["devices"] for e in only_memory["align"]["fsdp"]] == [1, 2, 4, 8]  # the default counts
    only_devices = json.loads(runner.invoke(app, ["plan", str(configs["llama31"]), "--json", "--devices", "8",
                                                  "--devices", "16"]).stdout)["publisher"]
    assert [e["devices"] for e in only_devices["align"]["ddp"]] == [8, 16]
    assert only_devices["align"]["fsdp_min_devices"] is None and only_devices["align"]["ddp"][0]["fits"] is None
    table = runner.invoke(app, ["plan", str(configs["llama31"]), "--publisher"]).stdout
    assert "publisher memory" in table and "fits" not in table.split("publisher memory")[1]
    trained = json.loads(runner.invoke(app, ["plan", str(configs["llama31"]), "--json", "--publisher",
                                             "--train-lm-head", "--calib-samples", "8"]).stdout)["publisher"]
    assert trained["align"]["trained_params"] == trained["align"]["params"] and trained["taylor"]["samples"] == 8


@pytest.mark.parametrize("yaml_devices, counts", [("8", [8]), ("[1, 2, 8]", [1, 2, 8]), ('"1,2"', [1, 2]),
                                                   ('["4", 2]', [2, 4])])
def test_devices_in_a_config_file_need_no_quotes(configs, tmp_path, yaml_devices, counts):
    """YAML reads `devices: 8` as a number: a device count is one, so it is taken as written."""
    (tmp_path / "plan.yaml").write_text(f"devices: {yaml_devices}\nratio: 0.85\n")
    result = runner.invoke(app, ["plan", str(configs["llama31"]), "--json", "--config", str(tmp_path / "plan.yaml")])
    assert result.exit_code == 0, result.output
    assert [e["devices"] for e in json.loads(result.stdout)["publisher"]["align"]["ddp"]] == counts


@pytest.mark.parametrize("yaml_devices, needle", [("2.5", "--devices must be a list of whole numbers; got 2.5"),
                                                  ("true", "--devices must be a list of whole numbers; got True"),
                                                  ("[2, 0]", "--devices takes whole numbers in 1..1024")])
def test_bad_devices_in_a_config_file(configs, tmp_path, yaml_devices, needle):
    (tmp_path / "plan.yaml").write_text(f"devices: {yaml_devices}\n")
    _one_line_error(runner.invoke(app, ["plan", str(configs["llama31"]), "--config", str(tmp_path / "plan.yaml")]),
                    needle)


def test_publisher_for_a_pruned_checkpoint_and_non_structured(tmp_path, configs):
    """A pruned checkpoint is aligned as it is (nothing left to prune); non-structured pruning has no Taylor."""
    from loram.accounting import plan_params, stock_config
    from loram.shared.pruned_model import build_pruned_config

    p = plan_params(LLAMA31_70B, "structured", 0.85)
    pruned = build_pruned_config(stock_config(LLAMA31_70B),
                                 {c.layer: (c.kv_heads, c.channels) for c in p.per_layer if c.pruned})
    (tmp_path / "config.json").write_text(pruned.to_json_string())
    result = runner.invoke(app, ["plan", str(tmp_path), "--devices", "8", "--device-memory", "80GiB",
                                 "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    assert "Taylor pruning: not estimated" in result.stdout
    # its alignment distils from the original by default, as `loram publish align` does: the same teacher and the
    # same matched (pruned) layers as planned from the stock config, with and without it
    for distill in ([], ["--no-distill"]):
        common = ["--json", "--devices", "8", "--device-memory", "80GiB", "--gradient-checkpointing", *distill]
        d = json.loads(runner.invoke(app, ["plan", str(tmp_path), *common]).stdout)
        stock = json.loads(runner.invoke(app, ["plan", str(configs["llama31"]), "--ratio", "0.85", *common]).stdout)
        assert d["publisher"]["taylor"] is None and d["publisher"]["align"] == stock["publisher"]["align"]
        teacher = d["publisher"]["align"]["ddp"][0].get("teacher_bytes", 0)
        assert (teacher == 2 * EXPECTED["llama31"][0] + 74 * 4 * 512 * 8192 * 4) == (not distill), teacher
    ns = json.loads(runner.invoke(app, ["plan", str(configs["llama2"]), "--json", "--kind", "non-structured",
                                        "--sparsity", "0.5", "--publisher"]).stdout)
    assert ns["publisher"]["taylor"] is None and ns["publisher"]["align"]["params"] == EXPECTED["llama2"][0]


def test_publisher_from_a_hub_repo_with_only_config_json(hub, tmp_path):
    from loram.shared.hub import push_files

    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_70B))
    push_files("org/llama31-70b", {"config.json": tmp_path / "config.json"}, endpoint=hub.url, message="config")
    result = runner.invoke(app, ["plan", "org/llama31-70b", "--endpoint", hub.url, "--json", *PUBLISHER_70B])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["publisher"]["align"]["fsdp_min_devices"] == 7


def test_a_non_structured_checkpoint_is_planned_as_it_is(tmp_path, hub):
    """A non-structured checkpoint has a stock config: it was planned as a stock model pruned once more
    (structured, 0.5), 1.41x fewer parameters than training on it holds. Its manifest tells, in a folder and on
    the Hub."""
    from tiny_models import save_masked_checkpoint

    from loram.shared.hub import push_files

    save_masked_checkpoint(tmp_path / "ns")
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "ns").parameters())
    local = json.loads(runner.invoke(app, ["plan", str(tmp_path / "ns"), "--json"]).stdout)
    assert local["pruned_checkpoint"] is True and local["training_params"] == local["original_params"] == params
    table = runner.invoke(app, ["plan", str(tmp_path / "ns")]).stdout
    assert "a LoRAM pruned checkpoint (non-structured: its zeros are stored, every weight held)" in table
    push_files("org/ns", {f: tmp_path / "ns" / f for f in ("config.json", "loram_manifest.json")}, endpoint=hub.url,
               message="config and manifest")
    remote = json.loads(runner.invoke(app, ["plan", "org/ns", "--endpoint", hub.url, "--json"]).stdout)
    assert remote["pruned_checkpoint"] is True and remote["training_params"] == local["training_params"]
    stock = json.loads(runner.invoke(app, ["plan", str(tmp_path / "ns" / "config.json"), "--json"]).stdout)
    assert stock["pruned_checkpoint"] is True  # a config.json beside its manifest is the checkpoint's


@pytest.mark.parametrize("args, needle", [
    (["--devices", "0"], "--devices takes whole numbers in 1..1024"),
    (["--devices", "2,x"], "--devices takes whole numbers"),
    (["--device-memory", "lots"], "cannot read 'lots' as a size"),
    (["--device-memory", "0GiB"], "--device-memory 0GiB is no memory at all; give the memory a device has"),
    (["--budget", "0"], "--budget 0 is no memory at all"),
    (["--calib-samples", "0"], "--calib-samples must be a whole number >= 1"),
    (["--calib-seq-len", "1"], "--calib-seq-len must be a whole number >= 2"),
    (["--calib-batch", "0"], "--calib-batch must be a whole number >= 1"),
])
def test_bad_publisher_flags(configs, args, needle):
    _one_line_error(runner.invoke(app, ["plan", str(configs["llama31"]), *args]), needle)
