"""Pools coming and going, restarts, stale ids, and the wire form of the protocol."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ipc.errors import BadRequest, ErrorCode, NotFound
from ipc.protocol.memory import (
    DropPool, EvictCached, Fork, ForkItem, MemoryReply, MemoryRequest, MemoryStats,
    RegisterPool, Release, Reregister, Reserve, SeqReserve, SeqState, SetBlockQuota, SwapIn,
    SwapOut,
)
from services.memory import MemoryManager

BS = 4


def reserve(m: MemoryManager, sid: int, start: int, tokens: list[int], num_new: int,
            pool: str = "d0", tenant: str = "t"):
    return m.reserve(Reserve([SeqReserve(sid, start, tokens, num_new, tenant=tenant,
                                         pool=pool)])).seqs[0]


def two_pools() -> MemoryManager:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", 8, BS, 4))
    m.register_pool(RegisterPool("d1", 8, BS, 4))
    return m


def test_drop_pool_reports_every_sequence_it_held() -> None:
    m = two_pools()
    reserve(m, 1, 0, [1, 2, 3], 3)
    reserve(m, 2, 0, [1, 2, 3, 4, 5], 5)
    m.swap_out(SwapOut([2]))
    reserve(m, 3, 0, [1], 1, pool="d1")
    m.fork(Fork([ForkItem(1, 201)]))
    reply = m.drop_pool(DropPool("d0"))
    assert sorted(reply.lost) == [1, 2, 201]
    assert [t.tenant for t in m.stats(MemoryStats()).tenants] == ["t"]
    assert m.stats(MemoryStats()).tenants[0].blocks == 1  # c's, in d1
    assert m.stats(MemoryStats()).tenants[0].swapped == 0
    r = reserve(m, 1, 3, [4], 1)
    assert r.error is not None and r.error.code == ErrorCode.NOT_FOUND and "sequence 1 " in r.error.message
    with pytest.raises(NotFound, match="d0"):
        m.drop_pool(DropPool("d0"))


def test_reregistering_a_pool_means_its_driver_restarted() -> None:
    m = two_pools()
    reserve(m, 1, 0, [1, 2, 3], 3)
    reply = m.register_pool(RegisterPool("d0", 4, BS))
    assert reply.lost == [1]
    assert m.stats(MemoryStats("d0")).pools[0].num_blocks == 4


def test_unknown_ids_get_errors_naming_them() -> None:
    m = two_pools()
    r = reserve(m, 50, 0, [1], 1, pool="nowhere")
    assert r.error is not None and r.error.code == ErrorCode.NOT_FOUND
    assert "'nowhere'" in r.error.message
    r = reserve(m, 51, 7, [1], 1)
    assert r.error.code == ErrorCode.NOT_FOUND and "sequence 51 " in r.error.message
    reserve(m, 1, 0, [1, 2], 2)
    r = reserve(m, 1, 5, [3], 1)
    assert r.error.code == ErrorCode.BAD_REQUEST and "has 2 tokens, not 5" in r.error.message
    r = reserve(m, 1, 0, [9], 1)
    assert r.error.code == ErrorCode.BAD_REQUEST
    r = reserve(m, 1, 2, [3], 1, pool="d1")
    assert r.error.code == ErrorCode.BAD_REQUEST and "'d0'" in r.error.message
    r = reserve(m, 1, 2, [2 ** 70], 1)
    assert r.error.code == ErrorCode.BAD_REQUEST and "64-bit" in r.error.message
    failures = m.release(Release([1, 52])).failures
    assert [(f.seq_id, f.error.code) for f in failures] == [(52, ErrorCode.NOT_FOUND)]
    for call in (lambda: m.stats(MemoryStats("x")), lambda: m.evict_cached(EvictCached("x"))):
        with pytest.raises(NotFound, match="'x'"):
            call()
    with pytest.raises(BadRequest):
        m.handle(Reserve)  # type: ignore[arg-type]  # not a request instance


def test_restarted_server_recomputes_reregistered_sequences() -> None:
    m = two_pools()
    reserve(m, 1, 0, list(range(9)), 9)
    reserve(m, 1, 9, [9], 1)

    fresh = MemoryManager()
    fresh.register_pool(RegisterPool("d0", 8, BS, 4))
    r = reserve(fresh, 1, 10, [10], 1)
    assert r.error is not None and r.error.code == ErrorCode.NOT_FOUND
    reply = fresh.reregister(Reregister([SeqState(1, "t", "d0", list(range(10)))]))
    assert reply.failures == [] and reply.released == []
    assert fresh.stats(MemoryStats()).pools[0].used == 0
    # The scheduler recomputes: a first allocation for all tokens so far.
    r = reserve(fresh, 1, 10, [], 10)
    assert r.error is None and r.table_start == 0 and len(r.blocks) == 3
    assert fresh.sequence(1).num_slots == 10


def test_reregister_adopts_kv_the_driver_kept() -> None:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", 8, BS))
    states = [SeqState(1, "t", "d0", list(range(10)), blocks=[5, 2, 7], num_computed=10),
              SeqState(2, "t", "d0", list(range(10)), blocks=[5, 2, 6], num_computed=9)]
    reply = m.reregister(Reregister(states))
    assert reply.failures == []
    pool = m.pool("d0")
    assert (pool.ref[5], pool.ref[2], pool.ref[7], pool.ref[6]) == (2, 2, 1, 1)
    r = reserve(m, 1, 10, [10], 1)
    assert r.error is None and r.table_start == 3 and r.blocks == []
    # The adopted full blocks went back into the prefix cache.
    r = reserve(m, 3, 0, list(range(9)), 9)
    assert r.num_cached == 8 and r.blocks[:2] == [5, 2]


def test_reregister_rejects_stale_block_ids() -> None:
    m = MemoryManager()
    m.register_pool(RegisterPool("d0", 8, BS))
    m.reregister(Reregister([SeqState(1, "alice", "d0", [1, 2, 3, 4, 5], blocks=[0, 1],
                                      num_computed=5)]))
    bad = [
        SeqState(24, "t", "d0", [1, 2], blocks=[8], num_computed=2),  # out of range
        SeqState(25, "t", "d0", [1, 2, 3], blocks=[3, 3], num_computed=3),  # too many, twice
        SeqState(26, "bob", "d0", [1, 2, 3, 4, 5], blocks=[0, 4], num_computed=5),  # alice's
        SeqState(23, "alice", "d0", [9, 9, 9, 9, 5], blocks=[0, 4], num_computed=5),  # other tokens
        SeqState(22, "t", "d1", [1], blocks=[0], num_computed=1),  # no such pool
    ]
    failures = m.reregister(Reregister(bad)).failures
    assert [(f.seq_id, f.error.code) for f in failures] == [
        (24, ErrorCode.BAD_REQUEST), (25, ErrorCode.BAD_REQUEST), (26, ErrorCode.BAD_REQUEST),
        (23, ErrorCode.BAD_REQUEST), (22, ErrorCode.NOT_FOUND)]
    assert "block 8" in failures[0].error.message and "'d1'" in failures[4].error.message
    assert "block 0" in failures[2].error.message
    assert m.pool("d0").ref[:5] == [1, 1, 0, 0, 0]


def test_reregister_replace_releases_everything_else() -> None:
    m = two_pools()
    reserve(m, 1, 0, [1, 2, 3], 3)
    reserve(m, 2, 0, [1, 2, 3], 3)
    reply = m.reregister(Reregister([SeqState(2, "t", "d0", [1, 2, 3, 4])], replace=True))
    assert reply.released == [1] and reply.failures == []
    assert m.stats(MemoryStats()).pools[0].used == 0
    assert len(m.sequence(2).tokens) == 4


def test_reregister_caches_only_what_was_reported_computed() -> None:
    # A scheduler killed between a step's Reserve and its Execute: the next
    # one's clean slate must not offer that step's slots to the prefix cache.
    m = two_pools()
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks and one more
    reserve(m, 1, 0, prompt, 4)  # the first chunk's slots (its step ran)
    m.reserve(Reserve([SeqReserve(1, 13, [], 8, computed=4)]))  # the second chunk's (it never ran)
    m.reregister(Reregister([], replace=True))
    # Only the first block, reported computed by the second Reserve, is served.
    assert reserve(m, 2, 0, prompt, 13).num_cached == BS


def test_every_request_and_reply_survives_the_wire() -> None:
    m = two_pools()
    requests: list[MemoryRequest] = [
        Reserve([SeqReserve(1, 0, [1, 2, 3, 4, 5], 5, tenant="t", pool="d0")]),
        Fork([ForkItem(1, 2)]),
        Reserve([SeqReserve(2, 5, [6], 1), SeqReserve(53, 3, [1], 1)]),
        SwapOut([2]), SwapIn([2]), Release([2, 54]),
        SetBlockQuota("t", 100), EvictCached(), MemoryStats(),
        Reregister([SeqState(3, "t", "d1", [1])]), DropPool("d1"),
    ]
    enc = msgspec.msgpack.Encoder()
    req_dec = msgspec.msgpack.Decoder(MemoryRequest)
    rep_dec = msgspec.msgpack.Decoder(MemoryReply)
    replies: list[Any] = []
    for req in requests:
        wire_req = req_dec.decode(enc.encode(req))
        assert wire_req == req
        reply = m.handle(wire_req)
        assert rep_dec.decode(enc.encode(reply)) == reply
        replies.append(reply)
    assert replies[2].seqs[0].cow_src >= 0 and replies[2].seqs[1].error.code == "not_found"
    assert replies[-1].lost == [3]


def test_wire_rejects_negative_slot_counts() -> None:
    wire = msgspec.msgpack.encode(["Reserve", [[1, 0, [1], -1]]])
    with pytest.raises(msgspec.ValidationError, match="num_new|>= 0"):
        msgspec.msgpack.decode(wire, type=MemoryRequest)
