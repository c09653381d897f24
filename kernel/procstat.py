"""What the host's scheduler says about a local process: its main thread's
state and the CPU time the whole process has used (Linux /proc/PID/stat).

The kernel asks this of an instance that missed its heartbeats, to tell a
hung service from a starved one. A hung service is stopped (state T), blocked
(S or D: a deadlock, a syscall that never returns) or spinning (R, using the
CPU). A starved one is runnable (R) and has not been given the CPU: on an
overloaded host a service's process was seen runnable for 4.7 s with no CPU
time while a plain sleeper in another process woke on time (docs/reliability.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    state: str  # R running or runnable, S sleeping, D disk wait, T stopped, Z zombie, ...
    cpu_s: float  # user + system time of every thread so far

    @property
    def runnable(self) -> bool:
        return self.state == "R"


def sample(pid: int) -> ProcSample | None:
    """The process's state and CPU time; None where it is gone or this is not Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return ProcSample(fields[0].decode("ascii", "replace"), (int(fields[11]) + int(fields[12])) / _TICKS_PER_S)
    except (IndexError, ValueError):
        return None


__all__ = ["ProcSample", "sample"]
