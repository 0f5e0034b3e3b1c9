"""Every command that reads a pruned checkpoint checks it first (`check_pruned_checkpoint`): the real
`loram train`, `loram recover` and `loram publish align` on a corrupted checkpoint stop with one line,
exit code 2, and write nothing; a stock model (no manifest) still trains."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_checkpoint

from loram.publisher.prune import prune
from loram.shared.errors import LoramError
from loram.shared.manifest import MANIFEST_JSON, MANIFEST_TENSORS, sha256_file
from loram.shared.pruned_model import check_pruned_checkpoint
from loram.train import TrainConfig, train

LORAM = str(Path(sys.executable).parent / "loram")
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(3)]
ENV = {**os.environ, "LORAM_THREADS": "1"}


def _flip_weight_byte(p: Path) -> str:
    with open(p / "model.safetensors", "r+b") as f:  # a byte of the tensor data, not of the header
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0x10]))
    return "model.safetensors"


def _wrong_sha(p: Path) -> str:
    data = json.loads((p / MANIFEST_JSON).read_text())
    data["files"]["model.safetensors"] = "0" * 64
    (p / MANIFEST_JSON).write_text(json.dumps(data))
    return "model.safetensors"


def _garbage_manifest(p: Path) -> str:
    (p / MANIFEST_JSON).write_text('{"format_version": 1, "tensors": ')
    return MANIFEST_JSON


def _rewrite_tensors(p: Path, edit) -> None:
    """Change the index tensors (and the JSON's counts and tensors sha256 to match), as a buggy tool would."""
    tensors = load_file(str(p / MANIFEST_TENSORS))
    edit(tensors)
    save_file(tensors, str(p / MANIFEST_TENSORS), metadata={"format": "pt"})
    data = json.loads((p / MANIFEST_JSON).read_text())
    for entry in data["pruned_layers"]:
        for name in ("kept_kv_heads", "kept_mlp_channels"):
            key = f"layers.{entry['layer']}.{name}"
            if key in tensors:
                entry[name] = tensors[key].numel()
    data["tensors"]["sha256"] = sha256_file(p / MANIFEST_TENSORS)
    (p / MANIFEST_JSON).write_text(json.dumps(data))


def _counts_disagree(p: Path) -> str:
    def drop_one(tensors):  # a valid plan, but one channel fewer than config.json's layer 2 holds
        tensors["layers.2.kept_mlp_channels"] = tensors["layers.2.kept_mlp_channels"][:-1].clone()

    _rewrite_tensors(p, drop_one)
    return "does not match config.json: layer 2"


def _index_out_of_range(p: Path) -> str:
    def out_of_range(tensors):  # same count, last index beyond the original 40 channels
        kept = tensors["layers.3.kept_mlp_channels"].clone()
        kept[-1] = 4000
        tensors["layers.3.kept_mlp_channels"] = kept

    _rewrite_tensors(p, out_of_range)
    return "kept MLP channels index out of range [0, 40): 4000"


CORRUPTIONS = {"flipped-weight-byte": _flip_weight_byte, "wrong-sha256": _wrong_sha,
               "garbage-manifest": _garbage_manifest, "kept-counts-disagree": _counts_disagree,
               "index-out-of-range": _index_out_of_range}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A pristine pruned checkpoint, data, and an adapter trained on it (2 steps), once per module."""
    root = tmp_path_factory.mktemp("integrity")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    prune(base=str(root / "base"), out=root / "pristine", method="l2", ratio=0.5, layers="1:5")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    (root / "text.txt").write_text("LoRAM prunes, trains and recovers. " * 40)
    train(TrainConfig(model=str(root / "pristine"), data=str(root / "qa.jsonl"), out=root / "adapter",
                      columns="prompt=question,response=answer", seq_len=32, batch=4, steps=2))
    return root


def _commands(root: Path, folder: Path, adapter: Path) -> dict[str, list[str]]:
    out = root / "out"
    return {
        "train": ["train", str(folder), "--data", str(root / "qa.jsonl"), "--columns",
                  "prompt=question,response=answer", "--steps", "1", "--seq-len", "32",
                  "--out", str(out / f"train-{folder.name}")],
        "recover": ["recover", str(adapter), "--out", str(out / f"recover-{folder.name}")],
        "align": ["publish", "align", str(folder), "--data", str(root / "text.txt"), "--steps", "1",
                  "--seq-len", "16", "--out", str(out / f"align-{folder.name}")],
    }


@pytest.fixture(scope="module")
def refused(root):
    """Each corruption of a copy of the pristine checkpoint, and the real CLI's answer to each command on it:
    (corruption, command) -> (completed process, what the error must name, the --out it was given, the
    checkpoint's file hashes before the command). Each CLI start costs seconds of imports, so the 15 runs go
    4 at a time."""
    runs = {}
    for corruption, corrupt in sorted(CORRUPTIONS.items()):
        folder = root / corruption
        shutil.copytree(root / "pristine", folder)
        named = corrupt(folder)
        adapter = root / f"adapter-{corruption}"  # trained on the pristine copy, its base now corrupted
        shutil.copytree(root / "adapter", adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(folder)}))
        before = {p.name: sha256_file(p) for p in folder.iterdir()}
        for command, args in _commands(root, folder, adapter).items():
            runs[corruption, command] = (args, named, Path(args[-1]), before, folder)

    def run(args):
        return subprocess.run([LORAM, *args], capture_output=True, text=True, env=ENV, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(runs, pool.map(run, [r[0] for r in runs.values()]), strict=True))
    return {key: (done[key], named, out, before, folder) for key, (_, named, out, before, folder) in runs.items()}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("command", ["train", "recover", "align"])
def test_a_corrupted_checkpoint_is_refused_in_one_line_and_nothing_is_written(refused, command, corruption):
    proc, named, out, before, folder = refused[corruption, command]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert named in lines[0] and "Traceback" not in proc.stderr
    assert len(lines[0]) < 1000  # never an index list
    assert not out.exists()
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before  # align wrote no fresh manifest


def test_messages_name_the_file_and_the_fix(root, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(root / "pristine", folder)
    assert check_pruned_checkpoint(folder).method.kind == "structured"
    _flip_weight_byte(folder)
    with pytest.raises(LoramError, match=r"/p/model.safetensors: sha256 does not match the manifest.*loram pull"):
        check_pruned_checkpoint(folder)
    check_pruned_checkpoint(folder, verify=False)  # --no-verify, or a snapshot resolve_model just verified
    shutil.copyfile(folder / "model.safetensors", folder / "model-extra.safetensors")
    with pytest.raises(LoramError, match=r"/p/model-extra.safetensors: not listed"):
        check_pruned_checkpoint(folder, verify=False)


def test_a_long_index_list_is_never_printed(root, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(root / "pristine", folder)

    def all_out_of_range(tensors):
        tensors["layers.1.kept_mlp_channels"] = tensors["layers.1.kept_mlp_channels"] + 1000

    _rewrite_tensors(folder, all_out_of_range)
    with pytest.raises(LoramError, match=r"layer 1: kept MLP channels index out of range \[0, 40\): "
                                         r"1\d\d\d, 1\d\d\d, 1\d\d\d, 1\d\d\d, 1\d\d\d \(and 15 more\); re-download"):
        check_pruned_checkpoint(folder)


def test_no_verify_skips_the_hashes_not_the_manifest(root, tmp_path):
    from loram.recover import recover

    folder = tmp_path / "p"
    shutil.copytree(root / "pristine", folder)
    _flip_weight_byte(folder)
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(folder)}))
    with pytest.raises(LoramError, match="model.safetensors: sha256 does not match"):
        recover(adapter=str(adapter), out=tmp_path / "rec")
    assert recover(adapter=str(adapter), out=tmp_path / "rec", verify=False).expanded > 0
    _garbage_manifest(folder)
    with pytest.raises(LoramError, match="loram_manifest.json is malformed"):
        recover(adapter=str(adapter), out=tmp_path / "rec2", verify=False)


def test_a_stock_model_has_nothing_to_check_and_still_trains(root):
    assert check_pruned_checkpoint(root / "base") is None
    result = train(TrainConfig(model=str(root / "base"), data=str(root / "qa.jsonl"), out=root / "stock-adapter",
                               columns="prompt=question,response=answer", seq_len=32, batch=4, steps=1))
    assert result.steps == 1


def test_a_pristine_checkpoint_still_recovers(root):
    proc = subprocess.run([LORAM, "recover", str(root / "adapter"), "--out", str(root / "rec")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "rec" / "adapter_model.safetensors").is_file()
