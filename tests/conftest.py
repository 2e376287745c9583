"Shared test settings: paths, and a private cache folder so tests never touch the user's cache."
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    "A fresh, empty `BIGMODEL_NB_CACHE` for one test."
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIGMODEL_NB_CACHE", str(cache))
    return cache


def run_py(code: str, env: dict | None = None, **kw):
    "Run `code` in a fresh interpreter (so environment variables are read anew)."
    import subprocess
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, **kw)
