"""The one error type for user mistakes.

Anything the user can fix (a bad flag, a missing file, an unreachable registry) raises `LoramError`
with a message that names what is wrong and how to fix it. The CLI prints it as one line and exits
with code 2; the Python API lets it propagate.
"""


class LoramError(Exception):
    """A user-facing error: its message is printed as a single line, never with a traceback."""


def warn(message: str) -> None:
    """Something the user should know but need not fix: one `warning: ...` line on stderr (rank 0 only)."""
    import os
    import sys

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
