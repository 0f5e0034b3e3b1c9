"""A candidate alignment data layout, measured by the alignment grid and not (yet) in `loram publish align`.

`loram publish align` packs documents end to end and cuts blocks of `--seq-len` tokens wherever they fall, so most
blocks begin mid-conversation. A consumer's fine-tuning sequences all begin at the chat template's start (its system
turn). This prototype starts every block at a document's start: a block is a document's tokens, topped up with the
following documents' when it is shorter than `--seq-len`, and the tokens left over past the block's end are
dropped (the next block begins at the next document). Everything else is `loram publish align` as given.

    python benchmarks/doc_start_blocks.py -- publish align PRUNED --data wiki-chat:1 --data math.jsonl:1 ... --out ALIGNED
"""

import sys

from _common import align_argv, run_loram

from loram.publisher import align_data


def iter_blocks(name: str, tokenizer, seq_len: int):
    block: list[int] = []
    for ids in align_data.iter_document_ids(name, tokenizer):
        block.extend(ids)
        if len(block) >= seq_len:
            yield {"input_ids": block[:seq_len]}
            block = []


def main() -> None:
    argv = align_argv(sys.argv[1:], "doc_start_blocks.py -- publish align PRUNED ... (see the docstring)")
    align_data.iter_blocks = iter_blocks
    run_loram(argv)


if __name__ == "__main__":
    main()
