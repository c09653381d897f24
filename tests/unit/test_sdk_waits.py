"""A call's waits share one timer (sdk/connection.py `_Tick`): a stream whose
events stop still ends at its deadline, however many events it took first,
and a call that got its reply leaves no wake-up behind. The kernel side is a
bare ROUTER on inproc://."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import pytest

from ipc.envelope import Kind
from ipc.errors import DeadlineExceeded
from ipc.protocol.echo import Count, Counted, CountDone, Echo, EchoReply
from ipc.protocol.base import Message
from sdk.connection import Connection
from tests.helpers.fake_kernel import FakeKernel


@pytest.fixture
async def kernel() -> AsyncIterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


async def test_a_stream_whose_events_stop_ends_at_its_deadline(kernel: FakeKernel) -> None:
    conn = Connection(kernel.endpoint)
    try:
        got: list[Message] = []
        async with anyio.create_task_group() as tg:
            # Five events, then silence: no reply ever comes.
            events: list[tuple[Kind, Message]] = [(Kind.EVENT, Counted(i)) for i in range(5)]
            tg.start_soon(kernel.serve_one, events)
            with pytest.raises(DeadlineExceeded, match="Count to 'echo' timed out"):
                async for ev in conn.stream("echo", Count(9), timeout=0.5):
                    got.append(ev)
        assert got == [Counted(i) for i in range(5)]
        assert conn._calls == {}
        # The connection goes on: a call after it is answered.
        async with anyio.create_task_group() as tg:
            reply: list[tuple[Kind, Message]] = [(Kind.REPLY, EchoReply(b"ok", "e"))]
            tg.start_soon(kernel.serve_one, reply)
            assert (await conn.call("echo", Echo(b"ok"), timeout=10)).payload == b"ok"
    finally:
        conn.close()


async def test_calls_answered_leave_no_timer_behind(kernel: FakeKernel) -> None:
    conn = Connection(kernel.endpoint)
    loop = asyncio.get_running_loop()
    try:
        for n in range(3):
            async with anyio.create_task_group() as tg:
                answers: list[tuple[Kind, Message]] = [(Kind.EVENT, Counted(i)) for i in range(n)]
                tg.start_soon(kernel.serve_one, [*answers, (Kind.REPLY, CountDone(n))])
                assert [m async for m in conn.stream("echo", Count(n), timeout=10)][-1] == CountDone(n)
        # Each call's one timer was cancelled with it: none is scheduled to
        # wake a queue that nobody reads (asyncio's loop lists its timers).
        scheduled = getattr(loop, "_scheduled", None)
        if scheduled is not None:
            assert not [h for h in scheduled if not h.cancelled() and "_Tick" in repr(h)]
    finally:
        conn.close()
