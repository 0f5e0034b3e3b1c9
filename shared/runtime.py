"""Process-level choices: how many CPU threads torch may use, and which device to compute on."""

import os

import torch


def free_cores() -> int:
    """Cores not busy with other work (`LORAM_THREADS` overrides).

    On a shared 2-core machine, asking torch for 2 threads while another process runs makes
    gradient work 10-15x slower than 1 thread, so we count the load average out.
    """
    if os.environ.get("LORAM_THREADS"):
        value = os.environ["LORAM_THREADS"]
        if not value.strip().isdigit() or int(value) < 1:
            from loram.shared.errors import LoramError

            raise LoramError(f"LORAM_THREADS={value!r} is not a whole number >= 1; set e.g. LORAM_THREADS=2 "
                             "or unset it")
        return int(value)
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, total - busy)


def configure_threads() -> int:
    """Set torch's intra-op thread count from the free cores; returns it."""
    n = free_cores()
    torch.set_num_threads(n)
    return n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
