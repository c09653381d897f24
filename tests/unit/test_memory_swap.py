"""Swap tier, capacity and quota limits of the MemoryManager."""

from __future__ import annotations

from ipc.errors import ErrorCode
from ipc.protocol.memory import (
    Fork, ForkItem, MemoryStats, RegisterPool, Release, Reserve, SeqReserve, SetBlockQuota,
    SwapIn, SwapOut,
)
from services.memory import MemoryConfig, MemoryManager

BS = 4


def manager(num_blocks: int = 16, swap_slots: int = 8,
            config: MemoryConfig | None = None) -> MemoryManager:
    m = MemoryManager(config)
    m.register_pool(RegisterPool("d0", num_blocks, BS, swap_slots))
    return m


def new(m: MemoryManager, sid: int, n: int, tenant: str = "t", first: int = 0) -> list[int]:
    r = m.reserve(Reserve([SeqReserve(sid, 0, list(range(first, first + n)), n, tenant=tenant,
                                      pool="d0")])).seqs[0]
    assert r.error is None, r.error
    return r.blocks


def test_swap_round_trip_names_every_copy() -> None:
    m = manager()
    blocks = new(m, 1, 10)
    out = m.swap_out(SwapOut([1])).seqs[0]
    assert out.error is None
    assert out.device_blocks == blocks and len(out.swap_slots) == 3
    assert out.blocks == out.swap_slots and m.sequence(1).swapped
    s = m.stats(MemoryStats()).pools[0]
    assert (s.used, s.swap_used, s.num_swapped_seqs, s.swapped_out) == (0, 3, 1, 3)
    # Fill the device with someone else, evicting a's cached full blocks.
    new(m, 2, 64, first=100)
    m.release(Release([2], computed=False))
    back = m.swap_in(SwapIn([1])).seqs[0]
    assert back.error is None
    assert back.swap_slots == out.swap_slots
    assert back.blocks == back.device_blocks and len(back.blocks) == 3
    assert m.sequence(1).blocks == back.blocks and not m.sequence(1).swapped
    s = m.stats(MemoryStats()).pools[0]
    assert (s.used, s.swap_used, s.swapped_in) == (3, 0, 3)
    # The sequence goes on where it was.
    r = m.reserve(Reserve([SeqReserve(1, 10, [10], 1)])).seqs[0]
    assert r.error is None and r.table_start == 3 and r.blocks == []


def test_swap_in_reuses_blocks_still_cached() -> None:
    m = manager()
    new(m, 1, 10)
    full = m.sequence(1).blocks[:2]
    out = m.swap_out(SwapOut([1])).seqs[0]
    back = m.swap_in(SwapIn([1])).seqs[0]
    # The two full blocks were still cached on the device: no copy for them.
    assert back.blocks[:2] == full
    assert back.device_blocks == [back.blocks[2]] and back.swap_slots == [out.swap_slots[2]]


def test_forks_swapped_together_keep_sharing() -> None:
    m = manager()
    new(m, 16, 6)
    m.fork(Fork([ForkItem(16, 3)]))
    out = m.swap_out(SwapOut([16, 3]))
    assert out.seqs[0].blocks == out.seqs[1].blocks
    assert len(out.seqs[0].device_blocks) == 2 and out.seqs[1].device_blocks == []
    assert m.stats(MemoryStats()).pools[0].swap_used == 2
    back = m.swap_in(SwapIn([16, 3]))
    assert back.seqs[0].blocks == back.seqs[1].blocks
    assert m.pool("d0").ref[back.seqs[0].blocks[1]] == 2


def test_swap_out_fails_cleanly_when_the_swap_tier_is_full() -> None:
    m = manager(swap_slots=2)
    new(m, 1, 10)
    before = list(m.sequence(1).blocks)
    r = m.swap_out(SwapOut([1])).seqs[0]
    assert r.error is not None and r.error.code == ErrorCode.OVERLOADED
    assert "swap" in r.error.message
    assert m.sequence(1).blocks == before and not m.sequence(1).swapped


def test_swap_in_fails_cleanly_when_the_device_is_full() -> None:
    m = manager(num_blocks=4)
    new(m, 1, 8)
    m.swap_out(SwapOut([1]))
    new(m, 2, 16, first=50)
    r = m.swap_in(SwapIn([1])).seqs[0]
    assert r.error is not None and r.error.code == ErrorCode.OVERLOADED
    assert m.sequence(1).swapped and m.stats(MemoryStats()).pools[0].swap_used == 2


def test_swap_errors_are_per_sequence() -> None:
    m = manager()
    new(m, 1, 3)
    out = m.swap_out(SwapOut([51, 1, 1])).seqs
    assert [r.error.code if r.error else None for r in out] == [
        ErrorCode.NOT_FOUND, None, ErrorCode.BAD_REQUEST]
    r = m.reserve(Reserve([SeqReserve(1, 3, [3], 1)])).seqs[0]
    assert r.error is not None and r.error.code == ErrorCode.BAD_REQUEST
    assert "swapped out" in r.error.message
    assert m.swap_in(SwapIn([1, 1])).seqs[1].error.code == ErrorCode.BAD_REQUEST


def test_reserve_overloaded_when_the_pool_is_full_leaves_state_unchanged() -> None:
    m = manager(num_blocks=4)
    new(m, 1, 12)
    reply = m.reserve(Reserve([
        SeqReserve(2, 0, list(range(8)), 8, tenant="t", pool="d0"),
        SeqReserve(3, 0, [1, 2], 2, tenant="t", pool="d0"),
    ]))
    b, c = reply.seqs
    assert b.error is not None and b.error.code == ErrorCode.OVERLOADED
    assert b.error.detail["needed"] == 2 and b.error.detail["available"] == 1
    assert c.error is None and len(c.blocks) == 1
    # b was never created: a retry starts it afresh.
    assert m.release(Release([2])).failures[0].error.code == ErrorCode.NOT_FOUND
    a = m.reserve(Reserve([SeqReserve(1, 12, [12], 1)])).seqs[0]
    assert a.error is not None and a.error.code == ErrorCode.OVERLOADED
    assert len(m.sequence(1).tokens) == 12  # the refused token was not taken


def test_quota_refuses_blocks_past_the_limit_for_that_tenant_only() -> None:
    m = manager(config=MemoryConfig(tenant_blocks={"small": 2}))
    assert m.set_block_quota(SetBlockQuota("tiny", 1)).limit == 1
    new(m, 119, 8, tenant="small")
    reply = m.reserve(Reserve([
        SeqReserve(219, 0, [50], 1, tenant="small", pool="d0"),
        SeqReserve(102, 0, list(range(40)), 40, tenant="big", pool="d0"),
        SeqReserve(120, 0, list(range(8)), 8, tenant="tiny", pool="d0"),
    ]))
    codes = [r.error.code if r.error else None for r in reply.seqs]
    assert codes == [ErrorCode.OVERLOADED, None, ErrorCode.OVERLOADED]
    assert "quota" in reply.seqs[0].error.message
    usage = {t.tenant: t for t in m.stats(MemoryStats()).tenants}
    assert (usage["small"].blocks, usage["small"].limit) == (2, 2)
    assert usage["big"].blocks == 10 and usage["big"].limit == -1
    m.release(Release([119]))
    assert new(m, 319, 8, tenant="small", first=7)


def test_quota_counts_shared_blocks_once() -> None:
    m = manager(config=MemoryConfig(default_tenant_blocks=2))
    new(m, 16, 6)
    assert m.fork(Fork([ForkItem(16, 103), ForkItem(16, 203)])).failures == []
    assert m.set_block_quota(SetBlockQuota("t", 3)).blocks == 2
    # One copy-on-write fits in the quota, the second does not.
    reply = m.reserve(Reserve([SeqReserve(103, 6, [1], 1), SeqReserve(203, 6, [2], 1)]))
    assert reply.seqs[0].error is None and reply.seqs[0].cow_dst >= 0
    assert reply.seqs[1].error is not None and reply.seqs[1].error.code == ErrorCode.OVERLOADED


def test_swap_in_respects_the_quota() -> None:
    m = manager()
    new(m, 1, 8)
    m.swap_out(SwapOut([1]))
    m.pool("d0").evict(-1)
    m.set_block_quota(SetBlockQuota("t", 1))
    r = m.swap_in(SwapIn([1])).seqs[0]
    assert r.error is not None and r.error.code == ErrorCode.OVERLOADED
    usage = m.stats(MemoryStats()).tenants[0]
    assert (usage.blocks, usage.swapped) == (0, 2)
