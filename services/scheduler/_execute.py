"""Steps 3 and 4 of the engine loop: one batched `Reserve`, then one
`Execute` per driver, concurrently; what came back is data for the engine
to apply (it owns the requests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import msgspec

from common.logs import get_logger
from ipc import codec
from ipc.errors import DeadlineExceeded, Error, ErrorCode, LlmosError, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from services.scheduler._request import Seq, State
from services.scheduler._kv_quota import KvQuotas
from services.scheduler._sessions import SessionTable
from services.scheduler._state import DriverState, EngineState

log = get_logger()


# Work and Produced are made per sequence per step: msgspec Structs, not
# dataclasses, for their C-built __init__ (a dataclass's is Python: 0.5 us
# against 0.2 on this box); gc=False as neither is ever in a reference cycle.
class Work(msgspec.Struct, eq=False, gc=False):
    """One sequence's share of a step: the KV of positions [start, end) is
    computed, after the copy-on-write block copies (src, dst)."""

    seq: Seq
    start: int
    end: int
    copies: list[tuple[int, int]]
    # Async scheduling: sent before the step that samples its input came
    # back; the driver feeds it the token it sampled (drivers/seq_table.py).
    chain: bool = False

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token: a token is sampled
        (but not by a finished turn's epilogue, _session_epilogue.py)."""
        return self.chain or self.end == len(self.seq.tokens) and not self.seq.epilogue


class Produced(msgspec.Struct, gc=False):
    seq: Seq
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = []


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
    generation = state.memory_generation
    if state.memory_synced != generation:
        # A restarted memory server not yet told which blocks the drivers
        # hold would hand them out again: wait for the re-registration.
        return [], []
    release, discard = state.take_releases()
    reply = await state.memory(state.backend.reserve(mp.Reserve(items, release, discard)))
    if generation != state.memory_generation:
        # The memory server restarted while the call was out: a reply from
        # the new one hands out blocks a driver still holds for live
        # sequences (not re-registered yet), so running on them would write
        # over their KV. Nothing starts; the re-registration (replace=True)
        # drops what the new server reserved, and the releases died with the old.
        return [], []
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


@dataclass(slots=True, eq=False)
class Sent:
    """One driver's share of a step: its `Execute`, and once back, the reply
    (None: the driver was lost) or why the live driver refused it whole."""

    pool: str
    driver: DriverState
    incarnation: int
    items: list[Work]
    msg: dp.Execute
    memory_generation: int  # the memory server's when it was sent (chained steps)
    reply: dp.Executed | None = None
    refused: str = ""


async def execute(state: EngineState, work: list[Work], incarnations: dict[str, int]) -> StepResult:
    """Run `work` on the drivers, each pool's part on the incarnation of its
    driver that the plan saw."""
    result = StepResult()
    sents = prepare(state, work, incarnations, result)
    state.critical_rpcs += 1  # the drivers' Executes run concurrently: one round trip
    await send_all(state, sents)
    for sent in sents:
        apply(state, sent, result)
    return result


def prepare(state: EngineState, work: list[Work], incarnations: dict[str, int], result: StepResult) -> list[Sent]:
    """Each pool's `Execute` for `work`. What the driver will hold once it
    ran is recorded now (`Seq.driver_key`, `driver_pos`, `table_synced`), so
    a step chained after this one (async scheduling) is built on it; the
    reply undoes it where the step did not run (`apply`)."""
    by_pool: dict[str, list[Work]] = {}
    for w in work:
        by_pool.setdefault(w.seq.pool or "", []).append(w)
    sents = []
    for pool, items in by_pool.items():
        incarnation = incarnations.get(pool, -1)
        d = state.drivers.get(pool)
        if d is None:
            continue  # died since the plan; the engine re-queues them
        if d.incarnation != incarnation:
            result.lost_pools.add(pool)  # restarted since the plan: its KV is gone
            continue
        steps, deltas, copies = [], [], []
        key = (pool, incarnation)
        for w in items:
            seq, start, end = w.seq, w.start, w.end
            all_tokens = seq.tokens
            if w.chain:
                # Its input is the token the driver sampled for it in the step before.
                synced = seq.table_synced
                deltas.append(dp.StepDelta(seq.seq_id, [], start, synced, seq.block_table[synced:], True, True))
            elif seq.driver_key == key and seq.driver_pos == start:
                # The driver holds it: only what changed.
                samples = end == len(all_tokens) and not seq.epilogue  # (a turn's epilogue: _session_epilogue.py)
                synced = seq.table_synced
                deltas.append(dp.StepDelta(seq.seq_id, all_tokens[start:end], start, synced,
                                           seq.block_table[synced:], samples))
            else:
                samples = end == len(all_tokens) and not seq.epilogue
                params = seq.request.submit.params
                prior = all_tokens[:start] if params.repetition_penalty != 1.0 else []
                steps.append(dp.StepSeq(seq.seq_id, all_tokens[start:end], start, list(seq.block_table), samples,
                                        params, prior))
            if w.copies:
                copies.extend(w.copies)
            seq.driver_key, seq.driver_pos, seq.table_synced = key, end, len(seq.block_table)
        sents.append(seal(state, pool, d, incarnation, items, steps, copies, deltas))
    return sents


def seal(state: EngineState, pool: str, d: DriverState, incarnation: int, items: list[Work],
         steps: list[dp.StepSeq], copies: list[tuple[int, int]], deltas: list[dp.StepDelta]) -> Sent:
    """One pool's `Execute` for `items`, with the drops owed to its driver, counted in `execute_bytes`."""
    msg = dp.Execute(steps, copies, deltas, state.driver_drops.pop(pool, []), state.epoch)
    state.execute_bytes += len(codec.encode(msg))
    return Sent(pool, d, incarnation, items, msg, state.memory_generation)


async def send_all(state: EngineState, sents: list[Sent]) -> None:
    """Send each `Sent` and await the replies, concurrently."""
    if len(sents) == 1:
        # Awaited here, not in a task: the Execute leaves before this task
        # first yields, ahead of whatever else the loop has to run.
        await _send(state, sents[0])
        return
    async with anyio.create_task_group() as tg:
        for sent in sents:
            tg.start_soon(_send, state, sent)


async def _send(state: EngineState, sent: Sent) -> None:
    pool, d = sent.pool, sent.driver
    with anyio.CancelScope() as scope:
        d.scopes.add(scope)
        try:
            sent.reply = await state.backend.execute(pool, sent.msg)
        except (Unavailable, DeadlineExceeded) as exc:
            log.warning("scheduler.driver_lost", driver=pool, error=str(exc), seqs=len(sent.items))
        except LlmosError as exc:
            # A live driver refused the whole step: count it against the
            # sequences, so a poisonous one cannot loop forever.
            log.error("scheduler.step_refused", driver=pool, error=str(exc))
            sent.refused = f"driver {pool} refused the step: {exc}"
        finally:
            d.scopes.discard(scope)


def apply(state: EngineState, sent: Sent, result: StepResult) -> None:
    """Take in one driver's reply. A chained step's outputs (async
    scheduling) count only for the sequences whose step before ran as
    planned and that still run: a sequence that ended, failed or was reset
    meanwhile, or any after the memory server restarted, has its output
    dropped (never streamed) and goes in full next time."""
    pool, d, incarnation, items = sent.pool, sent.driver, sent.incarnation, sent.items
    chained = any(w.chain for w in items)
    if sent.refused:
        result.refused.extend((w.seq, sent.refused) for w in items if _current(state, w, sent))
        return
    # The reply is only good if the driver that ran it is the one whose KV
    # the block tables describe: a restarted driver would answer from empty
    # blocks. Its ServiceDown/ServiceUp reach us before its reply (one
    # connection, in order), and bump the incarnation.
    reply = sent.reply
    if reply is None or incarnation != d.incarnation or state.drivers.get(pool) is not d:
        # (A chained step's driver restarted after the step before reported
        # it: the recovery has it already, and may have started others there.)
        if reply is None and state.drivers.get(pool) is d or not chained:
            result.lost_pools.add(pool)
        for w in items:
            if _current(state, w, sent):
                w.seq.driver_key = None
        return
    outputs = {o.seq_id: o for o in reply.outputs}
    produced = result.produced
    running = State.RUNNING
    same_memory = sent.memory_generation == state.memory_generation
    for w in items:
        seq, end = w.seq, w.end
        # (`_current`, its test inlined: it is asked of every chained sequence)
        if w.chain and (seq.request.state is not running or seq.num_computed != w.start or seq.pool != pool
                        or not same_memory):
            _current(state, w, sent)  # False: it resets what the driver holds
            continue
        out = outputs.get(seq.seq_id)
        if out is not None and out.resend:
            # The driver does not hold it (restarted, or lost it): nothing
            # ran; it goes in full next step, its slots already reserved.
            log.info("scheduler.driver_resend", driver=pool, seq=seq.seq_id, why=out.error)
            seq.driver_key = None
            continue
        if out is None or out.error:
            seq.driver_key = None
            why = out.error if out is not None else "the driver returned no output"
            result.failed.append((seq, f"driver {pool}: {why}"))
            continue
        seq.num_computed = end
        if out.token >= 0 and end == len(seq.tokens):
            produced.append(Produced(seq, out.token, out.logprob, out.top_logprobs))


def _current(state: EngineState, w: Work, sent: Sent) -> bool:
    """Whether `w`'s outcome still applies: always for a planned step; for
    a chained one, while its sequence runs on from where the step before
    left it, with the memory server that reserved its slot. (Its request's
    `state` says whether it runs: `EngineState` keeps the two in step.)"""
    if not w.chain:
        return True
    seq = w.seq
    now = seq.request.state
    ended = now is State.FINISHED
    if (now is not State.RUNNING or seq.num_computed != w.start or seq.pool != sent.pool
            or sent.memory_generation != state.memory_generation):
        if not ended and seq.driver_key == (sent.pool, sent.incarnation):
            seq.driver_key = None  # the driver's copy moved on without us
        return False
    return True


__all__ = ["Produced", "Sent", "StepResult", "Work", "apply", "execute", "prepare", "reserve", "reserve_refused",
           "send_all"]
