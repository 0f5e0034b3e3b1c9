"""Build typer commands from config dataclasses, so every option is declared once.

`add_config_command(app, "prune", PruneConfig, run)` creates a command whose flags are the config's
fields (help text from `option(help=...)`), plus `--config FILE.yaml`. Flags given on the command line
override the file.

Exit codes (docs/conventions.md): 0 success; 2 a user mistake (`LoramError`, a usage error, a full disk or
a permission denied), printed as one line `error: ...`; 1 an internal error (any other exception), one line
`error: unexpected <Type>: ...` asking for a report, with the traceback when `LORAM_DEBUG=1`; 130 Ctrl-C;
141 (silent) a reader that closed the output pipe.
"""

import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import sys
import traceback
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import click
import typer

from loram.shared.configs import Config, _base_type
from loram.shared.errors import INTERRUPTED, INTERRUPTED_LINE, LoramError

USER_ERROR, INTERNAL_ERROR = 2, 1
CLOSED_PIPE = 141  # 128 + SIGPIPE, as a shell tool that `| head` stopped reading exits
DEBUG_ENV = "LORAM_DEBUG"  # set to 1: print the traceback of every error too
# OS errors the user fixes (a full disk, a read-only or forbidden folder): one line, exit 2
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def one_line(message: str) -> str:
    """`message` with its lines joined: an error is always printed as a single line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: str, code: int = USER_ERROR) -> typing.NoReturn:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def report_error(e: BaseException) -> int:
    """Print `e` as one `error: ...` line on stderr (after its traceback when LORAM_DEBUG=1); return the exit
    code: 2 for a user mistake, 130 for Ctrl-C, 1 for anything else (an internal error: please report it).
    A reader that closed the pipe (`loram plan ... | head`) ends the command quietly, as it ends `git log`."""
    if isinstance(e, BrokenPipeError):
        with contextlib.suppress(OSError, ValueError):  # no second BrokenPipeError when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE
    rank, connected = _rank()
    if isinstance(e, KeyboardInterrupt):
        if rank == 0 and not getattr(e, "already_said", False):  # Ctrl-C reaches every process of a torchrun job
            typer.echo(INTERRUPTED_LINE, err=True)
        return INTERRUPTED
    if _debug():
        traceback.print_exception(e)
    if isinstance(e, LoramError):
        message, code = str(e), USER_ERROR
    elif isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        fix = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
        message, code = f"{e.strerror or e}{where}; {fix} or choose another --out", USER_ERROR
    elif connected and _lost_peer(e):
        message, code = ("another process of this run stopped (the connection to it was lost: "
                         f"{one_line(e)[:120]}); its own error is above, or in the launcher's summary; fix that and "
                         "rerun the same command with --resume to continue from the last checkpoint"), INTERNAL_ERROR
    elif type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        message, code = (f"out of memory ({one_line(e)[:200] or type(e).__name__}); use a smaller --batch or "
                         "--seq-len, --quant nf4, or a machine with more memory"), USER_ERROR
    else:
        text = one_line(e)
        text = text[:300] + "..." if len(text) > 300 else text
        message = (f"unexpected {type(e).__name__}: {text or '(no message)'} "
                   f"(set {DEBUG_ENV}=1 for the traceback; please report it)")
        code = INTERNAL_ERROR
    if rank == 0 or connected:
        typer.echo(f"error: {f'[rank {rank}] ' if rank else ''}{one_line(message)}", err=True)
    return code


def _lost_peer(e: BaseException) -> bool:
    """`e` is a collective failing because another process of the job went away (killed, crashed), as gloo and
    NCCL report it, rather than an error of this process's own."""
    text = str(e)
    return (type(e).__name__ in ("DistBackendError", "DistNetworkError")
            or any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")))


def _rank() -> tuple[int, bool]:
    """This process's rank in a torchrun / accelerate launch job (0 alone), and whether the job's processes are
    connected yet. Before they are, every rank ran the same checks on the same flags and files, so rank 0 alone
    reports a failure (one line, not one per process); after, an error may be one rank's own, and each reports
    it, naming its rank."""
    from loram.shared.runtime import process_rank

    dist = sys.modules.get("torch.distributed")
    return process_rank(), bool(dist is not None and dist.is_available() and dist.is_initialized())


def user_errors(fn: Callable) -> Callable:
    """Turn any exception into one line on stderr: LoramError (a user mistake) exits with code 2, Ctrl-C
    with 130, anything else with 1 (see `report_error`). Typer's and click's own exits pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as e:
            raise typer.Exit(report_error(e)) from None

    return wrapper


# Third-party output that says nothing a user can act on, hidden by the CLI (and so by `loram demo`): bitsandbytes
# logs a warning on import on CPUs with AVX512-BF16 when the optional `kernels` package is missing (it changes
# nothing we use: we turn that packed path off); peft 0.21 reads transformers 5's deprecated
# `is_gradient_checkpointing` each time it wraps a model (train, merge, eval with an adapter).
# The Trainer notes, when two checkpoints were saved within a second (short runs), that it orders them by step
# rather than by mtime: right either way, nothing to act on.
_QUIET_LOGGERS = {"bitsandbytes": "ERROR"}
_QUIET_LOG_MESSAGES = {"transformers.trainer_utils": ["mtime may not be reliable on this filesystem"]}
_QUIET_FUTURE_WARNINGS = [r"`is_gradient_checkpointing` is deprecated"]


def console_warnings() -> None:
    """How the CLI shows warnings: LoRAM's own (e.g. `TruncationWarning`) as one `warning: ...` line like every
    other (first process only), instead of Python's two lines of file, line number and source; the known
    third-party output above not at all; every other warning as Python shows it. The Python API is untouched:
    there the warnings stay ordinary Python warnings, for the caller to filter or record."""
    import logging

    from loram.shared.errors import say

    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, messages in _QUIET_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(lambda r, m=tuple(messages): not any(x in r.getMessage() for x in m))
    for pattern in _QUIET_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.split(".")[0] == "loram":
            say(f"warning: {one_line(str(message))}")
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def quiet_bars_off_a_terminal() -> None:
    """When stderr is no terminal (a log file, a pipe, CI), the Hub client's and transformers' progress bars
    ("Fetching 13 files", "Upload 0 LFS files", "Loading weights", "Writing model shards") are not drawn: there
    they are only carriage-return noise between the lines that matter. LoRAM's own training bar stays."""
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def run_app(app: typer.Typer, args: list[str] | None = None, prog_name: str | None = None) -> typing.NoReturn:
    """Run the CLI `app` as a program: errors raised outside a command (while building or parsing it) become
    one line and an exit code like a command's (`report_error`), and so do click's usage errors (an unknown
    flag, a missing value, an extra argument: exit 2, naming the command's --help) instead of click's usage block
    of four lines. A command line with no command still shows the help."""
    try:
        code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except SystemExit:
        raise
    except typer.Abort:
        sys.exit(report_error(KeyboardInterrupt()))
    except (Exception, KeyboardInterrupt) as e:
        if _is_usage_error(e):
            if type(e).__name__ == "NoArgsIsHelpError":  # `loram`, `loram publish`: the help, as before
                e.show()
            else:
                command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "loram"
                typer.echo(f"error: {one_line(e.format_message()).rstrip('.')}; see {command} --help", err=True)
            sys.exit(e.exit_code)
        sys.exit(report_error(e))
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(e: BaseException) -> bool:
    """One of click's usage errors (typer carries its own copy of click, so they are known by their shape and
    module, not by click's classes)."""
    return (".click." in f".{type(e).__module__}." or "._click." in f".{type(e).__module__}.") and all(
        hasattr(e, a) for a in ("format_message", "exit_code", "show"))


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
    """Print a simple aligned text table (the CLI's readable output); a missing value (None) is `-`."""
    file = file or sys.stdout
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [["-" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
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
