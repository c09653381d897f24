"""The engine loop: continuous batching over the memory server and drivers.

Each step, top to bottom:
  1. apply what happened since the last step: lost drivers (their sequences
     go back to the waiting line for recompute), a restarted memory server
     (live sequences are re-registered with the blocks their driver still
     holds; _recovery.py), session switches (_sessions.py), cancels, deadlines;
  2. plan (planner.py): who runs, how many tokens, whom to preempt —
     by recompute (the KV is released) or, with `preemption = "swap"`, by
     moving the KV to the host swap tier (_swap.py);
  3. the memory work (_step.py): swap-ins of the swapped sequences the plan
     runs, one batched `Reserve` carrying the releases — none when every
     decode's slot was reserved while the last step ran;
  4. one `Execute` per driver, concurrently, and beside them the next step's
     `Reserve` (the overlap, _overlap.py) and, with async steps, the next step
     itself when it is the same decodes one token on (steps 2-3 skipped);
  5. new tokens to their requests, at most one `TokenDelta` per client.

The lines, the drivers, the KV to release and the memory handle belong to
`EngineState` (_state.py): this loop, recovery, sessions and the swap tier
change them through its verbs. The world is reached through a `Backend`
(the service's is IPC; tests use an in-process one): no sockets here.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping

import anyio
from anyio.abc import TaskGroup

from ipc.errors import BadRequest, DeadlineExceeded, LlmosError, Unavailable
from ipc.protocol import scheduler as sp
from common.logs import get_logger
from services.scheduler._admission import (CHARS_PER_TOKEN, Model, check_fits, check_prompt_size,
                                           check_queue_room, tokenize)
from services.scheduler._fanout import ForkGroups
from services.scheduler._execute import Produced, Work
from services.scheduler._kv_quota import KvQuotas
from services.scheduler._request import Emit, Request, Seq, Sink
from services.scheduler._session_epilogue import schedule_epilogues
from services.scheduler._sessions import SessionTable
from services.scheduler._recovery import Recovery
from services.scheduler._state import Backend, EngineState
from services.scheduler._text import TextLater, feed_step
from services.scheduler._engine_info import engine_stats, request_info
from services.scheduler._overlap import InFlight, execute_step, send_next, settle
from services.scheduler._step import reserve_plan
from text.stream import TextStream
from services.scheduler._tuning import Tuning
from common.config.scheduler import PreemptionMode, SchedulerConfig
from services.scheduler.planner import BlockCounts, BlockLedger, Limits, PoolShape, StepPlan, plan
from services.scheduler.policies import make_policy

log = get_logger()

# A sequence whose steps keep failing (not for lack of blocks) is ended.
MAX_FAILURES = 3


class Engine:
    def __init__(self, config: SchedulerConfig, backend: Backend):
        self.config = config
        self.state = EngineState(backend, make_policy(config.policy))
        self.limits = Limits(config.token_budget, config.max_num_seqs, config.prefill_chunk)
        self.tuning = Tuning(config, lambda: self.clock())  # objectives, the tuner (self.limits), early rejection
        self.clock = time.monotonic  # step durations (tests substitute a model of the device)
        self.model: Model | None = None
        self.requests: dict[tuple[str, str], Request] = {}
        self.finished: OrderedDict[tuple[str, str], Request] = OrderedDict()
        self.sessions = SessionTable(self.state, config.session_pin_fraction)
        self._seq_ids = iter(range(1, 2**62))
        self.fanout = ForkGroups(self.state, lambda: next(self._seq_ids))  # n > 1: choices fork a prompt's KV
        self.recovery = Recovery(self.state, self.sessions)
        self._cancels: set[tuple[str, str]] = set()
        self.kv = KvQuotas()
        self._block_counts = BlockCounts()  # the ledger's, kept from step to step
        self.text_later = TextLater()  # last step's text that waits for the next Execute (_text.py)
        self._flying: InFlight | None = None  # async scheduling: the next step, sent while this one runs
        self._tg: TaskGroup | None = None  # where its Executes are awaited (run()'s; None: no async steps)
        self.steps = self.tokens_generated = self.preemptions = self.num_finished = 0  # for Stats, retry_after_s
        self.last_step_s = self._tokens_per_s = 0.0

    def set_model(self, model: Model) -> None:
        self.model = model
        self.wake()

    def driver_up(self, instance: str, meta: Mapping[str, object]) -> None:
        num_blocks, block_size = meta.get("num_blocks"), meta.get("block_size")
        if not isinstance(num_blocks, int) or not isinstance(block_size, int):
            return
        chains = self.config.async_steps is True or meta.get("device") != "cpu"  # "auto": not on host cores
        self.recovery.driver_up(instance, PoolShape(num_blocks, block_size), chains)

    def driver_down(self, instance: str) -> None:
        self.recovery.driver_down(instance)

    def seqs_lost(self, pool: str, seq_ids: list[int]) -> None:
        """The memory server dropped these sequences with their pool."""
        self.recovery.seqs_lost(pool, seq_ids)

    def memory_down(self) -> None:
        self.state.memory_lost()

    @property
    def memory_is_down(self) -> bool:
        return self.state.memory_down

    def memory_restarted(self) -> None:
        self.kv.forget_learned()
        self.recovery.memory_restarted()

    def wake(self) -> None:
        self.state.wake()

    def set_kv_quotas(self, limits: Mapping[str, int]) -> None:
        """The policy's KV-block quotas (tenant -> blocks; absent: unlimited).
        Waiting requests that no longer fit are refused at the next step."""
        self.kv.set_policy(limits)
        self.wake()

    @property
    def kv_quotas(self) -> dict[str, int]:
        return self.kv.limits

    def submit(self, msg: sp.Submit, principal: str, emit: Emit, prompt_ids: list[int] | None = None) -> Sink:
        """Admit (or re-attach) a request; the returned sink's `wait()` gives
        its `Finished`. Raises BadRequest, Overloaded or Unavailable.

        A Submit re-attaches (`sink.attached`: no admission, nothing to
        charge) only when this principal has a live or remembered request with
        its id; anything else is a new request, admitted like any other,
        whatever `attempt` or `resume_ids` it carries. `prompt_ids`: the
        prompt already tokenized (by `tokenize`, off the event loop)."""
        msg.validate()
        key = (principal, msg.request_id or uuid.uuid4().hex)
        known = self.requests.get(key) or self.finished.get(key)
        if known is not None:
            if known.prompt_ids != (prompt_ids if prompt_ids is not None else self.tokenize(msg)):
                raise BadRequest(f"request id {key[1]!r} is in use by another prompt",
                                 detail={"field": "request_id"})
            return known.reattach(emit, msg.resume_from)
        model = self.model
        if model is None:
            raise Unavailable("the scheduler has no model yet (no driver is up)")
        prompt = prompt_ids if prompt_ids is not None else self.tokenize(msg)
        room = check_fits(model, self.state.shapes(), prompt, msg.resume_ids)
        max_len = min(len(prompt) + msg.max_tokens, room)
        seq = Seq(next(self._seq_ids), list(prompt), len(prompt), tenant=principal or "default",
                  priority=msg.priority, arrival=time.monotonic(), max_len=max_len)
        refusal = self.kv.refusal(seq, self.state.shapes(), len(prompt), msg.max_tokens)
        if refusal is not None:
            log.warning("scheduler.kv_quota_refused", principal=principal, error=refusal.message)
            raise refusal
        check_queue_room(self.config, [*self.state.waiting, *self.sessions.queued()], principal,
                         len(prompt) + len(msg.resume_ids), self._tokens_per_s)
        stop_ids = frozenset(msg.stop_token_ids) | (frozenset() if msg.ignore_eos else model.eos_token_ids)
        req = Request(key, msg, prompt, seq, TextStream(model.tokenizer, prompt, msg.stop), stop_ids, max_len)
        self.tuning.admit(req, self.state, self.limits)  # Overloaded when predicted to miss its objective
        sink = req.attach(emit, msg.resume_from)
        if req.replay(msg.resume_ids):
            self._remember(req)
            return sink
        if req.session is not None:
            self.sessions.arrive(req, model)  # refused if its new text cannot fit the session's context
        self.requests[key] = req
        if req.session is None and not self.fanout.arrive(req, model.tokenizer):
            self.state.enqueue(seq)
        return sink

    def check_prompt_size(self, msg: sp.Submit) -> None:
        """Refuse a prompt that cannot fit the model (O(1), before anything reads it)."""
        check_prompt_size(self.model, msg)

    def tokenize(self, msg: sp.Submit) -> list[int]:
        """The prompt's ids (size-checked first). Blocking for a long prompt:
        the service calls it from a worker thread."""
        return tokenize(self.model, msg)

    def cancel(self, principal: str, request_id: str) -> bool:
        key = (principal, request_id)
        if key not in self.requests:
            return False
        self._cancels.add(key)
        self.wake()
        return True

    def cancel_principal(self, principal: str) -> int:
        """Cancel every live request of `principal` (it was revoked)."""
        keys = [k for k in self.requests if k[0] == principal]
        self._cancels.update(keys)
        if keys:
            self.wake()
        return len(keys)

    def submitted(self, principal: str, request_id: str) -> sp.Submit | None:
        """The Submit of a live or remembered request (None: no such request)."""
        key = (principal, request_id)
        req = self.requests.get(key) or self.finished.get(key)
        return None if req is None else req.submit

    def session_of(self, principal: str, request_id: str) -> str | None:
        """The session of a live or remembered request (None: no such request)."""
        known = self.submitted(principal, request_id)
        return None if known is None else known.session

    def request_info(self, principal: str, request_id: str) -> sp.RequestInfo:
        return request_info(self, principal, request_id)

    def stats(self) -> sp.SchedulerStatsReply:
        return engine_stats(self)

    async def run(self) -> None:
        async with anyio.create_task_group() as self._tg:  # owns a step sent ahead's Executes (async scheduling)
            await self._loop()

    async def _loop(self) -> None:
        while True:
            if not self._has_work():
                await self.text_later.settle()
                await self.state.wait()
                continue
            if not await self.step():
                # Nothing could run (no driver, memory down, blocks held by
                # requests that cannot start): wait for the world to change,
                # but re-check deadlines now and then.
                await self.state.wait(0.05)

    def _has_work(self) -> bool:
        st = self.state
        return bool(st.waiting or st.running or self._cancels or st.has_releases or self._flying
                    or self.recovery.pending or self.sessions.switching or self.fanout.pending)

    async def step(self) -> bool:
        """One engine step; returns whether any sequence ran."""
        st = self.state
        if self.text_later.due(self.recovery.pending or self.sessions.switching or self.fanout.pending):
            await self.text_later.settle()  # before anything could end those requests (and below)
        await self._apply_changes()
        if st.memory_down or self.model is None:
            await self.text_later.settle()
            return False
        began = time.monotonic()
        t0 = self.clock()
        await settle(st, wait=self._flying is None)  # async steps' slot renewal: awaited only before a plan
        flying, self._flying = self._flying, None
        if flying is not None:
            # Sent while the last step ran (async scheduling): it is this step.
            work, incarnations, num_tokens = flying.work, flying.incarnations, len(flying.work)
        else:
            # The drivers as planned: a block table is only good on the incarnation
            # it was planned for (one may restart during the memory calls and copies).
            incarnations = {i: d.incarnation for i, d in st.drivers.items()}
            ledger = BlockLedger(st.shapes(), [*st.running, *self.sessions.pinned()], self.kv_quotas,
                                 self._block_counts)
            p = plan(st.running, st.waiting, st.policy, ledger, self.limits, began)
            self._quota_verdicts(p, ledger)
            victims = [seq for seq in p.preempted if self._preempt(seq)]
            self.sessions.hand_over(p)
            self.sessions.relieve_pressure(p, ledger, self.limits.prefill_chunk)
            schedule_epilogues(self.sessions, p, ledger)  # finished turns' final tokens, for their pins
            work, failed = await reserve_plan(st, self.sessions, self.kv, p, victims, incarnations)
            num_tokens = p.num_tokens
            if failed or not work:
                await self.text_later.settle()
            for seq, why in failed:
                self._fail_once(seq, why)
            if not work:
                return False
        tg = self._tg if self.config.async_steps else None
        result = await execute_step(st, work, incarnations, self.config.overlap, self.kv_quotas,  # + next Reserve
                                    self.text_later.settle if self.text_later else None, flying=flying,
                                    chain=(lambda w: self._send_next(w, incarnations)) if tg else None, background=tg)
        self.recovery.pools_lost(result.lost_pools)
        for seq, why in result.refused:
            self._fail_once(seq, why, computed=False)
        for seq, why in result.failed:
            self.state.drop_kv(seq, computed=False)  # what the step wrote is not trusted
            self._end(seq.request, sp.FinishReason.ERROR, message=why)
        await self._deliver(result.produced)
        self.steps += 1
        self.last_step_s = self.clock() - t0
        if self.last_step_s > 0:
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (num_tokens / self.last_step_s)
        self.limits = self.tuning.after_step(work, self.last_step_s, st, self.limits)
        return True

    def _send_next(self, work: list[Work], incarnations: dict[str, int]) -> InFlight | None:
        """Async scheduling: step N+1 behind step N, unless something is to be
        applied or planned first (_overlap.py `send_next`)."""
        if not (self.state.waiting or self._cancels or self.recovery.pending or self.sessions.switching
                or self.fanout.pending or self._tg is None):
            self._flying = send_next(self.state, self._tg, work, incarnations, self.limits)
        return self._flying

    async def _apply_changes(self) -> None:
        st = self.state
        await self.recovery.apply()
        if not st.memory_down:
            await self.sessions.switch()
            await self.fanout.apply()
        if self._cancels and self.text_later:
            await self.text_later.settle()
        for key in self._cancels:
            req = self.requests.get(key)
            if req is not None:
                self._end(req, sp.FinishReason.CANCELLED)
        self._cancels.clear()
        wall = time.time_ns()
        for req in list(self.requests.values()):
            d = req.submit.deadline_ns
            if d and d <= wall:
                if req.generated[len(req.submit.resume_ids):] or req.submit.resume_from:
                    self._end(req, sp.FinishReason.DEADLINE)
                else:
                    self._end(req, sp.FinishReason.DEADLINE,
                              error=DeadlineExceeded(f"request {req.request_id!r} did not start before "
                                                     "its deadline", detail={"request_id": req.request_id}))

    def _preempt(self, seq: Seq) -> bool:
        """Back to the waiting line (its place kept); True when its KV is to be
        swapped out rather than released for recompute."""
        self.preemptions += 1
        swap = self.config.preemption == PreemptionMode.SWAP and seq.mem_known > 0
        if not swap:
            self.state.drop_kv(seq)
        self.state.requeue(seq)
        return swap

    def _quota_verdicts(self, p: StepPlan, ledger: BlockLedger) -> None:
        """Refuse the waiting sequences that can never fit their tenant's
        KV-block quota, and mark those that wait for room under it."""
        for req, refusal in self.kv.verdicts(p, ledger, self.state.waiting):
            if req.generated[len(req.submit.resume_ids):] or req.submit.resume_from:
                self._end(req, sp.FinishReason.ERROR, message=refusal.message)  # its client holds tokens
            else:
                self._end(req, sp.FinishReason.ERROR, error=refusal)

    def _fail_once(self, seq: Seq, why: str, *, computed: bool = True) -> None:
        req = seq.request
        req.failures += 1
        if req.failures >= MAX_FAILURES:
            self.state.drop_kv(seq, computed=computed)
            self._end(req, sp.FinishReason.ERROR, message=why)
            return
        self.state.drop_kv(seq, computed=computed)
        self.state.requeue(seq)

    async def _deliver(self, produced: list[Produced]) -> None:
        now, recorded = self.text_later.record(produced)  # one pass: the ids recorded, the text that can wait kept
        self.tokens_generated += recorded
        await feed_step(now)  # text now (worker thread); the rest beside the next step
        waits = self.text_later.requests() if now else set()
        for req, token in now:
            if req.ended or id(req) in waits:
                continue
            reason = req.end_reason(token)
            if reason is not None:
                self._end(req, reason)
            elif req.sink is not None:
                req.sink.flush()

    def _end(self, req: Request, reason: sp.FinishReason, *, error: LlmosError | None = None,
             message: str = "") -> None:
        """Finish a request for good: free its blocks, answer its client,
        start the next request of its session."""
        if req.done.is_set() or self.fanout.ended(req, reason):  # a fork group's prefix: kept for its choices
            return
        seq = req.seq
        if not self.sessions.queued_behind(req):  # else it never arrived
            self.state.remove(seq)
            self.state.policy.on_finished(seq)
        if req.session is None:
            self.state.release(seq)
        else:
            # Releases the KV or pins it, and starts the session's next request.
            self.sessions.ended(req, reason, failed=error is not None)
        req.finish(reason, error=error, message=message)
        self.requests.pop(req.key, None)
        self._remember(req)
        self.num_finished += 1
        if reason == sp.FinishReason.ERROR:
            log.warning("scheduler.request_failed", request_id=req.request_id, error=message)

    def _remember(self, req: Request) -> None:
        self.finished[req.key] = req
        self.finished.move_to_end(req.key)
        while len(self.finished) > self.config.remember_finished:
            self.finished.popitem(last=False)


__all__ = ["CHARS_PER_TOKEN", "Backend", "Engine", "Model"]
