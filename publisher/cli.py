"""`loram publish ...`: the publisher's commands (prune, align, selfgen, push)."""

import typer

from loram.shared.cli_support import add_config_command

app = typer.Typer(help="Publisher toolkit: prune, write alignment text (selfgen), align and publish a model.",
                  no_args_is_help=True)


def _prune(cfg) -> None:
    from loram.publisher.prune import prune, sparsity_table

    result = prune(cfg)
    if result.sparsity:
        typer.echo(sparsity_table(result.sparsity))
        typer.echo(f"parameters: {result.pruned_params:,}, non-zero {result.nonzero_params:,} "
                   f"({result.reduction:.2f}x fewer, nominal: shapes are unchanged) in {result.seconds:.1f} s")
        typer.echo(f"pruned checkpoint: {result.out}")
        return
    layers = sorted(result.kept)
    if layers:
        counts = sorted(set(result.kept.values()))
        shown = ", ".join(f"{kv} KV groups + {ch} channels" for kv, ch in counts)
        typer.echo(f"pruned layers [{layers[0]}, {layers[-1] + 1}): kept {shown} per layer")
    typer.echo(f"parameters: {result.original_params:,} -> {result.pruned_params:,} "
               f"({result.reduction:.2f}x smaller) in {result.seconds:.1f} s")
    typer.echo(f"pruned checkpoint: {result.out}")


def _align(cfg) -> None:
    from loram.publisher.align import align

    result = align(cfg)
    if not result.main:
        return  # another rank of a distributed run: rank 0 prints the summary
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    ppl = (f", held-out perplexity {result.perplexities[0][1]:.2f} -> {result.perplexities[-1][1]:.2f}"
           if result.perplexities else "")
    typer.echo(f"aligned {result.steps} steps ({result.tokens_seen:,} tokens) in {result.seconds:.0f} s: final loss "
               f"{last}{ppl}, {result.tokens_per_second or 0:,.0f} tokens/s, "
               f"peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB")
    typer.echo(f"aligned pruned checkpoint: {result.out}  (report: {result.out / 'align_report.json'})")


def _selfgen(cfg) -> None:
    from loram.publisher.selfgen import selfgen

    result = selfgen(cfg)
    resumed = f", resumed after {result.resumed}" if result.resumed else ""
    noun = "conversation" if result.conversations == 1 else "conversations"
    typer.echo(f"wrote {result.conversations} {noun} ({result.tokens:,} answer tokens{resumed}) in "
               f"{result.seconds:.0f} s ({result.new_tokens / max(result.seconds, 1e-9):,.0f} tokens/s, peak memory "
               f"{result.peak_memory_bytes / 2**20:,.0f} MiB): {result.out}")


def _register() -> None:
    from loram.publisher.prune import PruneConfig

    add_config_command(
        app, "prune", PruneConfig, _prune,
        help="Prune a model into a loadable checkpoint with its pruning manifest: structured and GQA-aware "
             "(random, l1, l2, taylor; --ratio), or non-structured (magnitude, wanda, sparsegpt; --sparsity or "
             "--nm), layer by layer.",
        examples=[
            "loram publish prune $(loram assets path model) --method taylor --ratio 0.5 --out smollm2-p50",
            "loram publish prune meta-llama/Llama-3.1-70B --ratio 0.85 --layers 4:78 --out llama70b-p85",
            "loram publish prune BASE --scores smollm2-p50/importance.safetensors --ratio 0.6 --out smollm2-p60",
            "loram publish prune $(loram assets path model) --method sparsegpt --sparsity 0.5 --samples 32 "
            "--seq-len 256 --out smollm2-sgpt50",
            "loram publish prune $(loram assets path model) --method wanda --nm 2:4 --samples 32 --seq-len 256 "
            "--out smollm2-w24",
        ],
    )

    from loram.publisher.align import AlignConfig

    add_config_command(
        app, "align", AlignConfig, _align,
        help="Align a pruned checkpoint by continual pre-training on a data mixture (lm_head frozen); "
             "writes an aligned pruned checkpoint whose manifest records the alignment.",
        examples=[
            "loram publish align smollm2-p50 --data wiki-chat:1 --data math.jsonl:1 --steps 80 --seq-len 256 --batch 1 "
            "--lr 1e-4 --eval-data wiki-heldout --out smollm2-p50-aligned   # measured best for LoRAM "
            "(docs/alignment.md): chat-form Wikipedia and math problems from loram publish selfgen",
            "loram publish align smollm2-p50 --data wiki --steps 300 --seq-len 256 --eval-data wiki-heldout "
            "--out smollm2-p50-aligned",
            "loram publish align smollm2-p50 --data web.parquet:1 --data math.jsonl:1 --steps 400 --seq-len 512 "
            "--batch 8 --grad-accum 16 --warmup 100 --save-every 200 --out aligned",
            "loram publish align smollm2-p50 --data wiki --steps 300 --seq-len 256 --out aligned --resume",
            "torchrun --nproc_per_node 2 -m loram publish align smollm2-p50 --data wiki --steps 300 "
            "--seq-len 256 --batch 2 --out aligned",
            "loram publish align smollm2-p50 --data wiki --steps 100 --seq-len 256 --distill-from none "
            "--out aligned-lm   # the paper's LM loss instead of the default hidden-state distillation",
            "loram publish align smollm2-p50 --data wiki --steps 100 --seq-len 256 "
            "--distill-from $(loram assets path model) --kd-weight 0.5 --hidden-weight 0 --out aligned-kd",
        ],
    )

    from loram.publisher.selfgen import SelfgenConfig

    add_config_command(
        app, "selfgen", SelfgenConfig, _selfgen,
        help="Write alignment text of a chosen domain with the original model itself: its sampled answers to "
             "prompts (built-in math, or a .txt file), as chat-form JSON lines for `loram publish align --data`.",
        examples=[
            "loram publish selfgen $(loram assets path model) --prompts math --count 128 --out mathgen.jsonl",
            "loram publish align smollm2-p50 --data wiki-chat:1 --data mathgen.jsonl:1 --steps 40 --seq-len 256 "
            "--out aligned   # general and math-domain text, half and half (the paper's recipe in small)",
            "loram publish selfgen meta-llama/Llama-3.1-70B-Instruct --prompts my_prompts.txt --count 20000 "
            "--batch 64 --out domain.jsonl",
            "loram publish selfgen meta-llama/Llama-3.1-70B-Instruct --prompts my_prompts.txt --count 20000 "
            "--batch 64 --out domain.jsonl --resume   # after an interruption: continues from the last finished batch",
        ],
    )

    from loram.publisher.push import PushConfig, push

    add_config_command(
        app, "push", PushConfig, lambda cfg: typer.echo(push(cfg).summary()),
        help="Publish a pruned (or aligned) checkpoint to the Hugging Face Hub with a generated model card; "
             "every file is checked against its manifest first.",
        examples=[
            "loram publish push smollm2-p50 --repo-id ORG/smollm2-p50 --tag v1",
            "loram publish push smollm2-p50-aligned --repo-id ORG/smollm2-p50 --branch aligned --tag v2",
            "loram publish push llama70b-p85 --repo-id ORG/llama70b-p85 --base-model meta-llama/Llama-3.1-70B "
            "--license llama3.1 --private",
        ],
    )


_register()
