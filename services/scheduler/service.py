"""The scheduler as a service: the engine loop behind the wire.

It follows the drivers and the memory server through `kernel.services` and
`memory.events`: a driver's ServiceUp makes a pool placeable, its ServiceDown
re-queues that driver's sequences for recompute, and a restarted memory
server gets the live sequences re-registered. At start it tells the memory
server to release everything (a previous scheduler instance's sequences) and
learns the model (tokenizer, EOS ids, context length) from a driver.

Trust: the principal and the token's body-dependent caveats (max_tokens,
session) are the kernel's stamp; rights are checked by the kernel per op, so
what needs a right has an op of its own (`PrioritySubmit`, `AdminList`,
`AdminCancel`). Caveat refusals and operator reads are published as
`AuditNote`s on `security.audit` for the security server's log.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

import anyio
from anyio.abc import TaskGroup

from text.shipped import tokenizer_from_files
from ipc.errors import Forbidden, LlmosError, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import kernel as kp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol import security as secp
from ipc.protocol.base import op_of
from common.logs import get_logger
from sdk.policy import follow_quotas
from sdk.service import Context, Service, handler
from services.scheduler.quotas import QuotaGate
from common.config.scheduler import PolicyName, PreemptionMode, SchedulerConfig, load_scheduler_config
from services.scheduler._linger import linger
from services.scheduler._ipc_backend import MEMORY, IpcBackend
from services.scheduler.engine import Engine, Model
from services.scheduler._history import HistoryStore, Histories
from services.scheduler._job_store import JobStore
from services.scheduler._session_service import SessionHandlers
from services.scheduler.jobs import JobRunner

log = get_logger()

# How long a Submit waits for the scheduler to know its model before `unavailable`.
READY_WAIT_S = 30.0
# After the memory server's ServiceUp, how long to wait for its MemoryRestarted
# before re-registering anyway.
MEMORY_GRACE_S = 5.0
# With a security server up at boot, jobs wait this long for its policy (and
# its revocations) before the first run.
POLICY_WAIT_S = 10.0
# Client-chosen strings copied into an audit note are cut to this.
AUDIT_STR = 128


def scheduler_args(argv: list[str]) -> SchedulerConfig:
    ap = argparse.ArgumentParser(prog="scheduler")
    ap.add_argument("--config", help="TOML file; its [scheduler] table is read (default: the kernel's)")
    ap.add_argument("--policy", choices=[p.value for p in PolicyName])
    ap.add_argument("--token-budget", type=int)
    ap.add_argument("--max-seqs", type=int)
    ap.add_argument("--prefill-chunk", type=int)
    ap.add_argument("--max-waiting", type=int)
    ap.add_argument("--max-waiting-tokens", type=int)
    ap.add_argument("--tpot-target-ms", type=float,
                    help="per-token latency target: auto-tune the token budget and batch cap (0: off)")
    ap.add_argument("--preemption", choices=[m.value for m in PreemptionMode],
                    help="a preempted sequence's KV: recompute it later (default) or swap it to the host tier")
    a = ap.parse_args(argv)
    return load_scheduler_config(a.config, policy=a.policy, preemption=a.preemption, token_budget=a.token_budget,
                                 max_num_seqs=a.max_seqs, prefill_chunk=a.prefill_chunk,
                                 max_waiting=a.max_waiting, max_waiting_tokens=a.max_waiting_tokens,
                                 tpot_target_ms=a.tpot_target_ms)


class SchedulerService(SessionHandlers, Service):
    name = sp.SCHEDULER

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = scheduler_args(sys.argv[1:] if argv is None else argv)
        self.engine = Engine(self.config, IpcBackend(self, self.config.step_timeout_s))
        self.engine.sessions.histories = Histories(HistoryStore(self.home / "sessions"))
        self.quotas = QuotaGate()
        self.jobs = JobRunner(self.engine, JobStore(self.home / "jobs"), max_jobs=self.config.max_jobs,
                              gate=self.quotas, max_finished=self.config.max_finished_jobs)
        self._ready = anyio.Event()
        self._model_wanted = anyio.Event()
        self._policy_seen = anyio.Event()
        self._security_at_boot = False
        self._revoked: frozenset[str] = frozenset()
        self._tg: TaskGroup | None = None

    async def on_start(self) -> None:
        await self.jobs.load()

    async def background(self, tg: TaskGroup) -> None:
        self._tg = tg
        tg.start_soon(self.engine.sessions.histories.flush_forever)  # sessions' history to disk
        services = self.subscribe(kp.SERVICES_TOPIC)
        await services.__anext__()  # Subscribed: no ServiceUp/Down is missed from here on
        memory = self.subscribe(mp.MEMORY_TOPIC)
        await memory.__anext__()
        tg.start_soon(self._follow_services, services, tg)
        tg.start_soon(self._follow_memory, memory)
        st: kp.StatusReply = await self.call(kp.KERNEL, kp.Status())
        for info in st.instances:
            if info.service == dp.DRIVER and info.state == "ready":
                self.engine.driver_up(info.instance, info.meta)
        self._security_at_boot = any(i.service == secp.SECURITY for i in st.instances)
        tg.start_soon(self._boot, tg)
        tg.start_soon(follow_quotas, self, self._apply_policy)

    def _apply_policy(self, policy: secp.QuotaPolicy) -> None:
        """Quotas, and revocations: a revoked principal's live requests and
        jobs are cancelled (the kernel already refuses its tokens)."""
        self.quotas.apply(policy)
        self.engine.set_kv_quotas(self.quotas.kv_blocks())
        revoked = frozenset(policy.revoked)
        newly, self._revoked = revoked - self._revoked, revoked
        self.jobs.revoked = revoked  # no run of theirs starts from here on
        for principal in newly:
            n = self.engine.cancel_principal(principal)
            log.info("scheduler.principal_revoked", principal=principal, cancelled_requests=n)
        if newly and self._tg is not None:
            self._tg.start_soon(self.jobs.revoke, revoked)
        self._policy_seen.set()

    async def _boot(self, tg: TaskGroup) -> None:
        # A clean slate: sequences of a previous scheduler instance are released
        # (their clients re-submit). Retried while the memory server is not up.
        while True:
            try:
                await self.call(MEMORY, mp.Reregister([], replace=True), timeout=30)
                break
            except LlmosError as exc:
                log.warning("scheduler.memory_not_ready", error=str(exc))
                await anyio.sleep(0.5)
        await self._learn_model()
        if self._security_at_boot:
            # Nothing is admitted before the quota policy is known: a restarted
            # scheduler serving at once admitted a tenant past its concurrency
            # quota (the abuse chaos run found it), and a revoked principal's
            # job must not run once before we hear of it.
            with anyio.move_on_after(POLICY_WAIT_S):
                await self._policy_seen.wait()
            if not self._policy_seen.is_set():
                log.warning("scheduler.no_policy", waited_s=POLICY_WAIT_S,
                            msg="serving without the quota policy; it applies when it arrives")
        self._ready.set()
        log.info("scheduler.ready", drivers=sorted(self.engine.state.drivers), policy=self.config.policy.name.value)
        tg.start_soon(self.jobs.run)
        await self.engine.run()

    async def _learn_model(self) -> None:
        while True:
            for instance in sorted(self.engine.state.drivers):
                try:
                    desc: dp.ModelDescription = await self.call(instance, dp.DescribeModel(), timeout=30)
                    tok = await anyio.to_thread.run_sync(
                        lambda: tokenizer_from_files(desc.tokenizer_files, f"driver {instance}",
                                                     eos_token_ids=desc.eos_token_ids,
                                                     bos_token_id=desc.bos_token_id))
                except LlmosError as exc:
                    log.warning("scheduler.describe_failed", driver=instance, error=str(exc))
                    continue
                self.engine.set_model(Model(tok, frozenset(desc.eos_token_ids), desc.max_model_len,
                                            desc.vocab_size))
                log.info("scheduler.model", name=desc.name, max_model_len=desc.max_model_len)
                return
            with anyio.move_on_after(1.0):
                await self._model_wanted.wait()  # a driver came up
            self._model_wanted = anyio.Event()

    async def _follow_services(self, events: Any, tg: TaskGroup) -> None:
        async for ev in events:
            if isinstance(ev, kp.ServiceUp) and ev.service == dp.DRIVER:
                self.engine.driver_up(ev.instance, ev.meta)
                self._model_wanted.set()
            elif isinstance(ev, kp.ServiceDown) and ev.service == dp.DRIVER:
                self.engine.driver_down(ev.instance)
            elif isinstance(ev, kp.ServiceDown) and ev.service == MEMORY:
                self.engine.memory_down()
            elif isinstance(ev, kp.ServiceUp) and ev.service == MEMORY:
                tg.start_soon(self._memory_grace)

    async def _memory_grace(self) -> None:
        await anyio.sleep(MEMORY_GRACE_S)
        if self.engine.memory_is_down:
            log.warning("scheduler.memory_restart_unannounced")
            self.engine.memory_restarted()

    async def _follow_memory(self, events: Any) -> None:
        async for ev in events:
            if isinstance(ev, mp.MemoryRestarted):
                self.engine.memory_restarted()
            elif isinstance(ev, mp.PoolLost):
                self.engine.seqs_lost(ev.pool, ev.seq_ids)

    async def _until_ready(self) -> None:
        with anyio.move_on_after(READY_WAIT_S):
            await self._ready.wait()
        if not self._ready.is_set():
            raise Unavailable("the scheduler is not ready: no driver or memory server is up")

    @handler
    async def submit(self, msg: sp.Submit, ctx: Context) -> sp.Finished:
        if msg.priority < 0:
            self._refuse(ctx, "priority", "Submit", Forbidden(
                f"priority {msg.priority} would run ahead of the default (0): that needs the `priority` "
                "right, as a PrioritySubmit", detail={"field": "priority"}))
        return await self._submit(msg, ctx)

    @handler
    async def priority_submit(self, msg: sp.PrioritySubmit, ctx: Context) -> sp.Finished:
        # The kernel let it through: the token holds `priority` (or `admin`).
        return await self._submit(msg, ctx)

    async def _submit(self, msg: sp.Submit, ctx: Context) -> sp.Finished:
        self._check_restrictions(msg, ctx, op_of(msg))
        known = self.engine.submitted(ctx.principal, msg.request_id) if msg.request_id else None
        if known is not None:
            # Re-attaching reads that request's stream: the caller's caveats
            # must cover the request as it was submitted, not only this message.
            self._check_restrictions(known, ctx, op_of(msg))
        msg.validate()
        await self._until_ready()
        if msg.session:  # its history loaded; BOS only if it opens the conversation
            msg = await self.session_turn(msg, ctx.principal, known)
        prompt_ids = await self._tokenize(msg)
        sink = self.engine.submit(msg, ctx.principal, ctx.emit, prompt_ids)
        rid = sink.request.request_id
        if not sink.attached:
            # Synchronously after submit, before the engine's next step: a
            # refused request never runs. The charge lasts as long as the
            # request, whichever stream is attached to it.
            try:
                self.quotas.charge(ctx.principal, sink.request)
            except LlmosError:
                self.engine.cancel(ctx.principal, rid)
                raise
        log.info("scheduler.submitted", request_id=rid, principal=ctx.principal, attached=sink.attached,
                 attempt=msg.attempt, prompt_tokens=len(sink.request.prompt_ids), resume_from=msg.resume_from)
        try:
            done = await sink.wait()
            if msg.session:
                await self.turn_done(msg, ctx.principal)
            log.info("scheduler.finished", request_id=rid, reason=str(done.finish_reason),
                     tokens=done.offset + len(done.token_ids))
            return done
        except anyio.get_cancelled_exc_class():
            # The kernel cancelled this handler: the requester is gone (or we
            # are stopping). Unless a re-submission took the stream over,
            # nobody will read the tokens: stop generating and free the blocks
            # (after `linger_s`, for a request its client may come back to).
            if not sink.superseded:
                if msg.linger_s > 0 and self._tg is not None and not sink.request.done.is_set():
                    self._tg.start_soon(linger, sink, msg.linger_s, lambda: self.engine.cancel(ctx.principal, rid))
                else:
                    self.engine.cancel(ctx.principal, sink.request.request_id)
            raise

    async def _tokenize(self, msg: sp.Submit) -> list[int]:
        """The prompt's ids: its size is checked first (O(1)); text, however
        short, is tokenized in a worker thread so the loop never does
        (services/scheduler/_text.py says why)."""
        if msg.prompt_ids:
            return self.engine.tokenize(msg)  # a copy of the ids: no tokenizer
        self.engine.check_prompt_size(msg)
        return await anyio.to_thread.run_sync(self.engine.tokenize, msg)

    @handler(idempotent=True)
    async def cancel(self, msg: sp.Cancel, ctx: Context) -> sp.CancelReply:
        self._check_request_session(msg.request_id, ctx, "Cancel")
        return sp.CancelReply(msg.request_id, self.engine.cancel(ctx.principal, msg.request_id))

    @handler(idempotent=True)
    async def status(self, msg: sp.RequestStatus, ctx: Context) -> sp.RequestInfo:
        self._check_request_session(msg.request_id, ctx, "RequestStatus")
        return self.engine.request_info(ctx.principal, msg.request_id)

    @handler(idempotent=True)
    async def stats(self, msg: sp.SchedulerStats, ctx: Context) -> sp.SchedulerStatsReply:
        return self.engine.stats()

    @handler(idempotent=True)  # with a job_id (the SDK always sends one) a repeat is harmless
    async def submit_job(self, msg: jp.SubmitJob, ctx: Context) -> jp.JobInfo:
        self._check_restrictions(msg.request, ctx, "SubmitJob")
        if msg.request.priority < 0:
            self._refuse(ctx, "priority", "SubmitJob", Forbidden(
                f"a job runs at priority >= 0 (got {msg.request.priority})", detail={"field": "priority"}))
        await self._until_ready()  # the model's context is known: nothing past it is stored
        self.engine.check_prompt_size(msg.request)
        return await self.jobs.submit(msg, ctx.principal)

    @handler(idempotent=True)
    async def list_jobs(self, msg: jp.ListJobs, ctx: Context) -> jp.JobList:
        return self.jobs.list(ctx.principal, ctx.restrictions.session)

    @handler(idempotent=True)
    async def get_job(self, msg: jp.GetJob, ctx: Context) -> jp.JobInfo:
        return await self.jobs.get(ctx.principal, msg.job_id, msg.last, ctx.restrictions.session)

    @handler(idempotent=True)
    async def cancel_job(self, msg: jp.CancelJob, ctx: Context) -> jp.JobInfo:
        return await self.jobs.cancel(ctx.principal, msg.job_id, ctx.restrictions.session)

    # Only an admin token reaches these (the kernel's rights check: see AdminList).

    @handler(idempotent=True)
    async def admin_list(self, msg: jp.AdminList, ctx: Context) -> jp.JobList:
        listing = self.jobs.list_all(msg.principal)
        self._audit(ctx, "jobs.list_all", "AdminList", "ok",
                    {"owner": msg.principal[:AUDIT_STR], "jobs": len(listing.jobs)})
        return listing

    @handler(idempotent=True)
    async def admin_cancel(self, msg: jp.AdminCancel, ctx: Context) -> jp.JobInfo:
        try:
            info = await self.jobs.cancel(msg.principal, msg.job_id, why=f"cancelled by {ctx.principal!r}")
        except LlmosError as exc:
            self._audit(ctx, "jobs.cancel_any", "AdminCancel", str(exc.code),
                        {"owner": msg.principal[:AUDIT_STR], "job_id": msg.job_id[:AUDIT_STR]})
            raise
        self._audit(ctx, "jobs.cancel_any", "AdminCancel", "ok",
                    {"owner": msg.principal[:AUDIT_STR], "job_id": msg.job_id[:AUDIT_STR]})
        return info

    def _check_restrictions(self, msg: sp.Submit, ctx: Context, op: str) -> None:
        """The caller's token caveats that depend on the request (max_tokens, session)."""
        r = ctx.restrictions
        if r.max_tokens and msg.max_tokens > r.max_tokens:
            self._refuse(ctx, "caveat", op, Forbidden(
                f"this capability allows at most {r.max_tokens} tokens per request (asked {msg.max_tokens})",
                detail={"field": "max_tokens"}))
        self._check_session(msg.session, ctx, op)

    def _check_session(self, session: str, ctx: Context, op: str) -> None:
        confined = ctx.restrictions.session
        if confined and session != confined:
            self._refuse(ctx, "caveat", op, Forbidden(f"this capability is confined to session {confined!r}",
                                                      detail={"field": "session"}))

    def _check_request_session(self, request_id: str, ctx: Context, op: str) -> None:
        """A token confined to a session reaches only that session's requests."""
        confined = ctx.restrictions.session
        if not confined:
            return
        session = self.engine.session_of(ctx.principal, request_id)
        if session is not None and session != confined:
            self._refuse(ctx, "caveat", op, Forbidden(
                f"this capability is confined to session {confined!r}; request {request_id!r} is not in it",
                detail={"field": "request_id"}))

    def _refuse(self, ctx: Context, action: str, op: str, exc: LlmosError) -> NoReturn:
        field = exc.detail.get("field", "") if exc.detail else ""
        self._audit(ctx, action, op, str(exc.code), {"field": str(field), "reason": exc.message[:AUDIT_STR]})
        raise exc

    def _audit(self, ctx: Context, action: str, op: str, outcome: str,
               detail: dict[str, str | int | float | bool]) -> None:
        note = secp.AuditNote(ctx.principal, action, f"{sp.SCHEDULER}:{op}", outcome, self.instance, detail)
        try:
            self.publish(secp.AUDIT_TOPIC, note)
        except LlmosError as exc:  # not connected: the refusal stands, the note is lost (and logged)
            log.warning("scheduler.audit_unsent", action=action, error=str(exc))
        log.info("scheduler.audit", action=action, op=op, principal=ctx.principal, outcome=outcome)


__all__ = ["SchedulerService"]
