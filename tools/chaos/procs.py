"""Process facts from /proc (Linux): alive, peak RSS, open file descriptors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import anyio


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (exited, not yet reaped) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _status_mb(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def peak_rss_mb(pid: int) -> float | None:
    """The process's high-water resident set (VmHWM), in MiB."""
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float | None:
    """The process's resident set now (VmRSS), in MiB."""
    return _status_mb(pid, "VmRSS:")


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class Sampler:
    """Samples the named processes once per `interval_s`: peak RSS by name
    (the largest over every pid that name had) and fd counts over time."""

    def __init__(self, pids: Callable[[], dict[str, int]], interval_s: float = 1.0):
        self._pids = pids
        self.interval_s = interval_s
        self.peak_rss_mb: dict[str, float] = {}
        self.fds: dict[str, list[int]] = {}

    def sample(self) -> None:
        for name, pid in self._pids().items():
            rss = peak_rss_mb(pid)
            if rss is not None:
                self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), round(rss, 1))
            n = open_fds(pid)
            if n is not None:
                self.fds.setdefault(name, []).append(n)

    async def run(self) -> None:
        while True:
            self.sample()
            await anyio.sleep(self.interval_s)  # a sampling period: a measurement, not a wait


def leaked(pids: Iterable[int], keep: Iterable[int] = ()) -> list[int]:
    """The pids, other than `keep`, that are still alive."""
    k = set(keep)
    return sorted(p for p in pids if p and p not in k and alive(p))
