"""The `loram` program's entry point: it imports the command line (torch, transformers: about two seconds) under
the same Ctrl-C rule as the commands themselves, so an interrupt while it loads is one line, not a traceback."""

import signal
import sys

from loram.shared.errors import INTERRUPTED, INTERRUPTED_LINE  # a module without imports: nothing to wait for


def main() -> None:
    try:
        from loram.cli import main as run
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # `timeout -s INT` signals the process and its group: twice
        sys.stderr.write(INTERRUPTED_LINE + "\n")
        sys.exit(INTERRUPTED)
    run()
