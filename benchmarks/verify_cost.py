"""What the integrity check costs next to what it protects: SmolLM2-135M pruned at ratio 0.5 (l2, no
calibration), the streaming sha256 of every file its manifest lists (and the whole
`check_pruned_checkpoint`: manifest, config, hashes), side by side with loading the model with
`from_pretrained` in fp32, the first thing `loram train` and `loram publish align` do after the check
(alone, and followed by one read of every weight, which the first training step does anyway).

Both read the same files from the page cache (one untimed warm-up of each first), so the ratio is the
CPU cost of hashing; on a cold disk both wait for the same bytes, and the hash's read warms the cache
for the load. 3 repeats; the table gives the median. Usage: python benchmarks/verify_cost.py
"""

import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, write

REPEATS = 3


def _timed(fn) -> list[float]:
    fn()  # warm-up: page cache, lazy imports
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _load_and_touch(folder: Path) -> None:
    """Load, then read every parameter once: fp32 safetensors load as zero-copy views of the mmapped file,
    so `from_pretrained` alone reads few bytes; the first training step reads them all."""
    import torch

    from loram.shared.pruned_model import from_pretrained

    model = from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def main() -> None:
    import torch

    from loram.publisher.prune import prune
    from loram.shared import assets
    from loram.shared.manifest import Manifest, sha256_file
    from loram.shared.pruned_model import check_pruned_checkpoint, from_pretrained
    from loram.shared.runtime import configure_threads

    configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "p50"
        prune(base=str(assets.model_dir()), method="l2", ratio=0.5, out=pruned)
        files = sorted(Manifest.load(pruned).files)
        size = sum((pruned / n).stat().st_size for n in files)

        def hash_all():
            for name in files:
                sha256_file(pruned / name)

        steps = {
            "sha256 of every listed file": _timed(hash_all),
            "`check_pruned_checkpoint` (manifest, config, sha256)": _timed(lambda: check_pruned_checkpoint(pruned)),
            "`from_pretrained(dtype=torch.float32)`": _timed(lambda: from_pretrained(pruned, dtype=torch.float32)),
            "`from_pretrained` + read every weight once": _timed(lambda: _load_and_touch(pruned)),
        }
    median = {k: statistics.median(v) for k, v in steps.items()}
    load = median["`from_pretrained(dtype=torch.float32)`"]
    check = median["`check_pruned_checkpoint` (manifest, config, sha256)"]
    table = [
        f"## Integrity check cost: SmolLM2-135M pruned at 0.5 (l2), {len(files)} files, {size / 2**20:.1f} MiB",
        "",
        "| step | runs (s) | median (s) | / load |",
        "|---|---|---|---|",
        *(f"| {k} | {', '.join(f'{t:.3f}' for t in v)} | {median[k]:.3f} | {median[k] / load:.2f}x |"
          for k, v in steps.items()),
        "",
        f"hashing: {size / 2**20 / median['sha256 of every listed file']:.0f} MiB/s; the full check costs "
        f"**{check / load:.0%}** of `from_pretrained` and "
        f"**{check / median['`from_pretrained` + read every weight once']:.0%}** of loading and reading every "
        "weight once (warm page cache).",
        "",
        f"Machine: {machine()}",
    ]
    write("verify_cost", {"files": len(files), "bytes": size, "runs_s": steps, "median_s": median,
                          "check_over_load": round(check / load, 2), "machine": machine()}, table)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help says what it does, runs nothing
    main()
