"""How FSDP alignment loads a pruned checkpoint: every process loading the whole model before sharding it
(the earlier code) side by side with `empty_model` + `shard_model(weights=...)` (parameters on the meta
device, sharded, then each process reading only its shards' rows from the safetensors).

SmolLM2-135M pruned by l2 at 0.5, saved in bf16 (as published checkpoints are) and trained in fp32, as
`loram publish align --fsdp` does. Two CPU processes (torchrun, gloo); per process: peak RSS after load +
shard, and a checksum of its local shards (both ways must hold the same numbers).
Usage: python benchmarks/fsdp_load.py [--processes 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, write

WORKER = """
import json, sys, torch, torch.distributed as dist
from loram.shared.runtime import configure_threads
from loram.shared.pruned_model import empty_model, from_pretrained
from loram.publisher.align_trainer import shard_model
configure_threads()
mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
if mode == "whole":   # the earlier code: the whole model in fp32 on every process, then sharded
    model = from_pretrained(folder, dtype=torch.float32)
    record = shard_model(model, device="cpu", bf16=False)
else:                 # now: empty, sharded, each process reads its rows
    model = empty_model(folder, dtype=torch.float32)
    record = shard_model(model, device="cpu", bf16=False, weights=folder)
total = sum(float(p.to_local().double().sum()) for p in model.parameters())
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
json.dump({"peak_rss_mib": round(hwm / 2**20, 1), "checksum": total, "local_numel": record["local_numel"]},
          open(f"{out}.{dist.get_rank()}", "w"))
dist.destroy_process_group()
"""


def _run(mode: str, folder: Path, tmp: Path, processes: int) -> list[dict]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp / mode
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(processes), str(script), mode,
                           str(folder), str(out)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "LORAM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(processes)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    import torch

    from loram.publisher.prune import prune
    from loram.shared import assets
    from loram.shared.pruned_model import from_pretrained, save_pruned_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prune(base=str(assets.model_dir()), out=str(tmp / "fp32"), method="l2", ratio=0.5)
        bf16 = from_pretrained(tmp / "fp32", dtype=torch.bfloat16)
        save_pruned_checkpoint(bf16, tmp / "bf16")
        params = sum(p.numel() for p in bf16.parameters())
        del bf16
        whole = _run("whole", tmp / "bf16", tmp, args.processes)
        empty = _run("empty", tmp / "bf16", tmp, args.processes)
    same = all(a["checksum"] == b["checksum"] and a["local_numel"] == b["local_numel"]
               for a, b in zip(whole, empty, strict=True))
    ratio = round(max(e["peak_rss_mib"] for e in empty) / max(w["peak_rss_mib"] for w in whole), 2)
    data = {"machine": machine(), "processes": args.processes, "params": params, "whole": whole, "empty": empty,
            "same_shards": same, "peak_ratio": ratio}
    table = [f"# FSDP load of SmolLM2 pruned at 0.5 (bf16 checkpoint, {params / 1e6:.1f}M parameters, trained "
             f"in fp32) over {args.processes} CPU processes", "",
             "| load | " + " | ".join(f"rank {r} peak RSS (MiB)" for r in range(args.processes)) + " |",
             "|---|" + "---|" * args.processes,
             "| whole model on every process, then `fully_shard` (earlier) | "
             + " | ".join(str(w["peak_rss_mib"]) for w in whole) + " |",
             "| `empty_model` + `shard_model(weights=...)`: each process reads its rows | "
             + " | ".join(str(e["peak_rss_mib"]) for e in empty) + " |", "",
             f"peak ratio (largest rank, now / earlier): **{ratio}x**; local shards identical both ways: "
             f"**{same}**. fp32 model: {params * 4 / 2**20:.0f} MiB; one rank's shard: "
             f"{empty[0]['local_numel'] * 4 / 2**20:.0f} MiB."]
    write("fsdp_load", data, table)


if __name__ == "__main__":
    main()
