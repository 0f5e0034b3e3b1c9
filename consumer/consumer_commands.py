"""Consumer commands of the `loram` CLI, each built from its config dataclass."""

import typer

from loram.demo import DemoConfig
from loram.shared.cli_support import add_config_command, print_table


def _demo(cfg: DemoConfig) -> None:
    from loram.demo import run_demo
    from loram.demo_report import DATA, memory_lines, pivot, verdicts

    report = run_demo(cfg)
    rows = [{"variant": r["variant"], **{DATA[d].split(" (")[0]: f"{r[d]:.3f}" for d in DATA if d in r}}
            for r in pivot(report)]
    typer.echo("\nperplexity (response tokens; lower is better)")
    print_table(rows)
    typer.echo("")
    for point, holds, text in verdicts(report):
        typer.echo(f"point {point}: {'holds' if holds else 'does NOT hold'}: {text}")
    for line in memory_lines(report):
        typer.echo(line)
    typer.echo(f"\nreport: {cfg.out / 'report.md'}  ({report['wall_time_s']:.0f} s)")


def _train(cfg) -> None:
    from loram.train import train

    result = train(cfg)
    if not result.main:
        return  # another rank of a distributed run: rank 0 prints the summary
    typer.echo(train_summary(result))
    typer.echo(f"adapter: {result.out}  (report: {result.out / 'training_report.json'})")


def train_summary(result) -> str:
    """The line `loram train` ends with; a resumed run names the steps it trained, not all of them."""
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    evals = f", eval loss {result.eval_losses[-1]:.4f}" if result.eval_losses else ""
    ran = len(result.report.get("step_seconds") or []) or result.steps
    steps = (f"{result.steps} steps" if ran >= result.steps else
             f"steps {result.steps - ran + 1}-{result.steps} of {result.steps} (resumed at step {result.steps - ran})")
    return (f"trained {steps} in {result.seconds:.0f} s: final loss {last}{evals}, "
            f"{result.tokens_per_second:,.0f} tokens/s, peak memory {result.peak_memory_bytes / 2**20:,.0f} MiB")


def _recover(cfg) -> None:
    from loram.recover import recover

    result = recover(cfg)
    typer.echo(f"recovered {result.expanded} tensors to the original shapes, copied {result.copied} unchanged")
    typer.echo(f"adapter for {result.original}: {result.out}")


def _merge(cfg) -> None:
    from loram.merge import merge

    typer.echo(f"merged checkpoint: {merge(cfg)}")


def _eval(cfg) -> None:
    from loram.evaluate import evaluate, print_rows

    print_rows(evaluate(cfg), cfg.json)


def _generate(cfg) -> None:
    from loram.generate import generate

    generate(cfg)


def register(app: typer.Typer) -> None:
    from loram.evaluate import EvalConfig
    from loram.generate import GenerateConfig
    from loram.merge import MergeConfig
    from loram.recover import RecoverConfig
    from loram.train import TrainConfig

    add_config_command(
        app, "recover", RecoverConfig, _recover,
        help="Recover an adapter trained on a pruned model to the original model's shapes (a standard peft adapter).",
        examples=["loram recover adapter-p50 --out adapter-original",
                  "loram recover adapter-p50 --fill normal --seed 1 --out adapter-normA",
                  "loram recover adapter-p50 --original /models/SmolLM2-135M-Instruct --out adapter-local"],
    )
    add_config_command(
        app, "merge", MergeConfig, _merge,
        help="Merge a recovered adapter into its original model as a full checkpoint (in the original's own dtype).",
        examples=["loram merge adapter-original --out merged", "loram merge adapter-original --dtype fp32 --out m32"],
    )
    add_config_command(
        app, "eval", EvalConfig, _eval,
        help="Compare models (original, original+adapter, pruned+adapter, merged) on response-token perplexity.",
        examples=["loram eval original=$(loram assets path model) loram=$(loram assets path model)+adapter-original "
                  "--data gsm8k-heldout",
                  "loram eval small=smollm2-p50+adapter-p50 --data news --json",
                  "loram eval original=BASE loram=BASE+RECOVERED --tasks gsm8k_cot,strategyqa --limit 100 --no-perplexity"],
    )
    add_config_command(
        app, "generate", GenerateConfig, _generate,
        help="Stream a completion from a model, optionally with an adapter (chat template when available).",
        examples=['loram generate $(loram assets path model) --adapter adapter-original --prompt "What is 12 x 7?"'],
    )

    add_config_command(
        app, "train", TrainConfig, _train,
        help="Train LoRA/QLoRA on a (pruned) model with your data; writes a peft adapter and a report.",
        examples=[
            "loram train smollm2-p50 --data gsm8k-train --columns prompt=question,response=answer --steps 30 "
            "--out adapter-p50",
            "loram train ORG/llama70b-p85 --quant nf4 --data my.jsonl --seq-len 512 --batch 1 --grad-accum 32 "
            "--gradient-checkpointing --out qloram",
            "loram train smollm2-p50 --data gsm8k-train --columns prompt=question,response=answer --steps 30 "
            "--out adapter-p50 --resume   # the first run again, after Ctrl-C",
        ],
    )
    add_config_command(
        app, "demo", DemoConfig, _demo,
        help="Run the whole LoRAM loop on the embedded SmolLM2 and print the result table.",
        examples=["loram demo", "loram demo --quick --out /tmp/demo",
                  "loram demo --publish-to http://127.0.0.1:8080 --repo-id me/smollm2-loram"],
    )
