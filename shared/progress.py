"""Progress for long training runs: one bar with loss, tokens/s and ETA; peak-memory measurement."""

import resource
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback


def process_peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec. `ru_maxrss` does not: a child
    started from a large process (a test runner) inherits the parent's high-water mark.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory() -> None:
    """Start a run's peak afresh: CUDA's counter, and on Linux the process's high-water mark (5 written to
    /proc/self/clear_refs sets it to the memory held now). Without it, a run in a process that did heavier work
    first (a notebook, a script that aligns and then trains) reported that work's peak as its own."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the process's peak so far stands
        pass


def peak_memory_bytes(devices=None) -> int:
    """CUDA peak allocated on the current GPU, or summed over `devices` (a model placed with device_map="auto");
    the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        gpus = sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"}) if devices else []
        return int(sum(torch.cuda.max_memory_allocated(i) for i in gpus) if gpus else torch.cuda.max_memory_allocated())
    return process_peak_rss_bytes()


class TrainingProgress(TrainerCallback):
    """A tqdm bar over optimizer steps showing the latest loss, eval loss and tokens/s (ETA is tqdm's)."""

    def __init__(self, desc: str = "training"):
        self.desc, self.bar = desc, None
        self.started = self.tokens_at_start = None
        self.tokens_per_second = 0.0
        self.memory_kind = "cuda_max_allocated" if torch.cuda.is_available() else "process_peak_rss"
        self.postfix: dict[str, str] = {}
        self.step_seconds: list[float] = []  # wall time of each optimizer step this process ran (--resume: from there)
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.started, self.tokens_at_start = time.time(), state.num_input_tokens_seen
        self._last = self.started

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        self.step_seconds.append(round(now - self._last, 3))
        self._last = None
        elapsed = max(sum(self.step_seconds), 1e-9)  # the steps' own time: evaluations between them left out
        self.tokens_per_second = (state.num_input_tokens_seen - self.tokens_at_start) / elapsed
        self.postfix["tok/s"] = f"{self.tokens_per_second:,.0f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            if logs and key in logs:
                self.postfix[key.replace("_", " ")] = f"{logs[key]:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
