"""`loram publish align` in two CPU processes (torchrun, gloo DDP) against one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import loram
from loram.publisher.align import align
from loram.publisher.prune import prune
from loram.shared.manifest import Manifest, verify_files

loram.register()  # pruned checkpoints load with the Auto classes

TORCHRUN = Path(sys.executable).parent / "torchrun"
TEXT = "Alignment is a short continual pre-training of the pruned model on general text. " * 150


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    save_tiny_checkpoint(tmp_path / "base", "llama-gqa")
    prune(base=str(tmp_path / "base"), out=tmp_path / "pruned", method="l2", ratio=0.5, layers="1:5")
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--data", str(tmp_path / "text.txt"), "--steps", "4", "--seq-len", "32", "--lr", "1e-3",
              "--save-every", "2", "--eval-data", str(tmp_path / "text.txt"), "--eval-limit", "4",
              "--eval-every", "2"]
    env = {**os.environ, "LORAM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "loram", "publish", "align",
                           str(tmp_path / "pruned"), *common, "--batch", "2", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("aligned 4 steps") == 1  # only rank 0 prints (and writes)

    single = align(pruned=str(tmp_path / "pruned"), data=[str(tmp_path / "text.txt")], steps=4, seq_len=32, lr=1e-3,
                   batch=4, save_every=2, eval_data=str(tmp_path / "text.txt"), eval_limit=4, eval_every=2,
                   out=tmp_path / "single")
    report = json.loads((tmp_path / "ddp" / "align_report.json").read_text())
    assert report["world_size"] == 2 and report["record"]["global_batch"] == 4
    assert report["tokens_seen"] == single.tokens_seen == 4 * 4 * 32
    ddp_losses = [r["loss"] for r in report["losses"]]
    assert ddp_losses == pytest.approx(single.losses, rel=1e-4)  # same blocks, same averaged gradient
    # pure hidden-state distillation (the default): the logged component is the loss, over both processes too
    assert [r["hidden_loss"] for r in report["losses"]] == pytest.approx(ddp_losses, rel=1e-5)
    ddp_ppl = [(e["step"], e["perplexity"]) for e in report["evals"]]
    assert [s for s, _ in ddp_ppl] == [0, 2, 4] and ddp_ppl[0] == single.perplexities[0]  # same weights at step 0
    assert [p for _, p in ddp_ppl] == pytest.approx([p for _, p in single.perplexities], rel=1e-3)

    for folder in (tmp_path / "ddp", tmp_path / "ddp" / "checkpoints" / "checkpoint-2"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        Manifest.load(folder, model.config)
        verify_files(folder)
    # each rank saved its own RNG state into the shared checkpoint, nothing else was written twice
    names = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "checkpoint-2").iterdir())
    assert "rng_state_0.json" in names and "rng_state_1.json" in names
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("ddp", "single"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    shutil.rmtree(tmp_path / "ddp")
