"""The `Service` base class every server and driver is built on.

    class EchoService(Service):
        name = "echo"

        @handler(idempotent=True)
        async def echo(self, msg: Echo, ctx: Context) -> EchoReply:
            return EchoReply(msg.payload, ctx.instance)

`Service.main()` runs it as a supervised child: connect to the kernel's back
socket, `on_start`, READY (with the boot secret), heartbeats, one task per
request, and a clean shutdown on SIGTERM, DISCONNECT or a silent kernel.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar

import anyio
import structlog
from anyio.abc import TaskGroup

from ipc import codec
from common.capability import Restrictions
from ipc.envelope import MAX_BATCH, PROTOCOL_VERSION, BatchedEvent, Header, Kind, events_message
from ipc.errors import EX_CONFIG, BadRequest, ConfigError, DeadlineExceeded, Internal, LlmosError, Unavailable
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S, Stalls
from common.home import back_endpoint, llmos_home
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message, ReplyT, Request, op_of, reply_type
from sdk.auth import service_keys
from sdk.connection import Connection
from common.logs import configure, get_logger

log = get_logger()

# A batch of events is sent once it holds this many bytes of bodies.
_BATCH_BYTES = 1 << 20

HandlerFn = Callable[[Any, Any, "Context"], Awaitable[Message | None]]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    fn: HandlerFn
    msg_type: type[Message]
    idempotent: bool


def handler(fn: Callable[..., Any] | None = None, *, idempotent: bool = False) -> Any:
    """Mark a method as the handler of the message type its first argument is
    annotated with. `idempotent` lets the kernel re-send the request to a new
    instance if this one dies while handling it."""

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        f.__llmos_handler__ = idempotent  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


class Context:
    """What a handler knows about the request it serves."""

    __slots__ = ("header", "buffers", "_service")

    def __init__(self, header: Header, service: "Service", buffers: list[Any]):
        self.header = header
        self.buffers = buffers  # extra frames after the body (bulk data, zero-copy)
        self._service = service

    @property
    def principal(self) -> str:
        """Who asked: stamped by the kernel from the verified capability token
        ("" when the kernel runs without auth). Never what a client claimed."""
        return self.header.principal

    @property
    def restrictions(self) -> Restrictions:
        """The token's caveats that depend on the request body (max_tokens,
        session): verified by the kernel, for this service to enforce."""
        return Restrictions.decode(self.header.restrictions)

    @property
    def trace_id(self) -> str:
        return self.header.trace_id

    @property
    def attempt(self) -> int:
        return self.header.attempt

    @property
    def instance(self) -> str:
        return self._service.instance

    def emit(self, event: Message, buffers: tuple[Any, ...] = ()) -> None:
        """Stream an event to the requester before the final reply. Events
        of the same loop tick leave together, one frame for all the calls
        (`Kind.EVENTS`); one with `buffers` goes alone, in its order."""
        self._service._emit(self.header, event, buffers)


class Service:
    name: ClassVar[str] = ""
    handlers: ClassVar[dict[str, HandlerSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, HandlerSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                idem = getattr(fn, "__llmos_handler__", None)
                if idem is None:
                    continue
                msg_type = _served_type(cls, attr, fn)
                found[op_of(msg_type)] = HandlerSpec(fn, msg_type, bool(idem))
        cls.handlers = found

    def __init__(self, instance: str | None = None, *, home: str | None = None, back: str | None = None,
                 secret: str | None = None):
        self.home = llmos_home(home)
        self.instance = instance or os.environ.get("LLMOS_INSTANCE") or self.name
        self.back = back or back_endpoint(self.home)
        self._secret = secret if secret is not None else os.environ.get("LLMOS_BOOT_SECRET", "")
        self._decoder = codec.decoder([h.msg_type for h in self.handlers.values()]) if self.handlers else None
        self._conn: Connection | None = None
        self._tg: TaskGroup | None = None
        self._stop = anyio.Event()
        self.stop_reason = ""
        self._parent = os.getppid()
        # msg id → the cancel scope of the handler serving it
        self._running: dict[int, anyio.CancelScope] = {}
        # Events emitted this loop tick, sent as one frame at its end (or
        # before anything that must follow them: a reply, an event with
        # buffers, a full batch).
        self._events: list[BatchedEvent] = []
        self._events_bytes = 0

    async def on_start(self) -> None:
        """Before READY: load what the service needs. Failing here exits non-zero."""

    async def on_stop(self) -> None:
        """After the last request is answered or cancelled, before disconnecting."""

    def ready_meta(self) -> dict[str, str | int | float | bool]:
        """Facts other services need at registration (sent in READY)."""
        return {}

    async def background(self, tg: TaskGroup) -> None:
        """Start long-running tasks of the service in `tg` (owned by the service)."""

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise Unavailable(f"{self.instance} is not connected")
        return self._conn

    async def call(self, service: str, msg: Request[ReplyT], *, timeout: float | None = None,
                   buffers: tuple[Any, ...] = ()) -> ReplyT:
        return await self.conn.call(service, msg, timeout=timeout, buffers=buffers)

    def stream(self, service: str, msg: Message, *, timeout: float | None = None) -> AsyncIterator[Message]:
        return self.conn.stream(service, msg, timeout=timeout)

    def publish(self, topic: str, event: Message) -> None:
        self.conn.send(Header(PROTOCOL_VERSION, Kind.EVENT, 0, src=self.instance, dst=topic, op=op_of(event)), event)

    def subscribe(self, topic: str) -> AsyncIterator[Message]:
        """Events on `topic`; the first one is `Subscribed` (the subscription is live)."""
        return self.conn.stream(kp.KERNEL, kp.Subscribe(topic))

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        self._stop.set()

    @classmethod
    def main(cls) -> None:
        """Entry point for `python -m services.NAME`."""
        # Logging first: building the service decodes its config table.
        configure(os.environ.get("LLMOS_INSTANCE") or cls.name, llmos_home(None))
        try:
            svc = cls()
            anyio.run(svc.run, backend="asyncio", backend_options={"use_uvloop": True})
        except ConfigError as exc:
            # Restarting cannot fix it: say why in one line, where the
            # supervisor reads it, and exit EX_CONFIG so it does not retry.
            _report_permanent(exc.message)
            sys.exit(EX_CONFIG)
        except LlmosError as exc:
            log.error("service.failed", error=str(exc))
            sys.exit(1)
        sys.exit(0)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # A fresh routing identity per incarnation: the kernel's ROUTER lets no
        # peer take over a connected identity, so a restarted instance must
        # not need its predecessor's connection to be gone first.
        conn = Connection(self.back, identity=f"{self.instance}.{secrets.token_hex(4)}".encode(),
                          src=self.instance, curve=service_keys(self.back, self.home))
        self._conn = conn
        conn.on_request = self._on_request
        conn.on_disconnect = lambda: self.stop("kernel said DISCONNECT")
        conn.on_cancel = self._cancel_request
        try:
            await self.on_start()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._signals)
                await self._register()
                tg.start_soon(self._heartbeat)
                await self.background(tg)
                task_status.started()
                log.info("service.ready", instance=self.instance)
                await self._stop.wait()
                log.info("service.stopping", reason=self.stop_reason)
                tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.on_stop()
        finally:
            self._conn = None
            conn.close()

    async def _register(self) -> None:
        ready = kp.Ready(self.name, self.instance, os.getpid(), self._secret,
                         ops=list(self.handlers), idempotent_ops=[op for op, h in self.handlers.items() if h.idempotent],
                         meta=self.ready_meta())
        try:
            await self.conn.call(kp.KERNEL, ready, timeout=HEARTBEAT_EXPIRY_S * 3, kind=Kind.READY)
        except DeadlineExceeded:
            raise Unavailable(f"the kernel at {self.back} did not answer READY") from None

    async def _heartbeat(self) -> None:
        conn = self.conn
        stalls = Stalls()
        last, cpu = time.monotonic(), time.thread_time()
        while True:
            await anyio.sleep(HEARTBEAT_INTERVAL_S)
            conn.send_control(Kind.HEARTBEAT)
            now, cpu_now = time.monotonic(), time.thread_time()
            if now - last > HEARTBEAT_INTERVAL_S * 1.5:
                # This loop did not get to run for that long: the kernel may
                # count our heartbeats missed (the kernel's own is
                # kernel.ticker_late). loop_cpu_s near the interval: our own
                # work held the loop; near 0: the host did not run us.
                log.warning("service.heartbeat_late", late_s=round(now - last - HEARTBEAT_INTERVAL_S, 3),
                            loop_cpu_s=round(cpu_now - cpu, 3))
                # The kernel's heartbeats of that span may still wait unread:
                # it is not the kernel's silence (only the span: a loop late
                # every time still finds a dead kernel).
                stalls.note(last + HEARTBEAT_INTERVAL_S, now)
            last, cpu = now, cpu_now
            silent = stalls.silence(now, conn.last_heard)
            if silent > HEARTBEAT_EXPIRY_S or os.getppid() != self._parent:
                # The kernel is gone: an orphan must not linger.
                self.stop(f"kernel silent for {silent:.1f}s")
                return

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                self.stop(f"signal {signal.Signals(sig).name}")

    def _on_request(self, header: Header, payload: list[Any]) -> None:
        spec = self.handlers.get(header.op)
        try:
            if spec is None or self._decoder is None:
                raise BadRequest(f"{self.name} has no op {header.op!r}")
            if not payload:
                raise BadRequest(f"{header.op} without a body")
            msg = codec.decode_body(self._decoder, payload[0], f"{header.op} body")
            if type(msg) is not spec.msg_type:
                raise BadRequest(f"header op {header.op!r} does not match body type {op_of(msg)!r}")
        except LlmosError as exc:
            self._send_answer(header, Kind.ERROR, exc.to_wire())
            return
        if self._tg is None:
            self._send_answer(header, Kind.ERROR, Unavailable(f"{self.instance} is starting").to_wire())
            return
        self._tg.start_soon(self._serve, spec, msg, header, payload[1:])

    async def _serve(self, spec: HandlerSpec, msg: Message, header: Header, buffers: list[Any]) -> None:
        ctx = Context(header, self, buffers)
        scope = anyio.CancelScope()
        self._running[header.msg_id] = scope
        try:
            with scope:
                await self._serve_in_scope(spec, msg, header, ctx)
        finally:
            self._running.pop(header.msg_id, None)
        if scope.cancelled_caught:
            log.info("service.request_cancelled", op=header.op, reason="requester gone")

    def _cancel_request(self, msg_id: int) -> None:
        scope = self._running.get(msg_id)
        if scope is not None:
            scope.cancel()

    async def _serve_in_scope(self, spec: HandlerSpec, msg: Message, header: Header, ctx: Context) -> None:
        if header.trace_id:
            structlog.contextvars.bind_contextvars(trace_id=header.trace_id)  # this task's context only
        try:
            timeout = (header.deadline_ns - time.time_ns()) / 1e9 if header.deadline_ns else None
            with anyio.fail_after(timeout):
                reply = await spec.fn(self, msg, ctx)
        except TimeoutError:
            self._send_answer(header, Kind.ERROR, DeadlineExceeded(f"{header.op} ran past its deadline").to_wire())
            return
        except LlmosError as exc:
            self._send_answer(header, Kind.ERROR, exc.to_wire())
            return
        except Exception as exc:  # a handler bug must not take the service down
            log.exception("service.handler_failed", op=header.op)
            self._send_answer(header, Kind.ERROR, Internal(f"{header.op} failed: {type(exc).__name__}: {exc}").to_wire())
            return
        self._send_answer(header, Kind.REPLY, reply)

    def _emit(self, req: Header, event: Message, buffers: tuple[Any, ...]) -> None:
        if buffers:
            self._send_answer(req, Kind.EVENT, event, buffers)
            return
        body = codec.encode(event)
        events = self._events
        events.append(BatchedEvent(req.msg_id, op_of(event), body))
        self._events_bytes += len(body)
        if len(events) == 1:
            asyncio.get_running_loop().call_soon(self._flush_events)
        elif len(events) >= MAX_BATCH or self._events_bytes >= _BATCH_BYTES:
            self._flush_events()

    def _flush_events(self) -> None:
        events = self._events
        if not events:
            return
        self._events, self._events_bytes = [], 0
        conn = self._conn
        if conn is None:
            return
        conn.send(*events_message(events, self.instance))

    def _send_answer(self, req: Header, kind: Kind, body: Any, buffers: tuple[Any, ...] = ()) -> None:
        self._flush_events()  # a call's events go before its reply (and before a later event of its own)
        conn = self._conn
        if conn is None:
            return
        op = "Error" if kind == Kind.ERROR else (op_of(body) if body is not None else "")
        conn.send(Header(PROTOCOL_VERSION, kind, req.msg_id, src=self.instance, dst=req.src, op=op,
                         trace_id=req.trace_id, attempt=req.attempt), body, buffers)


def _served_type(cls: type, attr: str, fn: Callable[..., Any]) -> type[Request[Any]]:
    """The request type a handler serves (its first argument's annotation),
    checked against its return annotation: a handler answers with the reply
    type its request declares, which is what the caller decodes."""
    hints = typing.get_type_hints(fn)
    params = [p for p in hints if p != "return"]
    msg_type = hints[params[0]] if params else None
    if not (isinstance(msg_type, type) and issubclass(msg_type, Request)):
        raise TypeError(f"{cls.__name__}.{attr}: annotate the first argument with a Request type")
    if "return" in hints and hints["return"] is not reply_type(msg_type):
        raise TypeError(f"{cls.__name__}.{attr} returns {hints['return']!r}, but {msg_type.__name__} "
                        f"is answered with {reply_type(msg_type).__name__}")
    return msg_type


# The supervisor names this file (kernel/supervisor.py `exit_reason_path`).
EXIT_REASON_ENV = "LLMOS_EXIT_REASON"


def _report_permanent(reason: str) -> None:
    line = " ".join(reason.split())[:1000]  # one line, bounded
    log.error("service.failed_permanently", error=line)
    print(f"llmos: {os.environ.get('LLMOS_INSTANCE', '?')}: {line}", file=sys.stderr)
    path = os.environ.get(EXIT_REASON_ENV)
    if path:
        try:
            with open(path, "w") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the exit status alone still stops the retries
