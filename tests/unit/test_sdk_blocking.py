"""The sync `Client` is one generic bridge over `AsyncClient` (sdk.blocking):
every async method, of the client and of `.jobs` / `.sessions`, is there with
the same signature; a stream is an iterator that, left early, closes the async
one on the loop (so a generation is cancelled). The kernel here is an
in-memory request path."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from ipc.errors import NotFound
from ipc.protocol import kernel as kp
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol import sessions as sessp
from ipc.protocol.base import Message
from sdk.client import AsyncClient, Client
from sdk.jobs import Jobs
from sdk.sessions import Sessions


class FakeConnection:
    closed = False
    token = b""

    def close(self) -> None:
        self.closed = True


class FakePath:
    """Answers as the kernel and the scheduler would; records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.streams_closed = 0
        self.closed = False

    async def call(self, dst: str, msg: Message, **_: Any) -> Message:
        self.sent.append(msg)
        match msg:
            case kp.Status():
                return kp.StatusReply(1, 2.0, [], kp.KernelCounters())
            case jp.AdminList(principal=who):
                return jp.JobList([jp.JobInfo("j1", jp.JobState.DONE, principal=who)])
            case sessp.SuspendSession(session=name):
                return sessp.SessionInfo(name, sessp.SessionState.SUSPENDED)
            case sp.Cancel(request_id=rid):
                return sp.CancelReply(rid, True)
        raise NotFound(f"no {type(msg).__name__} here")

    async def stream(self, dst: str, msg: Message, **_: Any) -> AsyncGenerator[Message, None]:
        self.sent.append(msg)
        try:
            match msg:
                case sp.Submit(request_id=rid, max_tokens=n):
                    for i in range(n - 1):
                        yield sp.TokenDelta(rid, i, [i], "x")
                    yield sp.Finished(rid, sp.FinishReason.LENGTH, n - 1, [n - 1], "x")
                case kp.Subscribe(topic=topic):
                    yield kp.Subscribed(topic)
                    yield kp.ServiceUp("echo", "echo-0", 7)
        finally:
            self.streams_closed += 1


@contextmanager
def sync_client() -> Iterator[tuple[Client, AsyncClient, FakePath]]:
    path = FakePath()
    stack = ExitStack()
    portal = stack.enter_context(start_blocking_portal("asyncio", {"use_uvloop": True}))

    async def make() -> AsyncClient:
        aclient = AsyncClient(FakeConnection())  # type: ignore[arg-type]
        aclient._path = path  # type: ignore[assignment]
        return aclient

    aclient = portal.call(make)
    with Client(portal, aclient, stack) as client:
        yield client, aclient, path


def test_every_async_method_is_there_synchronously_with_its_signature() -> None:
    with sync_client() as (c, ac, _):
        for face, target, cls in ((c, ac, AsyncClient), (c.jobs, ac.jobs, Jobs), (c.sessions, ac.sessions, Sessions)):
            names = [n for n, f in vars(cls).items() if not n.startswith("_") and inspect.isfunction(f)]
            assert names
            for name in names:
                if name == "aclose":
                    continue  # the sync client's close() ends the loop too
                assert inspect.signature(getattr(face, name)) == inspect.signature(getattr(target, name)), name


def test_a_sync_call_returns_the_reply() -> None:
    with sync_client() as (c, ac, path):
        assert c.call(kp.KERNEL, kp.Status()).pid == 1
        assert c.status().uptime_s == 2.0
        with pytest.raises(NotFound):
            c.request_status("nope")
        c.use_token(b"tok")  # a plain (non-async) method runs on the loop too
        assert ac.connection.token == b"tok"


def test_a_sync_stream_left_early_cancels_the_generation() -> None:
    with sync_client() as (c, _, path):
        chunks = c.stream_generate("hi", max_tokens=100, request_id="r1")
        got = [next(chunks), next(chunks)]
        assert [ch.offset for ch in got] == [0, 1]
        chunks.close()
        assert sp.Cancel("r1") in path.sent and path.streams_closed == 1
        whole = list(c.stream_generate("hi", max_tokens=3, request_id="r2"))
        assert whole[-1].finish_reason == sp.FinishReason.LENGTH
        assert sp.Cancel("r2") not in path.sent  # a stream read to its end has nothing to cancel


def test_methods_the_old_sync_twins_lacked() -> None:
    with sync_client() as (c, _, path):
        events = c.subscribe("kernel.services")
        assert next(events) == kp.Subscribed("kernel.services")
        assert next(events).instance == "echo-0"
        events.close()
        assert path.streams_closed == 1
        assert c.jobs.list_all("alice")[0].principal == "alice"
        assert c.sessions.suspend("chat").state == sessp.SessionState.SUSPENDED


def test_close_closes_the_async_client_once() -> None:
    with sync_client() as (c, ac, _):
        pass
    assert ac.connection.closed
    c.close()  # idempotent
