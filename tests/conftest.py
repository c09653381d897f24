from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# Async tests run on uvloop and fail if they block their loop (tests/helpers/loop_guard.py).
pytest_plugins = ["tests.helpers.loop_guard"]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """For `@pytest.mark.anyio` tests: uvloop, like production."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short LLMOS_HOME: ipc:// socket paths must stay under ~100 bytes."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    yield d
    if not os.environ.get("LLMOS_KEEP_TEST_HOME"):
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint with sharp (near-deterministic) weights, once
    per module. Modules that need another shape define their own."""
    from tests.helpers.model_fixtures import make_checkpoint  # torch: only where a model is needed

    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", sharp=True)
    return d
