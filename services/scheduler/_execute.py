"""Steps 3 and 4 of the engine loop: one batched `Reserve`, then one
`Execute` per driver, concurrently; what came back is data for the engine
to apply (it owns the requests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from common.logs import get_logger
from ipc import codec
from ipc.errors import DeadlineExceeded, Error, ErrorCode, LlmosError, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from services.scheduler._request import Seq
from services.scheduler._kv_quota import KvQuotas
from services.scheduler._sessions import SessionTable
from services.scheduler._state import EngineState

log = get_logger()


@dataclass(slots=True, eq=False)
class Work:
    """One sequence's share of a step: the KV of positions [start, end) is
    computed, after the copy-on-write block copies (src, dst)."""

    seq: Seq
    start: int
    end: int
    copies: list[tuple[int, int]]

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token: a token is sampled
        (but not by a finished turn's epilogue, _session_epilogue.py)."""
        return self.end == len(self.seq.tokens) and not self.seq.epilogue


@dataclass(slots=True)
class Produced:
    seq: Seq
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    produced: list[Produced] = field(default_factory=list)
    # Pools whose KV is no longer trusted (the driver died or restarted
    # since the plan): their sequences are recomputed.
    lost_pools: set[str] = field(default_factory=set)
    # A live driver refused the whole step: each sequence counts a failure.
    refused: list[tuple[Seq, str]] = field(default_factory=list)
    # The driver failed these sequences (their requests end with an error).
    failed: list[tuple[Seq, str]] = field(default_factory=list)


async def reserve(state: EngineState, scheduled: list[tuple[Seq, int]]) -> tuple[list[Work], list[tuple[Seq, Error]]]:
    """Reserve slots for `scheduled` (sequence, tokens to compute): the work
    of the sequences that got them (now running), and the memory server's
    refusals."""
    items = []
    for seq, n in scheduled:
        first = seq.mem_known == 0
        # `n` past the slots it holds: the memory server caps the slots at the
        # tokens it then knows (ahead = 0), however many it held already.
        items.append(mp.SeqReserve(seq.seq_id, seq.mem_known, seq.tokens[seq.mem_known:], n,
                                   seq.tenant if first else "", (seq.pool or "") if first else "",
                                   computed=-1 if first else seq.num_computed))
    # The KV to release rides on the same call, applied first.
    release, discard = state.take_releases()
    reply = await state.memory(state.backend.reserve(mp.Reserve(items, release, discard)))
    if not isinstance(reply, mp.ReserveReply):
        state.untake_releases(release, discard)
        return [], []
    for f in reply.release_failures:
        log.info("scheduler.release_unknown", seq=f.seq_id, error=f.error.message)
    work: list[Work] = []
    refused: list[tuple[Seq, Error]] = []
    for (seq, n), got in zip(scheduled, reply.seqs):
        if got.error is not None:
            refused.append((seq, got.error))
            continue
        seq.ahead = None
        if seq.mem_known == 0:
            seq.num_computed = got.num_cached
            seq.request.cached_tokens = max(seq.request.cached_tokens, got.num_cached)
        seq.mem_known = len(seq.tokens)
        del seq.block_table[got.table_start:]
        seq.block_table.extend(got.blocks)
        seq.table_synced = min(seq.table_synced, got.table_start)
        copies = [(got.cow_src, got.cow_dst)] if got.cow_src >= 0 else []
        start = seq.num_computed
        work.append(Work(seq, start, min(start + n, len(seq.tokens)), copies))
        state.start(seq)
    return work, refused


def reserve_refused(state: EngineState, sessions: SessionTable, kv: KvQuotas, seq: Seq, error: Error) -> str:
    """Take in the memory server's refusal of `seq`'s Reserve; returns why
    the sequence must start over (counted as a failure), or "" when it just
    waits for a later step."""
    detail = error.detail or {}
    if error.code == ErrorCode.OVERLOADED and detail.get("quota") == mp.KV_BLOCKS:
        # Its tenant's quota, not the pool: plan by it from now on (the
        # policy's own, or the memory server's config), so a sequence that
        # can never fit is refused and the others wait in the open.
        limit, held = detail.get("limit"), detail.get("held")
        limit = limit if isinstance(limit, int) else -1
        kv.learn(seq.tenant, limit)
        if seq in state.waiting:
            kv.mark_waiting(seq, state.shapes(), held if isinstance(held, int) else -1, limit)
    if error.code == ErrorCode.OVERLOADED:
        # Out of blocks (or over quota): it waits for a later step, and
        # idle sessions' pins on its pool give way (the planner's estimate
        # said it fit; the memory server, which also counts idle cached
        # blocks it would reuse, says not).
        if seq.pool is not None and seq not in state.running:
            sessions.short_of_blocks.add(seq.pool)
        return ""
    if error.code == ErrorCode.NOT_FOUND and seq.mem_known == 0:
        return ""  # the memory server does not know the pool yet
    # The memory server lost or disagrees about the sequence: start over.
    log.warning("scheduler.reserve_failed", seq=seq.seq_id, code=str(error.code), error=error.message)
    return f"the memory server refused the sequence: {error.message}"


async def execute(state: EngineState, work: list[Work], incarnations: dict[str, int]) -> StepResult:
    """Run `work` on the drivers, each pool's part on the incarnation of its
    driver that the plan saw."""
    by_pool: dict[str, list[Work]] = {}
    for w in work:
        by_pool.setdefault(w.seq.pool or "", []).append(w)
    result = StepResult()
    state.critical_rpcs += 1  # the drivers' Executes run concurrently: one round trip
    if len(by_pool) == 1:
        # Awaited here, not in a task: the Execute leaves before this task
        # first yields, ahead of whatever else the loop has to run.
        [(pool, items)] = by_pool.items()
        await _execute_on(state, pool, items, incarnations.get(pool, -1), result)
        return result
    async with anyio.create_task_group() as tg:
        for pool, items in by_pool.items():
            tg.start_soon(_execute_on, state, pool, items, incarnations.get(pool, -1), result)
    return result


async def _execute_on(state: EngineState, pool: str, items: list[Work], incarnation: int,
                      result: StepResult) -> None:
    d = state.drivers.get(pool)
    if d is None:
        return  # died since the plan; the engine re-queues them
    if d.incarnation != incarnation:
        result.lost_pools.add(pool)  # restarted since the plan: its KV is gone
        return
    steps, deltas, copies = [], [], []
    key = (pool, incarnation)
    for w in items:
        seq, start, end = w.seq, w.start, w.end
        all_tokens = seq.tokens
        samples = end == len(all_tokens) and not seq.epilogue  # (a turn's epilogue: _session_epilogue.py)
        if seq.driver_key == key and seq.driver_pos == start:
            # The driver holds it: only what changed.
            synced = seq.table_synced
            deltas.append(dp.StepDelta(seq.seq_id, all_tokens[start:end], start, synced,
                                       seq.block_table[synced:], samples))
        else:
            params = seq.request.submit.params
            prior = all_tokens[:start] if params.repetition_penalty != 1.0 else []
            steps.append(dp.StepSeq(seq.seq_id, all_tokens[start:end], start, list(seq.block_table), samples,
                                    params, prior))
        if w.copies:
            copies.extend(w.copies)
    reply: dp.Executed | None = None
    msg = dp.Execute(steps, copies, deltas, state.driver_drops.pop(pool, []), state.epoch)
    state.execute_bytes += len(codec.encode(msg))
    with anyio.CancelScope() as scope:
        d.scope = scope
        try:
            reply = await state.backend.execute(pool, msg)
        except (Unavailable, DeadlineExceeded) as exc:
            log.warning("scheduler.driver_lost", driver=pool, error=str(exc), seqs=len(items))
        except LlmosError as exc:
            # A live driver refused the whole step: count it against the
            # sequences, so a poisonous one cannot loop forever.
            log.error("scheduler.step_refused", driver=pool, error=str(exc))
            result.refused.extend((w.seq, f"driver {pool} refused the step: {exc}") for w in items)
            return
        finally:
            d.scope = None
    # The reply is only good if the driver that ran it is the one whose KV
    # the block tables describe: a restarted driver would answer from empty
    # blocks. Its ServiceDown/ServiceUp reach us before its reply (one
    # connection, in order), and bump the incarnation.
    if reply is None or incarnation != d.incarnation or state.drivers.get(pool) is not d:
        result.lost_pools.add(pool)
        for w in items:
            w.seq.driver_key = None
        return
    outputs = {o.seq_id: o for o in reply.outputs}
    produced = result.produced
    for w in items:
        seq, end = w.seq, w.end
        out = outputs.get(seq.seq_id)
        seq.driver_key = None  # until it ran there
        if out is not None and out.resend:
            # The driver does not hold it (restarted, or lost it): nothing
            # ran; it goes in full next step, its slots already reserved.
            log.info("scheduler.driver_resend", driver=pool, seq=seq.seq_id, why=out.error)
            continue
        if out is None or out.error:
            why = out.error if out is not None else "the driver returned no output"
            result.failed.append((seq, f"driver {pool}: {why}"))
            continue
        seq.num_computed = end
        seq.driver_key, seq.driver_pos, seq.table_synced = key, end, len(seq.block_table)
        if out.token >= 0 and end == len(seq.tokens):
            produced.append(Produced(seq, out.token, out.logprob, out.top_logprobs))


__all__ = ["Produced", "StepResult", "Work", "execute", "reserve", "reserve_refused"]
