"""The kernel's own ops (`dst = "kernel"`): status, subscribe, the security
server's revocation list, kill and shutdown — the system calls of the
microkernel, as opposed to the messages it only routes."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ipc.capability import RevocationList
from ipc.envelope import Header, Kind
from ipc.errors import BadRequest, Forbidden, Unavailable
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message
from ipc.sockets import Channel

if TYPE_CHECKING:
    from kernel.router import Kernel


def handle(k: "Kernel", ch: Channel, ident: bytes, header: Header, msg: Any) -> Message | None:
    """Answer one decoded kernel op (None: it answered itself)."""
    match msg:
        case kp.Status():
            return status(k)
        case kp.Subscribe(topic=topic):
            k.topics.subscribe(topic, ch, ident, header.msg_id)
            k._send_msg(ch, ident, header.msg_id, Kind.EVENT, kp.Subscribed(topic))
            if topic == kp.DENIALS_TOPIC:
                k._publish_denials()
            return None
        case kp.SetRevocations(tokens=tokens, keys=keys, principals=principals):
            inst = k.registry.by_identity.get(ident) if ch is k._back else None
            if inst is None or inst.service != "security":
                raise Forbidden("only the security service may set the revocation list")
            if k.guard is not None:
                k.guard.set_revocations(RevocationList(frozenset(tokens), frozenset(keys),
                                                          frozenset(principals)))
            return kp.RevocationsSet(len(tokens) + len(keys) + len(principals))
        case kp.Kill(target=target, signal=sig):
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


__all__ = ["handle", "status"]
