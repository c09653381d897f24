"""Timed and periodic jobs over the real engine loop with a fake paged driver:
schedule, results on disk, restart, cancel. No sockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from ipc.errors import BadRequest, Overloaded
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol.sampling import SamplingParams
from services.scheduler.engine import Engine
from services.scheduler._job_store import JobRecord, JobStore, job_dir
from services.scheduler.jobs import JobRunner, _next_run
from tests.helpers.scheduler_fakes import expected, running

GREEDY = SamplingParams(temperature=0.0)


def job(prompt: str = "tick", max_tokens: int = 6, **kw: object) -> jp.SubmitJob:
    return jp.SubmitJob(sp.Submit(prompt, params=GREEDY, max_tokens=max_tokens, ignore_eos=True), **kw)  # type: ignore[arg-type]


class Gate:
    """Quotas as the scheduler's `QuotaGate` applies them: refuses the first
    `refuse` admissions."""

    def __init__(self, refuse: int):
        self.refuse = refuse
        self.admitted: list[tuple[str, int]] = []
        self.running = 0

    def admit(self, principal: str, tokens: int) -> None:
        if self.refuse:
            self.refuse -= 1
            raise Overloaded("over quota", detail={"retry_after_s": 0.01})
        self.admitted.append((principal, tokens))
        self.running += 1

    def done(self, principal: str) -> None:
        self.running -= 1


@asynccontextmanager
async def runner(engine: Engine, root: Path, gate: Gate | None = None) -> AsyncIterator[JobRunner]:
    r = JobRunner(engine, JobStore(root), gate=gate)
    await r.load()
    async with anyio.create_task_group() as tg:
        tg.start_soon(r.run)
        yield r
        tg.cancel_scope.cancel()


async def until_runs(r: JobRunner, job_id: str, n: int, timeout: float = 10.0) -> jp.JobInfo:
    with anyio.fail_after(timeout):
        while (info := await r.get("", job_id, 0)).runs < n:
            await anyio.sleep(0.01)
    return info


async def test_a_periodic_job_runs_on_its_period_and_keeps_every_result(tmp_path: Path) -> None:
    async with running() as (engine, _), runner(engine, tmp_path) as r:
        start = time.time_ns()
        info = await r.submit(job(every_s=0.1, max_runs=3, job_id="p"), "")
        assert info.state in (jp.JobState.SCHEDULED, jp.JobState.RUNNING)
        done = await until_runs(r, "p", 3)
        assert done.state == jp.JobState.DONE and done.next_run_ns == 0
        assert [x.run for x in done.results] == [1, 2, 3]
        want = expected("tick", 6)
        assert all(x.token_ids == want and x.finish_reason == "length" for x in done.results)
        # Fixed rate from the first due time; no run starts before it is due.
        dues = [x.due_ns for x in done.results]
        assert dues[0] >= start and all(b - a >= int(0.1e9) for a, b in zip(dues, dues[1:]))
        assert all(x.started_ns >= x.due_ns for x in done.results)
        assert [j.job_id for j in r.list("").jobs] == ["p"] and r.list("someone else").jobs == []
        assert len((tmp_path / "p" / "runs.jsonl").read_bytes().splitlines()) == 3


async def test_a_timed_job_waits_for_its_time_and_runs_once(tmp_path: Path) -> None:
    async with running() as (engine, _), runner(engine, tmp_path) as r:
        at = time.time_ns() + int(0.3e9)
        await r.submit(job(at_ns=at, job_id="t"), "")
        info = await r.get("", "t", 0)
        assert info.runs == 0 and info.next_run_ns == at
        done = await until_runs(r, "t", 1)
        assert done.state == jp.JobState.DONE and len(done.results) == 1
        assert done.results[0].started_ns >= at


async def test_a_new_runner_reruns_the_interrupted_run_once_and_keeps_the_period(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    now = time.time_ns()
    request = msgspec.structs.replace(job().request, request_id="", attempt=0)
    # What a scheduler killed during run 2 leaves: run 1 recorded, run 2 begun,
    # and a torn line from a crash mid-append.
    rec = JobRecord(job_id="k", principal="", request=request, at_ns=now, every_s=0.1, max_runs=4,
                    created_ns=now, next_run_ns=now + int(0.1e9), started=2, started_due_ns=now)
    store.write_record(job_dir(rec.principal, rec.job_id), store.encode(rec))
    store.append_run("k", jp.JobRun(1, now - int(0.1e9), now, now, "length", "x", [1]))
    with open(tmp_path / "k" / "runs.jsonl", "ab") as f:
        f.write(b'[2, 1, 2, 3, "len')
    async with running() as (engine, _), runner(engine, tmp_path) as r:
        done = await until_runs(r, "k", 4)
    assert [x.run for x in done.results] == [1, 2, 3, 4]
    assert done.results[1].due_ns == now  # run 2 keeps the due time it had
    assert [x.run for x in JobStore(tmp_path).read_runs("k")] == [1, 2, 3, 4]


async def test_cancel_stops_a_job_and_its_run_in_flight(tmp_path: Path) -> None:
    async with running() as (engine, backend), runner(engine, tmp_path) as r:
        backend.hold_steps = anyio.Event()  # the run cannot finish before it is cancelled
        await r.submit(job(max_tokens=200, every_s=0.1, job_id="c"), "")
        with anyio.fail_after(10):
            while (await r.get("", "c", 0)).state != jp.JobState.RUNNING:
                await anyio.sleep(0.005)
        await r.cancel("", "c")
        backend.hold_steps.set()
        done = await until_runs(r, "c", 1)
        assert done.state == jp.JobState.CANCELLED and done.next_run_ns == 0
        assert done.results[0].finish_reason == "cancelled" and len(done.results[0].token_ids) < 200
    # Still cancelled for the next scheduler.
    async with running() as (engine, _), runner(engine, tmp_path) as r2:
        assert (await r2.get("", "c", 0)).state == jp.JobState.CANCELLED


async def test_submission_is_idempotent_by_job_id_and_checked(tmp_path: Path) -> None:
    async with running() as (engine, _), runner(engine, tmp_path) as r:
        a = await r.submit(job(at_ns=time.time_ns() + 10**12, job_id="same"), "")
        b = await r.submit(job(at_ns=time.time_ns() + 10**12, job_id="same"), "")
        assert a.job_id == b.job_id == "same" and len(r.list("").jobs) == 1
        with pytest.raises(BadRequest):
            await r.submit(job("other prompt", job_id="same"), "")
        with pytest.raises(BadRequest, match="every_s"):
            await r.submit(job(every_s=0.001), "")
        with pytest.raises(BadRequest, match="job_id"):
            await r.submit(job(job_id="../escape"), "")


async def test_a_run_over_its_owners_quota_waits_and_is_charged_like_a_request(tmp_path: Path) -> None:
    gate = Gate(refuse=2)
    async with running() as (engine, _), runner(engine, tmp_path, gate) as r:
        await r.submit(job(job_id="q"), "tenant")
        with anyio.fail_after(10):
            while (info := await r.get("tenant", "q", 0)).runs < 1:
                await anyio.sleep(0.01)
    assert [x.run for x in info.results] == [1] and info.results[0].finish_reason == "length"
    assert gate.admitted == [("tenant", len(b"tick") + 1 + 6)] and gate.running == 0  # prompt (with BOS) + max_tokens


def test_missed_periods_are_skipped_not_made_up() -> None:
    request = job().request
    rec = JobRecord(job_id="m", principal="", request=request, at_ns=0, every_s=1.0, created_ns=0,
                    next_run_ns=10 * 10**9)
    assert _next_run(rec, now=10 * 10**9) == 11 * 10**9
    assert _next_run(rec, now=15 * 10**9 + 1) == 16 * 10**9  # phase kept, one run
    once = msgspec.structs.replace(rec, every_s=0.0)
    assert _next_run(once, now=99 * 10**9) == 10 * 10**9
