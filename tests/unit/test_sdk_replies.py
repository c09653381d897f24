"""Typed replies: each request declares its reply type, the SDK decodes a
reply with that type alone (a wrong one is a protocol error naming both), a
service's handler must answer with it, and every connection of a process
shares one zmq context. The kernel side here is a bare ROUTER on inproc://."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
import zmq

from ipc import codec
from ipc.envelope import Kind
from ipc.errors import Internal
from ipc.protocol import kernel as kp
from ipc.protocol import scheduler as sp
from ipc.protocol.base import Message, Request, message_types, reply_type
from ipc.protocol.echo import Count, Counted, CountDone, Echo, EchoReply
from sdk.connection import Connection
from tests.helpers.fake_kernel import FakeKernel
from sdk.service import Context, Service, handler

def test_every_request_declares_a_registered_reply_type() -> None:
    requests = [t for t in message_types() if issubclass(t, Request)]
    assert {kp.Status, kp.Ready, sp.Submit, sp.PrioritySubmit, Echo} <= set(requests)
    for req in requests:
        assert reply_type(req) in message_types(), req
    assert reply_type(sp.PrioritySubmit) is sp.Finished  # inherited from Submit
    assert "Request" not in Message._registry  # the generic base is no message


def test_declaring_a_reply_adds_nothing_to_the_wire() -> None:
    class PlainEcho(msgspec.Struct, tag="Echo", array_like=True, omit_defaults=True, gc=False):
        payload: bytes = b""
        delay_s: float = 0.0

    assert codec.encode(Echo(b"x", 0.5)) == msgspec.msgpack.encode(PlainEcho(b"x", 0.5))
    assert codec.encode(kp.Status()) == msgspec.msgpack.encode(["Status"])


def test_a_reply_decodes_with_its_declared_type() -> None:
    assert codec.decode_reply(Echo, codec.encode(EchoReply(b"hi", "echo-0"))) == EchoReply(b"hi", "echo-0")


def test_a_reply_of_another_type_is_a_protocol_error_naming_both() -> None:
    with pytest.raises(Internal, match="Echo is answered with EchoReply, got CountDone") as err:
        codec.decode_reply(Echo, codec.encode(CountDone(3)))
    assert err.value.detail == {"expected": "EchoReply", "got": "CountDone"}
    with pytest.raises(Internal, match=r"invalid EchoReply reply to Echo: .*EchoReply\.instance"):
        codec.decode_reply(Echo, msgspec.msgpack.encode(["EchoReply", b"hi", 7]))
    with pytest.raises(Internal, match="undecodable reply to Echo"):
        codec.decode_reply(Echo, b"\xc1")


def test_a_handler_must_answer_with_the_declared_reply_type() -> None:
    with pytest.raises(TypeError, match="Echo is answered with EchoReply"):
        class Wrong(Service):
            @handler
            async def echo(self, msg: Echo, ctx: Context) -> CountDone:
                return CountDone(0)

    with pytest.raises(TypeError, match="a Request type"):
        class NotARequest(Service):
            @handler
            async def counted(self, msg: Counted, ctx: Context) -> CountDone:
                return CountDone(0)


@pytest.fixture
async def kernel() -> AsyncIterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


async def _exchange(kernel: FakeKernel, conn: Connection, answers: list[tuple[Kind, Message]],
                    request: Any) -> Any:
    """`conn.call(request)` while the fake kernel answers it; raises what the call raised."""
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(kernel.serve_one, answers)
        try:
            outcome.append(await conn.call("echo", request, timeout=10))
        except Internal as exc:
            outcome.append(exc)
    if isinstance(outcome[0], Internal):
        raise outcome[0]
    return outcome[0]


async def test_call_returns_the_declared_reply_and_refuses_another(kernel: FakeKernel) -> None:
    conn = Connection(kernel.endpoint)
    try:
        reply = await _exchange(kernel, conn, [(Kind.EVENT, Counted(0)), (Kind.REPLY, EchoReply(b"hi", "e"))],
                                Echo(b"hi"))
        assert reply == EchoReply(b"hi", "e")
        with pytest.raises(Internal, match="Echo is answered with EchoReply, got CountDone"):
            await _exchange(kernel, conn, [(Kind.REPLY, CountDone(1))], Echo(b"hi"))
        with pytest.raises(TypeError, match="Counted declares no reply type"):
            await conn.call("echo", Counted(1), timeout=10)  # type: ignore[arg-type]
    finally:
        conn.close()


async def test_a_stream_yields_events_then_the_typed_reply(kernel: FakeKernel) -> None:
    conn = Connection(kernel.endpoint)
    try:
        got: list[Message] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.serve_one, [(Kind.EVENT, Counted(0)), (Kind.EVENT, Counted(1)),
                                             (Kind.REPLY, CountDone(2))])
            got = [m async for m in conn.stream("echo", Count(2), timeout=10)]
        assert got == [Counted(0), Counted(1), CountDone(2)]
        # A subscription is answered by events only: a REPLY to it is a protocol error.
        events: list[Message] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(kernel.serve_one, [(Kind.EVENT, kp.Subscribed("t")), (Kind.REPLY, CountDone(0))])
            with pytest.raises(Internal, match="Subscribe is answered by events only, got a CountDone reply"):
                async for ev in conn.stream(kp.KERNEL, kp.Subscribe("t"), timeout=10):
                    events.append(ev)
        assert events == [kp.Subscribed("t")]
    finally:
        conn.close()


async def test_connections_share_one_context_and_closing_one_closes_its_sockets_only(
        kernel: FakeKernel) -> None:
    first, second = Connection(kernel.endpoint), Connection(kernel.endpoint)
    try:
        assert first._ch.sock.context is second._ch.sock.context is zmq.Context.instance()
        first.close()
        assert first._ch.sock.closed and not zmq.Context.instance().closed
        reply = await _exchange(kernel, second, [(Kind.REPLY, EchoReply(b"on", "e"))], Echo(b"on"))
        assert reply.payload == b"on"
    finally:
        first.close()
        second.close()
