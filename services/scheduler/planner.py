"""The step planner: which sequences run this step, how many tokens each
computes, and whom to preempt. Pure Python; no I/O.

Order (vLLM v1's, with llmos policies): running sequences first, most
important first, one decode token or one prefill chunk each, within the
token budget and the sequence cap; when a pool has too few free blocks the
least important running sequence on it is preempted (possibly the one being
planned). Then waiting sequences, in policy order, while budget, cap and
blocks last; a new sequence is placed on the driver with the most free
blocks and stays there. When the batch is full, a waiting sequence may first
displace a running one if the policy says so (`Policy.yields_to`), and the
running ones the waiting head outranks may sit out the step in which it
starts (`Policy.defers`: its first token is not slowed by their decodes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.scheduler._seq import Seq
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


@dataclass
class StepPlan:
    scheduled: list[tuple[Seq, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Seq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class BlockLedger:
    """Free device blocks per pool as the scheduler can know them: the pool's
    size minus the distinct blocks its live sequences hold (the scheduler is
    the memory server's only allocator, and cached blocks nobody holds are
    allocatable). Prefix-cache hits can make a new sequence take fewer (or,
    for idle cached blocks, a few more) blocks than estimated; the memory
    server has the last word and a refused sequence just waits a step."""

    def __init__(self, pools: Mapping[str, PoolShape], seqs: Iterable[Seq]):
        self.shapes = dict(pools)
        self.refs: dict[str, Counter[int]] = {p: Counter() for p in self.shapes}
        for s in seqs:
            if s.pool in self.refs:
                self.refs[s.pool].update(s.block_table)
        self.free = {p: shape.num_blocks - len(self.refs[p]) for p, shape in self.shapes.items()}

    def needed(self, seq: Seq, n: int, pool: str) -> int:
        """New device blocks `seq` needs to compute `n` more tokens on `pool`
        (a swapped-out sequence needs all of its blocks back: at most that
        many, as those still cached on the device come back without a copy)."""
        bs = self.shapes[pool].block_size
        held = 0 if seq.swapped else len(seq.block_table)
        return max(0, -(-(seq.num_computed + n) // bs) - held)

    def take(self, pool: str, blocks: int) -> None:
        self.free[pool] -= blocks

    def release(self, seq: Seq) -> None:
        refs = self.refs.get(seq.pool or "")
        if refs is None:
            return
        for b in seq.block_table:
            refs[b] -= 1
            if refs[b] == 0:
                del refs[b]
                self.free[seq.pool or ""] += 1

    def placement(self, max_len: int = 0) -> str | None:
        """The pool with the most free blocks among those that can hold a
        sequence of `max_len` positions whole (ties: by name, for
        determinism); a sequence stays where it is placed, and one on a pool
        too small for it could only ever preempt itself."""
        fits = [p for p in sorted(self.free) if self.shapes[p].num_blocks * self.shapes[p].block_size >= max_len]
        return max(fits or sorted(self.free), key=lambda p: self.free[p], default=None)


def plan(running: Iterable[Seq], waiting: Iterable[Seq], policy: Policy, ledger: BlockLedger,
         limits: Limits, now: float) -> StepPlan:
    out = StepPlan()
    run = sorted((s for s in running if s.pool in ledger.shapes), key=lambda s: policy.key(s, now))
    wait = sorted(waiting, key=lambda s: policy.key(s, now))

    def preempt(victim: Seq) -> None:
        run.remove(victim)
        ledger.release(victim)
        out.preempted.append(victim)

    # A better waiting sequence displaces the worst running one while the
    # batch is full (by count, or by blocks on the pool it would go to).
    for w in wait:
        if not run or not _batch_full(run, w, ledger, limits):
            break
        victim = policy.victim([r for r in run if policy.yields_to(r, w, now)], now)
        if victim is None:
            break
        preempt(victim)
    displaced = len(out.preempted)
    deferred = _deferred(run, wait, policy, ledger, limits, now)
    if deferred:
        run = [r for r in run if r not in deferred]

    budget = limits.token_budget
    i = 0
    while i < len(run) and budget > 0 and len(out.scheduled) < limits.max_num_seqs:
        seq = run[i]
        pool: str = seq.pool or ""
        n = min(seq.remaining, limits.prefill_chunk, budget)
        need = ledger.needed(seq, n, pool)
        while need > ledger.free[pool]:
            victim = policy.victim([r for r in run[i + 1:] if r.pool == seq.pool], now)
            if victim is None:
                break
            preempt(victim)
        if need > ledger.free[pool]:
            preempt(seq)
            continue
        ledger.take(pool, need)
        out.scheduled.append((seq, n))
        budget -= n
        i += 1

    # Nothing new starts in a step that had to preempt for blocks: it would
    # only be preempted again.
    if len(out.preempted) == displaced:
        for seq in wait:
            if budget <= 0 or len(out.scheduled) >= limits.max_num_seqs:
                break
            placed = seq.pool if seq.pool in ledger.shapes else ledger.placement(seq.max_len)
            if placed is None:
                break
            pool = placed
            n = min(seq.remaining, limits.prefill_chunk, budget)
            need = ledger.needed(seq, n, pool)
            if need > ledger.free[pool]:
                break  # keep the line's order: no one overtakes the head
            seq.pool = pool
            ledger.take(pool, need)
            out.scheduled.append((seq, n))
            budget -= n
    for seq, n in out.scheduled:
        policy.charge(seq, n, now)
    for seq in out.preempted:
        seq.preemptions += 1
        policy.on_preempted(seq, now)
    return out


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

