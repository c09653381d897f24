"""Requests waiting for a destination with no live instance: bounded per
destination, in total count and in total bytes, expired by deadline or wait
timeout. Plain data; the router decides what a refusal or an expiry is
answered with.

The total bounds matter because a client needs no token to send the one
public op (Login): with only a per-destination bound, requests parked under
many names grew the kernel from 40 MB to 2.4 GB (issue 12 #5)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    queued_at: float

    @property
    def size(self) -> int: ...

    @property
    def deadline_ns(self) -> int: ...


W = TypeVar("W", bound=Waiter)


class WaitQueues(Generic[W]):
    def __init__(self, limit: int, timeout_s: float, total_limit: int = 0, total_bytes: int = 0):
        """`limit` per destination; `total_limit` waiters and `total_bytes` of
        payload across all destinations (0: no such bound)."""
        self.limit = limit
        self.timeout_s = timeout_s
        self.total_limit = total_limit
        self.total_bytes = total_bytes
        self._queues: dict[str, deque[W]] = {}
        self._count = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def full(self, dst: str, size: int) -> str:
        """Why `dst` cannot take a waiter of `size` bytes now ("" if it can)."""
        q = self._queues.get(dst)
        if q is not None and len(q) >= self.limit:
            return f"its wait queue holds {self.limit} requests"
        if self.total_limit and self._count >= self.total_limit:
            return f"the kernel holds {self.total_limit} waiting requests"
        if self.total_bytes and self._bytes + size > self.total_bytes:
            return f"waiting requests would exceed {self.total_bytes} bytes"
        return ""

    def add(self, dst: str, w: W) -> bool:
        """Queue `w` for `dst`; False when a bound is reached (`full` says which)."""
        if self.full(dst, w.size):
            return False
        self._queues.setdefault(dst, deque()).append(w)
        self._count += 1
        self._bytes += w.size
        return True

    def take(self, dsts: Iterable[str]) -> Iterator[W]:
        """Everything waiting for any of `dsts`, oldest first per destination."""
        for dst in dsts:
            q = self._queues.pop(dst, None)
            while q:
                w = q.popleft()
                self._count -= 1
                self._bytes -= w.size
                yield w

    def expire(self, now: float, wall_ns: int) -> list[tuple[str, W, bool]]:
        """Remove and return (dst, waiter, deadline_passed) for every waiter
        whose deadline passed or that waited longer than the timeout."""
        out: list[tuple[str, W, bool]] = []
        self.remove(lambda dst, w: _expired(self, dst, w, now, wall_ns, out))
        return out

    def remove(self, pred: Callable[[str, W], bool]) -> None:
        for dst, q in list(self._queues.items()):
            kept: deque[W] = deque()
            for w in q:
                if pred(dst, w):
                    self._count -= 1
                    self._bytes -= w.size
                else:
                    kept.append(w)
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
