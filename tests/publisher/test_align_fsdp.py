"""`loram publish align --fsdp` in two CPU processes (torchrun, gloo, FSDP2 `fully_shard`): sharded for real
(DTensor parameters, one shard per rank), same losses as one process at the same global batch, exact resume
after kill -9, resume on another world size, no pickle anywhere, masks kept, distillation, loadable output."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny_models import save_masked_checkpoint, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import loram
from loram.publisher.align import align
from loram.publisher.prune import prune
from loram.shared.checkpoints import PICKLE_SUFFIXES
from loram.shared.manifest import Manifest, verify_files

loram.register()  # pruned checkpoints load with the Auto classes

TORCHRUN = Path(sys.executable).parent / "torchrun"
TEXT = "Alignment is a short continual pre-training of the pruned model on general text. " * 150
ENV = {**os.environ, "LORAM_THREADS": "1", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    save_tiny_checkpoint(root / "base", "llama-gqa")
    prune(base=str(root / "base"), out=root / "pruned", method="l2", ratio=0.5, layers="1:5")
    (root / "text.txt").write_text(TEXT)
    return root


def _cmd(root, out, nproc=2, *extra, pruned="pruned", steps=6, batch=None):
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), "-m", "loram", "publish", "align",
            str(root / pruned), "--data", str(root / "text.txt"), "--steps", str(steps), "--seq-len", "32",
            "--lr", "1e-3", "--save-every", "2", "--batch", str(batch or 4 // nproc), "--keep-checkpoints", "0", "--fsdp",
            "--out", str(root / out), *extra]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _report(folder) -> dict:
    return json.loads((Path(folder) / "align_report.json").read_text())


def _losses(folder) -> list[float]:
    return [r["loss"] for r in _report(folder)["losses"]]


def _state(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _no_pickle(folder: Path) -> None:
    """No file with a pickle suffix, none that starts like a pickle (protocol 2+) or a torch.save zip."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert p.suffix not in PICKLE_SUFFIXES, p
        with open(p, "rb") as f:
            head = f.read(2)
        assert head[:1] != b"\x80" and head != b"PK", p


def test_fsdp_matches_one_process_is_sharded_and_writes_no_pickle(root):
    _run(_cmd(root, "fsdp", 2, "--eval-data", str(root / "text.txt"), "--eval-limit", "4", "--eval-every", "2"))
    report = _report(root / "fsdp")
    sharding = report["fsdp"]  # read off the parameter objects after fully_shard, on every rank
    assert report["world_size"] == 2 and report["record"]["global_batch"] == 4
    assert sharding["dtensor_parameters"] == sharding["parameters"] > 0  # every parameter a DTensor
    assert sharding["mesh_sizes"] == [2] and sharding["placements"] == ["(Shard(dim=0),)"]
    per_rank = sharding["local_numel_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) == sharding["global_numel"]  # one shard per rank, no replica
    assert max(per_rank) < sharding["global_numel"] * 0.6
    assert sharding["units"] == 1 + 6  # root + every (per-layer class) decoder layer of the tiny model

    single = align(pruned=str(root / "pruned"), data=[str(root / "text.txt")], steps=6, seq_len=32, lr=1e-3,
                   batch=4, save_every=2, eval_data=str(root / "text.txt"), eval_limit=4, eval_every=2,
                   out=root / "single")
    assert _losses(root / "fsdp") == pytest.approx(single.losses, rel=1e-4)
    assert report["tokens_seen"] == single.tokens_seen
    assert [e["perplexity"] for e in report["evals"]] == pytest.approx([p for _, p in single.perplexities], rel=1e-3)
    a, b = _state(root / "fsdp"), _state(root / "single")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)

    _no_pickle(root / "fsdp")
    checkpoint = root / "fsdp" / "checkpoints" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "optimizer").iterdir())
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one optimizer shard per rank
    for folder in (root / "fsdp", checkpoint):  # the output and every checkpoint: loadable, verified, recorded
        model = AutoModelForCausalLM.from_pretrained(folder)
        manifest = Manifest.load(folder, model.config)
        verify_files(folder)
        assert manifest.alignment[-1]["tool"] == "loram publish align"
    assert Manifest.load(root / "fsdp").alignment[-1]["complete"] is True


def _kill_after_checkpoint(cmd, checkpoint: Path) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 240
        while not (checkpoint / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.005)
        ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun's workers
        assert ranks
        for p in [*ranks, psutil.Process(proc.pid)]:  # kill -9, every rank (they would outlive torchrun)
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(ranks, timeout=60)
    finally:
        proc.wait(timeout=60)


def test_kill_9_then_resume_reproduces_the_run_and_resumes_on_one_process(root):
    if not (root / "fsdp" / "align_report.json").is_file():
        _run(_cmd(root, "fsdp", 2, "--eval-data", str(root / "text.txt"), "--eval-limit", "4", "--eval-every", "2"))
    cmd = _cmd(root, "killed", 2, "--eval-data", str(root / "text.txt"), "--eval-limit", "4", "--eval-every", "2")
    _kill_after_checkpoint(cmd, root / "killed" / "checkpoints" / "checkpoint-2")
    assert not (root / "killed" / "align_report.json").exists()
    assert (root / "killed" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (root / "killed" / "checkpoints" / "checkpoint-6").exists()  # killed mid-run
    shutil.copytree(root / "killed", root / "killed-1")

    _run([*cmd, "--resume"])
    full, resumed = _losses(root / "fsdp"), _losses(root / "killed")
    assert len(resumed) == len(full) == 6 and resumed == pytest.approx(full, rel=1e-6)
    a, b = _state(root / "fsdp"), _state(root / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # final weights equal
    _no_pickle(root / "killed")

    # the global batch is pinned: resumed on one process with the same --batch 2, --grad-accum becomes 2
    resumed_on_one = _run([*_cmd(root, "killed-1", 1, "--eval-data", str(root / "text.txt"), "--eval-limit", "4",
                                 "--eval-every", "2", batch=2), "--resume"])
    assert ("warning: resuming on 1 process(es): --grad-accum 1 -> 2 keeps the global batch of 4 (--batch 2 per "
            "process)") in resumed_on_one.stderr
    report = _report(root / "killed-1")
    assert report["world_size"] == 1 and report["steps"] == 6 and report["fsdp"]["mesh_sizes"] == [1]
    assert report["record"]["global_batch"] == 4 and report["config"]["grad_accum"] == 2
    losses = _losses(root / "killed-1")
    assert losses[-1] == pytest.approx(full[-1], rel=0.05)  # same weights and optimizer state; new RNG only
    verify_files(root / "killed-1")
    AutoModelForCausalLM.from_pretrained(root / "killed-1")


def test_masks_stay_zero_under_fsdp_with_distillation(root):
    masks = save_masked_checkpoint(root / "sparse")
    save_tiny_checkpoint(root / "teacher", "llama-mha")
    # gradient accumulation too: the reduce-scatter waits for the last micro-batch
    # logit and hidden-state distillation together: the teacher is sharded too, its layer outputs hooked
    _run(_cmd(root, "sparse-out", 2, "--distill-from", str(root / "teacher"), "--kd-weight", "0.5", "--hidden-weight",
              "0.5", "--grad-accum", "2", pruned="sparse", steps=3, batch=1))
    report = _report(root / "sparse-out")
    assert report["record"]["global_batch"] == 4
    assert report["fsdp"]["dtensor_parameters"] == report["fsdp"]["parameters"]
    assert all(r["kd_loss"] > 0 and r["hidden_loss"] > 0 and "lm_loss" in r for r in report["losses"])
    assert report["record"]["distill"]["hidden"] == {"weight": 0.5, "loss": "mse", "layers": "pruned",
                                                          "inputs": "pruned"}
    for folder in (root / "sparse-out", root / "sparse-out" / "checkpoints" / "checkpoint-2"):
        after = _state(folder)
        for name, keep in masks.items():
            weight = after[f"{name}.weight"]
            assert torch.equal(weight == 0, ~keep), name  # pruned weights exactly zero, kept ones trained
    _no_pickle(root / "sparse-out")


def test_layer_local_reconstruction_under_fsdp_matches_one_process(root):
    # --hidden-inputs original: the teacher's sharded layers hand their inputs to the student's sharded layers
    _run(_cmd(root, "local-fsdp", 2, "--distill-from", "base", "--hidden-inputs", "original", steps=3))
    single = align(pruned=str(root / "pruned"), data=[str(root / "text.txt")], steps=3, seq_len=32, lr=1e-3,
                   batch=4, save_every=2, distill_from="base", hidden_inputs="original", out=root / "local-one")
    report = _report(root / "local-fsdp")
    assert report["record"]["distill"]["hidden"]["inputs"] == "original"
    assert report["frozen"][-1] == "everything outside decoder layers 1..4"
    assert _losses(root / "local-fsdp") == pytest.approx(single.losses, rel=1e-4) and min(single.losses) > 0
