"""Sessions: a conversation's requests run one at a time in arrival order,
its KV is kept between them, and it can be switched out (suspend / resume).

Pinning. Between requests a session holds its last sequence (the memory
server keeps its blocks referenced, so nothing evicts them). When the
session's next request gets its first blocks, the pinned sequence is
released in the same step, just before that `Reserve`: its full blocks are
then found in the prefix cache by the new prompt, which extends the
conversation (only the partly filled last block is computed again). Pins
give way under block pressure, least recently used first, and hold at most
`session_pin_fraction` of a pool.

Context switch (AIOS). `suspend` parks the session: its running request (or
its pinned sequence) leaves the batch and its KV moves to the driver's host
swap tier (memory `SwapOut`, then the driver's copy); the session's next
requests wait. `resume` swaps the KV back in and the request continues
where it stopped. With no swap tier (or a full one) the KV is dropped and
recomputed on resume: the same continuation, more work.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ipc.errors import ErrorCode, LlmosError
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from sdk.logs import get_logger
from services.scheduler._request import Request, State
from services.scheduler._seq import Seq

if TYPE_CHECKING:
    from services.scheduler.engine import Engine

log = get_logger()


@dataclass(eq=False)
class Session:
    key: tuple[str, str]  # (principal, session name)
    queue: deque[Request] = field(default_factory=deque)  # behind `active`, in arrival order
    active: Request | None = None
    pinned: Seq | None = None  # the last request's sequence, KV held for the next one
    suspended: bool = False
    parked: Seq | None = None  # out of the batch while suspended
    swapped: bool = False  # `parked`'s KV is in the swap tier
    used: float = field(default_factory=time.monotonic)  # last activity: the LRU order of pins

    @property
    def idle(self) -> bool:
        """Nothing to remember: the session can be forgotten."""
        return (self.active is None and not self.queue and self.pinned is None and self.parked is None
                and not self.suspended)

    def info(self) -> sp.SessionInfo:
        kv = self.parked or self.pinned or (self.active.seq if self.active is not None else None)
        where = "swap" if self.swapped else ("device" if kv is not None and kv.mem_known else "")
        state = (sp.SessionState.SUSPENDED if self.suspended
                 else sp.SessionState.ACTIVE if self.active is not None else sp.SessionState.IDLE)
        return sp.SessionInfo(self.key[1], state, len(self.queue),
                              self.active.request_id if self.active is not None else "",
                              kv.num_computed if kv is not None else 0, where)


def drop_kv(engine: "Engine", seq: Seq) -> None:
    """Forget `seq`'s KV (released at the next step); it is recomputed from its tokens."""
    if seq.mem_known:
        engine._to_release.append(seq.mem_id)
    seq.reset(keep_pool=True)


async def park(engine: "Engine", s: Session) -> None:
    """Take the session's sequence out of the batch and its KV to the swap tier."""
    seq: Seq | None = None
    req = s.active
    if req is not None and (req.seq in engine.running or req.seq in engine.waiting):
        seq = req.seq
        (engine.running if seq in engine.running else engine.waiting).remove(seq)
        req.state = State.SUSPENDED
    elif s.pinned is not None:
        seq, s.pinned = s.pinned, None
    if seq is None:
        return  # nothing holds KV: the session's requests just wait for resume
    s.parked = seq
    if not seq.mem_known or seq.pool not in engine.drivers:
        return
    reply = await engine._memory(engine.backend.swap_out(mp.SwapOut([seq.mem_id])))
    got = reply.seqs[0] if isinstance(reply, mp.SwapOutReply) and reply.seqs else None
    if got is None or got.error is not None:
        why = got.error.message if got is not None and got.error is not None else "memory call failed"
        log.info("scheduler.suspend_without_swap", session=s.key[1], why=why)
        if not engine.memory_is_down:
            drop_kv(engine, seq)
        else:
            seq.reset(keep_pool=True)
        return
    try:
        if got.device_blocks:
            await engine.backend.swap_blocks(seq.pool or "", dp.SwapBlocksOut(got.device_blocks, got.swap_slots))
    except LlmosError as exc:
        # The copy did not happen: what the slots hold is garbage. Releasing a
        # swapped sequence frees its slots.
        log.warning("scheduler.swap_out_failed", session=s.key[1], error=str(exc))
        drop_kv(engine, seq)
        return
    seq.block_table = list(got.blocks)
    s.swapped = True
    log.info("scheduler.suspended", session=s.key[1], blocks=len(got.blocks), copied=len(got.device_blocks))


async def unpark(engine: "Engine", s: Session) -> bool:
    """Bring a resumed session's sequence back; False: not now (no blocks), try later."""
    seq = s.parked
    if seq is not None and s.swapped:
        reply = await engine._memory(engine.backend.swap_in(mp.SwapIn([seq.mem_id])))
        if not isinstance(reply, mp.SwapInReply) or not reply.seqs:
            return False
        got = reply.seqs[0]
        if got.error is not None and got.error.code == ErrorCode.OVERLOADED:
            return False  # out of device blocks: wait for some
        s.swapped = False
        if got.error is not None:
            log.warning("scheduler.swap_in_refused", session=s.key[1], error=got.error.message)
            drop_kv(engine, seq)
        else:
            try:
                if got.device_blocks:
                    await engine.backend.swap_blocks(seq.pool or "",
                                                     dp.SwapBlocksIn(got.swap_slots, got.device_blocks))
                seq.block_table = list(got.blocks)
            except LlmosError as exc:
                log.warning("scheduler.swap_in_failed", session=s.key[1], error=str(exc))
                drop_kv(engine, seq)
    s.parked = None
    if seq is not None:
        req = s.active
        if req is not None and req.seq is seq:
            if seq.mem_known:
                engine.running.append(seq)
                req.state = State.RUNNING
            else:
                engine.waiting.append(seq)  # keeps its place in line (arrival, ticket)
                req.state = State.WAITING
            engine.wake()
        elif seq.mem_known:
            s.pinned = seq
    log.info("scheduler.resumed", session=s.key[1])
    engine._next_in_session(s)
    return True


def seq_blocks(seqs: list[Seq]) -> int:
    return len({b for s in seqs for b in s.block_table})


__all__ = ["Session", "drop_kv", "park", "unpark"]
