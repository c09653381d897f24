"""The SDK's re-submission budget (sdk/generate.py) with an in-memory
scheduler that dies on cue: it counts restarts without progress, so a long
request survives many restarts that each let it move on, and still gives up
on a scheduler that never answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ipc.errors import DeadlineExceeded, Overloaded, Unavailable
from ipc.protocol.scheduler import Finished, FinishReason, Submit, TokenDelta
from sdk.generate import MAX_RESUBMITS, build_submit, generate


class DyingScheduler:
    """Each Submit gets `tokens_per_life` tokens (resuming at `resume_from`),
    then the scheduler dies (`Unavailable`), until `total` tokens are out."""

    def __init__(self, total: int, tokens_per_life: int):
        self.total = total
        self.per_life = tokens_per_life
        self.submits: list[Submit] = []

    async def stream(self, dst: str, msg: Submit, **_: Any) -> AsyncIterator[Any]:
        self.submits.append(msg)
        start = msg.resume_from
        assert msg.resume_ids == list(range(start)), "the client re-submits exactly what it holds"
        end = min(start + self.per_life, self.total)
        for i in range(start, end):
            if i == self.total - 1:
                yield Finished(msg.request_id, FinishReason.LENGTH, i, [i])
                return
            yield TokenDelta(msg.request_id, i, [i])
        raise Unavailable("scheduler died while handling Submit")


async def test_many_restarts_with_progress_between_them_do_not_fail_the_request() -> None:
    sched = DyingScheduler(total=40, tokens_per_life=3)
    done = await generate(sched, build_submit("hi", max_tokens=40, request_id="r1"))  # type: ignore[arg-type]
    assert done.token_ids == list(range(40)) and done.finish_reason == FinishReason.LENGTH
    assert len(sched.submits) > MAX_RESUBMITS + 1
    assert [m.attempt for m in sched.submits] == list(range(len(sched.submits)))


async def test_a_scheduler_that_never_makes_progress_is_given_up_on() -> None:
    sched = DyingScheduler(total=40, tokens_per_life=0)
    with pytest.raises(Unavailable):
        await generate(sched, build_submit("hi", max_tokens=40, request_id="r2"),  # type: ignore[arg-type]
                       patience_s=0)
    assert len(sched.submits) == MAX_RESUBMITS + 1


class FlappingScheduler(DyingScheduler):
    """Dies `deaths` times in a row before serving anything (a scheduler
    killed again and again while a driver is down), then serves normally."""

    def __init__(self, total: int, deaths: int):
        super().__init__(total, tokens_per_life=total)
        self.deaths = deaths

    async def stream(self, dst: str, msg: Submit, **kw: Any) -> AsyncIterator[Any]:
        if len(self.submits) < self.deaths:
            self.submits.append(msg)
            raise Unavailable("scheduler died while handling Submit")
        async for ev in super().stream(dst, msg, **kw):
            yield ev


async def test_more_restarts_without_progress_than_the_count_are_waited_for_within_the_patience() -> None:
    sched = FlappingScheduler(total=10, deaths=3 * MAX_RESUBMITS)
    done = await generate(sched, build_submit("hi", max_tokens=10, request_id="r3"),  # type: ignore[arg-type]
                          backoff_s=0)  # (paces nothing here: the fake answers at once)
    assert done.token_ids == list(range(10)) and done.finish_reason == FinishReason.LENGTH
    assert len(sched.submits) == 3 * MAX_RESUBMITS + 1


async def test_a_closed_connection_is_not_resubmitted_to() -> None:
    """A closed connection fails every call at once: re-submitting for the
    whole patience would spin the caller's event loop (the gateway's)."""
    sched = DyingScheduler(total=40, tokens_per_life=0)
    sched.closed = True  # type: ignore[attr-defined]
    with pytest.raises(Unavailable):
        await generate(sched, build_submit("hi", max_tokens=40, request_id="r5"))  # type: ignore[arg-type]
    assert len(sched.submits) == 1


async def test_a_request_past_its_deadline_is_not_resubmitted() -> None:
    sched = DyingScheduler(total=40, tokens_per_life=0)
    submit = build_submit("hi", max_tokens=40, request_id="r4", timeout=1e-9)
    with pytest.raises(DeadlineExceeded, match="r4"):
        await generate(sched, submit)  # type: ignore[arg-type]
    assert len(sched.submits) == 1


class BusyAfterRestart(DyingScheduler):
    """Dies after 3 tokens; the restarted scheduler's queue is full for the
    first `busy` re-submissions (it admits them like any new request)."""

    def __init__(self, total: int, busy: int):
        super().__init__(total, tokens_per_life=3)
        self.busy = busy

    async def stream(self, dst: str, msg: Submit, **kw: Any) -> AsyncIterator[Any]:
        if msg.attempt and self.busy:
            self.busy -= 1
            self.submits.append(msg)
            raise Overloaded("the scheduler's queue is full", detail={"retry_after_s": 0.0})
        if msg.attempt:
            self.per_life = self.total
        async for ev in super().stream(dst, msg, **kw):
            yield ev


async def test_a_resubmission_refused_as_overloaded_waits_its_turn() -> None:
    sched = BusyAfterRestart(total=10, busy=2)
    done = await generate(sched, build_submit("hi", max_tokens=10, request_id="r6"),  # type: ignore[arg-type]
                          backoff_s=0)
    assert done.token_ids == list(range(10)) and len(sched.submits) == 4


async def test_a_first_submission_refused_as_overloaded_is_the_callers_answer() -> None:
    sched = BusyAfterRestart(total=10, busy=1)

    async def refuse(dst: str, msg: Submit, **kw: Any) -> AsyncIterator[Any]:
        sched.submits.append(msg)
        raise Overloaded("the scheduler's queue is full", detail={"retry_after_s": 1.0})
        yield  # pragma: no cover

    sched.stream = refuse  # type: ignore[method-assign]
    with pytest.raises(Overloaded):
        await generate(sched, build_submit("hi", max_tokens=10, request_id="r7"))  # type: ignore[arg-type]
    assert len(sched.submits) == 1
