"""The `llmos` command line as tests run it: a subprocess on a home, and
`llmos ps --json` polled until a condition holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.testing import REPO_ROOT

LLMOS = [sys.executable, "-m", "tools.cli"]


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LLMOS, "--home", str(home), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def ps(home: Path) -> dict:  # type: ignore[type-arg]
    out = llmos(home, "ps", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_ps(home: Path, pred, what: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    end = time.monotonic() + 60
    while True:
        try:
            snap = ps(home)
            if pred(snap):
                return snap
        except AssertionError:
            pass
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)
