"""Consumer commands of the `loram` CLI, each built from its config dataclass."""

import typer

from loram.demo import DemoConfig
from loram.shared.cli_support import add_config_command, print_table


def _demo(cfg: DemoConfig) -> None:
    from loram.demo import run_demo

    report = run_demo(cfg)
    print_table(report["results"])
    typer.echo(f"\nreport: {cfg.out / 'report.md'}  ({report['wall_time_s']} s)")


def register(app: typer.Typer) -> None:
    add_config_command(
        app, "demo", DemoConfig, _demo,
        help="Run the whole LoRAM loop on the embedded SmolLM2 and print the result table.",
        examples=["loram demo", "loram demo --quick --out /tmp/demo"],
    )
