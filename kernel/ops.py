"""The kernel's own ops (`dst = "kernel"`): status, subscribe, the security
server's revocation list, kill and shutdown — the system calls of the
microkernel, as opposed to the messages it only routes.

The capability check covered the header's op; `check` makes sure the body is
that op (a `Status` header over a `Shutdown` body shut the kernel down, issue
12 #1), so what runs is what was authorised.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from common.capability import RevocationList
from ipc.envelope import Header, Kind
from ipc.errors import BadRequest, Forbidden, Unavailable
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message, op_of
from ipc.sockets import Channel
from kernel.registry import Instance

if TYPE_CHECKING:
    from kernel.router import Kernel

# Signals an operator may send through Kill: ways to end a process. SIGSTOP
# and friends would freeze a service until the heartbeat expiry (a hang, not
# a crash), and arbitrary signals have no place in a restart drill.
KILL_SIGNALS = frozenset({"SIGKILL", "SIGTERM", "SIGINT"})


def check(header: Header, msg: Message) -> None:
    """Raise `BadRequest` unless the body is the op the header names."""
    if op_of(msg) != header.op:
        raise BadRequest(f"kernel op body is {op_of(msg)} but the header names {header.op!r}: "
                         f"the capability check covers the header's op, so they must agree")


def audited(msg: Message) -> bool:
    """Ops that act or open a stream of other parties' events (Status is a read
    `llmos top` polls; its refusals are audited by the guard)."""
    return not isinstance(msg, kp.Status)


def target_of(msg: Message) -> str:
    match msg:
        case kp.Kill(target=target, signal=sig):
            return f"{target} {sig}"
        case kp.Subscribe(topic=topic):
            return topic
        case kp.Shutdown(reason=reason):
            return reason
        case kp.SetRevocations(tokens=tokens, keys=keys, principals=principals):
            return f"{len(tokens)} tokens, {len(keys)} keys, {len(principals)} principals"
    return ""


def handle(k: "Kernel", ch: Channel, ident: bytes, header: Header, msg: Any,
           inst: Instance | None) -> Message | None:
    """Answer one decoded kernel op (None: it answered itself). `inst` is the
    registered service that asked, None for a client."""
    match msg:
        case kp.Status():
            return status(k)
        case kp.Subscribe(topic=topic):
            k.topics.subscribe(topic, ch, ident, header.msg_id)
            k._send_msg(ch, ident, header.msg_id, Kind.EVENT, kp.Subscribed(topic))
            if topic == kp.DENIALS_TOPIC:
                k.publish_audit()
            return None
        case kp.SetRevocations(tokens=tokens, keys=keys, principals=principals):
            if inst is None or inst.service != "security":
                raise Forbidden("only the security service may set the revocation list")
            if k.guard is not None:
                k.guard.set_revocations(RevocationList(frozenset(tokens), frozenset(keys),
                                                          frozenset(principals)))
            return kp.RevocationsSet(len(tokens) + len(keys) + len(principals))
        case kp.Kill(target=target, signal=sig):
            if sig not in KILL_SIGNALS:
                raise BadRequest(f"Kill sends one of {sorted(KILL_SIGNALS)}, not {sig!r}",
                                 detail={"field": "signal"})
            if k.supervisor is None:
                raise Unavailable("this kernel runs without a supervisor")
            return kp.Killed(k.supervisor.kill(target, sig))
        case kp.Shutdown(reason=reason):
            k.request_shutdown(reason)
            return kp.ShuttingDown()
    raise BadRequest(f"unknown kernel op {header.op!r}")


def status(k: "Kernel") -> kp.StatusReply:
    """Every instance (supervised or not) with its state and load, and the counters."""
    if k.supervisor is not None:
        infos = k.supervisor.describe()
    else:
        infos = []
    supervised = {i.instance for i in infos}
    now = time.monotonic()
    for inst in k.registry.by_identity.values():
        if inst.name not in supervised:
            infos.append(kp.InstanceInfo(inst.service, inst.name, inst.pid, "ready",
                                         uptime_s=now - inst.registered_at))
    for info in infos:
        live = k.registry.by_name.get(info.instance)
        if live is not None:
            info.outstanding = len(live.outstanding)
            info.meta = live.meta
    return kp.StatusReply(os.getpid(), now - k.started, infos, k.counters)


__all__ = ["KILL_SIGNALS", "audited", "check", "handle", "status", "target_of"]
