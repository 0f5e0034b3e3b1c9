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


def cache_root() -> Path:
    """Where the cache is (not created)."""
    if os.environ.get("LORAM_CACHE"):
        return Path(os.environ["LORAM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "loram"


def cache_dir() -> Path:
    """The root cache directory (created on first use)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a place nobody may create folders in (/proc)
        from loram.shared.errors import LoramError

        where = "LORAM_CACHE" if os.environ.get("LORAM_CACHE") else "the cache folder"
        why = "a file is in the way" if isinstance(e, FileExistsError | NotADirectoryError) else \
            (e.strerror or str(e)).lower()
        raise LoramError(f"{where} {root} cannot be made a folder ({why}); point LORAM_CACHE at a folder you "
                         "can write to") from e
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
