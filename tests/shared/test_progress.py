"""loram.shared.progress.peak_memory_bytes: the figure reports print as peak memory.

On GPUs a model placed with device_map="auto" (`loram publish selfgen`) spans several devices, and the peak is the sum
of each GPU's peak allocation, counted once per GPU; without devices it is the current GPU's. CUDA's counters are
replaced by per-index numbers here, so the summing is checked without a GPU."""

import torch

from loram.shared import progress


def _fake_cuda(monkeypatch, peaks: dict[int, int]) -> list:
    asked = []

    def max_memory_allocated(device=None):
        asked.append(device)
        return peaks[0 if device is None else device]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    return asked


def test_sums_each_gpu_once_over_the_devices_a_model_spans(monkeypatch):
    asked = _fake_cuda(monkeypatch, {0: 5 * 2**30, 1: 7 * 2**30, 2: 11 * 2**30})
    devices = {torch.device("cuda", 0), torch.device("cuda", 2), torch.device("cpu"), torch.device("meta")}
    assert progress.peak_memory_bytes(devices) == 16 * 2**30  # cpu / meta layers add nothing; GPU 1 is not the model's
    assert sorted(asked) == [0, 2]
    asked.clear()
    assert progress.peak_memory_bytes(["cuda:1", "cuda:1", "cuda"]) == 12 * 2**30  # "cuda" is GPU 0; 1 counted once
    assert sorted(asked) == [0, 1]


def test_current_gpu_without_devices_or_with_none_on_a_gpu(monkeypatch):
    asked = _fake_cuda(monkeypatch, {0: 3 * 2**20})
    assert progress.peak_memory_bytes() == 3 * 2**20
    assert progress.peak_memory_bytes({torch.device("cpu")}) == 3 * 2**20  # offloaded entirely: the current GPU's
    assert asked == [None, None]


def test_cpu_is_the_process_peak_rss(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rss = progress.process_peak_rss_bytes()
    assert rss > 2**20
    assert progress.peak_memory_bytes({torch.device("cpu")}) >= rss
