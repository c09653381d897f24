"""The kernel's routing as a state machine, without I/O.

In: requests and answers (kernel/inbox.py turns what the sockets received
into these calls), registrations, an instance's death (`instance_down`,
`instance_hung`), a client's (`client_gone`) and the passing of time
(`expire_waiting`; kernel/liveness.py keeps the clock). Out: frames sent
through the two injected ports (kernel/ports.py) and the supervisor's hooks
(`Children`). Unit tests drive it with frame lists and fake ports.

A request gets a kernel routing id (`rid`) that replaces the sender's msg id
on the way to the service; the reply's rid finds the requester again. Bodies
pass through untouched, except the kernel's own ops (kernel/ops.py), which
act on the kernel through the verbs at the end (`ops.KernelHost`).
"""

from __future__ import annotations

import hmac
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from common.capability import RevocationList
from common.logs import get_logger
from ipc import codec
from ipc.curve import KeyRing, peer_key
from ipc.envelope import Header, Kind, encode_header
from ipc.errors import BadRequest, DeadlineExceeded, LlmosError, NotFound, Overloaded, Unauthorized, Unavailable
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message
from kernel import ops
from kernel.clients import ClientBook
from kernel.config import KernelConfig
from kernel.guard import Guard
from kernel.keys import key_refusal
from kernel.ports import Children, ClosedPort, Port
from kernel.registry import Instance, Registry
from kernel.replies import Replies
from kernel.topics import Topics
from kernel.waiting import WaitQueues

log = get_logger()

_EMPTY = b""
HUNG, REPLACED = "missed heartbeats", "replaced by a new registration"
_OP_AUDIT_BACKLOG = 1024
_ready_decoder = codec.decoder([kp.Ready])
_kernel_ops = codec.decoder([kp.Status, kp.Subscribe, kp.Kill, kp.Shutdown, kp.SetRevocations])


@dataclass(slots=True, eq=False)
class Pending:
    """A request the kernel has routed (or queued) and not yet seen answered."""

    rid: int
    origin: Port
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


class Router:
    def __init__(self, config: KernelConfig, secret: str, *, guard: Guard | None = None,
                 on_shutdown: Callable[[str], None] = lambda reason: None,
                 clock: Callable[[], float] = time.monotonic, wall_ns: Callable[[], int] = time.time_ns):
        """`clock` is monotonic seconds, `wall_ns` the time deadlines are in."""
        self.config = config
        self._secret = secret.encode()
        self.registry = Registry()
        self.guard = guard  # None: no capability check (auth off)
        self.children: Children | None = None
        self.keyring: KeyRing | None = None  # tcp://: the CURVE keys issued to children (ipc/curve.py)
        self.on_shutdown = on_shutdown
        self.pending: dict[int, Pending] = {}
        self.waiting: WaitQueues[Pending] = WaitQueues(config.wait_queue_limit, config.wait_timeout_s,
                                                       config.wait_total_limit, config.wait_total_bytes)
        self.clients = ClientBook(config.client_inflight_limit, config.client_public_limit,
                                  config.public_inflight_limit, config.client_inflight_bytes,
                                  config.inflight_bytes_limit)
        # front identity → when it was last heard (clients with work in flight ping)
        self.clients_seen: dict[bytes, float] = {}
        self.counters = kp.KernelCounters()
        self.replies = Replies(self.counters)
        self.front: Port = ClosedPort()
        self.back: Port = ClosedPort()
        self.topics = Topics([self.front, self.back])
        # kernel ops done, waiting for the audit subscriber (bounded: the oldest go)
        self._op_audit: deque[kp.KernelOpDone] = deque(maxlen=_OP_AUDIT_BACKLOG)
        self._rids = itertools.count(1)
        self.clock = clock
        self._wall_ns = wall_ns
        self.started = clock()

    def attach(self, front: Port, back: Port) -> None:
        """Send through these from now on (subscriptions start afresh)."""
        self.front, self.back, self.topics = front, back, Topics([front, back])

    def detach(self) -> None:
        self.attach(ClosedPort(), ClosedPort())

    def route(self, origin: Port, ident: bytes, header: Header, payload: list[Any],
              inst: Instance | None = None) -> None:
        """A request from a client (`inst` None) or from a registered instance."""
        if inst is None:
            # From a client. Services trust only what is stamped here: the
            # verified principal, the source as the kernel sees it (its
            # routing id: the security server budgets failed logins by it),
            # and attempt 0 (only the kernel's own re-send counts attempts; a
            # client-set one bought re-admission without quota, issue 12 #3).
            src = source(ident, None)
            if self.guard is not None:
                try:
                    header = self.guard.admit(header, src)
                except LlmosError as exc:
                    self.replies.error(origin, ident, header.msg_id, exc.to_wire())
                    return
            else:
                header = msgspec.structs.replace(header, principal="", restrictions=_EMPTY, src=src, attempt=0)
        elif header.src != inst.name:
            header = msgspec.structs.replace(header, src=inst.name)  # the registered name, not a claim
        dst = header.dst
        if dst == kp.KERNEL:
            self._kernel_op(origin, ident, header, payload, inst)
            return
        if len(payload) < 2:
            self.replies.error(origin, ident, header.msg_id, BadRequest("request without a body frame").to_wire())
            return
        if header.deadline_ns and header.deadline_ns <= self._wall_ns():
            self.replies.error(origin, ident, header.msg_id,
                               DeadlineExceeded(f"deadline passed before routing to {dst!r}").to_wire())
            return
        p = Pending(next(self._rids), origin, ident, header.msg_id, header, payload, self.clock(),
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
        inst = self.registry.pick(p.header.dst)
        if inst is None:
            self._enqueue(p)
            return
        header = msgspec.structs.replace(p.header, msg_id=p.rid, token=_EMPTY)
        back = self.back
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

    def expire_waiting(self, now: float) -> None:
        """Fail the waiters whose deadline passed or that waited too long."""
        for dst, p, deadline in self.waiting.expire(now, self._wall_ns()):
            if deadline:
                self._fail(p, DeadlineExceeded(f"{dst!r} did not come back before the deadline"))
            else:
                self._fail(p, Unavailable(f"{dst!r} has no live instance (waited {self.waiting.timeout_s:g}s)"))

    def answer(self, inst: Instance, header: Header, payload: list[Any], *, final: bool) -> None:
        """A reply or error (`final`), or a streamed event, from `inst`."""
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
        self.replies.error(p.origin, p.origin_id, p.origin_msg_id, exc.to_wire())

    def _ended(self, p: Pending) -> None:
        if p.origin is self.front:
            self.clients.remove(p.origin_id, p.rid, p.public, p.size)

    def client_gone(self, ident: bytes, reason: str) -> None:
        """Forget a client and cancel its outstanding requests: each serving
        instance gets DISCONNECT with the request's routing id, which cancels
        its handler. Costs what the client owned, nothing for one with
        nothing in flight (a flood of DISCONNECTs scanned every pending request)."""
        front = self.front
        self.topics.forget(front, ident)
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
                self.replies.control(self.back, inst.identity, Kind.DISCONNECT, rid)
                cancelled += 1
        self.counters.cancelled += cancelled
        if queued:
            self.waiting.remove(lambda dst, p: p.origin is front and p.origin_id == ident)
        log.info("kernel.client_gone", reason=reason, cancelled=cancelled)

    def register(self, ident: bytes, header: Header, payload: list[Any]) -> LlmosError | None:
        """READY from a service: checked against the boot secret. A refusal
        is returned, for the inbox to answer and audit."""
        back = self.back
        try:
            if len(payload) < 2:
                raise BadRequest("READY without a body")
            ready: kp.Ready = codec.decode_body(_ready_decoder, payload[1], "READY body")
        except BadRequest as exc:
            return exc
        if not (hmac.compare_digest(ready.secret.encode(), self._secret)  # per incarnation from the supervisor
                or (self.children is not None and self.children.admits(ready.instance, ready.secret))):
            return Unauthorized("wrong boot secret")
        if (refused := key_refusal(self.keyring, ready.instance, peer_key(payload[0]))) is not None:
            return refused
        for old in (self.registry.by_identity.get(ident), self.registry.by_name.get(ready.instance)):
            if old is not None:
                self.instance_down(old, REPLACED)
        now = self.clock()
        inst = Instance(ready.service, ready.instance, ident, ready.pid, frozenset(ready.ops),
                        frozenset(ready.idempotent_ops), dict(ready.meta), last_seen=now, registered_at=now,
                        peer_key=peer_key(payload[0]))
        self.registry.add(inst)
        self.replies.message(back, ident, header.msg_id, Kind.REPLY, kp.Registered(inst.name))
        log.info("kernel.registered", service=inst.service, instance=inst.name, pid=inst.pid)
        if self.children is not None:
            self.children.on_ready(inst.name, inst.pid)
        self.publish(kp.SERVICES_TOPIC, kp.ServiceUp(inst.service, inst.name, inst.pid, inst.meta))
        for p in list(self.waiting.take((inst.service, inst.name))):
            self._dispatch(p)
        return None

    def instance_down(self, which: Instance | str, reason: str) -> bool:
        """Forget a dead instance; re-send or fail what it held; tell
        subscribers. False when it was not registered (already down)."""
        inst = self.registry.by_name.get(which) if isinstance(which, str) else which
        if inst is None or self.registry.by_identity.get(inst.identity) is not inst:
            return False
        self.registry.remove(inst)
        if self.keyring is not None and reason != REPLACED:  # its key stops working (issue() revoked a replaced one's)
            self.keyring.revoke(inst.name, inst.peer_key)
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
        return True

    def instance_hung(self, inst: Instance) -> None:
        """Missed heartbeats: down, and the process killed so the supervisor
        restarts it (MINIX 3's reincarnation server)."""
        if self.instance_down(inst, HUNG) and self.children is not None:
            self.children.kill_quietly(inst.name, inst.pid)

    def heartbeat(self, inst: Instance) -> None:
        self.replies.control(self.back, inst.identity, Kind.HEARTBEAT)

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

    # The kernel's own ops, and the verbs they act through (ops.KernelHost).

    def _kernel_op(self, origin: Port, ident: bytes, header: Header, payload: list[Any],
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
                    self.guard.note(header, exc, source(ident, inst), header.principal)
                raise
            checked = msg
            reply = ops.handle(self, origin, ident, header, msg, inst)
        except LlmosError as exc:
            if checked is not None and ops.audited(checked):
                self._audit_op(checked, header, ident, inst, str(exc.code))
            self.replies.error(origin, ident, header.msg_id, exc.to_wire())
            return
        if ops.audited(msg):
            self._audit_op(msg, header, ident, inst, "ok")
        if reply is not None:
            self.replies.message(origin, ident, header.msg_id, Kind.REPLY, reply)

    def _audit_op(self, msg: Message, header: Header, ident: bytes, inst: Instance | None, outcome: str) -> None:
        self._op_audit.append(kp.KernelOpDone(type(msg).__name__, header.principal, source(ident, inst),
                                              ops.target_of(msg), outcome, time.time()))
        self.publish_audit()  # at once: a Shutdown's record must leave before the security server stops

    def subscribe(self, topic: str, port: Port, ident: bytes, msg_id: int) -> None:
        self.topics.subscribe(topic, port, ident, msg_id)
        self.replies.message(port, ident, msg_id, Kind.EVENT, kp.Subscribed(topic))
        if topic == kp.DENIALS_TOPIC:
            self.publish_audit()

    def set_revocations(self, revoked: RevocationList) -> None:
        if self.guard is not None:
            self.guard.set_revocations(revoked)

    def kill(self, target: str, sig_name: str) -> list[str]:
        if self.children is None:
            raise Unavailable("this kernel runs without a supervisor")
        return self.children.kill(target, sig_name)

    def request_shutdown(self, reason: str) -> None:
        self.on_shutdown(reason)

    def status(self) -> kp.StatusReply:
        """Every instance (supervised or not) with its state and load, and the counters."""
        now = self.clock()
        infos = self.registry.describe(self.children.describe() if self.children is not None else [], now)
        return kp.StatusReply(os.getpid(), now - self.started, infos, self.counters)


def source(ident: bytes, inst: Instance | None) -> str:
    return f"back:{inst.name}" if inst is not None else f"front:{ident.hex()}"


__all__ = ["HUNG", "Pending", "Router", "source"]
