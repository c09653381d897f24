"""Property tests of the memory server's parts, and a fuzz of its whole surface."""

from __future__ import annotations

from array import array

import hypothesis.strategies as st
from hypothesis import given, settings

from ipc.errors import LlmosError
from ipc.protocol.memory import (
    DropPool, EvictCached, Fork, ForkItem, MemoryRequest, MemoryStats, RegisterPool, Release,
    Reregister, Reserve, SeqReserve, SeqState, SetBlockQuota, SwapIn, SwapOut,
)
from services.memory import MemoryManager
from services.memory._free_queue import FreeBlockQueue
from services.memory._hashing import block_key, root_key

QUEUE_OPS = st.lists(st.tuples(st.sampled_from(["pop", "remove", "append", "appendleft"]),
                               st.integers(0, 15)), max_size=60)


@settings(max_examples=600, deadline=None)
@given(n=st.integers(0, 16), ops=QUEUE_OPS)
def test_free_queue_behaves_like_a_list(n: int, ops: list[tuple[str, int]]) -> None:
    q = FreeBlockQueue(n)
    ref = list(range(n))
    for op, b in ops:
        b %= max(n, 1)
        if op == "pop" and ref:
            assert q.popleft() == ref.pop(0)
        elif op == "remove" and b in ref:
            q.remove(b)
            ref.remove(b)
        elif op == "append" and n and b not in ref:
            q.append(b)
            ref.append(b)
        elif op == "appendleft" and n and b not in ref:
            q.appendleft(b)
            ref.insert(0, b)
        assert list(q) == ref and len(q) == len(ref)
        assert all((x in q) == (x in ref) for x in range(n))


NAMES = st.text("ab\x00:", max_size=3)


@settings(max_examples=500, deadline=None)
@given(t1=NAMES, s1=NAMES, t2=NAMES, s2=NAMES,
       tokens=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=8))
def test_keys_separate_tenants_and_salts(t1: str, s1: str, t2: str, s2: str,
                                         tokens: list[int]) -> None:
    same = (t1, s1) == (t2, s2)
    r1, r2 = root_key(t1, s1), root_key(t2, s2)
    assert (r1 == r2) == same
    block = array("q", tokens)
    assert (block_key(r1, block) == block_key(r2, block)) == same
    assert block_key(r1, block) != block_key(r1, array("q", tokens + [0]))


SEQ_IDS = st.sampled_from([1, 2, 3, 4])
TENANTS = st.sampled_from(["a", "b", "c", "d"])
POOLS = st.sampled_from(["p", "q", ""])
SMALL = st.integers(-2, 12)
TOKENS = st.lists(st.integers(0, 3), max_size=10)
REQUESTS: st.SearchStrategy[MemoryRequest] = st.one_of(
    st.builds(RegisterPool, POOLS, st.integers(-1, 12), st.integers(-1, 4), SMALL),
    st.builds(DropPool, POOLS),
    st.builds(Reserve, st.lists(st.builds(SeqReserve, SEQ_IDS, SMALL, TOKENS, SMALL, TENANTS, POOLS,
                                          NAMES), max_size=4)),
    st.builds(Release, st.lists(SEQ_IDS, max_size=3), st.booleans()),
    st.builds(Fork, st.lists(st.builds(ForkItem, SEQ_IDS, SEQ_IDS), max_size=3)),
    st.builds(SwapOut, st.lists(SEQ_IDS, max_size=3)),
    st.builds(SwapIn, st.lists(SEQ_IDS, max_size=3)),
    st.builds(Reregister, st.lists(st.builds(SeqState, SEQ_IDS, TENANTS, POOLS, TOKENS, NAMES,
                                             st.lists(st.integers(-2, 14), max_size=4), SMALL),
                                   max_size=3), st.booleans()),
    st.builds(SetBlockQuota, TENANTS, SMALL),
    st.builds(EvictCached, POOLS, SMALL),
    st.builds(MemoryStats, POOLS),
)


@settings(max_examples=500, deadline=None)
@given(num_blocks=st.integers(1, 12), bs=st.integers(1, 4), swap=st.integers(0, 6),
       reqs=st.lists(REQUESTS, min_size=5, max_size=30))
def test_no_request_crashes_the_manager_or_breaks_its_books(
        num_blocks: int, bs: int, swap: int, reqs: list[MemoryRequest]) -> None:
    """Anything the wire can carry (and, in process, values it would refuse)
    either gets a reply or raises an `ipc.errors` exception; afterwards the
    ref counts still match the block tables."""
    m = MemoryManager()
    m.register_pool(RegisterPool("p", num_blocks, bs, swap))
    for req in reqs:
        try:
            m.handle(req)
        except LlmosError:
            pass
        live = []
        for sid in (1, 2, 3, 4):
            try:
                live.append(m.sequence(sid))
            except LlmosError:
                pass
        for ps in m.stats(MemoryStats()).pools:
            pool = m.pool(ps.pool)
            holders = [0] * pool.num_blocks
            for seq in live:
                assert 0 <= seq.num_slots <= len(seq.tokens)
                if seq.pool is pool and not seq.swapped:
                    assert len(seq.blocks) == -(-seq.num_slots // pool.block_size)
                    for b in seq.blocks:
                        holders[b] += 1
            assert holders == pool.ref
            assert ps.used + ps.free + ps.cached == ps.num_blocks
            assert ps.used == sum(1 for h in holders if h)
