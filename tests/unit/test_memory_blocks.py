"""Targeted MemoryManager tests: prefix cache, LRU eviction, copy-on-write."""

from __future__ import annotations

import pytest

from ipc.errors import ErrorCode
from ipc.protocol.memory import (
    EvictCached, Fork, ForkItem, MemoryStats, PoolStats, RegisterPool, Release, Reserve,
    SeqBlocks, SeqReserve,
)
from services.memory import MemoryManager
from services.memory._free_queue import FreeBlockQueue

BS = 4


def manager(num_blocks: int = 16, swap_slots: int = 0) -> MemoryManager:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", num_blocks, BS, swap_slots))
    return m


def new(m: MemoryManager, sid: int, prompt: list[int], num_new: int | None = None,
        tenant: str = "t", salt: str = "") -> SeqBlocks:
    item = SeqReserve(sid, 0, prompt, len(prompt) if num_new is None else num_new,
                      tenant=tenant, pool="d0", cache_salt=salt)
    return m.reserve(Reserve([item])).seqs[0]


def step(m: MemoryManager, sid: int, start: int, tokens: list[int], num_new: int = 1) -> SeqBlocks:
    return m.reserve(Reserve([SeqReserve(sid, start, tokens, num_new)])).seqs[0]


def stats(m: MemoryManager) -> PoolStats:
    return m.stats(MemoryStats("d0")).pools[0]


def test_free_queue_removes_from_the_middle_and_keeps_order() -> None:
    q = FreeBlockQueue(5)
    assert list(q) == [0, 1, 2, 3, 4]
    q.remove(2)
    q.append(2)
    q.remove(4)
    q.appendleft(4)
    assert list(q) == [4, 0, 1, 3, 2] and len(q) == 5
    assert [q.popleft() for _ in range(5)] == [4, 0, 1, 3, 2]
    with pytest.raises(IndexError):
        q.popleft()
    q.append(3)
    assert list(q) == [3] and 3 in q and 0 not in q


def test_prefix_hit_shares_full_blocks_and_computes_the_rest() -> None:
    m = manager()
    prompt = list(range(10))
    a = new(m, 1, prompt)
    assert a.num_cached == 0 and len(a.blocks) == 3
    m.release(Release([1]))
    b = new(m, 2, prompt + [77, 78])
    # Blocks 0 and 1 (tokens 0..7) are full and come back; the rest is new.
    assert b.num_cached == 8 and b.blocks[:2] == a.blocks[:2]
    s = stats(m)
    assert s.hit_tokens == 8 and s.prompt_tokens == 10 + 12
    assert s.hit_rate == pytest.approx(8 / 22)


def test_live_sequences_share_cached_blocks_by_ref_count() -> None:
    m = manager()
    new(m, 1, list(range(9)))
    step(m, 1, 9, [100])  # commits a's two full blocks
    b = new(m, 2, list(range(9)))
    pool = m.pool("d0")
    shared = m.sequence(1).blocks[:2]
    assert b.blocks[:2] == shared and all(pool.ref[x] == 2 for x in shared)
    assert stats(m).used == 3 + 1  # a: 3 blocks, b: its own third one


def test_last_prompt_token_is_never_served_from_cache() -> None:
    m = manager()
    prompt = list(range(8))  # exactly two full blocks
    new(m, 1, prompt)
    m.release(Release([1]))
    b = new(m, 2, prompt)
    # Both blocks are cached, but the second holds the last token, so only
    # the first is served and the second is recomputed.
    assert b.num_cached == 4
    assert len(b.blocks) == 2
    assert m.sequence(2).num_slots == 8


def test_a_block_is_cached_only_once_its_kv_was_computed() -> None:
    m = manager()
    new(m, 1, list(range(9)))
    # a's step has not run yet (no later call for a): nothing to share.
    assert new(m, 2, list(range(9))).num_cached == 0
    step(m, 1, 9, [9])
    assert new(m, 3, list(range(9))).num_cached == 8


def test_release_of_an_unrun_step_caches_nothing_new() -> None:
    m = manager()
    new(m, 1, list(range(9)))
    m.release(Release([1], computed=False))
    assert stats(m).cached == 0
    new(m, 2, list(range(9)))
    m.release(Release([2]))
    assert stats(m).cached == 2


def test_tenants_and_salts_never_share_blocks() -> None:
    m = manager(num_blocks=32)
    prompt = list(range(12))
    new(m, 1, prompt, tenant="alice")
    m.release(Release([1]))
    other = new(m, 2, prompt, tenant="bob")
    salted = new(m, 3, prompt, tenant="alice", salt="s1")
    same = new(m, 4, prompt, tenant="alice")
    assert other.num_cached == 0 and salted.num_cached == 0
    assert same.num_cached == 8
    assert not set(other.blocks) & set(same.blocks)
    assert not set(salted.blocks) & set(same.blocks)


def test_uncached_free_blocks_go_before_any_eviction() -> None:
    m = manager(num_blocks=4)
    new(m, 1, list(range(5)))  # block 0 full (cached on release), block 1 partial
    m.release(Release([1]))
    assert (stats(m).free, stats(m).cached) == (3, 1)
    new(m, 2, [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9])
    assert stats(m).evictions == 0 and stats(m).cached == 1


def test_eviction_takes_least_recently_freed_first() -> None:
    m = manager(num_blocks=6)
    prompts = {sid: [sid] * 5 for sid in (1, 2, 3)}
    for sid, prompt in prompts.items():
        new(m, sid, prompt)  # one full block + one partial block each
    for sid in (2, 1, 3):  # free order: 2, 1, 3
        m.release(Release([sid]))
    assert stats(m).cached == 3
    new(m, 24, [0] * 16)  # needs 4: three free blocks, then evicts b's
    assert stats(m).evictions == 1
    # Probes with num_new=0 allocate nothing, so they evict nothing.
    assert new(m, 202, prompts[2], num_new=0).num_cached == 0
    assert new(m, 201, prompts[1], num_new=0).num_cached == 4
    assert new(m, 203, prompts[3], num_new=0).num_cached == 4


def test_a_cache_hit_refreshes_recency() -> None:
    m = manager(num_blocks=4)
    new(m, 1, [1] * 5)
    new(m, 2, [2] * 5)
    m.release(Release([1, 2]))  # a freed first: a is older
    new(m, 201, [1] * 5)  # hit on a's block ...
    m.release(Release([201]))  # ... which is now the newest
    new(m, 24, [0] * 12)  # three blocks: two free, then one eviction
    assert new(m, 202, [2] * 5, num_new=0).num_cached == 0
    assert new(m, 301, [1] * 5, num_new=0).num_cached == 4


def test_evict_cached_drops_idle_cached_blocks_lru_first() -> None:
    m = manager(num_blocks=8)
    for i, sid in enumerate((1, 2, 3)):
        new(m, sid, [i] * 5)
    m.release(Release([3, 1, 2]))
    assert m.evict_cached(EvictCached("d0", 1)).num_evicted == 1
    assert new(m, 203, [2] * 5, num_new=0).num_cached == 0
    assert m.evict_cached(EvictCached()).num_evicted == 2
    assert stats(m).cached == 0 and new(m, 202, [1] * 5, num_new=0).num_cached == 0


def test_fork_shares_blocks_and_copies_the_partial_block_on_write() -> None:
    m = manager()
    new(m, 16, list(range(6)))  # blocks: [full, partial (2 of 4)]
    assert m.fork(Fork([ForkItem(16, 103), ForkItem(16, 203)])).failures == []
    pool = m.pool("d0")
    full, partial = m.sequence(16).blocks
    assert pool.ref[full] == 3 and pool.ref[partial] == 3
    r = step(m, 103, 6, [60])
    assert r.cow_src == partial and r.cow_dst not in (full, partial)
    assert r.table_start == 1 and r.blocks == [r.cow_dst]
    assert m.sequence(103).blocks == [full, r.cow_dst]
    assert pool.ref[partial] == 2 and pool.ref[r.cow_dst] == 1
    # The parent writes too: still shared with c2, so it copies as well.
    rp = step(m, 16, 6, [61])
    assert rp.cow_src == partial and rp.cow_dst not in (r.cow_dst, partial)
    # c2 is the last holder: it writes in place.
    r2 = step(m, 203, 6, [62])
    assert r2.cow_src == -1 and m.sequence(203).blocks == [full, partial]
    assert stats(m).cow_copies == 2


def test_no_copy_when_the_shared_last_block_is_full() -> None:
    m = manager()
    new(m, 16, list(range(8)))
    m.fork(Fork([ForkItem(16, 3)]))
    r = step(m, 3, 8, [8])
    assert r.cow_src == -1 and r.table_start == 2 and len(r.blocks) == 1


def test_fork_errors_are_per_pair() -> None:
    m = manager()
    new(m, 16, [1, 2, 3])
    reply = m.fork(Fork([ForkItem(54, 24), ForkItem(16, 16), ForkItem(16, 55)]))
    assert [(f.seq_id, f.error.code) for f in reply.failures] == [
        (24, ErrorCode.NOT_FOUND), (16, ErrorCode.BAD_REQUEST)]
    assert m.sequence(55).blocks == m.sequence(16).blocks


def test_slots_never_run_ahead_of_known_tokens() -> None:
    m = manager()
    r = new(m, 1, [1, 2, 3], num_new=50)
    assert len(r.blocks) == 1 and m.sequence(1).num_slots == 3
    r = step(m, 1, 3, [], num_new=5)
    assert r.blocks == [] and m.sequence(1).num_slots == 3


def test_a_prompts_first_blocks_are_evicted_last() -> None:
    m = manager(num_blocks=3)
    new(m, 1, [1] * 9)  # two full blocks and a partial one
    m.release(Release([1]))
    new(m, 24, [0] * 8)  # takes the partial block, then evicts one cached block
    assert stats(m).evictions == 1
    # The evicted one was the deeper block: the prefix still hits its first block.
    assert new(m, 201, [1] * 9, num_new=0).num_cached == 4


def test_a_reserve_applies_its_releases_first_and_reuses_the_blocks_in_the_same_call() -> None:
    m = manager(num_blocks=4)
    new(m, 1, list(range(12)))  # 3 of the 4 blocks
    # 2 needs 3 blocks: only there once 1's are back, in the same call
    item = SeqReserve(2, 0, list(range(50, 62)), 12, tenant="t", pool="d0")
    reply = m.reserve(Reserve([item], release=[1]))
    assert reply.seqs[0].error is None and len(reply.seqs[0].blocks) == 3
    assert reply.num_freed == 3 and reply.release_failures == []
    # a released id is reserved again from token 0 in one call
    again = m.reserve(Reserve([SeqReserve(2, 0, [7, 8], 2, tenant="t", pool="d0")], release=[2]))
    assert again.seqs[0].error is None and m.sequence(2).tokens.tolist() == [7, 8]


def test_a_reserves_unknown_or_repeated_release_fails_alone() -> None:
    m = manager()
    new(m, 1, [1, 2, 3])
    reply = m.reserve(Reserve([SeqReserve(1, 3, [4], 1)], release=[99, 5], discard=[99]))
    assert reply.seqs[0].error is None
    assert [(f.seq_id, f.error.code) for f in reply.release_failures] == [
        (99, ErrorCode.NOT_FOUND), (5, ErrorCode.NOT_FOUND), (99, ErrorCode.NOT_FOUND)]
    # an id released and discarded in one call: the second is the unknown one
    reply = m.reserve(Reserve([], release=[1], discard=[1]))
    assert [f.seq_id for f in reply.release_failures] == [1] and stats(m).used == 0


def test_a_discarded_sequence_offers_nothing_its_last_step_was_to_fill() -> None:
    m = manager()
    new(m, 1, list(range(8)))  # two full blocks reserved, never computed
    m.reserve(Reserve([], discard=[1]))
    assert new(m, 2, list(range(8)) + [9]).num_cached == 0
    new(m, 3, list(range(8)))
    m.reserve(Reserve([], release=[3]))  # its step ran: both blocks cached
    assert new(m, 4, list(range(8)) + [9]).num_cached == 8
