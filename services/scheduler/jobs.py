"""Timed and periodic jobs: a generation run at a time and/or every interval,
its results kept under ``$LLMOS_HOME/jobs``.

Job ids are per principal: two tenants may both have a job "daily", and
neither can see, guess or squat the other's. On disk, per job, in its
directory (`job_dir`: the job id, prefixed with a hash of the principal when
there is one): ``job.json`` (the spec and schedule, replaced atomically) and
``runs.jsonl`` (one `JobRun` per line, append-only). Finished jobs (done,
cancelled, failed) are kept up to `max_finished` per principal, oldest
pruned first.
A run's number is its identity: job.json records that run N began before it
is submitted to the engine, runs.jsonl that it ended. A run that began but
did not end (the scheduler died) is run again under the same number by the
next scheduler, so every run is recorded exactly once. A torn last line (a
crash mid-append) is ignored, and that run is run again.

Schedule: fixed rate from `at_ns`; the runs of one job never overlap; runs
missed while no scheduler was up are not made up in a burst (the job runs
once, then keeps its phase).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

import anyio
import msgspec

from ipc.errors import BadRequest, Forbidden, LlmosError, NotFound, Overloaded, Unavailable
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol.base import Message
from common.logs import get_logger
from services.scheduler._job_store import JobRecord, JobStore, job_dir
from services.scheduler.engine import Engine

log = get_logger()

# How long a run that could not start (no model yet, queue full) waits before trying again.
RETRY_S = 1.0


class Gate(Protocol):
    """Per-principal admission (the scheduler's quotas): a run is charged
    like any request of its owner."""

    def admit(self, principal: str, tokens: int) -> None: ...
    def done(self, principal: str) -> None: ...


@dataclass
class Job:
    record: JobRecord
    finished: int  # the highest run number recorded
    dir: str = ""  # its directory in the store
    running: int = 0  # the run in flight (0: none)
    request_id: str = ""
    retry_ns: int = 0  # a run that could not start waits until then
    attempts: int = 0  # engine submissions of runs by this scheduler (each its own request id)

    @property
    def state(self) -> jp.JobState:
        r = self.record
        if r.cancelled and not self.running:
            return jp.JobState.CANCELLED  # `error` may say by whom (a revocation, an operator)
        if r.error and not r.cancelled:
            return jp.JobState.FAILED
        if self.running:
            return jp.JobState.RUNNING
        if self.exhausted:
            return jp.JobState.DONE
        return jp.JobState.SCHEDULED

    @property
    def exhausted(self) -> bool:
        r = self.record
        limit = 1 if not r.every_s else r.max_runs
        return bool(limit) and self.finished >= limit

    @property
    def due_ns(self) -> int | None:
        """When the next run may start (None: no run is due any more)."""
        r = self.record
        if self.running or r.cancelled or r.error or self.exhausted:
            return None
        if r.started > self.finished:
            return self.retry_ns  # an unfinished run: again, at once
        return max(r.next_run_ns, self.retry_ns)

    @property
    def key(self) -> tuple[str, str]:
        return (self.record.principal, self.record.job_id)

    def info(self, results: list[jp.JobRun] | None = None, *, owner: bool = False) -> jp.JobInfo:
        r = self.record
        due = self.due_ns
        return jp.JobInfo(r.job_id, self.state, r.name, r.at_ns, r.every_s, r.max_runs, r.created_ns,
                          due or 0, self.finished, r.error, results or [], r.principal if owner else "")


class JobRunner:
    """Keeps the jobs and runs them through the engine, one task per run in
    the runner's task group."""

    def __init__(self, engine: Engine, store: JobStore, *, max_jobs: int = 1024, gate: Gate | None = None,
                 max_finished: int = 256):
        self.engine = engine
        self.store = store
        self.max_jobs = max_jobs
        self.max_finished = max_finished
        self.gate = gate
        self.jobs: dict[tuple[str, str], Job] = {}  # (principal, job id) →
        # Principals revoked by the security server: their jobs are cancelled
        # and none of their runs starts.
        self.revoked: frozenset[str] = frozenset()
        self._wake = anyio.Event()
        # One save at a time: each writes the record as it is then, and the
        # last write must be the latest state.
        self._save_lock = anyio.Lock()

    async def load(self) -> None:
        for rec, runs, name in await anyio.to_thread.run_sync(self.store.load_all):
            job = Job(rec, max(runs, default=0), name)
            self.jobs[job.key] = job
        log.info("jobs.loaded", jobs=len(self.jobs), active=sum(1 for j in self.jobs.values() if j.due_ns is not None))

    async def submit(self, msg: jp.SubmitJob, principal: str) -> jp.JobInfo:
        msg.validate()
        job_id = msg.job_id or os.urandom(12).hex()
        if "/" in job_id or "\x00" in job_id or job_id.startswith("."):
            raise BadRequest("job_id must not contain '/' or NUL or start with '.'", detail={"field": "job_id"})
        request = msgspec.structs.replace(msg.request, request_id="", attempt=0, deadline_ns=0)
        known = self.jobs.get((principal, job_id))
        if known is not None:
            if known.record.request != request:
                raise BadRequest(f"job id {job_id!r} is in use by another job", detail={"field": "job_id"})
            return known.info()  # a re-submission
        name = job_dir(principal, job_id)
        if any(j.dir == name for j in self.jobs.values()):  # a job of an older layout holds it
            raise BadRequest(f"job id {job_id!r} is in use by another job", detail={"field": "job_id"})
        if sum(1 for j in self.jobs.values() if j.record.principal == principal and j.due_ns is not None) \
                >= self.max_jobs:
            raise Overloaded(f"at most {self.max_jobs} active jobs per principal")
        now = time.time_ns()
        rec = JobRecord(job_id=job_id, principal=principal, request=request, at_ns=msg.at_ns or now,
                        every_s=msg.every_s, max_runs=msg.max_runs, name=msg.name, created_ns=now,
                        next_run_ns=msg.at_ns or now)
        job = Job(rec, 0, name)
        await self._save(job)
        self.jobs[job.key] = job
        await self._prune(principal)
        self.wake()
        log.info("jobs.submitted", job_id=job_id, principal=principal, every_s=msg.every_s)
        return job.info()

    def list(self, principal: str, session: str = "") -> jp.JobList:
        """`principal`'s jobs (with `session`: only that session's, for a
        token confined to it)."""
        return jp.JobList([j.info() for j in self.jobs.values() if self._visible(j, principal, session)])

    def list_all(self, principal: str = "") -> jp.JobList:
        """Every principal's jobs (or one's), with their owners: the operator's view."""
        return jp.JobList([j.info(owner=True) for j in self.jobs.values()
                           if not principal or j.record.principal == principal])

    async def get(self, principal: str, job_id: str, last: int, session: str = "") -> jp.JobInfo:
        job = self._job(principal, job_id, session)
        results = await anyio.to_thread.run_sync(self.store.read_runs, job.dir, last)
        return job.info(results)

    async def cancel(self, principal: str, job_id: str, session: str = "", *, why: str = "") -> jp.JobInfo:
        job = self._job(principal, job_id, session)
        await self._cancel(job, why)
        return job.info()

    async def _cancel(self, job: Job, why: str = "") -> None:
        if not job.record.cancelled and job.state not in (jp.JobState.DONE, jp.JobState.FAILED):
            job.record.cancelled = True
            if why:
                job.record.error = job.record.error or why
            await self._save(job)
            if job.running:
                self.engine.cancel(job.record.principal, job.request_id)
            self.wake()
            await self._prune(job.record.principal)

    async def revoke(self, principals: frozenset[str]) -> None:
        """The security server revoked these principals: no run of theirs
        starts from now on, and their jobs are cancelled for good."""
        self.revoked = principals
        for job in [j for j in self.jobs.values() if j.record.principal in principals]:
            await self._cancel(job, f"principal {job.record.principal!r} was revoked")
        log.info("jobs.revoked", principals=len(principals))

    def _visible(self, job: Job, principal: str, session: str = "") -> bool:
        return job.record.principal == principal and (not session or job.record.request.session == session)

    def _job(self, principal: str, job_id: str, session: str = "") -> Job:
        job = self.jobs.get((principal, job_id))
        if job is None or not self._visible(job, principal, session):
            raise NotFound(f"no job {job_id!r}", detail={"job_id": job_id})
        return job

    async def _prune(self, principal: str) -> None:
        """Keep at most `max_finished` finished jobs of `principal`, dropping
        the oldest (its directory too)."""
        ended = sorted((j for j in self.jobs.values()
                        if j.record.principal == principal and j.due_ns is None and not j.running),
                       key=lambda j: j.record.created_ns)
        for job in ended[:max(0, len(ended) - self.max_finished)]:
            del self.jobs[job.key]
            async with self._save_lock:
                await anyio.to_thread.run_sync(self.store.remove, job.dir)
            log.info("jobs.pruned", job_id=job.record.job_id, principal=principal)

    def wake(self) -> None:
        self._wake.set()

    async def _save(self, job: Job) -> None:
        data = self.store.encode(job.record)  # the state as of now, not as of the write
        async with self._save_lock:
            await anyio.to_thread.run_sync(self.store.write_record, job.dir, data)

    async def run(self) -> None:
        """Start every due run; sleep until the next is due or a job changes."""
        async with anyio.create_task_group() as tg:
            while True:
                now = time.time_ns()
                soonest = math.inf
                for job in list(self.jobs.values()):
                    due = job.due_ns
                    if due is None or job.record.principal in self.revoked:
                        continue
                    if due <= now:
                        job.running = job.finished + 1
                        tg.start_soon(self._run, job)
                    else:
                        soonest = min(soonest, due)
                with anyio.move_on_after((soonest - now) / 1e9):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def _run(self, job: Job) -> None:
        rec, n = job.record, job.running
        try:
            if rec.started < n:
                rec.started, rec.started_due_ns = n, rec.next_run_ns
                rec.next_run_ns = _next_run(rec, time.time_ns())
                await self._save(job)
            result = await self._generate(job, n, rec.started_due_ns)
            if result is None:
                return  # could not start: try again later
            await anyio.to_thread.run_sync(self.store.append_run, job.dir, result)
            job.finished = max(job.finished, n)
            log.info("jobs.ran", job_id=rec.job_id, run=n, reason=result.finish_reason)
        except OSError as exc:
            # The disk refused: the run is not recorded, so it runs again.
            log.error("jobs.store_failed", job_id=rec.job_id, error=str(exc))
            job.retry_ns = time.time_ns() + int(RETRY_S * 1e9)
        except Exception:  # a bug in one run must not stop the scheduler's other work
            log.exception("jobs.run_failed", job_id=rec.job_id, run=n)
            job.retry_ns = time.time_ns() + int(RETRY_S * 1e9)
        finally:
            job.running = 0
            job.request_id = ""
            self.wake()
        if job.due_ns is None and job.key in self.jobs:
            await self._prune(rec.principal)

    async def _generate(self, job: Job, n: int, due: int) -> jp.JobRun | None:
        rec = job.record
        if rec.principal in self.revoked:
            return None  # revoked while it was due: `revoke` cancels the job
        job.attempts += 1
        request = msgspec.structs.replace(rec.request, request_id=f"job-{rec.job_id}-{n}.{job.attempts}")
        ids: list[int] = []
        text: list[str] = []

        def collect(ev: Message) -> None:
            if isinstance(ev, sp.TokenDelta):
                ids.extend(ev.token_ids)
                text.append(ev.text)

        started = time.time_ns()
        try:
            # Its text is tokenized in a worker thread, never on the loop (_text.py).
            ids_in = None if request.prompt_ids else await anyio.to_thread.run_sync(self.engine.tokenize, request)
            sink = self.engine.submit(request, rec.principal, collect, ids_in)
        except (Overloaded, Unavailable) as exc:
            job.retry_ns = time.time_ns() + int(RETRY_S * 1e9)
            log.warning("jobs.deferred", job_id=rec.job_id, run=n, error=exc.message)
            return None
        except (BadRequest, Forbidden) as exc:
            # The request will never run (e.g. the prompt no longer fits the model).
            rec.error = exc.message
            await self._save(job)
            return jp.JobRun(n, due, started, time.time_ns(), sp.FinishReason.ERROR.value, error=exc.message)
        gate = self.gate
        if gate is not None and not sink.attached and not sink.request.done.is_set():
            try:
                gate.admit(rec.principal, len(sink.request.prompt_ids) + request.max_tokens)
                # Held until the request ends, whichever stream is attached to it.
                sink.request.on_finish.append(lambda: gate.done(rec.principal))
            except Overloaded as exc:
                # Over its owner's quota: not now (synchronously after submit, so it never ran).
                self.engine.cancel(rec.principal, request.request_id)
                job.retry_ns = time.time_ns() + int(max(RETRY_S, float(exc.detail.get("retry_after_s", 0))) * 1e9)
                log.warning("jobs.deferred", job_id=rec.job_id, run=n, error=exc.message)
                return None
        job.request_id = request.request_id
        try:
            done = await sink.wait()
        except LlmosError as exc:  # e.g. its deadline passed before the first token
            return jp.JobRun(n, due, started, time.time_ns(), sp.FinishReason.ERROR.value, error=exc.message)
        return jp.JobRun(n, due, started, time.time_ns(), done.finish_reason.value, "".join(text) + done.text,
                         ids + list(done.token_ids), done.usage, done.error)


def _next_run(rec: JobRecord, now: int) -> int:
    """The due time after the current one: the next point of the job's
    period that lies in the future (one-shot jobs: unchanged)."""
    if not rec.every_s:
        return rec.next_run_ns
    period = int(rec.every_s * 1e9)
    nxt = rec.next_run_ns + period
    if nxt <= now:
        nxt += period * ((now - nxt) // period + 1)
    return nxt


__all__ = ["Job", "JobRunner"]
