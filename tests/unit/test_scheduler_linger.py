"""A resumable request (Submit.linger_s) whose requester went away: it runs
on, and is cancelled only if nobody re-attached within its window."""

from __future__ import annotations

import anyio

from ipc.protocol.scheduler import FinishReason, Submit
from common.config.scheduler import SchedulerConfig
from services.scheduler._linger import linger
from services.scheduler.engine import Engine, Model
from text.tokenizer import ByteTokenizer
from tests.helpers.scheduler_fakes import FakeDriver, InProcessBackend

TOK = ByteTokenizer()


def idle_engine() -> Engine:
    """An engine that is not stepping: requests stay where they are."""
    backend = InProcessBackend({"cpu": FakeDriver(64)})
    engine = Engine(SchedulerConfig(), backend)
    engine.driver_up("cpu", backend.drivers["cpu"].meta)
    engine.set_model(Model(TOK, frozenset(TOK.eos_token_ids), 256))
    return engine


async def test_a_lingering_request_nobody_comes_back_to_is_cancelled() -> None:
    engine = idle_engine()
    sent: list[object] = []
    sink = engine.submit(Submit(prompt="gone", request_id="g", linger_s=0.05), "alice", sent.append)
    cancelled: list[bool] = []
    with anyio.fail_after(10):
        await linger(sink, 0.05, lambda: cancelled.append(engine.cancel("alice", "g")))
    assert cancelled == [True]
    sink.emit(object())  # nobody reads the dead stream: what it emits goes nowhere
    assert sent == []


async def test_a_lingering_request_re_attached_in_time_is_not_cancelled() -> None:
    engine = idle_engine()
    sink = engine.submit(Submit(prompt="back", request_id="b", linger_s=60), "alice", lambda m: None)
    cancelled: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(linger, sink, 60.0, lambda: cancelled.append(True))
        await anyio.sleep(0)
        again = engine.submit(Submit(prompt="back", request_id="b", resume_from=0, attempt=1), "alice",
                              lambda m: None)
        assert again.attached
    # linger returned (the old stream was superseded) long before its 60 s window
    assert sink.superseded and cancelled == []
    assert ("alice", "b") in engine.requests


async def test_a_lingering_request_that_finishes_is_kept_for_its_client() -> None:
    engine = idle_engine()
    sink = engine.submit(Submit(prompt="done", request_id="d", linger_s=60), "alice", lambda m: None)
    cancelled: list[bool] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(linger, sink, 60.0, lambda: cancelled.append(True))
        await anyio.sleep(0)
        sink.request.finish(FinishReason.LENGTH)
    assert cancelled == []
