import sys
from pathlib import Path

import pytest

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
