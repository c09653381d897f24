"""The engine loop: continuous batching over the memory server and drivers.

Each step, top to bottom:
  1. apply what happened since the last step: lost drivers (their sequences
     go back to the waiting line for recompute), a restarted memory server
     (live sequences are re-registered with the blocks their driver still
     holds; _recovery.py), session switches (_sessions.py), cancels, deadlines;
  2. plan (planner.py): who runs, how many tokens, whom to preempt —
     by recompute (the KV is released) or, with `preemption = "swap"`, by
     moving the KV to the host swap tier (_swap.py);
  3. one `Release` (finished and preempted sequences), swap-ins of the
     swapped sequences the plan runs, one batched `Reserve`;
  4. one `Execute` per driver, concurrently;
  5. new tokens to their requests, at most one `TokenDelta` per client.

The lines, the drivers, the KV to release and the memory handle belong to
`EngineState` (_state.py): this loop, recovery, sessions and the swap tier
all change them through its verbs. The engine talks to the world through a
`Backend` (the service's is IPC; tests use an in-process one), so all of
this runs without sockets.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping

from ipc.errors import BadRequest, DeadlineExceeded, Error, ErrorCode, LlmosError, NotFound, Unavailable
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from common.logs import get_logger
from services.scheduler._admission import (CHARS_PER_TOKEN, Model, check_ids, check_prompt_size, check_queue_room,
                                           tokenize)
from services.scheduler._execute import Produced, Work, execute
from services.scheduler._request import Emit, Request, Seq, Sink, State
from services.scheduler._sessions import SessionTable, seq_blocks
from services.scheduler._recovery import reregister_live, requeue_lost
from services.scheduler._state import Backend, DriverState, EngineState
from services.scheduler._swap import swap_in, swap_out
from text.stream import TextStream
from services.scheduler.autotune import AutoTuner
from common.config.scheduler import PreemptionMode, SchedulerConfig
from services.scheduler.planner import BlockLedger, Limits, PoolShape, StepPlan, lifetime_blocks, plan
from services.scheduler.policies import make_policy
from services.scheduler.quotas import kv_quota_refusal

log = get_logger()

# A sequence whose steps keep failing (not for lack of blocks) is ended.
MAX_FAILURES = 3


class Engine:
    def __init__(self, config: SchedulerConfig, backend: Backend):
        self.config = config
        self.state = EngineState(backend, make_policy(config.policy))
        self.limits = Limits(config.token_budget, config.max_num_seqs, config.prefill_chunk)
        self.tuner = (AutoTuner(config.tpot_target_ms / 1e3, config.token_budget, config.max_num_seqs)
                      if config.tpot_target_ms > 0 else None)
        self.clock = time.monotonic  # step durations (tests substitute a model of the device)
        self.model: Model | None = None
        self.requests: dict[tuple[str, str], Request] = {}
        self.finished: OrderedDict[tuple[str, str], Request] = OrderedDict()
        self.sessions = SessionTable(self.state, config.session_pin_fraction)
        self._seq_ids = iter(range(1, 2**62))
        self._incarnations = iter(range(1, 2**62))
        self._cancels: set[tuple[str, str]] = set()
        self._lost_pools: set[str] = set()
        self._lost_seqs: set[tuple[str, int]] = set()  # (pool, seq id) the memory server dropped
        self._reregister = False
        # KV-block quotas per tenant: the security policy's, and those the
        # memory server refused a sequence by that the policy does not set
        # (its own config); the policy's replace both.
        self._kv_policy: dict[str, int] = {}
        self._kv_learned: dict[str, int] = {}
        # Counters for Stats and Overloaded's retry_after_s.
        self.steps = 0
        self.tokens_generated = 0
        self.preemptions = 0
        self.num_finished = 0
        self.kv_quota_refused = 0
        self.last_step_s = 0.0
        self._tokens_per_s = 0.0

    def set_model(self, model: Model) -> None:
        self.model = model
        self.wake()

    def driver_up(self, instance: str, meta: Mapping[str, object]) -> None:
        num_blocks, block_size = meta.get("num_blocks"), meta.get("block_size")
        if not isinstance(num_blocks, int) or not isinstance(block_size, int):
            return
        if instance in self.state.drivers:
            # A restart we did not see die: whatever it held is gone.
            self._lost_pools.add(instance)
        self.state.drivers[instance] = DriverState(PoolShape(num_blocks, block_size), next(self._incarnations))
        self.wake()

    def driver_down(self, instance: str) -> None:
        d = self.state.drivers.pop(instance, None)
        if d is None:
            return
        self._lost_pools.add(instance)
        if d.scope is not None:
            d.scope.cancel()
        self.wake()

    def seqs_lost(self, pool: str, seq_ids: list[int]) -> None:
        """The memory server dropped these sequences with their pool."""
        self._lost_seqs.update((pool, i) for i in seq_ids)
        self.wake()

    def memory_down(self) -> None:
        self.state.memory_lost()

    @property
    def memory_is_down(self) -> bool:
        return self.state.memory_down

    def memory_restarted(self) -> None:
        self.state.memory_down = False
        self._kv_learned.clear()  # its config may have changed: it will say so again
        self._reregister = True
        self.wake()

    def wake(self) -> None:
        self.state.wake()

    def set_kv_quotas(self, limits: Mapping[str, int]) -> None:
        """The policy's KV-block quotas (tenant -> blocks; absent: unlimited).
        Waiting requests that no longer fit are refused at the next step."""
        self._kv_policy = dict(limits)
        self._kv_learned.clear()
        self.wake()

    @property
    def kv_quotas(self) -> dict[str, int]:
        return {**self._kv_learned, **self._kv_policy}

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
            sink = known.attach(emit, msg.resume_from)
            sink.attached = True
            if not known.done.is_set():
                sink.flush()  # catch up now rather than at its next token
            return sink
        model = self.model
        if model is None:
            raise Unavailable("the scheduler has no model yet (no driver is up)")
        prompt = prompt_ids if prompt_ids is not None else self.tokenize(msg)
        # A sequence must fit one driver's KV pool on its own, or it could
        # only ever preempt itself. Checked before any loop over the ids.
        room = min(model.max_model_len, max((d.shape.num_blocks * d.shape.block_size
                                             for d in self.state.drivers.values()), default=model.max_model_len))
        if len(prompt) + 1 > room:
            what = "the model takes" if room == model.max_model_len else "the largest driver's KV cache holds"
            raise BadRequest(f"the prompt has {len(prompt)} tokens; {what} at most "
                             f"{room - 1} before the first generated one", detail={"field": "prompt"})
        check_ids(model, prompt, "prompt_ids")
        check_ids(model, msg.resume_ids, "resume_ids")
        max_len = min(len(prompt) + msg.max_tokens, room)
        seq = Seq(next(self._seq_ids), list(prompt), len(prompt), tenant=principal or "default",
                  priority=msg.priority, arrival=time.monotonic(), max_len=max_len)
        refusal = self._kv_refusal(seq, len(prompt), msg.max_tokens)
        if refusal is not None:
            self.kv_quota_refused += 1
            log.warning("scheduler.kv_quota_refused", principal=principal, error=refusal.message)
            raise refusal
        check_queue_room(self.config, [*self.state.waiting, *self.sessions.queued()], principal,
                         len(prompt) + len(msg.resume_ids), self._tokens_per_s)
        stop_ids = frozenset(msg.stop_token_ids) | (frozenset() if msg.ignore_eos else model.eos_token_ids)
        req = Request(key, msg, prompt, seq, TextStream(model.tokenizer, prompt, msg.stop), stop_ids, max_len)
        sink = req.attach(emit, msg.resume_from)
        for token in msg.resume_ids:
            # The client holds these: replay them (text state included) and
            # prefill them with the prompt instead of generating them again.
            seq.tokens.append(token)
            reason = req.add_token(token)
            if reason is not None:
                req.finish(reason)
                self._remember(req)
                return sink
        self.requests[key] = req
        if req.session is None:
            self.state.enqueue(seq)
            return sink
        self.sessions.arrive(req)
        return sink

    def _kv_refusal(self, seq: Seq, prompt_tokens: int, max_tokens: int) -> BadRequest | None:
        """The refusal of a sequence that needs more KV blocks than its
        tenant's quota even alone (None: it fits, or there is no quota)."""
        limit = self.kv_quotas.get(seq.tenant)
        need = lifetime_blocks(seq, self.state.shapes()) if limit is not None else None
        if limit is None or need is None or need[0] <= limit:
            return None
        return kv_quota_refusal(seq.tenant, limit, need[0], need[1], prompt_tokens, max_tokens)

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
        key = (principal, request_id)
        req = self.requests.get(key) or self.finished.get(key)
        if req is None:
            raise NotFound(f"no request {request_id!r} (unknown, or finished long ago)",
                           detail={"request_id": request_id})
        position = -1
        waiting = self.state.waiting
        if req.state == State.WAITING and req.seq in waiting:
            now = time.monotonic()
            order = sorted(waiting, key=lambda s: self.state.policy.key(s, now))
            position = order.index(req.seq)
        return sp.RequestInfo(request_id, req.state.value, len(req.generated), len(req.prompt_ids), position,
                              req.seq.pool or "", req.finish_reason.value if req.finish_reason else "",
                              req.waiting_on if req.state == State.WAITING else "")

    def stats(self) -> sp.SchedulerStatsReply:
        st = self.state
        pinned = self.sessions.pinned()
        quotas = self.kv_quotas
        ledger = BlockLedger(st.shapes(), [*st.running, *pinned], quotas)
        on_quota = Counter(s.tenant for s in st.waiting if s.request.waiting_on == sp.WAITING_ON_KV_QUOTA)
        quota_waits = [sp.QuotaWait(t, n, ledger.held[t], quotas.get(t, -1)) for t, n in sorted(on_quota.items())]
        loads = [sp.DriverLoad(i, d.shape.num_blocks, ledger.free[i], sum(1 for s in st.running if s.pool == i))
                 for i, d in sorted(st.drivers.items())]
        return sp.SchedulerStatsReply(st.policy.name.value, len(st.waiting), len(st.running),
                                      self.limits.token_budget, self.limits.max_num_seqs, self.steps,
                                      self.tokens_generated, self.preemptions, self.num_finished, loads,
                                      self.last_step_s, len(self.sessions), self.sessions.suspended(),
                                      seq_blocks(pinned), self.config.tpot_target_ms,
                                      self.tuner.step_s * 1e3 if self.tuner is not None else 0.0,
                                      self.config.preemption.value, st.swapped_out, st.swapped_in,
                                      quota_waits, self.kv_quota_refused)

    async def run(self) -> None:
        while True:
            if not self._has_work():
                await self.state.wait()
                continue
            if not await self.step():
                # Nothing could run (no driver, memory down, blocks held by
                # requests that cannot start): wait for the world to change,
                # but re-check deadlines now and then.
                await self.state.wait(0.05)

    def _has_work(self) -> bool:
        st = self.state
        return bool(st.waiting or st.running or self._cancels or st.has_releases or self._lost_pools
                    or self._lost_seqs or self._reregister or self.sessions.switching)

    async def step(self) -> bool:
        """One engine step; returns whether any sequence ran."""
        st = self.state
        await self._apply_changes()
        if st.memory_down or self.model is None:
            return False
        began = time.monotonic()
        # The drivers as planned: a block table is only good on the
        # incarnation it was planned for (one may restart during this
        # step's memory calls and copies).
        incarnations = {i: d.incarnation for i, d in st.drivers.items()}
        t0 = self.clock()
        ledger = BlockLedger(st.shapes(), [*st.running, *self.sessions.pinned()], self.kv_quotas)
        p = plan(st.running, st.waiting, st.policy, ledger, self.limits, began)
        self._quota_verdicts(p, ledger)
        victims = [seq for seq in p.preempted if self._preempt(seq)]
        self.sessions.hand_over(p)
        self.sessions.relieve_pressure(p, ledger, self.limits.prefill_chunk)
        if victims:
            # Before any Reserve: the plan gave their device blocks away.
            await swap_out(st, victims)
        if not await self._release():
            return False
        if st.memory_down or not p.scheduled:
            return False
        swapped = [seq for seq, _ in p.scheduled if seq.swapped]
        if swapped:
            later = set(await swap_in(st, swapped))
            for seq in swapped:
                if not seq.swapped and seq.mem_known:
                    # Back on device blocks: running from now on, whatever
                    # its Reserve says, so every plan counts those blocks.
                    st.start(seq)
            if later:  # fewer free blocks than the plan thought: they wait
                p.scheduled = [(seq, n) for seq, n in p.scheduled if seq not in later]
            # A failed swap-in dropped KV: released before its id is
            # reserved again from token 0.
            if st.memory_down or not await self._release():
                return False
        work = await self._reserve(p)
        if not work:
            return False
        result = await execute(st, work, incarnations)
        self._lost_pools |= result.lost_pools
        for seq, why in result.refused:
            self._fail_once(seq, why)
        for seq, why in result.failed:
            self._end(seq.request, sp.FinishReason.ERROR, message=why)
        self._deliver(result.produced)
        self.steps += 1
        self.last_step_s = self.clock() - t0
        if self.last_step_s > 0:
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (p.num_tokens / self.last_step_s)
        if self.tuner is not None:
            tuned = self.tuner.observe(sum(w.end - w.start for w in work), self.last_step_s)
            if tuned is not None and (tuned.token_budget, tuned.max_num_seqs) != (self.limits.token_budget,
                                                                               self.limits.max_num_seqs):
                self.limits = Limits(tuned.token_budget, tuned.max_num_seqs, self.config.prefill_chunk)
                log.info("scheduler.autotuned", token_budget=tuned.token_budget,
                         max_num_seqs=tuned.max_num_seqs, step_ms=round(self.tuner.step_s * 1e3, 1))
        return True

    async def _release(self) -> bool:
        """Send the KV to release, if any; False when the call failed (the
        ids are kept for the next step unless the memory server died)."""
        st = self.state
        if not st.has_releases:
            return True
        ids = st.take_releases()
        if await st.memory(st.backend.release(mp.Release(ids))) is None:
            if not st.memory_down:
                st.put_back_releases(ids)  # still held there: try again next step
            return False
        return True

    async def _apply_changes(self) -> None:
        st = self.state
        if self._lost_pools or self._lost_seqs:
            lost, self._lost_pools = self._lost_pools, set()
            lost_seqs, self._lost_seqs = self._lost_seqs, set()
            requeue_lost(st, self.sessions, lost, lost_seqs)
        if self._reregister and not st.memory_down:
            self._reregister = not await reregister_live(st, self.sessions)
        if not st.memory_down:
            await self.sessions.switch()
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
        KV-block quota (it was lowered, or learned from the memory server),
        and mark those that wait for room under it."""
        for seq in p.never_fit:
            req = seq.request
            need = lifetime_blocks(seq, ledger.shapes)
            limit = ledger.quotas.get(seq.tenant, 0)
            refusal = kv_quota_refusal(seq.tenant, limit, need[0] if need else 0, need[1] if need else 0,
                                       len(req.prompt_ids), req.submit.max_tokens)
            self.kv_quota_refused += 1
            log.warning("scheduler.kv_quota_refused", request_id=req.request_id, principal=req.key[0],
                        error=refusal.message)
            if req.generated[len(req.submit.resume_ids):] or req.submit.resume_from:
                self._end(req, sp.FinishReason.ERROR, message=refusal.message)  # its client holds tokens
            else:
                self._end(req, sp.FinishReason.ERROR, error=refusal)
        waits = {id(seq) for seq in p.quota_waits}
        for seq in self.state.waiting:
            if id(seq) in waits:
                self._waiting_on_quota(seq, ledger.held[seq.tenant], ledger.quotas.get(seq.tenant, -1))
            else:
                seq.request.waiting_on = ""

    def _waiting_on_quota(self, seq: Seq, held: int, limit: int) -> None:
        req = seq.request
        req.waiting_on = sp.WAITING_ON_KV_QUOTA
        if not req.quota_logged:
            req.quota_logged = True
            need = lifetime_blocks(seq, self.state.shapes()) or (0, 0)
            log.info("scheduler.waiting_on_quota", request_id=req.request_id, principal=req.key[0],
                     tenant=seq.tenant, quota=mp.KV_BLOCKS, held=held, limit=limit, needs_blocks=need[0],
                     block_size=need[1], msg="waits until the tenant's other requests free KV blocks")

    async def _reserve(self, p: StepPlan) -> list[Work]:
        """Reserve slots for the plan; returns the work of the sequences that got them."""
        st = self.state
        items = []
        for seq, n in p.scheduled:
            first = seq.mem_known == 0
            items.append(mp.SeqReserve(seq.seq_id, seq.mem_known, seq.tokens[seq.mem_known:], n,
                                       seq.tenant if first else "", (seq.pool or "") if first else ""))
        reply = await st.memory(st.backend.reserve(mp.Reserve(items)))
        if not isinstance(reply, mp.ReserveReply):
            return []
        work = []
        for (seq, n), got in zip(p.scheduled, reply.seqs):
            if got.error is not None:
                self._reserve_failed(seq, got.error)
                continue
            if seq.mem_known == 0:
                seq.num_computed = got.num_cached
                seq.request.cached_tokens = max(seq.request.cached_tokens, got.num_cached)
            seq.mem_known = len(seq.tokens)
            del seq.block_table[got.table_start:]
            seq.block_table.extend(got.blocks)
            copies = [(got.cow_src, got.cow_dst)] if got.cow_src >= 0 else []
            start = seq.num_computed
            work.append(Work(seq, start, min(start + n, len(seq.tokens)), copies))
            st.start(seq)
        return work

    def _reserve_failed(self, seq: Seq, error: Error) -> None:
        detail = error.detail or {}
        if error.code == ErrorCode.OVERLOADED and detail.get("quota") == mp.KV_BLOCKS:
            # Its tenant's quota, not the pool: plan by it from now on (the
            # policy's own, or the memory server's config), so a sequence that
            # can never fit is refused and the others wait in the open.
            limit, held = detail.get("limit"), detail.get("held")
            if isinstance(limit, int) and limit >= 0 and seq.tenant not in self._kv_policy:
                self._kv_learned[seq.tenant] = limit
            if seq in self.state.waiting:
                self._waiting_on_quota(seq, held if isinstance(held, int) else -1,
                                       limit if isinstance(limit, int) else -1)
        if error.code == ErrorCode.OVERLOADED:
            # Out of blocks (or over quota): it waits for a later step, and
            # idle sessions' pins on its pool give way (the planner's estimate
            # said it fit; the memory server, which also counts idle cached
            # blocks it would reuse, says not).
            if seq.pool is not None and seq not in self.state.running:
                self.sessions.short_of_blocks.add(seq.pool)
            return
        if error.code == ErrorCode.NOT_FOUND and seq.mem_known == 0:
            return  # the memory server does not know the pool yet
        # The memory server lost or disagrees about the sequence: start over.
        log.warning("scheduler.reserve_failed", seq=seq.seq_id, code=str(error.code), error=error.message)
        self._fail_once(seq, f"the memory server refused the sequence: {error.message}")

    def _fail_once(self, seq: Seq, why: str) -> None:
        req = seq.request
        req.failures += 1
        if req.failures >= MAX_FAILURES:
            self._end(req, sp.FinishReason.ERROR, message=why)
            return
        self.state.drop_kv(seq)
        self.state.requeue(seq)

    def _deliver(self, produced: list[Produced]) -> None:
        for out in produced:
            seq, req = out.seq, out.seq.request
            if req.done.is_set():
                continue
            seq.tokens.append(out.token)
            self.tokens_generated += 1
            reason = req.add_token(out.token, out.logprob)
            if reason is not None:
                self._end(req, reason)
            elif req.sink is not None:
                req.sink.flush()

    def _end(self, req: Request, reason: sp.FinishReason, *, error: LlmosError | None = None,
             message: str = "") -> None:
        """Finish a request for good: free its blocks, answer its client,
        start the next request of its session."""
        if req.done.is_set():
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
