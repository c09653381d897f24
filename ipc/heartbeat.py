"""Liveness constants shared by the kernel, services and clients (Paranoid
Pirate), and `Stalls`: how each of them judges a silent peer after its own
event loop did not run for a while."""

from __future__ import annotations

from collections import deque

HEARTBEAT_INTERVAL_S = 1.0
# A peer is dead after this many intervals without hearing anything from it.
HEARTBEAT_LIVENESS = 3
HEARTBEAT_EXPIRY_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
# A stall is forgotten this long after it ended: the sockets were read many
# times since, so nothing sent during it still waits unread.
_STALL_MEMORY_S = HEARTBEAT_EXPIRY_S * 10


class Stalls:
    """The spans this process's loop did not run (a timer woke much later
    than asked). What a peer sent meanwhile may still wait unread when the
    timer's task runs, so those spans do not count as the peer's silence.

    Only the spans themselves are forgiven - not the silence before one, and
    not the time between two - so a process whose loop is late on every
    wake-up still finds a dead peer after HEARTBEAT_EXPIRY_S of its own
    running time (departure 30 in docs/architecture.md)."""

    def __init__(self) -> None:
        self._spans: deque[tuple[float, float]] = deque()  # (start, end), in order, not overlapping

    def note(self, start: float, end: float) -> None:
        """The loop did not run from `start` to `end` (monotonic seconds)."""
        spans = self._spans
        if spans and spans[-1][1] >= start:  # two timers saw the same stall
            start = min(start, spans.pop()[0])
        spans.append((start, end))
        while spans[0][1] < end - _STALL_MEMORY_S:
            spans.popleft()

    def silence(self, now: float, heard: float) -> float:
        """Seconds since `heard`, less the spans this process did not run."""
        silent = now - heard
        for start, end in reversed(self._spans):
            if end <= heard:
                break
            silent -= end - max(start, heard)
        return silent


__all__ = ["HEARTBEAT_EXPIRY_S", "HEARTBEAT_INTERVAL_S", "HEARTBEAT_LIVENESS", "Stalls"]
