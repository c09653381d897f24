"""Timed and periodic jobs over real processes: they run on their schedule,
their results are fetched through the SDK, and they survive a SIGKILL of
the scheduler."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from sdk.client import AsyncClient
from tools.testing import running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import children

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def until_runs(c: AsyncClient, job_id: str, n: int, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while (info := await c.jobs.get(job_id)).runs < n:
            await anyio.sleep(0.05)
    return info


async def test_a_periodic_job_runs_again_and_again_through_a_scheduler_sigkill(home: Path, checkpoint: Path) -> None:
    prompt = [5, 17, 42, 99, 3, 250, 7]
    want = await local_greedy(checkpoint, prompt, 8)
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        job = await c.jobs.submit(prompt, every=0.5, max_tokens=8, name="tick", **GREEDY)
        timed = await c.jobs.submit(prompt, at=time.time() + 1.0, max_tokens=8, **GREEDY)
        before = await until_runs(c, job.job_id, 1)

        pid = llmos.instance(await llmos.status(), "scheduler").pid
        assert await c.kill("scheduler") == ["scheduler"]
        await llmos.wait_for(lambda st: llmos.instance(st, "scheduler").pid != pid
                             and llmos.instance(st, "scheduler").state == "ready", 60, "scheduler restarted")

        # The new scheduler found the job on disk and keeps running it.
        after = await until_runs(c, job.job_id, before.runs + 2)
        assert after.name == "tick" and after.every_s == 0.5
        assert [r.run for r in after.results] == list(range(1, after.runs + 1))  # none lost, none twice
        assert all(r.token_ids == want and r.finish_reason == "length" for r in after.results)
        last = await c.jobs.get(job.job_id, last=1)
        assert len(last.results) == 1 and last.results[0].run >= after.runs  # the latest only

        one = await until_runs(c, timed.job_id, 1)
        assert one.state == "done" and one.results[0].token_ids == want
        assert one.results[0].started_ns >= timed.at_ns

        assert {j.job_id for j in await c.jobs.list()} == {job.job_id, timed.job_id}
        cancelled = await c.jobs.cancel(job.job_id)
        assert cancelled.state in ("cancelled", "running")
        with anyio.fail_after(30):
            while (await c.jobs.get(job.job_id)).state != "cancelled":
                await anyio.sleep(0.05)
        assert (home / "jobs" / job.job_id / "runs.jsonl").exists()
