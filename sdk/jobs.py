"""Timed and periodic generation jobs (`AsyncClient.jobs`, `Client.jobs`).

    job = await client.jobs.submit("Summarise the news", every=3600, max_tokens=200)
    info = await client.jobs.get(job.job_id, last=5)     # the latest 5 results
    for run in info.results: print(run.run, run.text)

The scheduler keeps jobs and their results under `$LLMOS_HOME/jobs`; they
survive its restart. A submission carries a client-chosen job id, so it is
re-sent safely when the scheduler dies while answering.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ipc.errors import Unavailable
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from sdk.generate import build_submit

if TYPE_CHECKING:
    from sdk.client import AsyncClient

MAX_RESUBMITS = 5


def _at_ns(at: datetime | float | None) -> int:
    if at is None:
        return 0
    seconds = at.timestamp() if isinstance(at, datetime) else float(at)
    return int(seconds * 1e9)


class Jobs:
    def __init__(self, client: "AsyncClient"):
        self._client = client

    async def submit(self, prompt: str | Sequence[int], *, at: datetime | float | None = None,
                     every: float = 0.0, max_runs: int = 0, name: str = "", job_id: str | None = None,
                     **options: Any) -> jp.JobInfo:
        """Run a generation at `at` (a datetime or unix seconds; None: now)
        and, with `every` (seconds), periodically, `max_runs` times (0: until
        cancelled). `options` are `generate`'s (max_tokens, temperature, ...)."""
        msg = jp.SubmitJob(build_submit(prompt, **options), _at_ns(at), every, max_runs, name,
                           job_id or uuid.uuid4().hex)
        for attempt in range(MAX_RESUBMITS + 1):
            try:
                return await self._client.call(sp.SCHEDULER, msg, timeout=30.0)
            except Unavailable:
                if attempt == MAX_RESUBMITS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def list(self) -> list[jp.JobInfo]:
        return (await self._client.call(sp.SCHEDULER, jp.ListJobs(), timeout=10.0)).jobs

    async def get(self, job_id: str, *, last: int = 0) -> jp.JobInfo:
        """The job and its latest `last` results (0: every result kept), oldest first."""
        return await self._client.call(sp.SCHEDULER, jp.GetJob(job_id, last), timeout=10.0)

    async def cancel(self, job_id: str) -> jp.JobInfo:
        return await self._client.call(sp.SCHEDULER, jp.CancelJob(job_id), timeout=10.0)

    # Operator views over every principal's jobs: the token needs the `admin` right.

    async def list_all(self, principal: str = "") -> builtins.list[jp.JobInfo]:
        """Every principal's jobs (or `principal`'s), each with its owner in `.principal`."""
        return (await self._client.call(sp.SCHEDULER, jp.AdminList(principal), timeout=10.0)).jobs

    async def cancel_any(self, principal: str, job_id: str) -> jp.JobInfo:
        """Cancel `principal`'s job `job_id`."""
        return await self._client.call(sp.SCHEDULER, jp.AdminCancel(principal, job_id), timeout=10.0)


__all__ = ["Jobs"]
