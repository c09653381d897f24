"""The overlap (issue 15): step N+1's memory round trip runs while step N
runs on the drivers.

A decode's next slots are known before its tokens are: while step N
computes position p and samples token p+1, a decode whose slots end before
p+1 sends the `Reserve` it would have made next step at once, for up to
`AHEAD` (the memory server's MAX_AHEAD) positions past the tokens it knows
(`ahead=k`: slots for tokens not known yet; the tokens go with its next
Reserve, so the memory server's view lags by up to k tokens) and
`computed` (only blocks whose KV is written are offered to the prefix
cache). `Seq.ahead.until` is where its slots end. A steady decode so
calls the memory server once in k steps; the releases pending ride on the
next call, made for them alone when no decode needs one. When step N
returns, step N+1's decodes whose slots reach run with no memory call on
the critical path (`take_covered`); new and prefilling sequences reserve
as before. No slot is reserved past the last position a sequence computes
(its max length), nor into a new block under its tenant's KV quota.

Overlapped slots are only used on the driver incarnation they were
reserved for, with the memory server that reserved them:
a failed step discards the sequence (reset clears `Seq.ahead`), a lost or
restarted driver's sequences are reset, a restarted memory server's are
re-registered without it (_recovery.py), and a sequence that finishes in
step N is released with its unused slot by the next memory call (its token
is never sampled). Session turns keep the plain path: their next request
appends a whole prompt after the last token, which an unused slot would
run ahead of.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from common.logs import get_logger
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from services.scheduler._execute import Sent, StepResult, Work, apply, execute, prepare, seal, send_all
from services.scheduler._request import Ahead, Seq, State

# Slots a decode reserves ahead at once (the memory server's MAX_AHEAD): a
# steady decode then makes one memory call in that many steps, not each.
AHEAD = mp.MAX_AHEAD
# With async steps, a decode renews while this many steps' slots are left
# beyond the next: the renewal has that many steps to come back.
RENEW_AT = AHEAD // 2
from services.scheduler._state import EngineState
from services.scheduler.planner import Limits

log = get_logger()


def take_covered(state: EngineState, scheduled: list[tuple[Seq, int]], incarnations: dict[str, int]
                 ) -> tuple[list[Work], list[tuple[Seq, int]]]:
    """Split the plan: the work whose slots were reserved ahead (no memory
    call this step), and the rest, to reserve now."""
    covered: list[Work] = []
    rest: list[tuple[Seq, int]] = []
    running = State.RUNNING  # (a request's state says whether its sequence runs: _state.py)
    drivers = state.drivers
    for seq, n in scheduled:
        a = seq.ahead
        if (a is not None and a.pool == seq.pool and incarnations.get(a.pool, -1) == a.incarnation
                and a.pool in drivers and not seq.swapped and seq.request.state is running
                and 0 < n and seq.num_computed + n <= a.until):
            start = seq.num_computed
            end = start + n
            covered.append(Work(seq, start, min(end, len(seq.tokens)), list(a.copies) if a.copies else []))
            if a.copies:  # done once
                seq.ahead = Ahead(a.pool, a.incarnation, (), a.until)
        else:
            rest.append((seq, n))
    return covered, rest


def _ahead_items(state: EngineState, work: list[Work], quotas: Mapping[str, int],
                 margin: int) -> list[tuple[Seq, mp.SeqReserve]]:
    items = []
    drivers = state.drivers
    for w in work:
        seq = w.seq
        tokens = seq.tokens
        n = len(tokens)  # step N samples token n; step N+1 computes position n
        d = drivers.get(seq.pool or "")
        a = seq.ahead
        if (a is not None and a.until > n + margin and d is not None and a.pool == seq.pool
                and a.incarnation == d.incarnation):
            continue  # its slots reach past the next step (and `margin` more) already: no item
        if (d is None or w.end != n or seq.request.submit.session or seq.swapped or not seq.mem_known
                or seq.request.ended):
            continue  # nothing follows it in the next step, or not as a decode (a session's turn: see above)
        k = AHEAD if not seq.max_len else min(AHEAD, seq.max_len - 1 - n)  # its last token is never computed
        if quotas and seq.tenant in quotas:
            k = min(k, len(seq.block_table) * d.shape.block_size - n)  # a new block under its tenant's quota:
        if k < 1:                                                      # the planner decides who gets it
            continue
        known = seq.mem_known
        # Slots for positions [0, n + k): the memory server holds at least
        # `num_computed`, so `n + k - num_computed` more always reach them.
        items.append((seq, mp.SeqReserve(seq.seq_id, known, tokens[known:], n + k - seq.num_computed, ahead=k,
                                         computed=seq.num_computed)))
    return items


async def reserve_ahead(state: EngineState, work: list[Work], quotas: Mapping[str, int], *,
                        margin: int = 0) -> list[tuple[Seq, mp.SeqReserve, mp.SeqBlocks]] | None:
    """Reserve the next step's slots of `work`'s decodes, with the releases
    pending; the replies, applied once the step is back (`apply_ahead`).
    `margin`: renew also when the slots end within that many steps after
    the next (async scheduling sends step N+2 before this Reserve is back).
    None: there was nothing to send."""
    return await _reserve_items(state, _ahead_items(state, work, quotas, margin))


async def _reserve_items(state: EngineState, items: list[tuple[Seq, mp.SeqReserve]]
                         ) -> list[tuple[Seq, mp.SeqReserve, mp.SeqBlocks]] | None:
    if state.memory_synced != state.memory_generation:
        return []  # a restarted memory server, not re-registered yet (_execute.reserve)
    release, discard = state.take_releases()
    if not items and not release and not discard:
        return None
    req = mp.Reserve([item for _, item in items], release, discard)
    reply = await state.memory(state.backend.reserve(req), critical=False)
    if not isinstance(reply, mp.ReserveReply):
        state.untake_releases(release, discard)
        return []
    for f in reply.release_failures:
        log.info("scheduler.release_unknown", seq=f.seq_id, error=f.error.message)
    return [(seq, item, got) for (seq, item), got in zip(items, reply.seqs)]


def apply_ahead(replies: list[tuple[Seq, mp.SeqReserve, mp.SeqBlocks]], incarnations: dict[str, int]) -> None:
    for seq, item, got in replies:
        pool = seq.pool
        if got.error is not None or pool is None:
            continue  # it reserves as usual next step (and learns why then)
        seq.mem_known = known = item.start + len(item.tokens)
        table, start = seq.block_table, got.table_start
        if got.blocks or start < len(table):
            del table[start:]
            table.extend(got.blocks)
        if start < seq.table_synced:
            seq.table_synced = start
        copies = ((got.cow_src, got.cow_dst),) if got.cow_src >= 0 else ()
        seq.ahead = Ahead(pool, incarnations.get(pool, -1), copies, known + item.ahead)


@dataclass(eq=False)
class Renewal:
    """Async scheduling: a slot renewal (with the releases pending) that runs
    across steps, the loop never waiting on it: a decode renews while
    `RENEW_AT` slots are left, so the reply is back before they run out. It
    is applied at the first step boundary after it came back (`settle`),
    only to the sequences it was sent for that still run unchanged since."""

    incarnations: dict[str, int]
    memory_generation: int
    seqs: set[int] = field(default_factory=set)  # id() of the sequences it renews
    replies: list[tuple[Seq, mp.SeqReserve, mp.SeqBlocks]] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)

    async def run(self, state: EngineState, work: list[Work], quotas: Mapping[str, int]) -> None:
        try:
            items = _ahead_items(state, work, quotas, RENEW_AT)
            self.seqs = {id(seq) for seq, _ in items}
            self.replies = await _reserve_items(state, items) or []
        finally:
            self.done.set()


async def settle(state: EngineState, wait: bool) -> None:
    """Apply the renewal in flight if it is back (`wait`: await it first, as
    before a Reserve that could name one of its sequences; counted then in
    `critical_rpcs`, the loop waiting on it)."""
    r = state.renewal
    if r is None or not (wait or r.done.is_set()):
        return
    if not r.done.is_set():
        state.critical_rpcs += 1
        await r.done.wait()
    state.renewal = None
    if r.memory_generation != state.memory_generation:
        return  # the memory server restarted: its sequences were re-registered without these slots
    running = State.RUNNING
    apply_ahead([(seq, item, got) for seq, item, got in r.replies
                 if seq.request.state is running and seq.mem_known == item.start], r.incarnations)


@dataclass(eq=False)
class InFlight:
    """Step N+1, sent while step N runs (async scheduling): the decodes of
    step N, each fed by its driver the token it samples in N. The engine
    adopts it as its next step (`execute_step`'s `flying`)."""

    work: list[Work]
    incarnations: dict[str, int]
    sents: list[Sent]
    result: StepResult
    done: anyio.Event = field(default_factory=anyio.Event)

    async def fly(self, state: EngineState) -> None:
        """Send it and await the replies (a task of the engine's)."""
        try:
            await send_all(state, self.sents)
        finally:
            self.done.set()


def chain_step(state: EngineState, work: list[Work], incarnations: dict[str, int], limits: Limits
               ) -> tuple[list[Work], list[Sent]] | None:
    """Step N+1 for step N's `work`, to send before N returns: each decode
    one position on, its input the token N samples (`StepDelta.chain`), and
    each pool's `Execute` for it, built in the same pass. None when the step
    after is not that (a prefill chunk that samples nothing, a session's
    turn, a slot not reserved ahead, a driver that will not hold it) or it
    would not fit `limits`: the next plan decides. A sequence whose last
    token N samples is left out. What each driver will hold once the step
    ran is recorded (as `prepare` does) only when it is sent."""
    nxt: list[Work] = []
    # Per pool: (incarnation, block size, driver key), for a driver up on the
    # planned incarnation that takes steps sent ahead (`DriverState.chains`).
    pools = {pool: (d.incarnation, d.shape.block_size, (pool, d.incarnation)) for pool, d in state.drivers.items()
             if incarnations.get(pool, -1) == d.incarnation and d.chains}
    by_pool: dict[str, tuple[list[Work], list[dp.StepDelta]]] = {}
    last_pool: str | None = None
    items: list[Work] = []
    deltas: list[dp.StepDelta] = []
    running = State.RUNNING
    for w in work:
        seq = w.seq
        req = seq.request
        if req.state is not running:
            continue  # ended or out of the batch: nothing follows
        pos = w.end  # step N+1 computes position `pos`, its token the one N samples
        if not (w.chain or pos == len(seq.tokens)) or seq.epilogue or req.submit.session or seq.swapped:
            return None  # a prefill chunk that samples nothing, or not a plain decode
        max_len = seq.max_len
        if max_len and pos + 1 >= max_len:
            continue  # N samples its last token
        pool = seq.pool or ""
        a = seq.ahead
        shape = pools.get(pool)
        table = seq.block_table
        if (shape is None or a is None or a.copies or pos >= a.until or a.pool != pool or a.incarnation != shape[0]
                or seq.driver_pos != pos or seq.driver_key != shape[2] or len(table) * shape[1] <= pos):
            return None
        if pool != last_pool:
            items, deltas = by_pool.setdefault(pool, ([], []))
            last_pool = pool
        chained = Work(seq, pos, pos + 1, [], True)
        nxt.append(chained)
        items.append(chained)
        synced = seq.table_synced
        deltas.append(dp.StepDelta(seq.seq_id, [], pos, synced, table[synced:], True, True))
    if not nxt or len(nxt) > limits.max_num_seqs or len(nxt) > limits.token_budget:
        return None
    for w in nxt:
        seq = w.seq
        seq.driver_pos, seq.table_synced = w.end, len(seq.block_table)  # (its driver key is the pool's already)
    sents = []
    for pool, (items, deltas) in by_pool.items():
        sents.append(seal(state, pool, state.drivers[pool], pools[pool][0], items, [], [], deltas))
    return nxt, sents


def send_next(state: EngineState, tg: TaskGroup, work: list[Work], incarnations: dict[str, int],
              limits: Limits) -> InFlight | None:
    """Send step N+1 (`chain_step`) behind step N, its Executes awaited in
    `tg`, when it fits `limits`; None: the next step is planned as usual."""
    if state.memory_down:
        return None
    chained = chain_step(state, work, incarnations, limits)
    if chained is None:
        return None
    flying = InFlight(chained[0], incarnations, chained[1], StepResult())
    tg.start_soon(flying.fly, state)
    state.steps_ahead += 1
    return flying


async def execute_step(state: EngineState, work: list[Work], incarnations: dict[str, int], overlap: bool,
                       quotas: Mapping[str, int], beside: Callable[[], Coroutine[Any, Any, None]] | None = None,
                       *, flying: InFlight | None = None, chain: Callable[[list[Work]], InFlight | None] | None = None,
                       background: TaskGroup | None = None) -> StepResult:
    """Run `work` on the drivers (`execute`) and, with `overlap`, reserve
    the next step's decode slots meanwhile (a new block under a tenant's
    `quotas` is left to the next plan). The overlapped Reserve counts in
    `critical_rpcs` only when it came back after the step (the loop then
    waited on it with the drivers idle). `beside`: the last step's work that
    can wait (_text.py `TextLater`), run meanwhile too.

    Async scheduling: `flying` is this step, already sent while the last one
    ran (its replies are applied here, not before); `chain` is called once
    this step's Executes are built, to send the next one behind them. With
    `background` (async steps), the Reserve is a `Renewal` that runs in it
    across steps, unless one is in flight already; else it counts in
    `critical_rpcs` only when it came back after the step sent ahead too."""
    if not overlap and beside is None and flying is None and chain is None:
        return await execute(state, work, incarnations)
    if flying is not None:
        result, sents = flying.result, flying.sents
    else:
        result = StepResult()
        sents = prepare(state, work, incarnations, result)
    state.critical_rpcs += 1  # the drivers' Executes run concurrently: one round trip
    replies: list[tuple[Seq, mp.SeqReserve, mp.SeqBlocks]] = []
    executed = False
    nxt: InFlight | None = None

    async def run() -> None:
        nonlocal executed
        if flying is not None:
            await flying.done.wait()
        else:
            await send_all(state, sents)
        executed = True

    async def reserve() -> None:
        nonlocal replies
        got = await reserve_ahead(state, work, quotas, margin=1 if chain is not None else 0)
        if got is not None:
            replies = got
            state.critical_rpcs += executed and (nxt is None or nxt.done.is_set())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)  # first: the Execute leaves before anything else is done
        if chain is not None:
            nxt = chain(work)  # step N+1, behind this one on each driver
        if overlap and background is not None:
            if state.renewal is None:
                state.renewal = r = Renewal(dict(incarnations), state.memory_generation)
                background.start_soon(r.run, state, work, quotas)
        elif overlap:
            tg.start_soon(reserve)
        if beside is not None:
            tg.start_soon(beside)
    for sent in sents:
        apply(state, sent, result)
    # Applied before the engine reads the result: a sequence the step
    # failed is then reset with its slot (discarded, not cached).
    apply_ahead(replies, incarnations)
    return result


__all__ = ["InFlight", "Renewal", "apply_ahead", "chain_step", "execute_step", "reserve_ahead", "send_next", "settle",
           "take_covered"]
