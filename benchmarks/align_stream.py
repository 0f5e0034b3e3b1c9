"""Time to the first alignment step's data: a small source replayed from memory vs re-read every pass.

`loram publish align` mixes sources by weight and shuffles blocks in a 1000-block buffer, so before the first
step it draws 1000 blocks. A small source (the demo's 48 self-generated conversations next to wiki-chat) is
passed over many times to supply its share. Side by side in one process, the same sources and seed:

    baseline   each source's stream is `datasets`' `.repeat(None)` of its one-pass stream (re-reads the file,
               re-tokenizes, every pass: what align did before)
    replay     `loram.publisher.align_data.mixture` (a source of at most REPLAY_TOKENS is read once, then
               repeated from memory)

Both must yield the same blocks in the same order (checked). Writes benchmarks/results/align_stream.{md,json}.

    python benchmarks/align_stream.py                      # the demo's selfgen files (full and --quick), made anew
    python benchmarks/align_stream.py --small FILE.jsonl
"""

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from _common import demo_selfgen, machine, write

BLOCKS = 1200  # the shuffle buffer (1000) and the first 100 steps of 2 blocks


def baseline(sources, tokenizer, seq_len: int, seed: int = 0):
    import datasets

    from loram.publisher import align_data

    streams = [align_data._blocks_dataset(s.name, tokenizer, seq_len).repeat(None) for s in sources]
    mixed = datasets.interleave_datasets(streams, probabilities=align_data.probabilities(sources), seed=seed,
                                         stopping_strategy="first_exhausted")
    return mixed.shuffle(seed=seed, buffer_size=1000)


def timed(stream) -> tuple[list, float]:
    started = time.perf_counter()
    blocks = [b["input_ids"] for b in itertools.islice(stream, BLOCKS)]
    return blocks, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=Path, help="a small .jsonl source instead of the demo's selfgen files")
    args = ap.parse_args()
    from loram.demo import DemoConfig
    from loram.publisher.align_data import Source, mixture
    from loram.shared.assets import model_dir
    from loram.shared.pruned_model import load_tokenizer

    tokenizer = load_tokenizer(model_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.small:
            cases = {args.small.name: (args.small, 256)}
        else:  # the demo's selfgen file and its --quick one, each at the demo's --seq-len
            cases = {}
            for name, cfg in (("loram demo", DemoConfig()), ("loram demo --quick", DemoConfig(quick=True))):
                path = demo_selfgen(cfg, Path(tmp) / f"{len(cases)}.jsonl")
                cases[f"{name}: {cfg.setting('selfgen_count')} conversations"] = (path, cfg.setting("seq_len"))
        for name, (small, seq_len) in cases.items():
            sources = [Source("wiki-chat"), Source(str(small))]
            list(itertools.islice(mixture(sources, tokenizer, seq_len, shuffle_buffer=0), 8))  # warm: imports, caches
            old, old_s = timed(baseline(sources, tokenizer, seq_len))
            new, new_s = timed(mixture(sources, tokenizer, seq_len))
            assert old == new, "the replayed stream differs from the re-read one"
            rows.append({"small": name, "seq_len": seq_len, "blocks": BLOCKS, "baseline_s": round(old_s, 2),
                         "replay_s": round(new_s, 2), "speedup": round(old_s / new_s, 1)})
            print(rows[-1], flush=True)
    lines = ["# Alignment data stream: a small source replayed from memory", "",
             f"First {BLOCKS} blocks of `--data wiki-chat:1 --data SMALL:1`, seed 0, shuffle buffer 1000 (what align "
             "draws before its first step, and 100 steps more); identical blocks in both columns (checked). "
             "`python benchmarks/align_stream.py`", "",
             "| SMALL | --seq-len | re-read every pass (s) | replayed (s) | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['small']} | {r['seq_len']} | {r['baseline_s']:.2f} | {r['replay_s']:.2f} | {r['speedup']:.1f}x |"
              for r in rows]
    write("align_stream", {"machine": machine(), "rows": rows}, lines)


if __name__ == "__main__":
    main()
