"""The numbers MemoryStats reports."""

from __future__ import annotations

import pytest

from ipc.protocol.memory import (
    Fork, ForkItem, MemoryStats, RegisterPool, Release, Reserve, SeqReserve, SetBlockQuota,
    SwapIn, SwapOut,
)
from services.memory import MemoryManager


def test_stats_count_blocks_waste_hits_copies_and_tenants() -> None:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", 10, 4, 6))
    m.register_pool(RegisterPool("d1", 2, 8))
    m.reserve(Reserve([
        SeqReserve(1, 0, list(range(10)), 10, tenant="alice", pool="d0"),
        SeqReserve(2, 0, [7, 7, 7], 3, tenant="bob", pool="d0"),
        SeqReserve(3, 0, [1], 1, tenant="bob", pool="d1"),
    ]))
    m.fork(Fork([ForkItem(1, 201)]))
    m.reserve(Reserve([SeqReserve(201, 10, [10], 1)]))  # copy-on-write of a's third block
    m.set_block_quota(SetBlockQuota("carol", 5))
    s = m.stats(MemoryStats("d0")).pools[0]
    assert (s.num_blocks, s.block_size, s.swap_slots) == (10, 4, 6)
    assert (s.used, s.free, s.cached) == (5, 5, 0)
    assert s.utilisation == pytest.approx(0.5)
    # a: 4 + 4 + 2 of 4, a2's copy: 3 of 4, b: 3 of 4 -> 20 slots, 16 filled.
    assert s.waste_slots == 4 and s.waste_pct == pytest.approx(20.0)
    assert (s.num_seqs, s.cow_copies, s.prompt_tokens, s.hit_tokens) == (3, 1, 13, 0)

    m.release(Release([1]))
    m.reserve(Reserve([SeqReserve(4, 0, list(range(9)), 9, tenant="alice", pool="d0")]))
    m.swap_out(SwapOut([2]))
    m.swap_in(SwapIn([2]))
    s = m.stats(MemoryStats("d0")).pools[0]
    assert (s.prompt_tokens, s.hit_tokens) == (22, 8)
    assert s.hit_rate == pytest.approx(8 / 22)
    assert (s.swapped_out, s.swapped_in, s.swap_used) == (1, 1, 0)
    assert s.used + s.free + s.cached == 10

    both = m.stats(MemoryStats())
    assert [p.pool for p in both.pools] == ["d0", "d1"]
    usage = {t.tenant: (t.blocks, t.swapped, t.limit) for t in both.tenants}
    # alice: a2 holds 3 (2 shared with d), d adds 1; bob: b in d0, c in d1.
    assert usage == {"alice": (4, 0, -1), "bob": (2, 0, -1), "carol": (0, 0, 5)}


def test_evictions_are_counted() -> None:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", 2, 2))
    m.reserve(Reserve([SeqReserve(1, 0, [1, 2, 3, 4], 4, tenant="t", pool="d0")]))
    m.release(Release([1]))
    assert m.stats(MemoryStats()).pools[0].cached == 2
    m.reserve(Reserve([SeqReserve(2, 0, [5, 6, 7], 3, tenant="t", pool="d0")]))
    s = m.stats(MemoryStats()).pools[0]
    assert (s.evictions, s.cached, s.used) == (2, 0, 2)
