"""The one error type for user mistakes.

Anything the user can fix (a bad flag, a missing file, an unreachable registry) raises `LoramError`
with a message that names what is wrong and how to fix it. The CLI prints it as one line and exits
with code 2; the Python API lets it propagate.
"""


INTERRUPTED = 130  # the exit code of Ctrl-C (128 + SIGINT), whatever was running
INTERRUPTED_LINE = "interrupted; completed outputs are intact"


class LoramError(Exception):
    """A user-facing error: its message is printed as a single line, never with a traceback."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of `error`'s message (its type name if it has none), at most `limit`
    characters: messages from deep inside a library can run for pages, and ours are one line."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def say(line: str) -> None:
    """One line on stderr, from the first process only (every rank of a torchrun job runs the same code)."""
    import sys

    from loram.shared.runtime import first_process

    if first_process():
        print(line, file=sys.stderr, flush=True)


class LoramWarning(UserWarning):
    """Something the user should know but need not fix. The CLI shows it as one `warning: ...` line on stderr (first
    process only, `loram.shared.cli_support.console_warnings`); from the Python API it is an ordinary Python warning,
    for the caller to filter, record or turn into an error (`warnings.simplefilter("error", LoramWarning)`)."""


def warn(message: str) -> None:
    """Warn about something the user should know but need not fix (a `LoramWarning`, attributed to the caller)."""
    import warnings

    warnings.warn(message, LoramWarning, stacklevel=2)
