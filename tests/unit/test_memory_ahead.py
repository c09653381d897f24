"""A slot reserved ahead of its token (issue 15's overlap): `SeqReserve.ahead`
lets a decode's next slot be reserved while the step that samples its
token runs, and `computed` keeps a block that step still writes out of the
prefix cache."""

from __future__ import annotations

from ipc.errors import ErrorCode
from ipc.protocol.memory import MAX_AHEAD, MemoryStats, RegisterPool, Release, Reserve, SeqReserve
from services.memory import MemoryManager

BS = 4


def manager(num_blocks: int = 16) -> MemoryManager:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", num_blocks, BS))
    return m


def test_a_slot_is_reserved_past_the_tokens_only_when_asked() -> None:
    m = manager()
    first = m.reserve(Reserve([SeqReserve(1, 0, [1, 2, 3, 4], 4, tenant="t", pool="d0")])).seqs[0]
    assert len(first.blocks) == 1
    # slot 4's token is not known yet: without `ahead` nothing is reserved ...
    plain = m.reserve(Reserve([SeqReserve(1, 4, [], 1)])).seqs[0]
    assert plain.error is None and plain.blocks == []
    # ... with it, the block for slot 4 comes now
    early = m.reserve(Reserve([SeqReserve(1, 4, [], 1, ahead=1)])).seqs[0]
    assert early.error is None and early.table_start == 1 and len(early.blocks) == 1
    # the token comes with the next Reserve, which reserves slot 5 ahead: same block
    nxt = m.reserve(Reserve([SeqReserve(1, 4, [9], 1, ahead=1)])).seqs[0]
    assert nxt.error is None and nxt.blocks == []
    # asking again reserves nothing more: still one slot past the tokens
    again = m.reserve(Reserve([SeqReserve(1, 5, [], 1, ahead=1)])).seqs[0]
    assert again.error is None and again.blocks == []
    assert m.stats(MemoryStats("d0")).pools[0].used == 2


def test_ahead_and_computed_out_of_range_are_refused_by_name() -> None:
    m = manager()
    m.reserve(Reserve([SeqReserve(1, 0, [1, 2], 2, tenant="t", pool="d0")]))
    for item, field in ((SeqReserve(1, 2, [3], 1, ahead=MAX_AHEAD + 1), "ahead"),
                        (SeqReserve(1, 2, [3], 1, computed=-2), "computed")):
        got = m.reserve(Reserve([item])).seqs[0]
        assert got.error is not None and got.error.code == ErrorCode.BAD_REQUEST
        assert field in got.error.message and (got.error.detail or {}).get("field") == field
    # the sequence is as it was
    ok = m.reserve(Reserve([SeqReserve(1, 2, [3], 1)])).seqs[0]
    assert ok.error is None


def test_a_block_a_step_may_still_write_is_not_offered_to_the_prefix_cache() -> None:
    m = manager()
    m.reserve(Reserve([SeqReserve(1, 0, [1, 2, 3], 3, tenant="t", pool="d0")]))
    m.reserve(Reserve([SeqReserve(1, 3, [], 1, ahead=1, computed=3)]))  # slot 3 while step computes 0..2
    # slot 3's token arrives while the step computing it still runs: the
    # first block is full but only 3 positions are known to hold KV
    m.reserve(Reserve([SeqReserve(1, 3, [4], 1, ahead=1, computed=3)]))
    probe = m.reserve(Reserve([SeqReserve(2, 0, [1, 2, 3, 4, 5], 5, tenant="t", pool="d0")])).seqs[0]
    assert probe.num_cached == 0
    m.release(Release([2]))
    # once the caller says the block is written, it is shared
    m.reserve(Reserve([SeqReserve(1, 4, [5], 1, ahead=1, computed=4)]))
    probe = m.reserve(Reserve([SeqReserve(3, 0, [1, 2, 3, 4, 5], 5, tenant="t", pool="d0")])).seqs[0]
    assert probe.num_cached == 4


def test_a_finished_sequence_released_with_its_slot_ahead_caches_only_its_tokens() -> None:
    m = manager(num_blocks=4)
    m.reserve(Reserve([SeqReserve(1, 0, [1, 2, 3], 3, tenant="t", pool="d0")]))
    m.reserve(Reserve([SeqReserve(1, 3, [], 1, ahead=1, computed=0)]))  # slot 3 while 0..2 are computed
    m.reserve(Reserve([SeqReserve(1, 3, [4], 1, ahead=1, computed=3)]))  # slot 4 (a new block) while 3 is
    assert m.stats(MemoryStats("d0")).pools[0].used == 2
    # the step computing slot 3 sampled its end: released with slot 4 unused;
    # both blocks free, the full first one cached
    m.reserve(Reserve([], release=[1]))
    assert m.stats(MemoryStats("d0")).pools[0].used == 0
    probe = m.reserve(Reserve([SeqReserve(2, 0, [1, 2, 3, 4, 5], 5, tenant="t", pool="d0")])).seqs[0]
    assert probe.num_cached == 4
