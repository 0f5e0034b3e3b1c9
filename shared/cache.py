"""Where LoRAM keeps what it downloads or converts once.

`LORAM_CACHE` wins; otherwise `$XDG_CACHE_HOME/loram`; otherwise `~/.cache/loram`.
"""

import contextlib
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has no fcntl: there concurrent builds are not serialised
    fcntl = None


def cache_dir() -> Path:
    """The root cache directory (created on first use)."""
    if os.environ.get("LORAM_CACHE"):
        root = Path(os.environ["LORAM_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg).expanduser() / "loram"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # the path, or a folder on it, is a file
        from loram.shared.errors import LoramError

        where = "LORAM_CACHE" if os.environ.get("LORAM_CACHE") else "the cache folder"
        raise LoramError(f"{where} {root} is not a folder (a file is in the way); point LORAM_CACHE at a "
                         "folder") from e
    return root


@contextlib.contextmanager
def build_lock(folder: Path):
    """Held while one process builds `folder` of the cache: another that needs it (a second rank of torchrun,
    a second test worker, a second terminal) waits here, then finds it built and verified instead of building
    it again over the first one's files. Yields whether it had to wait (then check `folder` again)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield False
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            print(f"[loram cache] another process is building {folder}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
