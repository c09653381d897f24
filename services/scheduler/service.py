"""The scheduler as a service: the engine loop behind the wire.

It follows the drivers and the memory server through `kernel.services` and
`memory.events`: a driver's ServiceUp makes a pool placeable, its ServiceDown
re-queues that driver's sequences for recompute, and a restarted memory
server gets the live sequences re-registered. At start it tells the memory
server to release everything (a previous scheduler instance's sequences) and
learns the model (tokenizer, EOS ids, context length) from a driver.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio
from anyio.abc import TaskGroup

from drivers.model.tokenizer import load_tokenizer
from ipc.errors import Forbidden, LlmosError, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import kernel as kp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from sdk.logs import get_logger
from sdk.policy import follow_quotas
from sdk.service import Context, Service, handler
from services.scheduler.quotas import QuotaGate
from services.scheduler.config import PolicyName, PreemptionMode, SchedulerConfig, load_scheduler_config
from services.scheduler.engine import Engine, Model
from services.scheduler.jobs import JobRunner, JobStore

log = get_logger()

MEMORY = "memory"
# How long a Submit waits for the scheduler to know its model before `unavailable`.
READY_WAIT_S = 30.0
# After the memory server's ServiceUp, how long to wait for its MemoryRestarted
# before re-registering anyway.
MEMORY_GRACE_S = 5.0


def scheduler_args(argv: list[str]) -> SchedulerConfig:
    ap = argparse.ArgumentParser(prog="scheduler")
    ap.add_argument("--config", default=os.environ.get("LLMOS_CONFIG"),
                    help="TOML file; its [scheduler] table is read (default: the kernel's, $LLMOS_CONFIG)")
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


class IpcBackend:
    """The engine's memory and driver calls, over the kernel."""

    def __init__(self, service: Service, timeout_s: float):
        self.service = service
        self.timeout_s = timeout_s

    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply:
        reply: mp.ReserveReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def release(self, req: mp.Release) -> mp.ReleaseReply:
        reply: mp.ReleaseReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply:
        reply: mp.ReregisterReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        # Addressed to the instance: the block tables describe its KV only.
        reply: dp.Executed = await self.service.call(instance, req, timeout=self.timeout_s)
        return reply

    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply:
        reply: mp.SwapOutReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply:
        reply: mp.SwapInReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        reply: dp.Swapped = await self.service.call(instance, req, timeout=self.timeout_s)
        return reply


class SchedulerService(Service):
    name = sp.SCHEDULER

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = scheduler_args(sys.argv[1:] if argv is None else argv)
        self.engine = Engine(self.config, IpcBackend(self, self.config.step_timeout_s))
        self.quotas = QuotaGate()
        self.jobs = JobRunner(self.engine, JobStore(self.home / "jobs"), max_jobs=self.config.max_jobs,
                              gate=self.quotas)
        self._ready = anyio.Event()
        self._model_wanted = anyio.Event()

    async def on_start(self) -> None:
        await self.jobs.load()

    async def background(self, tg: TaskGroup) -> None:
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
        tg.start_soon(self._boot, tg)
        tg.start_soon(follow_quotas, self, self.quotas.apply)

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
        self._ready.set()
        log.info("scheduler.ready", drivers=sorted(self.engine.drivers), policy=self.config.policy.name.value)
        tg.start_soon(self.jobs.run)
        await self.engine.run()

    async def _learn_model(self) -> None:
        while True:
            for instance in sorted(self.engine.drivers):
                try:
                    desc: dp.ModelDescription = await self.call(instance, dp.DescribeModel(), timeout=30)
                    tok = await anyio.to_thread.run_sync(
                        lambda: load_tokenizer(desc.path, eos_token_ids=desc.eos_token_ids,
                                               bos_token_id=desc.bos_token_id))
                except LlmosError as exc:
                    log.warning("scheduler.describe_failed", driver=instance, error=str(exc))
                    continue
                self.engine.set_model(Model(tok, frozenset(desc.eos_token_ids), desc.max_model_len))
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
                self.engine.seqs_lost(ev.seq_ids)

    async def _until_ready(self) -> None:
        with anyio.move_on_after(READY_WAIT_S):
            await self._ready.wait()
        if not self._ready.is_set():
            raise Unavailable("the scheduler is not ready: no driver or memory server is up")

    @handler
    async def submit(self, msg: sp.Submit, ctx: Context) -> sp.Finished:
        check_restrictions(msg, ctx)
        await self._until_ready()
        sink = self.engine.submit(msg, ctx.principal, ctx.emit)
        rid = sink.request.request_id
        charged = msg.attempt == 0 and not sink.request.generated
        if charged:
            # Synchronously after submit, before the engine's next step: a
            # refused request never runs.
            try:
                self.quotas.admit(ctx.principal, len(sink.request.prompt_ids) + msg.max_tokens)
            except LlmosError:
                self.engine.cancel(ctx.principal, rid)
                raise
        log.info("scheduler.submitted", request_id=rid, principal=ctx.principal, attempt=msg.attempt,
                 prompt_tokens=len(sink.request.prompt_ids), resume_from=msg.resume_from)
        try:
            done = await sink.wait()
            log.info("scheduler.finished", request_id=rid, reason=str(done.finish_reason),
                     tokens=done.offset + len(done.token_ids))
            return done
        except anyio.get_cancelled_exc_class():
            # The kernel cancelled this handler: the requester is gone (or we
            # are stopping). Unless a re-submission took the stream over,
            # nobody will read the tokens: stop generating and free the blocks.
            if not sink.superseded:
                self.engine.cancel(ctx.principal, sink.request.request_id)
            raise
        finally:
            if charged:
                self.quotas.done(ctx.principal)

    @handler(idempotent=True)
    async def cancel(self, msg: sp.Cancel, ctx: Context) -> sp.CancelReply:
        return sp.CancelReply(msg.request_id, self.engine.cancel(ctx.principal, msg.request_id))

    @handler(idempotent=True)
    async def status(self, msg: sp.RequestStatus, ctx: Context) -> sp.RequestInfo:
        return self.engine.request_info(ctx.principal, msg.request_id)

    @handler(idempotent=True)
    async def stats(self, msg: sp.SchedulerStats, ctx: Context) -> sp.SchedulerStatsReply:
        return self.engine.stats()

    @handler(idempotent=True)
    async def suspend_session(self, msg: sp.SuspendSession, ctx: Context) -> sp.SessionInfo:
        check_session(msg.session, ctx)
        return self.engine.sessions.suspend(ctx.principal, msg.session)

    @handler(idempotent=True)
    async def resume_session(self, msg: sp.ResumeSession, ctx: Context) -> sp.SessionInfo:
        check_session(msg.session, ctx)
        return self.engine.sessions.resume(ctx.principal, msg.session)

    @handler(idempotent=True)
    async def close_session(self, msg: sp.CloseSession, ctx: Context) -> sp.SessionInfo:
        check_session(msg.session, ctx)
        return self.engine.sessions.close(ctx.principal, msg.session)

    @handler(idempotent=True)
    async def get_session(self, msg: sp.GetSession, ctx: Context) -> sp.SessionInfo:
        check_session(msg.session, ctx)
        return self.engine.sessions.get(ctx.principal, msg.session).info()

    @handler(idempotent=True)  # with a job_id (the SDK always sends one) a repeat is harmless
    async def submit_job(self, msg: sp.SubmitJob, ctx: Context) -> sp.JobInfo:
        check_restrictions(msg.request, ctx)
        return await self.jobs.submit(msg, ctx.principal)

    @handler(idempotent=True)
    async def list_jobs(self, msg: sp.ListJobs, ctx: Context) -> sp.JobList:
        return self.jobs.list(ctx.principal)

    @handler(idempotent=True)
    async def get_job(self, msg: sp.GetJob, ctx: Context) -> sp.JobInfo:
        return await self.jobs.get(ctx.principal, msg.job_id, msg.last)

    @handler(idempotent=True)
    async def cancel_job(self, msg: sp.CancelJob, ctx: Context) -> sp.JobInfo:
        return await self.jobs.cancel(ctx.principal, msg.job_id)


def check_restrictions(msg: sp.Submit, ctx: Context) -> None:
    """The caller's token caveats that depend on the request (max_tokens, session)."""
    r = ctx.restrictions
    if r.max_tokens and msg.max_tokens > r.max_tokens:
        raise Forbidden(f"this capability allows at most {r.max_tokens} tokens per request",
                        detail={"field": "max_tokens"})
    check_session(msg.session, ctx)


def check_session(session: str, ctx: Context) -> None:
    confined = ctx.restrictions.session
    if confined and session != confined:
        raise Forbidden(f"this capability is confined to session {confined!r}", detail={"field": "session"})


__all__ = ["SchedulerService"]
