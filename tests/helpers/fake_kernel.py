"""A stand-in for the kernel's front socket in SDK unit tests: a bare ROUTER
on inproc://, on the process's shared zmq context, that answers a request
with the (kind, body) pairs a test gives, in order."""

from __future__ import annotations

import itertools

import zmq
import zmq.asyncio

from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.protocol.base import Message

_names = itertools.count()


class FakeKernel:
    def __init__(self) -> None:
        self.endpoint = f"inproc://fake-kernel-{next(_names)}"
        self._sock = zmq.asyncio.Context.shadow(zmq.Context.instance()).socket(zmq.ROUTER)
        self._sock.bind(self.endpoint)

    async def serve_one(self, answers: list[tuple[Kind, Message]]) -> Header:
        """Answer the next request (past a closed connection's DISCONNECT or
        a heartbeat) with `answers`; returns the request's header."""
        while True:
            ident, _, raw, *_body = await self._sock.recv_multipart()
            header = decode_header(raw)
            if header.kind == Kind.REQUEST:
                break
        for kind, body in answers:
            out = Header(PROTOCOL_VERSION, kind, header.msg_id, op=type(body).__name__)
            await self._sock.send_multipart([ident, b"", encode_header(out), codec.encode(body)])
        return header

    def close(self) -> None:
        self._sock.close(linger=0)
