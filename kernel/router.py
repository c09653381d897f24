"""The kernel's mechanism: two ROUTER sockets, routing, liveness, wait queues.

Clients talk to the front socket, services to the back socket. A request gets a
kernel routing id (`rid`) that replaces the sender's msg id on the way to the
service; the reply's rid finds the requester again. Only the header is decoded
here; bodies pass through untouched (except the kernel's own ops).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import anyio
import msgspec
import zmq
from anyio.abc import TaskStatus

from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header, split_route
from ipc.curve import BACK_DOMAIN, FRONT_DOMAIN, CurveServer, peer_key, start_zap
from ipc.errors import (BadRequest, DeadlineExceeded, Error, LlmosError, NotFound, Overloaded, Unauthorized,
                        Unavailable)
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message
from ipc.sockets import Channel, bind_router, ipc_path_id, remove_ipc_path
from kernel import ops
from kernel.clients import ClientBook
from kernel.config import KernelConfig
from kernel.guard import Guard
from kernel.registry import Instance, Registry
from kernel.topics import Topics
from kernel.waiting import WaitQueues
from common.logs import get_logger

if TYPE_CHECKING:
    from kernel.supervisor import Supervisor

log = get_logger()

_EMPTY = b""
_PUMP_ROUNDS = 32
# Messages per drain: the slice clock is read between batches, so a batch of
# slow messages must stay short.
_PUMP_BATCH = 128
# A pump call also stops after this long, so the heartbeat timer gets a turn
# every ~50 ms under any flood: 16 rounds of malformed frames (each logged and
# answered, ~0.1-0.2 ms apiece) could hold the loop for seconds.
_PUMP_SLICE_S = 0.05
HUNG = "missed heartbeats"
# Rejected frames logged one by one, per heartbeat tick; past that a flood is
# logged as a count each tick (every one is still answered and counted).
_REJECTS_LOGGED_PER_TICK = 25
_OP_AUDIT_BACKLOG = 1024
# After a flood the kernel hands freed heap back to the OS (glibc keeps it
# otherwise: 2.1 GB stayed resident after one, issue 12 #5). Checked this often,
# done when this many messages were handled since the last time.
_TRIM_EVERY_S = 10.0
_TRIM_AFTER_MESSAGES = 20_000
_ready_decoder = codec.decoder([kp.Ready])
_kernel_ops = codec.decoder([kp.Status, kp.Subscribe, kp.Kill, kp.Shutdown, kp.SetRevocations])


def _libc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return fn
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim with


_malloc_trim = _libc_trim()


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass(slots=True, eq=False)
class Pending:
    """A request the kernel has routed (or queued) and not yet seen answered."""

    rid: int
    origin: Channel
    origin_id: bytes
    origin_msg_id: int
    header: Header
    payload: list[Any]  # body frame and extra buffers, passed through as received
    queued_at: float
    instance: Instance | None = None
    public: bool = False  # an unauthenticated client request (Login): capped apart
    size: int = 0  # bytes of the header and body frames (counted against the client and wait queues)

    @property
    def deadline_ns(self) -> int:
        return self.header.deadline_ns



class Kernel:
    def __init__(self, config: KernelConfig, front: str, back: str, secret: str, guard: Guard | None = None):
        self.config = config
        self.front_endpoint = front
        self.back_endpoint = back
        self._secret = secret.encode()
        self.registry = Registry()
        self.guard = guard  # None: no capability check (auth off)
        self.curve: CurveServer | None = None  # keys for tcp:// endpoints (CURVE + ZAP)
        self.pending: dict[int, Pending] = {}
        self.waiting: WaitQueues[Pending] = WaitQueues(config.wait_queue_limit, config.wait_timeout_s,
                                                       config.wait_total_limit, config.wait_total_bytes)
        self.clients = ClientBook(config.client_inflight_limit, config.client_public_limit,
                                  config.public_inflight_limit, config.client_inflight_bytes,
                                  config.inflight_bytes_limit)
        self.topics = Topics([])  # bound to the sockets in serve()
        # front identity → when it was last heard (clients with work in flight ping)
        self.clients_seen: dict[bytes, float] = {}
        self.counters = kp.KernelCounters()
        # kernel ops done, waiting for the audit subscriber (bounded: the oldest go)
        self._op_audit: deque[kp.KernelOpDone] = deque(maxlen=_OP_AUDIT_BACKLOG)
        self._pump_continues = False  # a _continue_pump is scheduled
        self._trimmed_at = (0.0, 0)  # (monotonic, messages handled) at the last heap trim
        self._reject_log_budget = _REJECTS_LOGGED_PER_TICK
        self._rejects_unlogged = 0
        self.started = time.monotonic()
        self.supervisor: Supervisor | None = None
        self._rids = itertools.count(1)
        self._front: Channel | None = None
        self._back: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.shutdown_requested = anyio.Event()
        self.shutdown_reason = ""

    # -- lifecycle -----------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._loop = asyncio.get_running_loop()
        zap = start_zap(ctx, self.curve) if self.curve is not None else None
        front = Channel(bind_router(ctx, self.front_endpoint, self.config.front_limits, self.curve, FRONT_DOMAIN),
                        on_readable=self._pump, reader_reschedules=True)
        back = Channel(bind_router(ctx, self.back_endpoint, self.config.limits, self.curve, BACK_DOMAIN),
                       on_readable=self._pump, reader_reschedules=True)
        # The files this kernel made: only they are removed on the way out.
        made = {ep: ipc_path_id(ep) for ep in (self.front_endpoint, self.back_endpoint)}
        self._front, self._back, self.topics = front, back, Topics([front, back])
        log.info("kernel.listening", front=self.front_endpoint, back=self.back_endpoint)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ticker)
                task_status.started()
                self._pump()  # anything that arrived before the reader was armed
                await anyio.sleep_forever()
        finally:
            self._front = self._back = None
            front.close()
            back.close()
            if zap is not None:
                zap.stop()
            ctx.term()
            for ep, ident in made.items():
                remove_ipc_path(ep, ident)

    def _pump(self) -> None:
        """The loop's reader callback for both sockets: drain them in batches.
        Running as a callback, not a task, saves a task switch per wake-up;
        the work per call is bounded, then continued at the next turn of the
        loop. While a continuation is due, wake-ups leave the work to it, so a
        flood costs one slice per turn and the timers run every turn (with a
        continuation per wake-up they multiplied turn after turn, and the
        heartbeat timer fell seconds behind)."""
        front, back, loop = self._front, self._back, self._loop
        if front is None or back is None or loop is None or self._pump_continues:
            return  # (a continuation will drain what this wake-up is about)
        until = time.monotonic() + _PUMP_SLICE_S
        # Every way out below either found no input pending or schedules the
        # continuation, so the answers sent meanwhile need not look for input.
        with front.reading(), back.reading():
            for _ in range(_PUMP_ROUNDS):
                from_front, from_back = front.drain(_PUMP_BATCH), back.drain(_PUMP_BATCH)
                if not from_front and not from_back:
                    if front.pending_input() or back.pending_input():
                        continue
                    return
                for frames in from_front:
                    self._guarded(self._on_front, front, frames)
                for frames in from_back:
                    self._guarded(self._on_back, back, frames)
                if time.monotonic() > until:
                    break
        if not self._pump_continues:
            self._pump_continues = True
            loop.call_soon(self._continue_pump)

    def _continue_pump(self) -> None:
        self._pump_continues = False
        self._pump()

    def _guarded(self, fn: Callable[[list[Any]], None], ch: Channel, frames: list[Any]) -> None:
        """No input may crash the kernel: a bug on one message costs that message."""
        try:
            fn(frames)
        except Exception:
            self.counters.rejected += 1
            log.exception("kernel.message_failed", socket="front" if ch is self._front else "back")

    async def _ticker(self) -> None:
        """Heartbeats out, dead instances detected, expired waiters answered."""
        tick = HEARTBEAT_INTERVAL_S / 4
        last = time.monotonic()
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            if now - last > tick + HEARTBEAT_INTERVAL_S / 2:
                # The loop was busy for that long: peers may miss our heartbeats.
                log.warning("kernel.ticker_late", late_s=round(now - last - tick, 3))
            last = now
            self._log_unlogged_rejects()
            self.publish_audit()
            for inst in list(self.registry.by_identity.values()):
                if now - inst.last_seen > HEARTBEAT_EXPIRY_S:
                    self.instance_down(inst, HUNG)
                elif now - inst.last_ping >= HEARTBEAT_INTERVAL_S:
                    inst.last_ping = now
                    self._send_control(self._back_ch(), inst.identity, Kind.HEARTBEAT)
            self._expire_waiting(now)
            self._expire_clients(now)
            self._trim_heap(now)

    def _trim_heap(self, now: float) -> None:
        at, seen = self._trimmed_at
        c = self.counters
        handled = c.routed + c.rejected + c.queued
        if now - at >= _TRIM_EVERY_S and handled - seen >= _TRIM_AFTER_MESSAGES and not self.waiting:
            self._trimmed_at = (now, handled)
            trim_heap()

    def _log_unlogged_rejects(self) -> None:
        """A flood of bad frames costs one log line per tick, not one per frame."""
        if self._rejects_unlogged:
            log.warning("kernel.rejected_unlogged", count=self._rejects_unlogged,
                        note="more rejected frames than are logged one by one; see counters.rejected")
            self._rejects_unlogged = 0
        self._reject_log_budget = _REJECTS_LOGGED_PER_TICK

    def _expire_clients(self, now: float) -> None:
        """A client silent past the heartbeat expiry while it has requests in
        flight is gone (killed, or its host is): cancel what it asked for."""
        front = self._front
        if front is None:
            return
        silent = {ident for ident, seen in self.clients_seen.items() if now - seen > HEARTBEAT_EXPIRY_S}
        if not silent:
            return
        for ident in silent:
            del self.clients_seen[ident]
            self.topics.forget(front, ident)
            self._client_gone(front, ident, "client stopped answering")

    def _client_gone(self, ch: Channel, ident: bytes, reason: str) -> None:
        """Cancel the requester's outstanding requests: each serving instance
        gets DISCONNECT with the request's routing id, which cancels its
        handler. Costs what the client owned, nothing for one with nothing in
        flight (a flood of DISCONNECTs scanned every pending request)."""
        self.clients_seen.pop(ident, None)
        rids = self.clients.take(ident)
        if not rids:
            return
        cancelled = 0
        queued = False
        for rid in rids:
            p = self.pending.pop(rid, None)
            if p is None:
                queued = True  # waiting for an instance
                continue
            inst = p.instance
            if inst is not None:
                inst.outstanding.discard(rid)
                self._send_control(self._back_ch(), inst.identity, Kind.DISCONNECT, rid)
                cancelled += 1
        self.counters.cancelled += cancelled
        if queued:
            self.waiting.remove(lambda dst, p: p.origin is ch and p.origin_id == ident)
        log.info("kernel.client_gone", reason=reason, cancelled=cancelled)

    def request_shutdown(self, reason: str) -> None:
        self.shutdown_reason = self.shutdown_reason or reason
        self.shutdown_requested.set()

    def _back_ch(self) -> Channel:
        assert self._back is not None
        return self._back

    # -- frames in -----------------------------------------------------------

    def _parse(self, ch: Channel, frames: list[Any]) -> tuple[bytes, list[Any], Header] | None:
        """(identity, payload, header), or None after rejecting a malformed message."""
        try:
            ident, payload = split_route(frames)
            if not payload:
                raise BadRequest("missing header frame")
            return ident, payload, decode_header(payload[0])
        except BadRequest as exc:
            msg_id = exc.detail.get("msg_id", 0)
            self._reject(ch, frames, exc, msg_id=msg_id if isinstance(msg_id, int) else 0)
            return None

    def _on_front(self, frames: list[Any]) -> None:
        front = self._front
        assert front is not None
        parsed = self._parse(front, frames)
        if parsed is None:
            return
        ident, payload, header = parsed
        self.clients_seen[ident] = time.monotonic()
        kind = header.kind
        if kind == Kind.REQUEST:
            self._route(front, ident, header, payload)
        elif kind == Kind.HEARTBEAT:
            self._send_control(front, ident, Kind.HEARTBEAT)
        elif kind == Kind.DISCONNECT:
            self.topics.forget(front, ident)
            self._client_gone(front, ident, "client disconnected")
        elif kind == Kind.READY:
            exc = Unauthorized("clients cannot register as services")
            self._reject(front, frames, exc, header)
            if self.guard is not None:
                self.guard.note(header, exc, self._source(ident, None))
        else:
            self._reject(front, frames, BadRequest(f"a client may not send {Kind(kind).name}"), header)

    def _on_back(self, frames: list[Any]) -> None:
        back = self._back_ch()
        parsed = self._parse(back, frames)
        if parsed is None:
            return
        ident, payload, header = parsed
        inst = self.registry.by_identity.get(ident)
        kind = header.kind
        if kind == Kind.READY:
            self._register(ident, header, payload)
            return
        if inst is None:
            self._reject(back, frames, Unauthorized("not registered: send READY with the boot secret first"), header)
            # A stale instance the kernel already declared dead must stop, not linger.
            self._send_control(back, ident, Kind.DISCONNECT)
            return
        if inst.peer_key and peer_key(payload[0]) != inst.peer_key:
            self._reject(back, frames, Unauthorized(f"{inst.name} registered with another CURVE key"), header)
            return
        inst.last_seen = time.monotonic()
        if kind == Kind.REPLY or kind == Kind.ERROR:
            self._answer(inst, header, payload, final=True)
        elif kind == Kind.EVENT:
            if header.msg_id:
                self._answer(inst, header, payload, final=False)
            else:
                self.topics.publish(header.dst, inst.name, payload, header.op)
        elif kind == Kind.REQUEST:
            self._route(back, ident, header, payload, inst)
        elif kind == Kind.HEARTBEAT:
            pass
        elif kind == Kind.DISCONNECT:
            self.topics.forget(back, ident)
            self.instance_down(inst, "disconnected")

    def _reject(self, ch: Channel, frames: Sequence[Any], exc: LlmosError, header: Header | None = None,
                msg_id: int = 0) -> None:
        """Answer a malformed or forbidden frame where a return identity exists."""
        self.counters.rejected += 1
        if self._reject_log_budget > 0:
            self._reject_log_budget -= 1
            log.warning("kernel.rejected", code=exc.code, error=exc.message,
                        socket="front" if ch is self._front else "back")
        else:
            self._rejects_unlogged += 1
        if not frames or len(frames[0]) == 0:
            return
        if header is not None:
            msg_id = header.msg_id
        self._send_error(ch, bytes(frames[0]), msg_id, exc.to_wire())

    # -- routing -------------------------------------------------------------

    def _route(self, origin: Channel, ident: bytes, header: Header, payload: list[Any],
               inst: Instance | None = None) -> None:
        if inst is None:
            # From a client. Services trust only what is stamped here: the
            # verified principal, the source as the kernel sees it (its
            # routing id: the security server budgets failed logins by it),
            # and attempt 0 (only the kernel's own re-send counts attempts; a
            # client-set one bought re-admission without quota, issue 12 #3).
            source = self._source(ident, None)
            if self.guard is not None:
                try:
                    header = self.guard.admit(header, source)
                except LlmosError as exc:
                    self._send_error(origin, ident, header.msg_id, exc.to_wire())
                    return
            else:
                header = msgspec.structs.replace(header, principal="", restrictions=_EMPTY, src=source, attempt=0)
        elif header.src != inst.name:
            header = msgspec.structs.replace(header, src=inst.name)  # the registered name, not a claim
        dst = header.dst
        if dst == kp.KERNEL:
            self._kernel_op(origin, ident, header, payload, inst)
            return
        if len(payload) < 2:
            self._send_error(origin, ident, header.msg_id, BadRequest("request without a body frame").to_wire())
            return
        if header.deadline_ns and header.deadline_ns <= time.time_ns():
            self._send_error(origin, ident, header.msg_id,
                             DeadlineExceeded(f"deadline passed before routing to {dst!r}").to_wire())
            return
        p = Pending(next(self._rids), origin, ident, header.msg_id, header, payload, time.monotonic(),
                    size=sum(len(f) for f in payload))
        if inst is None:
            p.public = self.guard is not None and not header.principal
            why = self.clients.refusal(ident, p.public, p.size)
            if why:
                self._fail(p, Overloaded(f"{why}; wait for answers before sending more",
                                         detail={"retry_after_s": 0.1}))
                return
            self.clients.add(ident, p.rid, p.public, p.size)
        self._dispatch(p)

    def _dispatch(self, p: Pending) -> None:
        dst = p.header.dst
        inst = self.registry.pick(dst)
        if inst is None:
            self._enqueue(p)
            return
        header = msgspec.structs.replace(p.header, msg_id=p.rid, token=_EMPTY)
        back = self._back_ch()
        if not back.send([inst.identity, _EMPTY, encode_header(header), *p.payload[1:]]):
            if back.full:
                # Alive, and behind by a whole send queue: overload, not death.
                self._fail(p, Overloaded(f"{inst.name} has {self.config.limits.send_hwm} requests queued",
                                         detail={"retry_after_s": 0.5}))
                return
            # The instance vanished between its last heartbeat and now.
            self.instance_down(inst, "unreachable")
            self._enqueue(p)
            return
        p.instance = inst
        inst.outstanding.add(p.rid)
        self.pending[p.rid] = p
        self.counters.routed += 1

    def _enqueue(self, p: Pending) -> None:
        dst = p.header.dst
        if self.registry.names_an_instance(dst):
            self._fail(p, Unavailable(f"instance {dst!r} is not running (address the service to wait "
                                      f"for any instance)"))
            return
        if self.registry.service_of(dst) is None:
            self._fail(p, NotFound(f"no service named {dst!r}"))
            return
        if not self.waiting.add(dst, p):
            self._fail(p, Overloaded(f"{dst!r} is down and {self.waiting.full(dst, p.size)}",
                                     detail={"retry_after_s": 1.0}))
            return
        self.counters.queued += 1

    def _flush_waiting(self, inst: Instance) -> None:
        for p in list(self.waiting.take((inst.service, inst.name))):
            self._dispatch(p)

    def _expire_waiting(self, now: float) -> None:
        for dst, p, deadline in self.waiting.expire(now, time.time_ns()):
            if deadline:
                self._fail(p, DeadlineExceeded(f"{dst!r} did not come back before the deadline"))
            else:
                self._fail(p, Unavailable(f"{dst!r} has no live instance (waited {self.waiting.timeout_s:g}s)"))

    def _answer(self, inst: Instance, header: Header, payload: list[Any], *, final: bool) -> None:
        p = self.pending.get(header.msg_id)
        if p is None or p.instance is not inst:
            # Late answer to a request that was re-sent elsewhere or already failed.
            self.counters.dropped += 1
            return
        if final:
            del self.pending[p.rid]
            inst.outstanding.discard(p.rid)
            self._ended(p)
            self.counters.replies += 1
        out = msgspec.structs.replace(header, msg_id=p.origin_msg_id)
        if not p.origin.send([p.origin_id, _EMPTY, encode_header(out), *payload[1:]]):
            self.counters.dropped += 1

    def _fail(self, p: Pending, exc: LlmosError) -> None:
        self._ended(p)
        self._send_error(p.origin, p.origin_id, p.origin_msg_id, exc.to_wire())

    def _ended(self, p: Pending) -> None:
        if p.origin is self._front:
            self.clients.remove(p.origin_id, p.rid, p.public, p.size)

    def _send_error(self, ch: Channel, ident: bytes, msg_id: int, err: Error) -> None:
        header = Header(PROTOCOL_VERSION, Kind.ERROR, msg_id, src=kp.KERNEL, op="Error")
        if not ch.send([ident, _EMPTY, encode_header(header), codec.encode(err)]):
            self.counters.dropped += 1

    def _send_control(self, ch: Channel, ident: bytes, kind: Kind, msg_id: int = 0) -> None:
        ch.send([ident, _EMPTY, encode_header(Header(PROTOCOL_VERSION, kind, msg_id, src=kp.KERNEL))])

    def _send_msg(self, ch: Channel, ident: bytes, msg_id: int, kind: Kind, body: Message) -> bool:
        header = Header(PROTOCOL_VERSION, kind, msg_id, src=kp.KERNEL, op=type(body).__name__)
        return ch.send([ident, _EMPTY, encode_header(header), codec.encode(body)])

    # -- registration and death -------------------------------------------------

    def _register(self, ident: bytes, header: Header, payload: list[Any]) -> None:
        back = self._back_ch()
        try:
            if len(payload) < 2:
                raise BadRequest("READY without a body")
            ready: kp.Ready = codec.decode_body(_ready_decoder, payload[1], "READY body")
        except BadRequest as exc:
            self._reject(back, [ident], exc, header)
            return
        if not hmac.compare_digest(ready.secret.encode(), self._secret):
            self._reject(back, [ident], Unauthorized("wrong boot secret"), header)
            return
        for old in (self.registry.by_identity.get(ident), self.registry.by_name.get(ready.instance)):
            if old is not None:
                self.instance_down(old, "replaced by a new registration")
        inst = Instance(ready.service, ready.instance, ident, ready.pid, frozenset(ready.ops),
                        frozenset(ready.idempotent_ops), dict(ready.meta), peer_key=peer_key(payload[0]))
        self.registry.add(inst)
        self._send_msg(back, ident, header.msg_id, Kind.REPLY, kp.Registered(inst.name))
        log.info("kernel.registered", service=inst.service, instance=inst.name, pid=inst.pid)
        if self.supervisor is not None:
            self.supervisor.on_ready(inst.name, inst.pid)
        self.publish(kp.SERVICES_TOPIC, kp.ServiceUp(inst.service, inst.name, inst.pid, inst.meta))
        self._flush_waiting(inst)

    def instance_down(self, which: Instance | str, reason: str) -> None:
        """Forget a dead instance; re-send or fail what it held; tell subscribers."""
        found = self.registry.by_name.get(which) if isinstance(which, str) else which
        if found is None:
            return
        inst = found
        if self.registry.by_identity.get(inst.identity) is not inst:
            return
        self.registry.remove(inst)
        log.warning("kernel.instance_down", service=inst.service, instance=inst.name, reason=reason)
        for rid in sorted(inst.outstanding):
            p = self.pending.pop(rid, None)
            if p is None:
                continue
            p.instance = None
            op = p.header.op
            if (op in inst.idempotent_ops and p.header.attempt + 1 < self.config.max_attempts
                    and not self.registry.names_an_instance(p.header.dst)):
                p.header = msgspec.structs.replace(p.header, attempt=p.header.attempt + 1)
                self.counters.resent += 1
                self._dispatch(p)
            else:
                self._fail(p, Unavailable(f"{inst.name} died while handling {op} ({reason})"))
        inst.outstanding.clear()
        self.publish(kp.SERVICES_TOPIC, kp.ServiceDown(inst.service, inst.name, reason))
        if reason == HUNG and self.supervisor is not None:
            # A hung process is killed so the supervisor can restart it (MINIX 3's RS).
            self.supervisor.kill_quietly(inst.name, inst.pid)

    # -- events ----------------------------------------------------------------

    def publish(self, topic: str, body: Message) -> None:
        self.topics.publish(topic, kp.KERNEL, [None, codec.encode(body)], type(body).__name__)

    def publish_audit(self) -> None:
        """Refusals and kernel ops go to the audit (the security server
        subscribes). Kept in bounded backlogs while nobody listens; refusals
        are flushed once per tick, aggregated, so a flood costs a few events."""
        if not self.topics.has_subscribers(kp.DENIALS_TOPIC):
            return
        while self._op_audit:
            self.publish(kp.DENIALS_TOPIC, self._op_audit.popleft())
        if self.guard is not None:
            for ev in self.guard.take_denials():
                self.publish(kp.DENIALS_TOPIC, ev)

    # -- the kernel's own ops ------------------------------------------------------

    def _kernel_op(self, ch: Channel, ident: bytes, header: Header, payload: list[Any],
                   inst: Instance | None) -> None:
        checked: Message | None = None  # the op, once its body is known to be what was authorised
        try:
            if len(payload) < 2:
                raise BadRequest("kernel request without a body")
            msg = codec.decode_body(_kernel_ops, payload[1], f"kernel op {header.op!r}")
            try:
                ops.check(header, msg)
            except BadRequest as exc:
                if self.guard is not None:  # a disguised op is an attack: audited like a refusal
                    self.guard.note(header, exc, self._source(ident, inst), header.principal)
                raise
            checked = msg
            reply = ops.handle(self, ch, ident, header, msg, inst)
        except LlmosError as exc:
            if checked is not None and ops.audited(checked):
                self._audit_op(checked, header, ident, inst, str(exc.code))
            self._send_error(ch, ident, header.msg_id, exc.to_wire())
            return
        if ops.audited(msg):
            self._audit_op(msg, header, ident, inst, "ok")
        if reply is not None:
            self._send_msg(ch, ident, header.msg_id, Kind.REPLY, reply)

    def _audit_op(self, msg: Message, header: Header, ident: bytes, inst: Instance | None, outcome: str) -> None:
        self._op_audit.append(kp.KernelOpDone(type(msg).__name__, header.principal, self._source(ident, inst),
                                              ops.target_of(msg), outcome, time.time()))
        self.publish_audit()  # at once: a Shutdown's record must leave before the security server stops

    @staticmethod
    def _source(ident: bytes, inst: Instance | None) -> str:
        return f"back:{inst.name}" if inst is not None else f"front:{ident.hex()}"

    def status(self) -> kp.StatusReply:
        return ops.status(self)
