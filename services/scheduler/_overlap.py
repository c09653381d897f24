"""The overlap (issue 15): step N+1's memory round trip runs while step N
runs on the drivers.

A decode's next slot is known before its token is: while step N computes
position p and samples token p+1, the `Reserve` it would have made next
step is sent at once, with `ahead=1` (the memory server reserves the slot
for a token it does not know yet; the token goes with the next Reserve)
and `computed` (only blocks whose KV is written are offered to the prefix
cache, since step N still writes the last one). The releases pending ride
on it as on any Reserve. When step N returns and its tokens are in, step
N+1's decodes run on that slot with no memory call on the critical path
(`take_covered`); new and prefilling sequences reserve as before.

An overlapped slot is only used by the step right after, on the driver
incarnation it was reserved for, with the memory server that reserved it:
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
from typing import Any

import anyio

from common.logs import get_logger
from ipc.protocol import memory as mp
from services.scheduler._execute import StepResult, Work, execute
from services.scheduler._request import Ahead, Seq
from services.scheduler._state import EngineState

log = get_logger()


def take_covered(state: EngineState, scheduled: list[tuple[Seq, int]], incarnations: dict[str, int]
                 ) -> tuple[list[Work], list[tuple[Seq, int]]]:
    """Split the plan: the work whose slots were reserved ahead (no memory
    call this step), and the rest, to reserve now."""
    covered: list[Work] = []
    rest: list[tuple[Seq, int]] = []
    running = {id(s) for s in state.running}
    drivers = state.drivers
    for seq, n in scheduled:
        a = seq.ahead
        if (a is not None and a.pool == seq.pool and incarnations.get(a.pool, -1) == a.incarnation
                and a.pool in drivers and not seq.swapped and id(seq) in running
                and 0 < n and seq.num_computed + n <= seq.mem_known + 1):
            start = seq.num_computed
            end = start + n
            covered.append(Work(seq, start, min(end, len(seq.tokens)), list(a.copies) if a.copies else []))
            if a.copies:  # done once
                seq.ahead = Ahead(a.pool, a.incarnation)
        else:
            rest.append((seq, n))
    return covered, rest


def _ahead_items(state: EngineState, work: list[Work], quotas: Mapping[str, int]) -> list[tuple[Seq, mp.SeqReserve]]:
    items = []
    drivers = state.drivers
    for w in work:
        seq = w.seq
        tokens = seq.tokens
        d = drivers.get(seq.pool or "")
        if (d is None or w.end != len(tokens) or seq.request.submit.session or seq.swapped or not seq.mem_known
                or (seq.max_len and len(tokens) + 1 >= seq.max_len)):
            continue  # nothing follows it in the next step, or not as a decode (a session's turn: see above)
        if quotas and seq.tenant in quotas and len(tokens) >= len(seq.block_table) * d.shape.block_size:
            continue  # a new block under its tenant's quota: the planner decides who gets it
        known = seq.mem_known
        items.append((seq, mp.SeqReserve(seq.seq_id, known, tokens[known:], 1, ahead=1, computed=seq.num_computed)))
    return items


async def reserve_ahead(state: EngineState, work: list[Work],
                        quotas: Mapping[str, int]) -> list[tuple[Seq, mp.SeqBlocks]] | None:
    """Reserve the next step's slots of `work`'s decodes, with the releases
    pending; the replies, applied once the step is back (`apply_ahead`).
    None: there was nothing to send."""
    items = _ahead_items(state, work, quotas)
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
    return [(seq, got) for (seq, _), got in zip(items, reply.seqs)]


def apply_ahead(replies: list[tuple[Seq, mp.SeqBlocks]], incarnations: dict[str, int]) -> None:
    plain: dict[str | None, Ahead] = {}  # per pool, the slot with no copy (immutable: shared)
    for seq, got in replies:
        pool = seq.pool
        if got.error is not None or pool is None:
            continue  # it reserves as usual next step (and learns why then)
        seq.mem_known = len(seq.tokens)
        table, start = seq.block_table, got.table_start
        if got.blocks or start < len(table):
            del table[start:]
            table.extend(got.blocks)
        if start < seq.table_synced:
            seq.table_synced = start
        if got.cow_src >= 0:
            seq.ahead = Ahead(pool, incarnations.get(pool, -1), ((got.cow_src, got.cow_dst),))
        else:
            a = plain.get(pool)
            if a is None:
                a = plain[pool] = Ahead(pool, incarnations.get(pool, -1))
            seq.ahead = a


async def execute_step(state: EngineState, work: list[Work], incarnations: dict[str, int], overlap: bool,
                       quotas: Mapping[str, int], beside: Callable[[], Coroutine[Any, Any, None]] | None = None) -> StepResult:
    """Run `work` on the drivers (`execute`) and, with `overlap`, reserve
    the next step's decode slots meanwhile (a new block under a tenant's
    `quotas` is left to the next plan). The overlapped Reserve counts in
    `critical_rpcs` only when it came back after the step (the loop then
    waited on it with the drivers idle). `beside`: the last step's work that
    can wait (_text.py `TextLater`), run meanwhile too."""
    if not overlap and beside is None:
        return await execute(state, work, incarnations)
    result = StepResult()
    replies: list[tuple[Seq, mp.SeqBlocks]] = []
    executed = False

    async def run() -> None:
        nonlocal result, executed
        result = await execute(state, work, incarnations)
        executed = True

    async def reserve() -> None:
        nonlocal replies
        got = await reserve_ahead(state, work, quotas)
        if got is not None:
            replies = got
            state.critical_rpcs += executed

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)  # first: the Execute leaves before anything else is done
        if overlap:
            tg.start_soon(reserve)
        if beside is not None:
            tg.start_soon(beside)
    # Applied before the engine reads the result: a sequence the step
    # failed is then reset with its slot (discarded, not cached).
    apply_ahead(replies, incarnations)
    return result


__all__ = ["apply_ahead", "execute_step", "reserve_ahead", "take_covered"]
