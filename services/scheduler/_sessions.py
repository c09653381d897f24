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
swap tier (_swap.py); the session's next requests wait. `resume` puts the
request back in line, still swapped, and the engine swaps its KV in when it
is scheduled (a pinned sequence is swapped in at once); it continues where
it stopped. With no swap tier (or a full one) the KV is dropped and
recomputed on resume: the same continuation, more work.

Conversation (issue 18). The session keeps its history (_history.py): a
turn's prompt is its new text; when it starts (`next`) it is bound to
system + kept turns + new text (`bind_turn`, evicting the oldest turns past
the context), and when it ends with stop or length its ids are appended
(`ended`), before its answer goes out; the pin then gets the KV of the
turn's final token before the next turn starts (_session_epilogue.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ipc.errors import NotFound
from ipc.protocol import scheduler as sp
from ipc.protocol import sessions as sessp
from common.logs import get_logger
from services.scheduler._admission import Model
from services.scheduler._history import Histories, bind_turn, check_turn_fits, with_history
from services.scheduler._request import Request, Seq
from services.scheduler._session_epilogue import arm, epilogue_blocks, in_flight, settle_epilogues
from services.scheduler._session_fork import adopt_pins
from services.scheduler._state import EngineState
from services.scheduler._swap import swap_in, swap_out
from services.scheduler.planner import BlockLedger, StepPlan

log = get_logger()


@dataclass(eq=False)
class Session:
    key: tuple[str, str]  # (principal, session name)
    queue: deque[Request] = field(default_factory=deque)  # behind `active`, in arrival order
    active: Request | None = None
    pinned: Seq | None = None  # the last request's sequence, KV held for the next one
    suspended: bool = False
    parked: Seq | None = None  # out of the batch while suspended
    used: float = field(default_factory=time.monotonic)  # last activity: the LRU order of pins

    @property
    def idle(self) -> bool:
        """Nothing to remember: the session can be forgotten."""
        return (self.active is None and not self.queue and self.pinned is None and self.parked is None
                and not self.suspended)

    def info(self, histories: Histories | None = None) -> sessp.SessionInfo:
        kv = self.parked or self.pinned or (self.active.seq if self.active is not None else None)
        where = "" if kv is None or not kv.mem_known else "swap" if kv.swapped else "device"
        state = (sessp.SessionState.SUSPENDED if self.suspended
                 else sessp.SessionState.ACTIVE if self.active is not None else sessp.SessionState.IDLE)
        info = sessp.SessionInfo(self.key[1], state, len(self.queue),
                                 self.active.request_id if self.active is not None else "",
                                 kv.num_computed if kv is not None else 0, where)
        return with_history(info, histories.get(self.key) if histories is not None else None)



def seq_blocks(seqs: list[Seq]) -> int:
    return len({b for s in seqs for b in s.block_table})


class SessionTable:
    """The engine's sessions, keyed by (principal, name). An idle session
    (nothing running, queued, pinned or suspended) is forgotten."""

    def __init__(self, state: EngineState, pin_fraction: float):
        self.state = state
        self.pin_fraction = pin_fraction  # of a pool's blocks, at most, held by pins
        self.by_key: dict[tuple[str, str], Session] = {}
        self._park: set[tuple[str, str]] = set()
        self._unpark: set[tuple[str, str]] = set()
        # Pools where a waiting sequence's Reserve was refused for blocks.
        self.short_of_blocks: set[str] = set()
        self.histories = Histories()  # the service gives it a store under LLMOS_HOME
        self.model: Model | None = None
        # Pins whose final token's KV is to be computed, and those a step computes now.
        self.epilogues: list[tuple[Session, Seq, int]] = []  # (session, pin, steps tried)
        self.flying: list[tuple[Session, Seq, int]] = []

    def __len__(self) -> int:
        return len(self.by_key)

    @property
    def switching(self) -> bool:
        """A suspend or resume (or a turn's epilogue) waits for the next step."""
        return bool(self._park or self._unpark or self.epilogues or self.flying)

    def queued(self) -> list[Seq]:
        return [r.seq for s in self.by_key.values() for r in s.queue]

    def pinned(self) -> list[Seq]:
        return [s.pinned for s in self.by_key.values() if s.pinned is not None]

    def suspended(self) -> int:
        return sum(1 for s in self.by_key.values() if s.suspended)

    def arrive(self, req: Request, model: Model) -> None:
        """A turn arrives: refused (BadRequest) if its new text and the
        session's system prompt alone cannot fit; else it waits its turn."""
        assert req.session is not None
        self.model = model
        check_turn_fits(self.histories.get_or_new(req.session), req.prompt_ids, self.room())
        s = self.by_key.get(req.session)
        if s is None:
            s = self.by_key[req.session] = Session(req.session)
        s.used = time.monotonic()
        s.queue.append(req)  # runs when the current request ends (and the session is not suspended)
        self.next(s)

    def queued_behind(self, req: Request) -> bool:
        """Is `req` waiting behind its session's active request (not yet in line)?"""
        s = self.by_key.get(req.session) if req.session is not None else None
        return s is not None and req in s.queue

    def ended(self, req: Request, reason: sp.FinishReason, failed: bool) -> None:
        """`req` of a session ended (the engine took it out of its lines): its
        KV is released, or pinned for the session's next request, which starts."""
        assert req.session is not None
        s = self.by_key.get(req.session)
        seq = req.seq
        if s is None:  # not expected: every request of a session is in its table until it ends
            self.state.release(seq)
            return
        if req in s.queue:
            s.queue.remove(req)  # ended while queued behind its session: it never arrived
            self._forget_if_idle(s)
            return
        if s.parked is seq:
            s.parked = None
            self.state.release(seq)
        elif (s.active is req and seq.mem_known and not seq.swapped and not failed
              and reason in (sp.FinishReason.STOP, sp.FinishReason.LENGTH)):
            self._pin(s, seq)
        else:
            self.state.release(seq)
        if s.active is req and not failed and reason in (sp.FinishReason.STOP, sp.FinishReason.LENGTH):
            req.turn = self.histories.append(s.key, req.request_id, req.prompt_ids, req.generated)
        if s.active is req:
            s.active = None
            s.used = time.monotonic()
            self.next(s)

    def next(self, s: Session) -> None:
        """Start the session's next request if it may run now; forget an idle session."""
        if (s.active is None and not s.suspended and s.parked is None and s.queue
                and (s.pinned is None or not s.pinned.epilogue)):
            req = s.active = s.queue.popleft()
            bind_turn(self.histories, req, self.room())
            if s.pinned is not None and s.pinned.pool in self.state.drivers:
                req.seq.pool = s.pinned.pool  # where the conversation's KV is
            self.state.enqueue(req.seq)
        self._forget_if_idle(s)

    def room(self) -> int:
        """Positions one sequence may reach: the model's context, or the largest KV pool."""
        m = self.model
        ctx = m.max_model_len if m is not None else 1 << 30
        return min(ctx, max((x.num_blocks * x.block_size for x in self.state.shapes().values()), default=ctx))

    def _forget_if_idle(self, s: Session) -> None:
        if s.idle:
            self.by_key.pop(s.key, None)

    def get(self, principal: str, name: str) -> Session:
        s = self.by_key.get((principal, name))
        if s is None:
            raise NotFound(f"no session {name!r}: none of its requests is running or queued, and it holds no KV",
                           detail={"session": name})
        return s

    def describe(self, principal: str, name: str) -> sessp.SessionInfo:
        """The session's state and history (NotFound: neither a live session nor a history)."""
        s = self.by_key.get((principal, name))
        if s is not None:
            return s.info(self.histories)
        rec = self.histories.get((principal, name))
        if rec is None:
            raise NotFound(f"no session {name!r}: it has no history and no request", detail={"session": name})
        return with_history(sessp.SessionInfo(name, sessp.SessionState.IDLE), rec)

    def suspend(self, principal: str, name: str) -> sessp.SessionInfo:
        s = self.get(principal, name)
        if not s.suspended:
            s.suspended = True
            self._unpark.discard(s.key)
            self._park.add(s.key)
            self.state.wake()
        return s.info(self.histories)

    def resume(self, principal: str, name: str) -> sessp.SessionInfo:
        s = self.get(principal, name)
        if s.suspended:
            s.suspended = False
            self._park.discard(s.key)
            self._unpark.add(s.key)
            self.state.wake()
        return s.info(self.histories)

    def close(self, principal: str, name: str) -> sessp.SessionInfo:
        """Release the KV the session keeps for its next request — pinned on
        the device, or parked by a suspend (in the swap tier, or on its way
        back after a resume). Its requests, if any, are not touched."""
        s = self.get(principal, name)
        self._unpin(s)
        kept = s.parked
        if kept is not None and (s.active is None or s.active.seq is not kept):
            self.state.drop_kv(kept)
            s.parked = None
            self.state.wake()
        if s.active is None and not s.queue:
            s.suspended = False  # nothing left to suspend
            self._park.discard(s.key)
            self._unpark.discard(s.key)
        info = s.info()
        self._forget_if_idle(s)
        return info

    def _unpin(self, s: Session) -> None:
        if s.pinned is not None:
            # Its full blocks stay in the prefix cache (not while its epilogue may write one).
            self.state.release(s.pinned, computed=not in_flight(self, s.pinned))
            s.pinned = None
            self.state.wake()
        self._forget_if_idle(s)

    def _pin(self, s: Session, seq: Seq) -> None:
        """Hold `seq`'s KV for the session's next request, within the pin budget
        of its pool (older pins there give way)."""
        if s.pinned is not None:
            self.state.release(s.pinned)
            s.pinned = None
        d = self.state.drivers.get(seq.pool or "")
        limit = int(self.pin_fraction * d.shape.num_blocks) if d is not None else 0
        need = epilogue_blocks(self, seq, limit)
        if need > limit:
            self.state.release(seq)
            return
        others = sorted((x for x in self.by_key.values() if x.pinned is not None and x.pinned.pool == seq.pool),
                        key=lambda x: x.used)
        held = seq_blocks([x.pinned for x in others if x.pinned is not None])
        for x in others:
            if held + need <= limit:
                break
            held -= len(set(x.pinned.block_table)) if x.pinned is not None else 0
            self._unpin(x)
        s.pinned = seq
        s.used = time.monotonic()
        arm(self, s, seq)

    def hand_over(self, p: StepPlan) -> None:
        """A session's new request is about to get its first blocks: release the
        pinned sequence now (this step's Release precedes its Reserve), so the
        conversation's full blocks are prefix-cache hits for it."""
        for seq, _ in p.scheduled:
            req = seq.request
            if seq.mem_known or req.session is None:
                continue
            s = self.by_key.get(req.session)
            if s is not None and s.active is req and s.pinned is not None:
                self.state.release(s.pinned)
                s.pinned = None

    def relieve_pressure(self, p: StepPlan, ledger: BlockLedger, prefill_chunk: int) -> None:
        """Pins give way when they keep work from running: on a pool where the
        plan preempted, where the next waiting sequence found too few blocks,
        or where the memory server refused a waiting sequence blocks; and a
        tenant's pins when its requests wait on its KV-block quota."""
        short, self.short_of_blocks = self.short_of_blocks, set()
        if not any(x.pinned is not None for x in self.by_key.values()):
            return
        state = self.state
        pools = {v.pool for v in p.preempted} | short
        scheduled = {id(seq) for seq, _ in p.scheduled}
        now = time.monotonic()
        head = min((w for w in state.waiting if id(w) not in scheduled),
                   key=lambda w: state.policy.key(w, now), default=None)
        if head is not None:
            pool = head.pool if head.pool in ledger.shapes else ledger.placement(head.max_len)
            if pool is not None and ledger.needed(head, min(head.remaining, prefill_chunk),
                                                  pool) > ledger.free[pool]:
                pools.add(pool)
        tenants = {w.tenant for w in p.quota_waits}
        for x in list(self.by_key.values()):
            if x.pinned is not None and (x.pinned.pool in pools or x.pinned.tenant in tenants):
                self._unpin(x)

    def kv_lost(self, pools: set[str], lost: set[tuple[str, int]]) -> None:
        """Drivers (their pools) or sequences ((pool, seq id)) lost their KV."""
        for s in list(self.by_key.values()):
            for kept in (s.pinned, s.parked):
                if kept is None or not (kept.pool in pools or (kept.mem_known and (kept.pool, kept.seq_id) in lost)):
                    continue
                if kept is s.pinned:
                    self._unpin(s)
                else:
                    self.state.drop_kv(kept)

    def memory_restarted(self) -> None:
        """The swap tier's bookkeeping died with the memory server: parked KV
        is recomputed on resume. (Pins on the device are re-registered by the
        engine; `drop_pins` forgets those it could not.)"""
        for s in list(self.by_key.values()):
            if s.parked is not None:
                s.parked.reset(keep_pool=True)
            if s.pinned is not None and s.pinned.pool not in self.state.drivers:
                s.pinned = None
            self._forget_if_idle(s)

    def drop_pins(self, seqs: list[Seq]) -> None:
        """Forget these pinned sequences without releasing them (the memory
        server does not know them)."""
        for s in list(self.by_key.values()):
            if s.pinned is not None and s.pinned in seqs:
                s.pinned = None
                self._forget_if_idle(s)

    async def switch(self) -> None:
        """Suspend and resume sessions as asked (a resume that finds no free
        blocks is tried again next step)."""
        settle_epilogues(self)  # before a pin is forked
        await adopt_pins(self)
        for key in list(self._park):
            self._park.discard(key)
            s = self.by_key.get(key)
            if s is not None and s.suspended and s.parked is None:
                await park(self.state, s)
        for key in list(self._unpark):
            s = self.by_key.get(key)
            if s is None or s.suspended or await unpark(self, s):
                self._unpark.discard(key)


async def park(state: EngineState, s: Session) -> None:
    """Take the session's sequence out of the batch and its KV to the swap tier."""
    seq: Seq | None = None
    req = s.active
    if req is not None and state.park(req.seq):
        seq = req.seq
    elif s.pinned is not None:
        seq, s.pinned = s.pinned, None
    if seq is None:
        return  # nothing holds KV: the session's requests just wait for resume
    s.parked = seq
    if not seq.mem_known or seq.swapped:
        return  # no KV yet, or preempted to the swap tier already
    if await swap_out(state, [seq]):
        log.info("scheduler.suspended", session=s.key[1], blocks=len(seq.block_table))
    else:
        log.info("scheduler.suspend_without_swap", session=s.key[1])


async def unpark(table: SessionTable, s: Session) -> bool:
    """Bring a resumed session's sequence back; False: not now (no blocks), try later.
    A request goes back in line (the engine swaps its KV in when it runs);
    a pinned sequence must be on the device to be pinned, so it comes in now."""
    state = table.state
    seq = s.parked
    req = s.active
    active = seq is not None and req is not None and req.seq is seq
    if seq is not None and seq.swapped and not active and await swap_in(state, [seq]):
        return False
    s.parked = None
    if seq is not None and active:
        state.unpark(seq)
    elif seq is not None and seq.mem_known:
        s.pinned = seq
        arm(table, s, seq)  # if its epilogue had not run when it was suspended
    log.info("scheduler.resumed", session=s.key[1])
    table.next(s)
    return True


__all__ = ["Session", "SessionTable"]
