"""Each incarnation of a supervised child gets its own boot secret: once it
is replaced, its secret registers nothing (not its own name, not another),
while the running incarnation's still lets a service it started register."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import zmq

from common.home import back_endpoint
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import Error, ErrorCode
from ipc.protocol.kernel import ChildState, Ready
from tools.chaos.fuzz import boot_secret
from tools.testing import running_llmos


def register(home: Path, service: str, instance: str, secret: str) -> str:
    """READY on the back socket: "registered", or the refusal's message."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(back_endpoint(home))
    try:
        sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready")),
                             msgspec.msgpack.encode(Ready(service, instance, 1, secret))])
        if not sock.poll(10_000):
            return "no answer"
        frames = sock.recv_multipart()
        if decode_header(frames[1]).kind == Kind.REPLY:
            return "registered"
        err = msgspec.msgpack.decode(frames[2], type=Error)
        assert err.code == ErrorCode.UNAUTHORIZED
        return err.message
    finally:
        sock.close()


async def test_a_replaced_incarnations_secret_registers_nothing(home: Path) -> None:
    async with running_llmos(home) as llmos:
        old_pid = llmos.instance(await llmos.status(), "echo").pid
        old = await anyio.to_thread.run_sync(boot_secret, old_pid)
        assert await llmos.client.kill("echo") == ["echo"]
        st = await llmos.wait_for(lambda s: llmos.instance(s, "echo").pid not in (0, old_pid)
                                  and llmos.instance(s, "echo").state == ChildState.READY, what="echo restarted")
        new_pid = llmos.instance(st, "echo").pid
        new = await anyio.to_thread.run_sync(boot_secret, new_pid)
        assert new != old and len(new) == 64
        for service, instance in [("echo", "echo"), ("echo", "echo-2"), ("probe", "probe")]:
            said = await anyio.to_thread.run_sync(register, home, service, instance, old)
            assert "wrong boot secret" in said, (instance, said)
        # The live incarnation's secret still registers a service it would start itself.
        assert await anyio.to_thread.run_sync(register, home, "probe", "probe", new) == "registered"
        assert await anyio.to_thread.run_sync(register, home, "probe", "probe", "") != "registered"
        st = await llmos.status()
        assert llmos.instance(st, "echo").pid == new_pid and llmos.instance(st, "echo").state == ChildState.READY
