"""Build typer commands from config dataclasses, so every option is declared once.

`add_config_command(app, "prune", PruneConfig, run)` creates a command whose flags are the config's
fields (help text from `option(help=...)`), plus `--config FILE.yaml`. Flags given on the command line
override the file. User mistakes (`LoramError`) print as one line and exit with code 2.
"""

import dataclasses
import functools
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from loram.shared.configs import Config, _base_type
from loram.shared.errors import LoramError


def fail(message: str, code: int = 2) -> typing.NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn LoramError into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoramError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("interrupted; completed outputs are intact", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _default_shown(field) -> str | bool:
    """The `[default: ...]` text: the value, a list as `a,b,c`; False when there is nothing to show."""
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    if isinstance(default, list | tuple):
        default = ",".join(map(str, default))
    return str(default) if default not in (None, "") else False


def _param_for(field, hint) -> inspect.Parameter:
    """The typer parameter of one config field. Choices and numbers reach the config as typed (their
    metavars say what they take), so `Config` refuses a bad one with the same message as in YAML."""
    meta = field.metadata
    tp = _base_type(hint)
    is_list = tp is list or typing.get_origin(tp) is list
    choices = tuple(map(str, meta.get("choices") or ()))
    kwargs: dict = {"help": meta.get("help", "")}
    if choices:

        def complete(incomplete: str) -> list[str]:
            return [c for c in choices if c.startswith(incomplete)]

        kwargs["autocompletion"] = complete
        label = "|".join(choices)
        kwargs["metavar"] = f"<list[{label}]>" if is_list else f"<{label}>"
        tp = list[str] if is_list else str
    elif tp in (int, float) and not meta.get("argument"):
        kwargs["metavar"] = f"<{tp.__name__}>"
        tp = str
    if meta.get("argument"):
        kwargs["metavar"] = field.name.upper()
        info = typer.Argument(show_default=False, **kwargs)
    else:
        flag = (meta.get("flag") or field.name).replace("_", "-")
        names = [f"--{flag}"]
        if tp is bool:  # `flag="on-name/off-name"` names both sides; otherwise --x/--no-x
            on, _, off = flag.partition("/")
            names = [f"--{on}/--{off or 'no-' + on}"]
        info = typer.Option(*names, show_default=_default_shown(field), **kwargs)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[typing.Optional[tp], info])  # noqa: UP045


def add_config_command(app: typer.Typer, name: str, config_cls: type[Config], run: Callable[[Config], object],
                       *, help: str, examples: list[str] = ()) -> None:
    """Register `name` on `app`: flags from `config_cls`, `--config FILE`, and `run(config)`."""
    hints = typing.get_type_hints(config_cls)
    params = [_param_for(f, hints[f.name]) for f in config_cls.fields()]
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[typing.Optional[Path],  # noqa: UP045
                             typer.Option("--config", help="YAML file of options; flags override it.")]))

    @user_errors
    def command(**kwargs):
        cfg = config_cls.resolve(kwargs.pop("config"), **kwargs)
        run(cfg)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    epilog = ""
    if examples:
        epilog = "Examples:\n\n" + "\n\n".join(f"  $ {e}" for e in examples)
    app.command(name, help=help, epilog=epilog)(command)


def print_table(rows: list[dict], columns: list[str] | None = None, file=None) -> None:
    """Print a simple aligned text table (the CLI's readable output)."""
    file = file or sys.stdout
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths, strict=True)),
              file=file)


def _numeric(v: str) -> bool:
    try:
        float(v.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return False
