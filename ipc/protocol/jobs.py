"""The scheduler's timed and periodic jobs (service ``"scheduler"``): a job is a
`Submit` run at a time and then every so often, its runs kept under
$LLMOS_HOME/jobs across scheduler restarts."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from ipc.errors import BadRequest
from ipc.protocol.base import Message, Request
from ipc.protocol.scheduler import NonNegative, Submit, Usage


MAX_JOB_ID_LEN = 128
MIN_JOB_PERIOD_S = 0.1


class JobState(StrEnum):
    SCHEDULED = "scheduled"  # waiting for its next run
    RUNNING = "running"
    DONE = "done"  # ran as often as asked
    CANCELLED = "cancelled"
    FAILED = "failed"  # a run was refused (e.g. the prompt no longer fits the model)


class SubmitJob(Request["JobInfo"]):
    """Run `request` at `at_ns` (unix ns; 0 = now) and then, with `every_s`,
    every that many seconds (fixed rate; runs of one job never overlap, and
    runs missed while no scheduler was up are not made up in a burst: the job
    runs once and keeps its period), `max_runs` times (0 = until cancelled).
    Results are kept under $LLMOS_HOME/jobs and survive a scheduler restart.
    `job_id` makes the submission idempotent (the SDK always sends one)."""

    request: Submit
    at_ns: NonNegative = 0
    every_s: float = 0.0
    max_runs: NonNegative = 0
    name: str = ""
    job_id: str = ""

    def validate(self) -> None:
        if self.request.resume_from or self.request.resume_ids:
            raise BadRequest("a job's request cannot resume a stream", detail={"field": "request"})
        self.request.validate()
        if self.every_s and not self.every_s >= MIN_JOB_PERIOD_S:
            raise BadRequest(f"every_s must be 0 (once) or >= {MIN_JOB_PERIOD_S}, got {self.every_s}",
                             detail={"field": "every_s"})
        if len(self.job_id) > MAX_JOB_ID_LEN or len(self.name) > MAX_JOB_ID_LEN:
            raise BadRequest(f"job_id and name: at most {MAX_JOB_ID_LEN} characters", detail={"field": "job_id"})


class JobRun(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One run of a job: its number (from 1), when it was due, began and
    ended (unix ns), and what it generated."""

    run: int
    due_ns: int
    started_ns: int
    finished_ns: int
    finish_reason: str  # a FinishReason; "error" also when the run was refused
    text: str = ""
    token_ids: list[int] = []
    usage: Usage = Usage()
    error: str = ""


class JobInfo(Message):
    job_id: str  # unique per principal (each principal has its own namespace)
    state: JobState
    name: str = ""
    at_ns: int = 0
    every_s: float = 0.0
    max_runs: int = 0
    created_ns: int = 0
    next_run_ns: int = 0  # 0 when no run is due any more
    runs: int = 0  # finished runs
    error: str = ""
    results: list[JobRun] = []  # GetJob only: the latest runs, oldest first
    principal: str = ""  # the owner (filled in AdminList answers)


class ListJobs(Request["JobList"]):
    pass


class JobList(Message):
    jobs: list[JobInfo] = []


class GetJob(Request[JobInfo]):
    """A job and its latest `last` results (0: every result kept)."""

    job_id: str
    last: NonNegative = 0


class CancelJob(Request[JobInfo]):
    """No further runs; a run in progress is cancelled (and recorded so)."""

    job_id: str


# Operator ops over every principal's jobs. Their names match no right's
# pattern but `admin`'s ("*"), so the kernel lets only an admin token (not
# one attenuated from it to fewer rights) through: keep them free of "Job"
# and "Session" (tests/unit/test_scheduler_admin.py checks).

class AdminList(Request[JobList]):
    """Every principal's jobs (`principal` given: only that one's), each with
    its owner in `JobInfo.principal`. Audited."""

    principal: str = ""


class AdminCancel(Request[JobInfo]):
    """Cancel `principal`'s job `job_id`. Audited."""

    principal: str
    job_id: str
