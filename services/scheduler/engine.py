"""The engine loop: continuous batching over the memory server and drivers.

Each step, top to bottom:
  1. apply what happened since the last step: lost drivers (their sequences
     go back to the waiting line for recompute), a restarted memory server
     (live sequences are re-registered with the blocks their driver still
     holds; _recovery.py), cancels, deadlines;
  2. plan (planner.py): who runs, how many tokens, whom to preempt —
     by recompute (the KV is released) or, with `preemption = "swap"`, by
     moving the KV to the host swap tier (_swap.py);
  3. one `Release` (finished and preempted sequences), swap-ins of the
     swapped sequences the plan runs, one batched `Reserve`;
  4. one `Execute` per driver, concurrently;
  5. new tokens to their requests, at most one `TokenDelta` per client.

The engine talks to the world through a `Backend` (the service's is IPC;
tests use an in-process one), so all of this runs without sockets.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import anyio

from text.tokenizer import Tokenizer
from ipc.errors import BadRequest, DeadlineExceeded, ErrorCode, LlmosError, NotFound, Overloaded, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from common.logs import get_logger
from services.scheduler._request import Emit, Request, Sink, State
from services.scheduler._seq import Seq
from services.scheduler._sessions import SessionTable, seq_blocks
from services.scheduler._recovery import reregister_live, requeue_lost
from services.scheduler._swap import drop_kv, swap_in, swap_out
from text.stream import TextStream
from services.scheduler.autotune import AutoTuner
from common.config.scheduler import PreemptionMode, SchedulerConfig
from services.scheduler.planner import BlockLedger, Limits, PoolShape, StepPlan, lifetime_blocks, plan
from services.scheduler.policies import make_policy
from services.scheduler.quotas import kv_quota_refusal

log = get_logger()

# A sequence whose steps keep failing (not for lack of blocks) is ended.
MAX_FAILURES = 3
# A text prompt longer than the model's context times this many characters
# cannot fit in any tokenization and is refused before it is tokenized (real
# tokenizers average 3-5 characters a token; 32 leaves room for long runs of
# whitespace or repeated characters that merge into one token).
CHARS_PER_TOKEN = 32

T = TypeVar("T")


class Backend(Protocol):
    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply: ...
    async def release(self, req: mp.Release) -> mp.ReleaseReply: ...
    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply: ...
    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed: ...
    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply: ...
    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply: ...
    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped: ...


@dataclass(frozen=True, slots=True)
class Model:
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    max_model_len: int
    vocab_size: int = 0  # the model's embedding rows (0: the tokenizer's vocabulary)

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * CHARS_PER_TOKEN

    @property
    def num_ids(self) -> int:
        """Token ids the model takes: 0 .. num_ids - 1."""
        return self.vocab_size or self.tokenizer.vocab_size


@dataclass
class DriverState:
    shape: PoolShape
    epoch: int
    scope: anyio.CancelScope | None = None  # the step in flight on it


class Engine:
    def __init__(self, config: SchedulerConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.policy = make_policy(config.policy)
        self.limits = Limits(config.token_budget, config.max_num_seqs, config.prefill_chunk)
        self.tuner = (AutoTuner(config.tpot_target_ms / 1e3, config.token_budget, config.max_num_seqs)
                      if config.tpot_target_ms > 0 else None)
        self.clock = time.monotonic  # step durations (tests substitute a model of the device)
        self.model: Model | None = None
        self.drivers: dict[str, DriverState] = {}
        self.requests: dict[tuple[str, str], Request] = {}
        self.finished: OrderedDict[tuple[str, str], Request] = OrderedDict()
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.sessions = SessionTable(self)
        self._seq_nos = iter(range(1, 2**62))
        self._epochs = iter(range(1, 2**62))
        self._to_release: list[str] = []
        self._cancels: set[tuple[str, str]] = set()
        self._lost_pools: set[str] = set()
        self._lost_ids: set[str] = set()
        self._memory_down = False
        self._reregister = False
        self._memory_scope: anyio.CancelScope | None = None
        self._wake = anyio.Event()
        # KV-block quotas per tenant: the security policy's, and those the
        # memory server refused a sequence by that the policy does not set
        # (its own config); the policy's replace both.
        self._kv_policy: dict[str, int] = {}
        self._kv_learned: dict[str, int] = {}
        # Counters for Stats and Overloaded's retry_after_s.
        self.steps = 0
        self.tokens_generated = 0
        self.preemptions = 0
        self.swapped_out = self.swapped_in = 0  # sequences moved to / from the swap tier
        self.num_finished = 0
        self.kv_quota_refused = 0
        self.last_step_s = 0.0
        self._tokens_per_s = 0.0

    # -- the world changing (called by the service) --------------------------------

    def set_model(self, model: Model) -> None:
        self.model = model
        self.wake()

    def driver_up(self, instance: str, meta: Mapping[str, object]) -> None:
        num_blocks, block_size = meta.get("num_blocks"), meta.get("block_size")
        if not isinstance(num_blocks, int) or not isinstance(block_size, int):
            return
        if instance in self.drivers:
            # A restart we did not see die: whatever it held is gone.
            self._lost_pools.add(instance)
        self.drivers[instance] = DriverState(PoolShape(num_blocks, block_size), next(self._epochs))
        self.wake()

    def driver_down(self, instance: str) -> None:
        d = self.drivers.pop(instance, None)
        if d is None:
            return
        self._lost_pools.add(instance)
        if d.scope is not None:
            d.scope.cancel()
        self.wake()

    def seqs_lost(self, mem_ids: list[str]) -> None:
        """The memory server dropped these sequences with their pool."""
        self._lost_ids.update(mem_ids)
        self.wake()

    def memory_down(self) -> None:
        self._memory_down = True
        if self._memory_scope is not None:
            self._memory_scope.cancel()

    @property
    def memory_is_down(self) -> bool:
        return self._memory_down

    def memory_restarted(self) -> None:
        self._memory_down = False
        self._kv_learned.clear()  # its config may have changed: it will say so again
        self._reregister = True
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def set_kv_quotas(self, limits: Mapping[str, int]) -> None:
        """The policy's KV-block quotas (tenant -> blocks; absent: unlimited).
        Waiting requests that no longer fit are refused at the next step."""
        self._kv_policy = dict(limits)
        self._kv_learned.clear()
        self.wake()

    @property
    def kv_quotas(self) -> dict[str, int]:
        return {**self._kv_learned, **self._kv_policy}

    # -- client requests ---------------------------------------------------------------

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
                                             for d in self.drivers.values()), default=model.max_model_len))
        if len(prompt) + 1 > room:
            what = "the model takes" if room == model.max_model_len else "the largest driver's KV cache holds"
            raise BadRequest(f"the prompt has {len(prompt)} tokens; {what} at most "
                             f"{room - 1} before the first generated one", detail={"field": "prompt"})
        self._check_ids(model, prompt, "prompt_ids")
        self._check_ids(model, msg.resume_ids, "resume_ids")
        max_len = min(len(prompt) + msg.max_tokens, room)
        seq = Seq(next(self._seq_nos), list(prompt), len(prompt), tenant=principal or "default",
                  priority=msg.priority, arrival=time.monotonic(), max_len=max_len)
        refusal = self._kv_refusal(seq, len(prompt), msg.max_tokens)
        if refusal is not None:
            self.kv_quota_refused += 1
            log.warning("scheduler.kv_quota_refused", principal=principal, error=refusal.message)
            raise refusal
        self._admit(principal, len(prompt) + len(msg.resume_ids))
        stop_ids = frozenset(msg.stop_token_ids) | (frozenset() if msg.ignore_eos else model.eos_token_ids)
        req = Request(key, msg, prompt, seq, TextStream(model.tokenizer, prompt, msg.stop), stop_ids, max_len)
        seq.owner = req
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
            self._enqueue(seq)
            return sink
        self.sessions.arrive(req)
        return sink

    def _kv_refusal(self, seq: Seq, prompt_tokens: int, max_tokens: int) -> BadRequest | None:
        """The refusal of a sequence that needs more KV blocks than its
        tenant's quota even alone (None: it fits, or there is no quota)."""
        limit = self.kv_quotas.get(seq.tenant)
        need = lifetime_blocks(seq, {i: d.shape for i, d in self.drivers.items()}) if limit is not None else None
        if limit is None or need is None or need[0] <= limit:
            return None
        return kv_quota_refusal(seq.tenant, limit, need[0], need[1], prompt_tokens, max_tokens)

    def check_prompt_size(self, msg: sp.Submit) -> None:
        """Refuse a prompt that cannot fit the model, before anything reads
        it (O(1)): ids past the context, text past it whatever its
        tokenization."""
        model = self.model
        if model is not None and len(msg.prompt_ids) >= model.max_model_len:
            raise BadRequest(f"the prompt has {len(msg.prompt_ids)} ids; this model takes at most "
                             f"{model.max_model_len - 1} before the first generated one",
                             detail={"field": "prompt_ids"})
        if model is not None and len(msg.prompt) > model.max_prompt_chars:
            raise BadRequest(f"the prompt has {len(msg.prompt)} characters; this model takes at most "
                             f"{model.max_prompt_chars} ({model.max_model_len} tokens of context x "
                             f"{CHARS_PER_TOKEN} characters)", detail={"field": "prompt"})

    def tokenize(self, msg: sp.Submit) -> list[int]:
        """The prompt's ids (size-checked first). Blocking for a long prompt:
        the service calls it from a worker thread."""
        if self.model is None:
            raise Unavailable("the scheduler has no model yet (no driver is up)")
        self.check_prompt_size(msg)
        if msg.prompt_ids:
            return list(msg.prompt_ids)
        return self.model.tokenizer.encode(msg.prompt, add_special_tokens=msg.add_special_tokens)

    @staticmethod
    def _check_ids(model: Model, ids: list[int], field: str) -> None:
        n = model.num_ids
        bad = next((t for t in ids if not 0 <= t < n), None)
        if bad is not None:
            raise BadRequest(f"{field} holds id {bad}, outside this model's vocabulary (0..{n - 1})",
                             detail={"field": field})

    def _admit(self, principal: str, prompt_tokens: int) -> None:
        """The waiting line's bounds: `max_waiting` requests and
        `max_waiting_tokens` tokens in all, and for a named principal (auth on)
        `max_waiting_share` of each, so one tenant's flood leaves room for the others."""
        c = self.config
        queued = [*self.waiting, *self.sessions.queued()]
        tokens = sum(s.remaining for s in queued)
        why = ""
        if len(queued) >= c.max_waiting or tokens + prompt_tokens > c.max_waiting_tokens:
            why = f"the scheduler's queue is full ({len(queued)} requests, {tokens} tokens waiting)"
        elif principal and c.max_waiting_share < 1.0:
            mine = [s for s in queued if s.tenant == principal]
            mine_tokens = sum(s.remaining for s in mine)
            cap, cap_tokens = max(1, int(c.max_waiting * c.max_waiting_share)), \
                max(1, int(c.max_waiting_tokens * c.max_waiting_share))
            if len(mine) >= cap or mine_tokens + prompt_tokens > cap_tokens:
                why = (f"{principal!r} holds its share of the scheduler's queue ({len(mine)} of at most {cap} "
                       f"requests, {mine_tokens} of {cap_tokens} tokens waiting)")
                tokens = mine_tokens
        if not why:
            return
        rate = self._tokens_per_s or 1.0
        retry = min(30.0, max(0.5, (tokens + prompt_tokens) / rate))
        raise Overloaded(why, detail={"retry_after_s": round(retry, 2)})

    def _enqueue(self, seq: Seq) -> None:
        self.policy.on_arrival(seq, time.monotonic())
        self.waiting.append(seq)
        self.wake()

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
        if req.state == State.WAITING and req.seq in self.waiting:
            now = time.monotonic()
            order = sorted(self.waiting, key=lambda s: self.policy.key(s, now))
            position = order.index(req.seq)
        return sp.RequestInfo(request_id, req.state.value, len(req.generated), len(req.prompt_ids), position,
                              req.seq.pool or "", req.finish_reason.value if req.finish_reason else "",
                              req.waiting_on if req.state == State.WAITING else "")

    def stats(self) -> sp.SchedulerStatsReply:
        pinned = self.sessions.pinned()
        quotas = self.kv_quotas
        ledger = BlockLedger({i: d.shape for i, d in self.drivers.items()}, [*self.running, *pinned], quotas)
        on_quota = Counter(s.tenant for s in self.waiting if s.owner.waiting_on == sp.WAITING_ON_KV_QUOTA)
        quota_waits = [sp.QuotaWait(t, n, ledger.held[t], quotas.get(t, -1)) for t, n in sorted(on_quota.items())]
        loads = [sp.DriverLoad(i, d.shape.num_blocks, ledger.free[i], sum(1 for s in self.running if s.pool == i))
                 for i, d in sorted(self.drivers.items())]
        return sp.SchedulerStatsReply(self.policy.name.value, len(self.waiting), len(self.running),
                                      self.limits.token_budget, self.limits.max_num_seqs, self.steps,
                                      self.tokens_generated, self.preemptions, self.num_finished, loads,
                                      self.last_step_s, len(self.sessions), self.sessions.suspended(),
                                      seq_blocks(pinned), self.config.tpot_target_ms,
                                      self.tuner.step_s * 1e3 if self.tuner is not None else 0.0,
                                      self.config.preemption.value, self.swapped_out, self.swapped_in,
                                      quota_waits, self.kv_quota_refused)

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not self._has_work():
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            did = await self.step()
            if not did:
                # Nothing could run (no driver, memory down, blocks held by
                # requests that cannot start): wait for the world to change,
                # but re-check deadlines now and then.
                with anyio.move_on_after(0.05):
                    await self._wake.wait()
                self._wake = anyio.Event()

    def _has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancels or self._to_release or self._lost_pools
                    or self._lost_ids or self._reregister or self.sessions.switching)

    async def step(self) -> bool:
        """One engine step; returns whether any sequence ran."""
        await self._apply_changes()
        if self._memory_down or self.model is None:
            return False
        began = time.monotonic()
        # The drivers as planned: a block table is only good on the
        # incarnation it was planned for (one may restart during this
        # step's memory calls and copies).
        epochs = {i: d.epoch for i, d in self.drivers.items()}
        t0 = self.clock()
        pools = {i: d.shape for i, d in self.drivers.items()}
        ledger = BlockLedger(pools, [*self.running, *self.sessions.pinned()], self.kv_quotas)
        p = plan(self.running, self.waiting, self.policy, ledger, self.limits, began)
        self._quota_verdicts(p, ledger)
        victims = [seq for seq in p.preempted if self._preempt(seq)]
        self.sessions.hand_over(p)
        self.sessions.relieve_pressure(p, ledger)
        if victims:
            # Before any Reserve: the plan gave their device blocks away.
            await swap_out(self, victims)
        if self._to_release:
            ids, self._to_release = self._to_release, []
            if await self._memory(self.backend.release(mp.Release(ids))) is None:
                if not self._memory_down:
                    self._to_release.extend(ids)  # still held there: try again next step
                return False
        if self._memory_down or not p.scheduled:
            return False
        swapped = [seq for seq, _ in p.scheduled if seq.swapped]
        if swapped:
            later = set(await swap_in(self, swapped))
            for seq in swapped:
                if not seq.swapped and seq.mem_known:
                    # Back on device blocks: running from now on, whatever
                    # its Reserve says, so every plan counts those blocks.
                    self._to_running(seq)
            if later:  # fewer free blocks than the plan thought: they wait
                p.scheduled = [(seq, n) for seq, n in p.scheduled if seq not in later]
            if self._memory_down:
                return False
        work = await self._reserve(p)
        if not work:
            return False
        produced = await self._execute(work, epochs)
        self._deliver(produced)
        self.steps += 1
        self.last_step_s = self.clock() - t0
        if self.last_step_s > 0:
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (p.num_tokens / self.last_step_s)
        if self.tuner is not None:
            tuned = self.tuner.observe(sum(b - a for _, a, b, _ in work), self.last_step_s)
            if tuned is not None and (tuned.token_budget, tuned.max_num_seqs) != (self.limits.token_budget,
                                                                               self.limits.max_num_seqs):
                self.limits = Limits(tuned.token_budget, tuned.max_num_seqs, self.config.prefill_chunk)
                log.info("scheduler.autotuned", token_budget=tuned.token_budget,
                         max_num_seqs=tuned.max_num_seqs, step_ms=round(self.tuner.step_s * 1e3, 1))
        return True

    async def _memory(self, call: Awaitable[T]) -> T | None:
        """Await a memory call; None when it failed (the step is abandoned and
        planned again; a dead memory server also pauses the loop until it is back)."""
        with anyio.CancelScope() as scope:
            self._memory_scope = scope
            try:
                return await call
            except Unavailable as exc:
                log.warning("scheduler.memory_unavailable", error=exc.message)
                self._memory_down = True
            except LlmosError as exc:
                log.error("scheduler.memory_failed", error=str(exc))
            finally:
                self._memory_scope = None
        return None

    # -- 1. changes since the last step ---------------------------------------------------

    async def _apply_changes(self) -> None:
        if self._lost_pools or self._lost_ids:
            lost, self._lost_pools = self._lost_pools, set()
            lost_ids, self._lost_ids = self._lost_ids, set()
            requeue_lost(self, lost, lost_ids)
        if self._reregister and not self._memory_down:
            self._reregister = False
            await reregister_live(self)
        if not self._memory_down:
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

    # -- 2./3. plan, release, reserve -----------------------------------------------------

    def _preempt(self, seq: Seq) -> bool:
        """Back to the waiting line (its place kept); True when its KV is to be
        swapped out rather than released for recompute."""
        self.preemptions += 1
        swap = self.config.preemption == PreemptionMode.SWAP and seq.mem_known > 0
        if not swap:
            drop_kv(self, seq)
        self._to_waiting(seq)
        return swap

    def _quota_verdicts(self, p: StepPlan, ledger: BlockLedger) -> None:
        """Refuse the waiting sequences that can never fit their tenant's
        KV-block quota (it was lowered, or learned from the memory server),
        and mark those that wait for room under it."""
        for seq in p.never_fit:
            req: Request = seq.owner
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
        for seq in self.waiting:
            if id(seq) in waits:
                self._waiting_on_quota(seq, ledger.held[seq.tenant], ledger.quotas.get(seq.tenant, -1))
            else:
                seq.owner.waiting_on = ""

    def _waiting_on_quota(self, seq: Seq, held: int, limit: int) -> None:
        req: Request = seq.owner
        req.waiting_on = sp.WAITING_ON_KV_QUOTA
        if not req.quota_logged:
            req.quota_logged = True
            need = lifetime_blocks(seq, {i: d.shape for i, d in self.drivers.items()}) or (0, 0)
            log.info("scheduler.waiting_on_quota", request_id=req.request_id, principal=req.key[0],
                     tenant=seq.tenant, quota=mp.KV_BLOCKS, held=held, limit=limit, needs_blocks=need[0],
                     block_size=need[1], msg="waits until the tenant's other requests free KV blocks")

    def _to_running(self, seq: Seq) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.running.append(seq)
            req: Request = seq.owner
            req.state = State.RUNNING
            req.waiting_on = ""
            req.first_scheduled = req.first_scheduled or time.monotonic()

    def _to_waiting(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.waiting.append(seq)
            req: Request = seq.owner
            req.state = State.WAITING

    async def _reserve(self, p: StepPlan) -> list[tuple[Seq, int, int, list[tuple[int, int]]]]:
        """Reserve slots for the plan; returns (seq, start, end, copies) of the
        sequences that got them."""
        items = []
        for seq, n in p.scheduled:
            first = seq.mem_known == 0
            items.append(mp.SeqReserve(seq.mem_id, seq.mem_known, seq.tokens[seq.mem_known:], n,
                                       seq.tenant if first else "", (seq.pool or "") if first else ""))
        reply = await self._memory(self.backend.reserve(mp.Reserve(items)))
        if not isinstance(reply, mp.ReserveReply):
            return []
        work = []
        for (seq, n), got in zip(p.scheduled, reply.seqs):
            req: Request = seq.owner
            if got.error is not None:
                self._reserve_failed(seq, got.error)
                continue
            if seq.mem_known == 0:
                seq.num_computed = got.num_cached
                req.cached_tokens = max(req.cached_tokens, got.num_cached)
            seq.mem_known = len(seq.tokens)
            del seq.block_table[got.table_start:]
            seq.block_table.extend(got.blocks)
            copies = [(got.cow_src, got.cow_dst)] if got.cow_src >= 0 else []
            start = seq.num_computed
            work.append((seq, start, min(start + n, len(seq.tokens)), copies))
            self._to_running(seq)
        return work

    def _reserve_failed(self, seq: Seq, error: object) -> None:
        code = getattr(error, "code", "")
        message = getattr(error, "message", "")
        detail = getattr(error, "detail", None) or {}
        if code == ErrorCode.OVERLOADED and detail.get("quota") == mp.KV_BLOCKS:
            # Its tenant's quota, not the pool: plan by it from now on (the
            # policy's own, or the memory server's config), so a sequence that
            # can never fit is refused and the others wait in the open.
            limit, held = detail.get("limit"), detail.get("held")
            if isinstance(limit, int) and limit >= 0 and seq.tenant not in self._kv_policy:
                self._kv_learned[seq.tenant] = limit
            if seq in self.waiting:
                self._waiting_on_quota(seq, held if isinstance(held, int) else -1,
                                       limit if isinstance(limit, int) else -1)
        if code == ErrorCode.OVERLOADED:
            # Out of blocks (or over quota): it waits for a later step, and
            # idle sessions' pins on its pool give way (the planner's estimate
            # said it fit; the memory server, which also counts idle cached
            # blocks it would reuse, says not).
            if seq.pool is not None and seq not in self.running:
                self.sessions.short_of_blocks.add(seq.pool)
            return
        if code == ErrorCode.NOT_FOUND and seq.mem_known == 0:
            return  # the memory server does not know the pool yet
        # The memory server lost or disagrees about the sequence: start over.
        log.warning("scheduler.reserve_failed", seq=seq.mem_id, code=str(code), error=message)
        self._fail_once(seq, f"the memory server refused the sequence: {message}")

    def _fail_once(self, seq: Seq, why: str) -> None:
        req: Request = seq.owner
        req.failures += 1
        if req.failures >= MAX_FAILURES:
            self._end(req, sp.FinishReason.ERROR, message=why)
            return
        drop_kv(self, seq)
        self._to_waiting(seq)

    # -- 4. execute ---------------------------------------------------------------------

    async def _execute(self, work: list[tuple[Seq, int, int, list[tuple[int, int]]]], epochs: dict[str, int]
                       ) -> list[tuple[Seq, list[tuple[int, float]]]]:
        by_pool: dict[str, list[tuple[Seq, int, int, list[tuple[int, int]]]]] = {}
        for w in work:
            by_pool.setdefault(w[0].pool or "", []).append(w)
        produced: list[tuple[Seq, list[tuple[int, float]]]] = []
        async with anyio.create_task_group() as tg:
            for pool, items in by_pool.items():
                tg.start_soon(self._execute_on, pool, items, epochs.get(pool, -1), produced)
        return produced

    async def _execute_on(self, pool: str, items: list[tuple[Seq, int, int, list[tuple[int, int]]]], epoch: int,
                          produced: list[tuple[Seq, list[tuple[int, float]]]]) -> None:
        d = self.drivers.get(pool)
        if d is None:
            return  # died since the plan; _apply_changes re-queues them
        if d.epoch != epoch:
            self._lost_pools.add(pool)  # restarted since the plan: its KV is gone
            return
        steps, copies = [], []
        for seq, a, b, cow in items:
            req: Request = seq.owner
            params = req.submit.params
            prior = seq.tokens[:a] if params.repetition_penalty != 1.0 else []
            steps.append(dp.StepSeq(seq.seq_no, seq.tokens[a:b], a, list(seq.block_table),
                                    b == len(seq.tokens), params, prior))
            copies.extend(cow)
        reply: dp.Executed | None = None
        with anyio.CancelScope() as scope:
            d.scope = scope
            try:
                reply = await self.backend.execute(pool, dp.Execute(steps, copies))
            except (Unavailable, DeadlineExceeded) as exc:
                log.warning("scheduler.driver_lost", driver=pool, error=str(exc), seqs=len(items))
            except LlmosError as exc:
                # A live driver refused the whole step: count it against the
                # sequences, so a poisonous one cannot loop forever.
                log.error("scheduler.step_refused", driver=pool, error=str(exc))
                for seq, *_ in items:
                    self._fail_once(seq, f"driver {pool} refused the step: {exc}")
                return
            finally:
                d.scope = None
        # The reply is only good if the driver that ran it is the one whose KV
        # the block tables describe: a restarted driver would answer from empty
        # blocks. Its ServiceDown/ServiceUp reach us before its reply (one
        # connection, in order), and bump the epoch.
        if reply is None or epoch != d.epoch or self.drivers.get(pool) is not d:
            self._lost_pools.add(pool)
            return
        outputs = {o.seq_id: o for o in reply.outputs}
        for seq, a, b, _ in items:
            out = outputs.get(seq.seq_no)
            req = seq.owner
            if out is None or out.error:
                why = out.error if out is not None else "the driver returned no output"
                self._end(req, sp.FinishReason.ERROR, message=f"driver {pool}: {why}")
                continue
            seq.num_computed = b
            if b == len(seq.tokens) and out.token >= 0:
                produced.append((seq, [(out.token, out.logprob)]))

    # -- 5. deliver ---------------------------------------------------------------------

    def _deliver(self, produced: list[tuple[Seq, list[tuple[int, float]]]]) -> None:
        for seq, tokens in produced:
            req: Request = seq.owner
            if req.done.is_set():
                continue
            reason = None
            for token, logprob in tokens:
                seq.tokens.append(token)
                self.tokens_generated += 1
                reason = req.add_token(token, logprob)
                if reason is not None:
                    break
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
            for line in (self.running, self.waiting):
                if seq in line:
                    line.remove(seq)
            self.policy.on_finished(seq)
        if req.session is None:
            if seq.mem_known:
                self._to_release.append(seq.mem_id)
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


__all__ = ["Backend", "Engine", "Model"]
