"""One DEALER connection to the kernel, shared by clients and services.

No background task is needed: the socket's reader callback drains it on the
event loop and hands each answer to the call waiting for its msg id. A waiting
call also watches the kernel's liveness (it pings after a quiet interval and
gives up with `Unavailable` after HEARTBEAT_EXPIRY_S of silence).

Every connection of a process shares one zmq context (`zmq.Context.instance()`,
which pyzmq makes anew in a forked child): a gateway holding hundreds of
callers' connections holds one context and its I/O thread, not one each.
Closing a connection closes its sockets; the context stays for the others.

A reply is decoded with the type its request declares (`Request[ReplyT]`), so
`call()` returns that type; events (a stream's deltas, a topic's messages)
are decoded as any message.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import operator
import time
from collections import deque
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from ipc import codec
from ipc.curve import CurveClient
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_event_batch, decode_header, encode_header
from ipc.errors import BadRequest, DeadlineExceeded, Error, Internal, LlmosError, Unauthorized, Unavailable
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S, Stalls
from ipc.protocol.base import Message, ReplyT, Request, op_of
from ipc.sockets import MAX_MESSAGE_BYTES, Channel, connect_dealer
from common.logs import get_logger

log = get_logger()

Answer = tuple[Header, list[Any]]
# Put in a call's queue when its wait for an answer times out (`_next`).
_TICK: Answer = (Header(PROTOCOL_VERSION, 0), [])


class _Answers:
    """A call's answers in arrival order, for its one reader: what an
    `asyncio.Queue` did here in a third of the Python calls per answer (a
    stream's client takes one per event; the queue's getter and putter
    bookkeeping was a fifth of its CPU). A reader cancelled while it waits
    loses nothing: an answer is only ever taken by `get` returning it."""

    __slots__ = ("_items", "_waiter", "_loop")

    def __init__(self) -> None:
        self._items: deque[Answer] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    def put_nowait(self, answer: Answer) -> None:
        self._items.append(answer)
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # (done: its reader was cancelled)
            waiter.set_result(None)

    async def get(self) -> Answer:
        items = self._items
        while not items:
            self._waiter = waiter = self._loop.create_future()
            await waiter
        return items.popleft()


class _Tick:
    """Puts `_TICK` in a call's queue once a wait (`arm`) has lasted its
    seconds. One timer serves all of the call's waits: a wait that ends first
    leaves it to fire, and it then waits on for the wait after, if any (a
    timer per event cost a stream's client a fifth of its CPU: uvloop makes
    each one a libuv handle)."""

    __slots__ = ("_q", "_loop", "_handle", "_due")

    def __init__(self, q: _Answers):
        self._q = q
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time the wait in progress ends (0: none waits)

    def arm(self, wait: float) -> None:
        self._due = due = self._loop.time() + wait
        handle = self._handle
        if handle is not None and handle.when() > due:  # (a shorter wait than the one it was set for)
            handle.cancel()
            handle = None
        if handle is None:
            self._handle = self._loop.call_at(due, self._fire)

    def disarm(self) -> None:
        self._due = 0.0

    def _fire(self) -> None:
        self._handle = None
        due = self._due
        if not due:
            return  # no wait in progress: the next one arms it again
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._fire)  # armed again since: the rest of that wait
            return
        self._due = 0.0
        self._q.put_nowait(_TICK)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
RequestHandler = Callable[[Header, list[Any]], None]


class Connection:
    def __init__(self, endpoint: str, *, identity: bytes | None = None, src: str = "",
                 curve: CurveClient | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        """`max_message_bytes`: the most the kernel takes from this peer (a
        client: `FRONT_MAX_MESSAGE_BYTES`); a bigger request is refused here,
        since ZeroMQ on the kernel's side would drop it with the connection
        and the call would only time out."""
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.src = src
        sock = connect_dealer(zmq.Context.instance(), endpoint, identity, curve=curve)
        # Over CURVE, a refused handshake is silent on the socket itself: the
        # monitor is the only place it shows, and without it a refused client
        # would only learn that "the kernel stopped answering".
        self.refusal: LlmosError | None = None
        self._monitor: Channel | None = None
        if curve is not None and endpoint.startswith("tcp://"):
            self._monitor = Channel(sock.get_monitor_socket(HANDSHAKE_EVENTS), on_readable=self._on_monitor)
        self._ch = Channel(sock, on_readable=self._on_readable)
        self._ids = itertools.count(1)
        self._calls: dict[int, _Answers] = {}
        self.last_heard = time.monotonic()
        self._stalls = Stalls()  # spans this process's loop did not run (a late wake-up)
        self.on_request: RequestHandler | None = None
        self.on_disconnect: Callable[[], None] | None = None
        # DISCONNECT carrying a msg id: the requester of that request is gone.
        self.on_cancel: Callable[[int], None] | None = None
        self.last_sent = 0.0
        self.token: bytes = b""
        self.closed = False
        self._events = codec.AnyDecoder()

    def send(self, header: Header, body: Message | Error | bytes | None = None, buffers: tuple[Any, ...] = ()) -> bool:
        frames: list[Any] = [b"", encode_header(header)]
        if body is not None:
            frames.append(body if isinstance(body, bytes) else codec.encode(body))
        frames.extend(buffers)
        size = sum(len(f) for f in frames[1:])
        if size > self.max_message_bytes:
            raise BadRequest(f"{header.op or 'message'} is {size} bytes; the kernel takes at most "
                             f"{self.max_message_bytes} from this peer", detail={"bytes": size})
        self.last_sent = time.monotonic()
        return self._ch.send(frames)

    def send_control(self, kind: Kind) -> None:
        self.send(Header(PROTOCOL_VERSION, kind, src=self.src))

    def _on_readable(self) -> None:
        if self.closed:
            return
        for frames in self._ch.drain():
            self._dispatch(frames)

    def _on_monitor(self) -> None:
        if self.closed or self._monitor is None:
            return
        for frames in self._monitor.drain():
            try:
                event = parse_monitor_message([f.bytes for f in frames])["event"]
            except (zmq.ZMQError, ValueError, IndexError):
                continue
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refusal = None  # e.g. the operator authorised the key and the retry got through
            elif event in HANDSHAKE_FAILED and self.refusal is None:
                self._refuse(_handshake_error(self.endpoint, event))

    def _refuse(self, exc: LlmosError) -> None:
        """The kernel will not talk to us: every call waiting fails with why, now."""
        self.refusal = exc
        body = codec.encode(exc.to_wire())
        for msg_id, q in self._calls.items():
            q.put_nowait((Header(PROTOCOL_VERSION, Kind.ERROR, msg_id, op="Error"), [body]))

    def _dispatch(self, frames: list[Any]) -> None:
        if len(frames) < 2 or len(frames[0]) != 0:
            log.warning("conn.malformed_frames", parts=len(frames))
            return
        try:
            header = decode_header(frames[1])
        except BadRequest as exc:
            log.warning("conn.malformed_header", error=exc.message)
            return
        self.last_heard = time.monotonic()
        kind = header.kind
        if kind == Kind.REPLY or kind == Kind.ERROR or kind == Kind.EVENT:
            q = self._calls.get(header.msg_id)
            if q is not None:
                q.put_nowait((header, frames[2:]))
            elif kind == Kind.ERROR:
                log.warning("conn.unsolicited_error", body=_describe_error(frames[2:]))
        elif kind == Kind.EVENTS:
            self._dispatch_events(header, frames[2:])
        elif kind == Kind.REQUEST:
            if self.on_request is not None:
                self.on_request(header, frames[2:])
        elif kind == Kind.DISCONNECT:
            if header.msg_id:
                if self.on_cancel is not None:
                    self.on_cancel(header.msg_id)
            elif self.on_disconnect is not None:
                self.on_disconnect()

    def _dispatch_events(self, header: Header, payload: list[Any]) -> None:
        """Several calls' events in one frame: each to its call, in order, as
        if it had come alone (a call that is gone drops its own, as above)."""
        try:
            batch = decode_event_batch(payload)
        except BadRequest as exc:
            log.warning("conn.malformed_events", error=exc.message)
            return
        calls, src = self._calls, header.src
        for ev in batch.events:
            q = calls.get(ev.msg_id)
            if q is not None:
                q.put_nowait((Header(PROTOCOL_VERSION, Kind.EVENT, ev.msg_id, src=src, op=ev.op), [ev.body]))

    def _request_header(self, dst: str, msg: Message, deadline_ns: int, msg_id: int, trace_id: str,
                        kind: Kind) -> Header:
        return Header(PROTOCOL_VERSION, kind, msg_id, src=self.src, dst=dst, op=op_of(msg),
                      token=self.token, deadline_ns=deadline_ns, trace_id=trace_id)

    async def call(self, dst: str, msg: Request[ReplyT], *, timeout: float | None = None, trace_id: str = "",
                   buffers: tuple[Any, ...] = (), kind: Kind = Kind.REQUEST) -> ReplyT:
        """Send a request and return its reply, of the type the request declares;
        an ERROR raises its exception, events before the reply are skipped.
        (`kind=Kind.READY` is the one other exchange: a service registering.)"""
        if not isinstance(msg, Request):
            raise TypeError(f"{op_of(msg)} declares no reply type (not a Request); stream() it")
        async for header, payload in self._exchange(dst, msg, timeout, trace_id, buffers, kind):
            if header.kind != Kind.EVENT:
                return self._reply(header, payload, type(msg))
        raise Internal("stream ended without a reply")  # pragma: no cover - _exchange always ends on one

    async def stream(self, dst: str, msg: Message, *, timeout: float | None = None, trace_id: str = "",
                     ready: Callable[[], Awaitable[None]] | None = None) -> AsyncGenerator[Message, None]:
        """Yield every EVENT body, then the final REPLY body (of the type a
        `Request` declares; a message that is not one, e.g. `Subscribe`, is
        answered by events only); an ERROR raises. `ready` is awaited before
        the request leaves (sdk/auth.py: the token renewed), here rather than
        in a generator around this one, which cost each event a layer."""
        if ready is not None:
            await ready()
        async for header, payload in self._exchange(dst, msg, timeout, trace_id, (), Kind.REQUEST):
            if header.kind == Kind.EVENT:
                yield self._events.decode(self._body(header, payload), f"{header.op} event")
            elif isinstance(msg, Request):
                yield self._reply(header, payload, type(msg))
            else:
                self._body(header, payload)  # an ERROR raises
                raise Internal(f"protocol error: {op_of(msg)} is answered by events only, got a {header.op} reply")

    async def _exchange(self, dst: str, msg: Message, timeout: float | None, trace_id: str,
                        buffers: tuple[Any, ...], kind: Kind) -> AsyncIterator[Answer]:
        if self.closed:
            raise Unavailable("connection is closed")
        if self.refusal is not None:
            raise self.refusal
        msg_id = next(self._ids)
        deadline_ns = time.time_ns() + int(timeout * 1e9) if timeout else 0
        q = _Answers()
        self._calls[msg_id] = q
        tick = _Tick(q)
        try:
            if not self.send(self._request_header(dst, msg, deadline_ns, msg_id, trace_id, kind), msg, buffers):
                raise Unavailable(f"cannot send to the kernel at {self.endpoint}")
            end = time.monotonic() + timeout if timeout else None
            while True:
                header, payload = await self._next(q, tick, end, dst, msg)
                yield header, payload
                if header.kind != Kind.EVENT:
                    return
        finally:
            self._calls.pop(msg_id, None)
            tick.close()

    async def _next(self, q: _Answers, tick: _Tick, end: float | None, dst: str,
                    msg: Message) -> Answer:
        since = time.monotonic()
        if since - self.last_sent > HEARTBEAT_INTERVAL_S:
            # The kernel cancels the requests of a client silent for too long,
            # so a long stream that only receives still says it is alive.
            self.send_control(Kind.HEARTBEAT)
        while True:
            wait = HEARTBEAT_INTERVAL_S
            if end is not None:
                wait = min(wait, end - time.monotonic())
                if wait <= 0:
                    raise DeadlineExceeded(f"{op_of(msg)} to {dst!r} timed out")
            # A timer that wakes the get, rather than a cancel scope around
            # it (a stream of tokens spent a quarter of its client's CPU on
            # scopes), and one per call, not per event (_Tick).
            tick.arm(wait)
            armed = time.monotonic()
            try:
                got = await q.get()
            finally:
                tick.disarm()
            if got is not _TICK:
                return got
            if self.closed:
                raise Unavailable("connection closed while waiting")
            self._on_monitor()  # in case the monitor's wake-up was missed
            if self.refusal is not None:
                raise self.refusal
            now = time.monotonic()
            if now - armed > wait + HEARTBEAT_INTERVAL_S / 2:
                # This process did not run: what the kernel sent meanwhile may
                # still be unread, so that span is not the kernel's silence
                # (only the span: a client late every time still finds it dead).
                self._stalls.note(armed + wait, now)
            if self._stalls.silence(now, max(self.last_heard, since)) > HEARTBEAT_EXPIRY_S:
                raise Unavailable(f"the kernel at {self.endpoint} stopped answering")
            self.send_control(Kind.HEARTBEAT)

    @staticmethod
    def _body(header: Header, payload: list[Any]) -> Any:
        if not payload:
            raise Internal(f"{header.op or 'answer'} arrived without a body")
        if header.kind == Kind.ERROR:
            err = codec.decode_body(codec.error_decoder, payload[0], "error body")
            raise err.exception()
        return payload[0]

    def _reply(self, header: Header, payload: list[Any], request: type[Request[ReplyT]]) -> ReplyT:
        return codec.decode_reply(request, self._body(header, payload))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send_control(Kind.DISCONNECT)
        finally:
            if self._monitor is not None:
                self._ch.sock.disable_monitor()
                self._monitor.close()
            self._ch.close()


HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | functools.reduce(operator.or_, HANDSHAKE_FAILED)


def _handshake_error(endpoint: str, event: int) -> LlmosError:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Unauthorized(f"refused: this client's key is not authorised by the kernel at {endpoint} "
                            "(the kernel's operator adds its public key to curve/authorized/; see docs/security.md)")
    return Unauthorized(f"refused: the CURVE handshake with {endpoint} failed (is curve/kernel.key this "
                        "kernel's public key, and does it serve CURVE there?)")


def _describe_error(payload: list[Any]) -> str:
    try:
        err = msgspec.msgpack.decode(payload[0], type=Error)
        return f"{err.code}: {err.message}"
    except (msgspec.DecodeError, IndexError):
        return "undecodable"


__all__ = ["Connection", "LlmosError"]
