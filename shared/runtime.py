"""Process-level choices: how many CPU threads torch may use, and which device to compute on."""

import os

import torch


def free_cores() -> int:
    """Threads for torch: `LORAM_THREADS`, else `OMP_NUM_THREADS`, else the cores not busy right now.

    On a shared 2-core machine, asking torch for 2 threads while another process runs makes gradient
    work 10-15x slower than 1 thread, so cores running other work are left alone. "Right now" is the
    number of runnable threads the kernel reports (`procs_running`), its smallest value over a few
    samples, less this process: not the 1-minute load average, which stays high for a minute after any
    job ends (an idle machine right after an earlier run would get 1 thread of 2).
    """
    value = os.environ.get("LORAM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            from loram.shared.errors import LoramError

            raise LoramError(f"LORAM_THREADS={value!r} is not a whole number >= 1; set e.g. LORAM_THREADS=2 "
                             "or unset it")
        return int(value)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2": OpenMP's nested levels
    if omp.isdigit() and int(omp) >= 1:  # as OpenMP itself, an unreadable value is not used
        return int(omp)
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, total - busy_cores())


def busy_cores(samples: int = 5, interval: float = 0.01, stat: str = "/proc/stat") -> int:
    """Threads of other processes runnable now: the kernel's `procs_running` (which counts this one too),
    its minimum over `samples` readings `interval` seconds apart, so a process that only passes by is not
    counted. 0 where /proc/stat is not there."""
    import time

    seen = []
    for k in range(samples):
        try:
            with open(stat, encoding="ascii") as f:
                running = next((int(line.split()[1]) for line in f if line.startswith("procs_running ")), None)
        except OSError:
            running = None
        if running is None:
            return 0
        seen.append(running)
        if k + 1 < samples:
            time.sleep(interval)
    return max(0, min(seen) - 1)


def configure_threads() -> int:
    """Set torch's intra-op thread count from the free cores; returns it."""
    n = free_cores()
    torch.set_num_threads(n)
    return n


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_rank() -> int:
    """This process's rank in a torchrun / accelerate launch job, 0 for the only process. Read from the launcher's
    RANK, so it holds before the process group is up; a RANK without a WORLD_SIZE above 1 (left in the environment,
    not set by a launcher) makes no process a second one."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def first_process() -> bool:
    """This is the first process of a torchrun / accelerate launch job (or the only one): the one that writes
    outputs and prints (`process_rank`)."""
    return process_rank() == 0
