"""Where LoRAM keeps what it downloads or converts once.

`LORAM_CACHE` wins; otherwise `$XDG_CACHE_HOME/loram`; otherwise `~/.cache/loram`.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root cache directory (created on first use)."""
    if os.environ.get("LORAM_CACHE"):
        root = Path(os.environ["LORAM_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(xdg).expanduser() / "loram"
    root.mkdir(parents=True, exist_ok=True)
    return root
