"""The `loram` program's entry point: it imports the command line (torch, transformers: about two seconds) under
the same Ctrl-C rule as the commands themselves, so an interrupt while it loads is one line, not a traceback."""

import signal
import sys

INTERRUPTED = 130  # loram.shared.cli_support's code for Ctrl-C (not imported: that module loads typer and more)


def main() -> None:
    try:
        from loram.cli import main as run
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # `timeout -s INT` signals the process and its group: twice
        sys.stderr.write("interrupted; completed outputs are intact\n")
        sys.exit(INTERRUPTED)
    run()
