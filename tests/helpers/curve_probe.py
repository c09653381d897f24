"""Probing a CURVE endpoint from a test: does a DEALER configured one way
complete the handshake (zmq's socket monitor says, not a timeout)? Blocking:
the caller marks itself `loop_block` or runs it in a worker thread."""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, encode_header

FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def handshake_events(endpoint: str, setup: object = None, limit_s: float = 20.0) -> set[int]:
    """Connect a DEALER (configured by `setup`), send a request, and collect
    monitor events until the handshake succeeds or fails."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if callable(setup):
        setup(sock)
    mon = sock.get_monitor_socket()
    seen: set[int] = set()
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.HEARTBEAT))])
        end = time.monotonic() + limit_s
        while not (seen & (FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED})):
            assert time.monotonic() < end, f"no handshake outcome; events {seen}"
            if mon.poll(200):
                seen.add(recv_monitor_message(mon)["event"])
        answered = sock.poll(500)
        if zmq.EVENT_HANDSHAKE_SUCCEEDED not in seen:
            assert not answered, "a client that failed the handshake got an answer"
        return seen
    finally:
        sock.disable_monitor()
        mon.close()
        sock.close()
        ctx.term()


def keyed(public: bytes, secret: bytes, server: bytes) -> object:
    """A `handshake_events` setup: this keypair, toward this server key."""
    def setup(sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    return setup
