from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short LLMOS_HOME: ipc:// socket paths must stay under ~100 bytes."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    yield d
    if not os.environ.get("LLMOS_KEEP_TEST_HOME"):
        subprocess.run(["rm", "-rf", str(d)], check=False)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint with sharp (near-deterministic) weights, once
    per module. Modules that need another shape define their own."""
    from tests.unit.model_fixtures import make_checkpoint  # torch: only where a model is needed

    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", sharp=True)
    return d
