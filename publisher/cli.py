"""`loram publish ...`: the publisher's commands (prune, align, push)."""

import typer

from loram.shared.cli_support import add_config_command

app = typer.Typer(help="Publisher toolkit: prune, align and publish a model.", no_args_is_help=True)


def _prune(cfg) -> None:
    from loram.publisher.prune import prune

    result = prune(cfg)
    layers = sorted(result.kept)
    if layers:
        counts = sorted(set(result.kept.values()))
        shown = ", ".join(f"{kv} KV groups + {ch} channels" for kv, ch in counts)
        typer.echo(f"pruned layers [{layers[0]}, {layers[-1] + 1}): kept {shown} per layer")
    typer.echo(f"parameters: {result.original_params:,} -> {result.pruned_params:,} "
               f"({result.reduction:.2f}x smaller) in {result.seconds:.1f} s")
    typer.echo(f"pruned checkpoint: {result.out}")


def _register() -> None:
    from loram.publisher.prune import PruneConfig

    add_config_command(
        app, "prune", PruneConfig, _prune,
        help="Prune a model (structured, GQA-aware) into a loadable checkpoint with its pruning manifest.",
        examples=[
            "loram publish prune $(loram assets path model) --method taylor --ratio 0.5 --out smollm2-p50",
            "loram publish prune meta-llama/Llama-3.1-70B --ratio 0.85 --layers 4:78 --out llama70b-p85",
            "loram publish prune BASE --scores smollm2-p50/importance.safetensors --ratio 0.6 --out smollm2-p60",
        ],
    )


_register()
