"""`loram publish ...`: the publisher's commands (prune, align, push)."""

import typer

app = typer.Typer(help="Publisher toolkit: prune, align and publish a model.", no_args_is_help=True)
