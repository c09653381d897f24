"""Requests waiting for a destination with no live instance: bounded per
destination, expired by deadline or wait timeout. Plain data; the router
decides what a refusal or an expiry is answered with."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    queued_at: float

    @property
    def deadline_ns(self) -> int: ...


W = TypeVar("W", bound=Waiter)


class WaitQueues(Generic[W]):
    def __init__(self, limit: int, timeout_s: float):
        self.limit = limit
        self.timeout_s = timeout_s
        self._queues: dict[str, deque[W]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, dst: str, w: W) -> bool:
        """Queue `w` for `dst`; False when that queue is full."""
        q = self._queues.setdefault(dst, deque())
        if len(q) >= self.limit:
            return False
        q.append(w)
        return True

    def take(self, dsts: Iterable[str]) -> Iterator[W]:
        """Everything waiting for any of `dsts`, oldest first per destination."""
        for dst in dsts:
            q = self._queues.pop(dst, None)
            while q:
                yield q.popleft()

    def expire(self, now: float, wall_ns: int) -> list[tuple[str, W, bool]]:
        """Remove and return (dst, waiter, deadline_passed) for every waiter
        whose deadline passed or that waited longer than the timeout."""
        out: list[tuple[str, W, bool]] = []
        self.remove(lambda dst, w: _expired(self, dst, w, now, wall_ns, out))
        return out

    def remove(self, pred: Callable[[str, W], bool]) -> None:
        for dst, q in list(self._queues.items()):
            kept = deque(w for w in q if not pred(dst, w))
            if kept:
                self._queues[dst] = kept
            else:
                del self._queues[dst]


def _expired(wq: WaitQueues[W], dst: str, w: W, now: float, wall_ns: int,
             out: list[tuple[str, W, bool]]) -> bool:
    if w.deadline_ns and w.deadline_ns <= wall_ns:
        out.append((dst, w, True))
        return True
    if now - w.queued_at > wq.timeout_s:
        out.append((dst, w, False))
        return True
    return False
