import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs files on 2 workers: one core each, not 2 x 2 threads
    os.environ.setdefault("LORAM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny_models) importable by name

from tiny_models import KINDS, tiny_model  # noqa: E402


@pytest.fixture(params=KINDS)
def any_tiny_model(request):
    """Each tiny architecture in turn."""
    return request.param, tiny_model(request.param)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """An empty LORAM_CACHE for tests that must not touch the user's cache."""
    monkeypatch.setenv("LORAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


HUB_TOKEN = "hf_loramTestToken0123456789abcdefXYZ"  # planted: tests check it never leaks


@pytest.fixture(params=["lfs", "regular"])
def hub(request, tmp_path, monkeypatch):
    """A loopback Hub (tests/hub_server.py) in LFS mode (Xet disabled) or all-inline mode, with an
    isolated Hugging Face home, cache and LoRAM cache, and HF_TOKEN set to `HUB_TOKEN`."""
    from hub_server import HubServer
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    env = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_TOKEN_PATH": home / "token",
           "LORAM_CACHE": tmp_path / "loram-cache", "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_XET": "1" if request.param == "lfs" else "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    # huggingface_hub reads these at import; the patched values act for this process, the env for children
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.setattr(constants, name, str(env[name]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "lfs")
    with HubServer(mode=request.param, token=HUB_TOKEN) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_pruned(tmp_path_factory):
    """The embedded SmolLM2-135M pruned by `loram publish prune --method l2 --ratio 0.5` (no calibration), once
    per test session: the memory-estimate tests measure real runs on it."""
    import subprocess
    import sys
    from pathlib import Path

    from loram.shared import assets

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-l2-0.5"
    proc = subprocess.run([str(Path(sys.executable).parent / "loram"), "publish", "prune", str(assets.model_dir()),
                           "--method", "l2", "--ratio", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture
def loram_warnings(recwarn):
    """`said()`: the messages of the LoramWarnings raised since the last call (what the CLI prints as `warning:`
    lines), every one of them, repeats included."""
    import warnings

    from loram.shared.errors import LoramWarning

    warnings.simplefilter("always", LoramWarning)

    def said() -> list[str]:
        messages = [str(w.message) for w in recwarn.list if issubclass(w.category, LoramWarning)]
        recwarn.clear()
        return messages

    return said
