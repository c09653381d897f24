"""What the Ray launcher's tests add to tools/raysim.py: waiting for a pid to be gone."""

from __future__ import annotations

import os
import time


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether `pid` is gone within `timeout` (polled; run it in a thread)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
