"""Connection limits under the HTTP parser: what uvicorn does not bound.

uvicorn (h11) bounds the request head's size and closes idle keep-alive
connections, but a connection that opens and then sends its head a byte at
a time is held forever, and nothing caps how many connections one client
holds. `guarded_h11` returns uvicorn's h11 protocol with, per connection:

- a head deadline: from the connection's opening (and from the first byte
  of each later request on it) to the end of that request's headers,
  `header_timeout_s`; past it the client gets 408 and the connection closes;
- caps at accept: past `max_connections` in all, or past
  `max_connections_per_client` from one source address, the new connection
  gets 503 and is closed before anything of it is read;
- a head larger than `max_header_bytes` answered 431 (h11's own refusal,
  named), and a response that leaves a request body unread closes the
  connection: after a short linger (at most `LINGER_BYTES` more read and
  dropped, `LINGER_S`), so a client still sending gets the refusal rather
  than a reset that can discard it (a close with unread data sends RST).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.config.gateway import GatewayConfig

LINGER_BYTES = 1 << 20
LINGER_S = 2.0


def _raw(status: int, reason: str, message: str) -> bytes:
    body = ('{"error": {"message": "%s", "type": "invalid_request_error", "param": null, "code": "%d"}}'
            % (message, status)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_h11(cfg: GatewayConfig) -> type[H11Protocol]:
    head_timeout = _raw(408, "Request Timeout",
                        f"request headers did not arrive within {cfg.header_timeout_s:g} s "
                        f"(gateway.header_timeout_s)")
    head_too_large = _raw(431, "Request Header Fields Too Large",
                          f"request line and headers are over {cfg.max_header_bytes} bytes "
                          f"(gateway.max_header_bytes)")
    malformed = _raw(400, "Bad Request", "malformed HTTP request")
    too_many = _raw(503, "Service Unavailable",
                    f"too many connections (gateway.max_connections {cfg.max_connections})")
    too_many_here = _raw(503, "Service Unavailable",
                         f"too many connections from your address "
                         f"(gateway.max_connections_per_client {cfg.max_connections_per_client})")

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._refused = False
            self._linger: int | None = None  # bytes left to drop before closing

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            refusal = self._over_cap(transport)
            if refusal is not None:
                # Not counted among the connections; connection_lost tidies up.
                self._refused = True
                self.transport = transport
                transport.write(refusal)
                transport.close()
                return
            super().connection_made(_Lingering(transport, self))  # type: ignore[arg-type]
            self._arm()

        def _over_cap(self, transport: asyncio.Transport) -> bytes | None:
            if len(self.connections) >= cfg.max_connections:
                return too_many
            if cfg.max_connections_per_client:
                peer = transport.get_extra_info("peername")
                host = peer[0] if isinstance(peer, tuple) and peer else None
                if host is not None:
                    mine = sum(1 for c in self.connections if isinstance(c, H11Protocol)
                               and c.client is not None and c.client[0] == host)
                    if mine >= cfg.max_connections_per_client:
                        return too_many_here
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._refused:
                self.transport.close()
                return
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._linger is not None:
                self._linger -= len(data)
                if self._linger < 0 and isinstance(self.transport, _Lingering):
                    self.transport.abort_linger()
                return
            waiting_head = self.conn.their_state is h11.IDLE
            if waiting_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and waiting_head:
                if self._head_timer is None:  # a new request began: its head has a deadline
                    self._arm()
            else:
                self._head_bytes = 0
                self._disarm()

        def send_400_response(self, msg: str) -> None:
            # h11 refused the bytes; a head over its size bound is the common case.
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(head_too_large if self._head_bytes > cfg.max_header_bytes else malformed)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A refusal that left the body unread said `Connection: close`:
            # close (lingering, see _Lingering). Any other answer with the body
            # unread (a 404 to a GET with a body) keeps the connection, as
            # uvicorn does, reading the rest of the body and dropping it: the
            # client was not told to go and would reuse it.
            if (self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.MUST_CLOSE
                    and not self.transport.is_closing()):
                self.transport.close()

        def _close_after_linger(self) -> None:
            if self._linger is not None:
                return
            self._unset_keepalive_if_required()
            self._linger = LINGER_BYTES
            self.flow.resume_reading()
            t = self.transport
            self.loop.call_later(LINGER_S, t.abort_linger if isinstance(t, _Lingering) else t.close)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(cfg.header_timeout_s, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(head_timeout)
                self.transport.close()

    return GuardedH11Protocol


class _Lingering:
    """The connection's transport, whose close() lingers while the client may
    still be sending: uvicorn closes right after a response that says
    `Connection: close` (or after h11 refused the bytes), and a close with
    unread data would reset the connection under the answer."""

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._t = transport
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def is_closing(self) -> bool:
        return self._closing or self._t.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._protocol.conn.their_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._t.close()  # nothing of theirs unread
        else:
            self._protocol._close_after_linger()

    def abort_linger(self) -> None:
        self._t.close()
