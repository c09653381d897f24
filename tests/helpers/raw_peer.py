"""A peer that speaks the kernel's wire by hand (a blocking DEALER): any
header, any body, any frames. Blocking: run it in a worker thread from an
async test."""

from __future__ import annotations

from typing import Any

import msgspec
import zmq

from ipc import codec
from ipc.envelope import Header, Kind, decode_header, encode_header
from ipc.protocol.base import Message


class RawPeer:
    """A DEALER that speaks the wire by hand: any header, any body, any size."""

    def __init__(self, endpoint: str, identity: bytes | None = None, rcvhwm: int = 1000,
                 curve: tuple[bytes, bytes, bytes] | None = None):
        """`curve`: (public, secret, server public) keys, Z85, for a tcp:// CURVE endpoint."""
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self.ids = 0

    def send(self, header: Header, *body: bytes) -> int:
        self.ids += 1
        header = msgspec.structs.replace(header, msg_id=self.ids)
        self.sock.send_multipart([b"", encode_header(header), *body])
        return self.ids

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, copy=True)

    def recv(self, timeout_s: float = 15.0) -> tuple[Header, Any]:
        """The next answer (control frames such as DISCONNECT are skipped)."""
        while True:
            assert self.sock.poll(int(timeout_s * 1000)), "no answer from the kernel"
            frames = self.sock.recv_multipart()
            header = decode_header(frames[1])
            if len(frames) >= 3:
                break
        dec = codec.error_decoder if header.kind == Kind.ERROR else codec.decoder(Message._registry.values())
        return header, codec.decode_body(dec, frames[2], "reply")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
