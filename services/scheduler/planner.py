"""The step planner: which sequences run this step, how many tokens each
computes, and whom to preempt. Pure Python; no I/O.

Order (vLLM v1's, with llmos policies): running sequences first, most
important first, one decode token or one prefill chunk each, within the
token budget and the sequence cap; when a pool has too few free blocks the
least important running sequence on it is preempted (possibly the one being
planned). Then waiting sequences, in policy order, while budget, cap and
blocks last; a new sequence is placed on the driver with the most free
blocks per sequence it runs (its free blocks less those its queued prefill
will take, over its batch: `BlockLedger.placement`) and stays there. When
the batch is full, a waiting sequence may first displace a running one if
the policy says so (`Policy.yields_to`), and the running ones the waiting
head outranks may sit out the step in which it starts (`Policy.defers`:
its first token is not slowed by their decodes).

KV-block quotas (a tenant's blocks over every pool) are planned like pools:
a running sequence short of its tenant's quota preempts a less important
one of the same tenant (or itself); a waiting one short of it holds back
its tenant's line but not the others' (`quota_waits`); and one that could
never fit (its prompt and max_tokens need more blocks than the quota) is
handed back (`never_fit`) for the engine to refuse.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from services.scheduler._block_counts import BlockCounts  # re-exported: the engine keeps one for its ledgers
from services.scheduler._request import Seq
from services.scheduler.policies import Policy


@dataclass(frozen=True, slots=True)
class PoolShape:
    num_blocks: int
    block_size: int


@dataclass(frozen=True, slots=True)
class Limits:
    token_budget: int
    max_num_seqs: int
    prefill_chunk: int
    late: frozenset[int] = frozenset()  # waiting sequence ids that start after the rest (the tuner's choice)


@dataclass
class StepPlan:
    scheduled: list[tuple[Seq, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Seq] = field(default_factory=list)
    quota_waits: list[Seq] = field(default_factory=list)  # waiting on their tenant's KV-block quota
    never_fit: list[Seq] = field(default_factory=list)  # need more blocks than their quota, ever

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class _Held(Counter[str]):
    """Blocks per tenant, each counted on first read (`count(tenant)`, plus
    what the ledger `add`ed before), then kept up to date by the ledger."""

    def __init__(self, count: Callable[[str], int]):
        super().__init__()
        self._count = count
        self._added: dict[str, int] = {}

    def __missing__(self, tenant: str) -> int:
        n = self[tenant] = self._count(tenant) + self._added.pop(tenant, 0)
        return n

    def add(self, tenant: str, blocks: int) -> None:
        """`blocks` more for `tenant`, without counting it now."""
        if tenant in self:
            self[tenant] += blocks
        else:
            self._added[tenant] = self._added.get(tenant, 0) + blocks


class BlockLedger:
    """Free device blocks per pool as the scheduler can know them: the pool's
    size minus the distinct blocks its live sequences hold (the scheduler is
    the memory server's only allocator, and cached blocks nobody holds are
    allocatable). Prefix-cache hits can make a new sequence take fewer (or,
    for idle cached blocks, a few more) blocks than estimated; the memory
    server has the last word and a refused sequence just waits a step.

    With `quotas` (tenant -> KV blocks over every pool) it also counts the
    distinct blocks each tenant holds, as the memory server does.

    Built every step, so it costs one C-level set union per pool, or with
    `counts` (kept by the caller from step to step) only the tables that
    changed: a tenant's count is only taken when read (a tenant under a
    quota), and the per-block reference counts only when a preemption
    releases blocks."""

    def __init__(self, pools: Mapping[str, PoolShape], seqs: Iterable[Seq],
                 quotas: Mapping[str, int] | None = None, counts: BlockCounts | None = None):
        self.shapes = dict(pools)
        self.quotas = dict(quotas or {})
        self._seqs = [s for s in seqs if s.pool in self.shapes]
        if counts is not None:  # kept from the last step by the caller
            held = counts.distinct(self._seqs)
            self.free = {p: shape.num_blocks - held.get(p, 0) for p, shape in self.shapes.items()}
        else:
            self.free = {p: shape.num_blocks - len(set().union(*(s.block_table for s in self._seqs if s.pool == p)))
                         for p, shape in self.shapes.items()}
        self.held = _Held(self._tenant_blocks)
        # pool -> [sequences running, blocks their queued prefill will take] (`count_load`)
        self._load: dict[str, list[int]] = {p: [0, 0] for p in self.shapes}
        self._refs: dict[str, Counter[int]] | None = None  # pool -> block -> holders, once released
        self._tenant_refs: dict[str, Counter[tuple[str, int]]] = {}

    def _tenant_blocks(self, tenant: str) -> int:
        """The distinct (pool, block) pairs `tenant`'s sequences hold."""
        return sum(len(set().union(*(s.block_table for s in self._seqs if s.pool == p and s.tenant == tenant)))
                   for p in self.shapes)

    def needed(self, seq: Seq, n: int, pool: str) -> int:
        """New device blocks `seq` needs to compute `n` more tokens on `pool`
        (a swapped-out sequence needs all of its blocks back: at most that
        many, as those still cached on the device come back without a copy)."""
        bs = self.shapes[pool].block_size
        held = 0 if seq.swapped else len(seq.block_table)
        return max(0, -(-(seq.num_computed + n) // bs) - held)

    def room(self, tenant: str) -> int:
        """Blocks `tenant` may still take under its quota (negative: over it)."""
        limit = self.quotas.get(tenant)
        return sys.maxsize if limit is None else limit - self.held[tenant]

    def quota_allows(self, tenant: str, blocks: int) -> bool:
        return blocks <= 0 or blocks <= self.room(tenant)

    def never_fits(self, seq: Seq) -> bool:
        """Whether `seq` needs more blocks than its tenant's quota, ever."""
        limit = self.quotas.get(seq.tenant)
        if limit is None:
            return False
        need = lifetime_blocks(seq, self.shapes)
        return need is not None and need[0] > limit

    def take(self, pool: str, blocks: int, tenant: str = "") -> None:
        self.free[pool] -= blocks
        self.held.add(tenant, blocks)

    def release(self, seq: Seq) -> None:
        pool = seq.pool or ""
        if pool not in self.shapes:
            return
        if self._refs is None:
            self._refs = {p: Counter() for p in self.shapes}
            for s in self._seqs:
                self._refs[s.pool or ""].update(s.block_table)
        refs = self._refs[pool]
        mine = self._tenant_refs.get(seq.tenant)
        if mine is None:
            mine = self._tenant_refs[seq.tenant] = Counter()
            for s in self._seqs:
                if s.tenant == seq.tenant:
                    mine.update((s.pool or "", b) for b in s.block_table)
        for b in seq.block_table:
            refs[b] -= 1
            if refs[b] == 0:
                del refs[b]
                self.free[pool] += 1
            if mine[(pool, b)] > 0:
                mine[(pool, b)] -= 1
                if mine[(pool, b)] == 0:
                    del mine[(pool, b)]
                    self.held[seq.tenant] -= 1

    def count_load(self, running: Iterable[Seq]) -> None:
        """The load `placement` weighs: sequences running per pool, and the
        blocks their queued prefill (tokens not yet computed) will take."""
        self._load = {p: [0, 0] for p in self.shapes}
        for seq in running:
            self.placed(seq)

    def placed(self, seq: Seq) -> None:
        """`seq` runs on its pool from now on (counted in its load)."""
        load = self._load.get(seq.pool or "")
        if load is not None:
            load[0] += 1
            if seq.remaining > 1:
                load[1] += self.needed(seq, seq.remaining, seq.pool or "")

    def placement(self, max_len: int = 0) -> str | None:
        """Where a new sequence goes, among the pools that can hold `max_len`
        positions whole (on one too small it could only preempt itself): the
        most free blocks per sequence run, (free - queued prefill blocks) /
        (running + 1) — KV and load together (Llumnix's "freeness"): a pool
        with free blocks but a full batch does not take every newcomer.
        Ties: most free blocks, then by name. A sequence stays there."""
        fits = [p for p in sorted(self.free) if self.shapes[p].num_blocks * self.shapes[p].block_size >= max_len]

        def freeness(pool: str) -> tuple[float, int]:
            running, prefill = self._load[pool]
            room = self.free[pool] - prefill  # short of blocks, more load is worse, not better:
            return (room / (running + 1) if room >= 0 else room * (running + 1)), self.free[pool]
        return max(fits or sorted(self.free), key=freeness, default=None)


def lifetime_blocks(seq: Seq, shapes: Mapping[str, PoolShape]) -> tuple[int, int] | None:
    """(blocks, block size): the device blocks `seq` holds at its longest —
    the KV of every position but its last (a final token is never fed back),
    `max_len - 1` — on its pool, or on the pool that would need the fewest
    among those that can hold it; None with no pool."""
    positions = max(seq.max_len - 1, len(seq.tokens))
    if seq.pool is not None and seq.pool in shapes:
        pools = [shapes[seq.pool]]
    else:
        pools = [s for s in shapes.values() if s.num_blocks * s.block_size >= seq.max_len] or list(shapes.values())
    return min(((-(-positions // s.block_size), s.block_size) for s in pools), default=None)


def plan(running: Iterable[Seq], waiting: Iterable[Seq], policy: Policy, ledger: BlockLedger,
         limits: Limits, now: float) -> StepPlan:
    out = StepPlan()
    run = sorted((s for s in running if s.pool in ledger.shapes), key=lambda s: policy.key(s, now))
    ledger.count_load(run)
    wait: list[Seq] = []
    for s in sorted(waiting, key=lambda s: policy.key(s, now)):
        (out.never_fit if ledger.never_fits(s) else wait).append(s)
    if limits.late:
        wait.sort(key=lambda s: s.seq_id in limits.late)
    # Only a waiting sequence its tenant's quota lets start may displace or
    # defer running ones (those it would displace are mostly other tenants').
    startable = [w for w in wait if w.tenant not in ledger.quotas
                 or ledger.quota_allows(w.tenant, _first_need(w, ledger, limits))]

    def preempt(victim: Seq) -> None:
        run.remove(victim)
        ledger.release(victim)
        out.preempted.append(victim)

    # A better waiting sequence displaces the worst running one while the
    # batch is full (by count, or by blocks on the pool it would go to).
    for w in startable:
        if not run or not _batch_full(run, w, ledger, limits):
            break
        victim = policy.victim([r for r in run if policy.yields_to(r, w, now)], now)
        if victim is None:
            break
        preempt(victim)
    displaced = len(out.preempted)
    deferred = _deferred(run, startable, policy, ledger, limits, now)
    if deferred:
        run = [r for r in run if r not in deferred]

    budget = limits.token_budget
    i = 0
    while i < len(run) and budget > 0 and len(out.scheduled) < limits.max_num_seqs:
        seq = run[i]
        pool: str = seq.pool or ""
        n = min(seq.remaining, limits.prefill_chunk, budget)
        need = ledger.needed(seq, n, pool)
        if need == 0 and ledger.free[pool] >= 0:  # within its blocks (a decode, mostly): nothing to take
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
            continue
        while need > ledger.free[pool] or not ledger.quota_allows(seq.tenant, need):
            # Short of the pool's blocks: the victim is on the pool; short of
            # the tenant's quota: it is one of the tenant's own.
            short_pool = need > ledger.free[pool]
            victim = policy.victim([r for r in run[i + 1:]
                                    if (r.pool == seq.pool if short_pool else r.tenant == seq.tenant)], now)
            if victim is None:
                break
            preempt(victim)
        if need > ledger.free[pool] or not ledger.quota_allows(seq.tenant, need):
            preempt(seq)
            continue
        ledger.take(pool, need, seq.tenant)
        out.scheduled.append((seq, n))
        budget -= n
        i += 1

    # Nothing new starts in a step that had to preempt for blocks: it would
    # only be preempted again.
    held_back: set[str] = set()  # tenants whose next sequence is short of their quota
    if len(out.preempted) == displaced:
        for seq in wait:
            if budget <= 0 or len(out.scheduled) >= limits.max_num_seqs:
                break
            if seq.tenant in held_back:
                continue  # its tenant's line keeps its order too
            placed = seq.pool if seq.pool in ledger.shapes else ledger.placement(seq.max_len)
            if placed is None:
                break
            pool = placed
            n = min(seq.remaining, limits.prefill_chunk, budget)
            need = ledger.needed(seq, n, pool)
            if not ledger.quota_allows(seq.tenant, need):
                held_back.add(seq.tenant)  # the others' requests go on
                continue
            if need > ledger.free[pool]:
                break  # keep the line's order: no one overtakes the head
            seq.pool = pool
            ledger.take(pool, need, seq.tenant)
            ledger.placed(seq)
            out.scheduled.append((seq, n))
            budget -= n
    if wait and ledger.quotas:
        started = {id(seq) for seq, _ in out.scheduled}
        out.quota_waits = [w for w in wait if id(w) not in started and w.tenant in ledger.quotas and (
            w.tenant in held_back or not ledger.quota_allows(w.tenant, _first_need(w, ledger, limits)))]
    for seq, n in out.scheduled:
        policy.charge(seq, n, now)
    for seq in out.preempted:
        seq.preemptions += 1
        policy.on_preempted(seq, now)
    return out


def _first_need(seq: Seq, ledger: BlockLedger, limits: Limits) -> int:
    """Blocks a waiting sequence needs for its next chunk (0: no pool to go to)."""
    pool = seq.pool if seq.pool in ledger.shapes else ledger.placement(seq.max_len)
    return 0 if pool is None else ledger.needed(seq, min(seq.remaining, limits.prefill_chunk), pool)


def _deferred(run: list[Seq], wait: list[Seq], policy: Policy, ledger: BlockLedger, limits: Limits,
              now: float) -> list[Seq]:
    """Running sequences that sit this step out for the waiting head
    (`Policy.defers`) — only when the head will surely get its chunk: its
    blocks fit beside one new block for each sequence that does run."""
    if not wait or not run:
        return []
    head = wait[0]
    deferred = [r for r in run if policy.defers(r, head, now)]
    if not deferred:
        return []
    pool = head.pool if head.pool in ledger.shapes else ledger.placement(head.max_len)
    if pool is None:
        return []
    staying = sum(1 for r in run if r.pool == pool and r not in deferred)
    need = ledger.needed(head, min(head.remaining, limits.prefill_chunk, limits.token_budget), pool)
    return deferred if need + staying <= ledger.free[pool] else []


def _batch_full(run: list[Seq], head: Seq, ledger: BlockLedger, limits: Limits) -> bool:
    if len(run) >= limits.max_num_seqs:
        return True
    pool = head.pool if head.pool in ledger.shapes else ledger.placement(head.max_len)
    if pool is None:
        return False
    return ledger.needed(head, min(head.remaining, limits.prefill_chunk), pool) > ledger.free[pool]

