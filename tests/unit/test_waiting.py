"""The kernel's wait queues, as plain data."""

from __future__ import annotations

from dataclasses import dataclass

from kernel.waiting import WaitQueues


@dataclass
class W:
    name: str
    queued_at: float
    deadline_ns: int = 0
    size: int = 100


def test_bounded_per_destination_and_taken_in_order() -> None:
    wq: WaitQueues[W] = WaitQueues(limit=2, timeout_s=10)
    assert wq.add("echo", W("a", 0)) and wq.add("echo", W("b", 0))
    assert not wq.add("echo", W("c", 0))  # full
    assert wq.add("echo-1", W("d", 0))  # another destination has its own bound
    assert [w.name for w in wq.take(["echo", "echo-1"])] == ["a", "b", "d"]
    assert len(wq) == 0


def test_expiry_by_deadline_and_by_wait_timeout() -> None:
    wq: WaitQueues[W] = WaitQueues(limit=10, timeout_s=5)
    wq.add("x", W("deadline", queued_at=100, deadline_ns=1_000))
    wq.add("x", W("old", queued_at=90))
    wq.add("x", W("fresh", queued_at=99))
    gone = wq.expire(now=100.0, wall_ns=2_000)
    assert [(d, w.name, by_deadline) for d, w, by_deadline in gone] == [("x", "deadline", True), ("x", "old", False)]
    assert [w.name for w in wq.take(["x"])] == ["fresh"]


def test_remove_by_predicate() -> None:
    wq: WaitQueues[W] = WaitQueues(limit=10, timeout_s=5)
    for n in "abc":
        wq.add("x", W(n, 0))
    wq.remove(lambda dst, w: w.name == "b")
    assert [w.name for w in wq.take(["x"])] == ["a", "c"]


def test_bounded_in_total_count_and_bytes_across_destinations() -> None:
    """Many destinations cannot add up past the totals (a flood parked under
    made-up names grew the kernel by gigabytes), and space comes back when
    waiters leave by any way: taken, expired or removed."""
    wq: WaitQueues[W] = WaitQueues(limit=10, timeout_s=5, total_limit=3, total_bytes=1_000)
    assert all(wq.add(f"svc{i}", W(str(i), 0)) for i in range(3))
    assert not wq.add("svc9", W("over count", 0)) and "3 waiting requests" in wq.full("svc9", 100)
    assert [w.name for w in wq.take(["svc0"])] == ["0"] and len(wq) == 2
    assert not wq.add("big", W("over bytes", 0, size=801)) and "1000 bytes" in wq.full("big", 801)
    assert wq.add("big", W("fits", 0, size=800)) and wq.bytes == 1_000
    wq.remove(lambda dst, w: w.name == "fits")
    assert wq.bytes == 200 and len(wq) == 2
    assert len(wq.expire(now=100.0, wall_ns=0)) == 2 and wq.bytes == 0 and len(wq) == 0
