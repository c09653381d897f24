"""MemoryManager against a reference model, driven by random operations.

The model plays the driver too: it performs every copy the replies ask for
and writes each computed token into the slot the block table names. So the
central check is end to end: every sequence reads back its own tokens
through its block table, whatever sharing, caching, copy-on-write, swapping,
eviction, pool loss and restart happened before.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
)

from ipc.errors import ErrorCode, LlmosError
from ipc.protocol.memory import (
    DropPool, EvictCached, Fork, ForkItem, MemoryStats, RegisterPool, Release, Reregister, Reserve,
    SeqReserve, SeqState, SetBlockQuota, SwapIn, SwapOut,
)
from services.memory import MemoryManager
from tests.helpers.memory_reference import TENANTS, PoolModel, ReferenceBooks, SeqModel, ceil_div

POOLS = ["p0", "p1"]
# p0 exists from the start and is picked most: sequences meet in one pool.
SOME_POOL = st.sampled_from(["p0", "p0", "p0", "p1"])
# Shared beginnings make prefix hits (and cross-tenant near-misses) common.
BASES = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], [1, 2, 3, 4, 4, 4, 4, 4], [0, 0, 0, 0, 0, 0]]
TOKEN = st.integers(0, 3)
SOME_TENANT = st.sampled_from(["a", "a", "a", "b"])
# Indices into the live sequences (modulo their number): cheaper to draw than
# `st.data()` draws that depend on the state.
PICK = st.integers(0, 999)
PICKS = st.lists(PICK, min_size=1, max_size=3)


class MemoryMachine(RuleBasedStateMachine, ReferenceBooks):
    def __init__(self) -> None:
        super().__init__()
        self.m = MemoryManager()
        self.init_books()


    @initialize(num_blocks=st.integers(4, 32), bs=st.integers(1, 4), swap=st.integers(0, 16))
    def first_pools(self, num_blocks: int, bs: int, swap: int) -> None:
        self.register_pool("p0", num_blocks, bs, swap)
        self.register_pool("p1", 6, 2, 2)

    @rule(pool=SOME_POOL, num_blocks=st.integers(1, 32), bs=st.integers(1, 4),
          swap=st.integers(0, 16))
    def register_pool(self, pool: str, num_blocks: int, bs: int, swap: int) -> None:
        reply = self.m.register_pool(RegisterPool(pool, num_blocks, bs, swap))
        if pool in self.pools:
            self.forget_pool(pool, reply.lost)
        else:
            assert reply.lost == []
        self.pools[pool] = PoolModel(num_blocks, bs, swap)

    @rule(pool=st.sampled_from(POOLS))
    def drop_pool(self, pool: str) -> None:
        try:
            reply = self.m.drop_pool(DropPool(pool))
        except LlmosError as e:
            assert pool not in self.pools and e.code == ErrorCode.NOT_FOUND and pool in e.message
            return
        self.forget_pool(pool, reply.lost)

    @rule(new=st.lists(st.tuples(st.sampled_from(BASES), st.integers(0, 16),
                                 st.lists(TOKEN, max_size=5), st.integers(0, 8), SOME_TENANT,
                                 SOME_POOL), min_size=1, max_size=3))
    def new_sequences(self, new: list[tuple[list[int], int, list[int], int, str, str]]) -> None:
        self.reserve([SeqReserve(self.new_id(), 0, base[:cut] + tail, num_new, tenant=tenant,
                                 pool=pool) for base, cut, tail, num_new, tenant, pool in new])

    @precondition(lambda self: self.seqs)
    @rule(picks=st.lists(st.tuples(PICK, st.lists(TOKEN, max_size=2), st.integers(0, 4),
                                   st.integers(0, 19)), min_size=1, max_size=4),
          stale=st.integers(0, 9), dead=PICK)
    def step(self, picks: list[tuple[int, list[int], int, int]], stale: int, dead: int) -> None:
        live = sorted(self.seqs)
        items = []
        for i, tokens, num_new, desync in picks:
            sid = live[i % len(live)]
            if sid not in (item.seq_id for item in items):
                # One caller in twenty is desynchronised.
                start = len(self.seqs[sid].tokens) + (desync == 0)
                items.append(SeqReserve(sid, start, tokens, num_new))
        if self.dead and stale == 0:
            items.append(SeqReserve(self.dead[dead % len(self.dead)], 1 + stale, [1], 1))
        self.reserve(items)

    @precondition(lambda self: any(not s.swapped for s in self.seqs.values()))
    @rule(token=TOKEN)
    def decode(self, token: int) -> None:
        """A scheduler step: every resident sequence computes one more token."""
        self.reserve([SeqReserve(sid, len(s.tokens), [token], 1)
                      for sid, s in sorted(self.seqs.items()) if not s.swapped])

    def reserve(self, items: list[SeqReserve]) -> None:
        before = {t: self.held(t) for t in TENANTS}
        reply = self.m.reserve(Reserve(items))
        assert [r.seq_id for r in reply.seqs] == [i.seq_id for i in items]
        writes: list[tuple[int, int, int]] = []
        copies: list[tuple[str, int, int]] = []
        for item, r in zip(items, reply.seqs):
            s = self.seqs.get(item.seq_id)
            expected = self.expected_error(item, s)
            if r.error is not None:
                assert r.error.code in expected, (item, r.error, expected)
                event(f"reserve: {r.error.code}")
                continue
            assert None in expected, (item, expected)
            if s is None:
                s = self.seqs[item.seq_id] = SeqModel(item.tenant, item.pool, [])
            p = self.pools[s.pool]
            s.tokens += item.tokens
            first = s.num_slots == 0 and not s.table
            if first:
                self.check_hit(s, r.table_start, r.blocks, r.num_cached)
                prior = r.num_cached
                if prior:
                    event("reserve: prefix hit")
            else:
                assert r.num_cached == 0
                prior = s.num_slots
            if r.cow_src >= 0:
                assert r.table_start == len(s.table) - 1 and s.table[-1] == r.cow_src
                assert r.blocks[0] == r.cow_dst
                copies.append((s.pool, r.cow_src, r.cow_dst))
                event("reserve: copy on write")
            else:
                assert r.table_start == len(s.table)
            s.table = s.table[:r.table_start] + r.blocks
            s.num_slots = max(prior, min(prior + item.num_new, len(s.tokens)))
            assert len(s.table) == ceil_div(s.num_slots, p.bs)
            writes += [(item.seq_id, pos, s.tokens[pos]) for pos in range(prior, s.num_slots)]
        # The driver: copies first, then the forward pass writes the new KV.
        for pool, src, dst in copies:
            self.pools[pool].content[dst] = list(self.pools[pool].content[src])
            self.pools[pool].writer[dst] = self.pools[pool].writer[src]
        for sid, pos, token in writes:
            s = self.seqs[sid]
            p = self.pools[s.pool]
            b = s.table[pos // p.bs]
            assert self.holders(s.pool)[b] == [sid], f"write into shared block {b}"
            assert self.m.pool(s.pool).key[b] is None, f"write into cached block {b}"
            p.content[b][pos % p.bs] = token
            p.writer[b] = s.tenant
        self.check_quota(before)

    def expected_error(self, item: SeqReserve, s: SeqModel | None) -> set[str | None]:
        if s is None:
            if item.start or item.pool not in self.pools:
                return {ErrorCode.NOT_FOUND}
            known = len(item.tokens)
            bs = self.pools[item.pool].bs
            need = min(ceil_div(known, bs), (known - 1) // bs + ceil_div(item.num_new, bs))
            pool, tenant = item.pool, item.tenant
        else:
            if s.swapped or item.start != len(s.tokens):
                return {ErrorCode.BAD_REQUEST}
            bs = self.pools[s.pool].bs
            known = len(s.tokens) + len(item.tokens)
            first = s.num_slots == 0 and not s.table
            if first:
                need = min(ceil_div(known, bs), (known - 1) // bs + ceil_div(item.num_new, bs))
            else:
                target = min(s.num_slots + item.num_new, known)
                grow = ceil_div(target, bs) - len(s.table)
                cow = (s.num_slots % bs and target > s.num_slots
                       and len(self.holders(s.pool)[s.table[-1]]) > 1)
                need = grow + bool(cow)
            pool, tenant = s.pool, s.tenant
        if need <= self.available(pool) and need <= self.quota_room(tenant):
            return {None}
        return {None, ErrorCode.OVERLOADED}

    def check_hit(self, s: SeqModel, table_start: int, blocks: list[int], num_cached: int) -> None:
        p = self.pools[s.pool]
        assert table_start == 0 and num_cached % p.bs == 0
        assert num_cached <= max(len(s.tokens) - 1, 0), "the last prompt token came from cache"
        for i in range(num_cached // p.bs):
            b = blocks[i]
            assert p.content[b] == s.tokens[i * p.bs:(i + 1) * p.bs], "cache hit, wrong tokens"
            assert p.writer[b] == s.tenant, "a block crossed tenants"

    @precondition(lambda self: self.seqs or self.dead)
    @rule(picks=PICKS)
    def release(self, picks: list[int]) -> None:
        ids = self.pick(sorted(self.seqs) + self.dead, picks)
        reply = self.m.release(Release(ids))
        assert sorted(f.seq_id for f in reply.failures) == sorted(i for i in ids
                                                                  if i not in self.seqs)
        assert all(f.error.code == ErrorCode.NOT_FOUND for f in reply.failures)
        for sid in ids:
            if self.seqs.pop(sid, None) is not None:
                self.dead.append(sid)

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK, n=st.integers(1, 2))
    def fork(self, pick: int, n: int) -> None:
        parent = self.pick(sorted(self.seqs), [pick])[0]
        children = [self.new_id() for _ in range(n)]
        reply = self.m.fork(Fork([ForkItem(parent, c) for c in children]))
        p = self.seqs[parent]
        if p.swapped:
            assert [f.error.code for f in reply.failures] == [ErrorCode.BAD_REQUEST] * len(children)
            return
        assert reply.failures == []
        for c in children:
            self.seqs[c] = SeqModel(p.tenant, p.pool, list(p.tokens), p.num_slots, list(p.table))


    @precondition(lambda self: self.seqs)
    @rule(picks=PICKS)
    def swap_out(self, picks: list[int]) -> None:
        ids = self.pick(sorted(self.seqs), picks)
        free = {p: pm.swap_slots - len(self.holders(p, swapped=True))
                for p, pm in self.pools.items()}
        reply = self.m.swap_out(SwapOut(ids))
        for sid, r in zip(ids, reply.seqs):
            s = self.seqs[sid]
            if s.swapped:
                assert r.error is not None and r.error.code == ErrorCode.BAD_REQUEST
                continue
            if r.error is not None:
                assert r.error.code == ErrorCode.OVERLOADED and len(s.table) > free[s.pool]
                continue
            p = self.pools[s.pool]
            assert len(r.blocks) == len(s.table) and len(r.device_blocks) == len(r.swap_slots)
            for dev, slot in zip(r.device_blocks, r.swap_slots):
                assert dev in s.table
                p.swap_content[slot] = list(p.content[dev])
            free[s.pool] -= len(r.swap_slots)
            event("swap out")
            s.table = r.blocks
            s.swapped = True

    @precondition(lambda self: self.seqs)
    @rule(picks=PICKS)
    def swap_in(self, picks: list[int]) -> None:
        ids = self.pick(sorted(self.seqs), picks)
        before = {t: self.held(t) for t in TENANTS}
        reply = self.m.swap_in(SwapIn(ids))
        for sid, r in zip(ids, reply.seqs):
            s = self.seqs[sid]
            if not s.swapped:
                assert r.error is not None and r.error.code == ErrorCode.BAD_REQUEST
                continue
            if r.error is not None:
                assert r.error.code == ErrorCode.OVERLOADED
                assert (len(s.table) > self.available(s.pool)
                        or len(s.table) > self.quota_room(s.tenant))
                continue
            p = self.pools[s.pool]
            for dev, slot in zip(r.device_blocks, r.swap_slots):
                assert slot in s.table
                p.content[dev] = list(p.swap_content[slot])
                p.writer[dev] = s.tenant
            assert len(r.blocks) == len(s.table)
            if len(r.device_blocks) < len(r.blocks):
                event("swap in: blocks reused")
            s.table = r.blocks
            s.swapped = False
        self.check_quota(before)

    @rule(pool=st.sampled_from(POOLS), n=st.integers(-1, 4))
    def evict(self, pool: str, n: int) -> None:
        if pool not in self.pools:
            return
        cached = self.m.stats(MemoryStats(pool)).pools[0].cached
        got = self.m.evict_cached(EvictCached(pool, n)).num_evicted
        if got:
            event("evicted")
        assert got == (cached if n < 0 else min(n, cached))
        assert self.m.stats(MemoryStats(pool)).pools[0].cached == cached - got

    @rule(tenant=st.sampled_from(TENANTS), limit=st.integers(-1, 16))
    def set_quota(self, tenant: str, limit: int) -> None:
        usage = self.m.set_block_quota(SetBlockQuota(tenant, limit))
        assert usage.limit == limit and usage.blocks == self.held(tenant)
        self.limits[tenant] = limit

    @rule(adopt=st.lists(st.booleans(), min_size=8, max_size=8))
    def restart(self, adopt: list[bool]) -> None:
        """The memory server restarts empty; drivers kept their KV."""
        self.m = MemoryManager()
        self.limits.clear()
        for pool, p in self.pools.items():
            self.m.register_pool(RegisterPool(pool, p.num_blocks, p.bs, p.swap_slots))
        states = []
        for sid, s in sorted(self.seqs.items()):
            if s.swapped or not adopt[len(states) % len(adopt)]:
                s.table, s.num_slots, s.swapped = [], 0, False
            elif s.table:
                event("restart: adopted")
            states.append(SeqState(sid, s.tenant, s.pool, s.tokens, blocks=s.table,
                                   num_computed=s.num_slots))
        reply = self.m.reregister(Reregister(states, replace=True))
        assert reply.failures == [] and reply.released == []


    @invariant()
    def blocks_agree(self) -> None:
        stats = {ps.pool: ps for ps in self.m.stats(MemoryStats()).pools}
        assert sorted(stats) == sorted(self.pools)
        for pool, p in self.pools.items():
            mp = self.m.pool(pool)
            holders = self.holders(pool)
            for b in range(p.num_blocks):
                assert mp.ref[b] == len(holders.get(b, [])), f"ref count of block {b}"
                assert len({self.seqs[h].tenant for h in holders.get(b, [])}) <= 1
            swap_holders = self.holders(pool, swapped=True)
            for slot in range(p.swap_slots):
                assert mp.swap.ref[slot] == len(swap_holders.get(slot, []))
            ps = stats[pool]
            assert ps.used + ps.free + ps.cached == p.num_blocks
            assert ps.used == len(holders) and ps.swap_used == len(swap_holders)
            fill: dict[int, int] = {}
            for sid, s in self.seqs.items():
                if s.pool != pool:
                    continue
                assert self.m.sequence(sid).blocks == s.table
                content = p.swap_content if s.swapped else p.content
                for pos in range(s.num_slots):
                    assert content[s.table[pos // p.bs]][pos % p.bs] == s.tokens[pos], (sid, pos)
                if not s.swapped:
                    for i, b in enumerate(s.table):
                        f = min(p.bs, s.num_slots - i * p.bs)
                        assert fill.setdefault(b, f) == f
            assert ps.waste_slots == len(holders) * p.bs - sum(fill.values())

    @invariant()
    def prefix_cache_consistent(self) -> None:
        for pool, p in self.pools.items():
            mp = self.m.pool(pool)
            for key, b in mp.cached.items():
                assert mp.key[b] == key
                assert None not in p.content[b] and mp.owner[b] == p.writer[b]
            assert sum(1 for k in mp.key if k is not None) == len(mp.cached)
            idle_cached = sum(1 for b, k in enumerate(mp.key) if k is not None and not mp.ref[b])
            assert idle_cached == mp.num_cached
            for sid, s in self.seqs.items():
                if s.pool == pool and not s.swapped:
                    for b, key in zip(s.table, self.m.sequence(sid).keys):
                        assert mp.key[b] in (None, key)

    @invariant()
    def tenants_agree(self) -> None:
        usage = {t.tenant: t for t in self.m.stats(MemoryStats()).tenants}
        for t in TENANTS:
            assert (usage[t].blocks if t in usage else 0) == self.held(t)


MemoryMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestMemoryModel = MemoryMachine.TestCase
TestMemoryModel.pytestmark = [pytest.mark.slow]  # 500 runs of 40 steps: 25-50 s on 2 cores
