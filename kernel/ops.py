"""The kernel's own ops (`dst = "kernel"`): status, subscribe, the security
server's revocation list, kill and shutdown — the system calls of the
microkernel, as opposed to the messages it only routes.

The capability check covered the header's op; `check` makes sure the body is
that op (a `Status` header over a `Shutdown` body shut the kernel down, issue
12 #1), so what runs is what was authorised.
"""

from __future__ import annotations

from typing import Any, Protocol

from common.capability import RevocationList
from ipc.envelope import Header
from ipc.errors import BadRequest, Forbidden
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message, op_of
from kernel.ports import Port
from kernel.registry import Instance

# Signals an operator may send through Kill: ways to end a process. SIGSTOP
# and friends would freeze a service until the heartbeat expiry (a hang, not
# a crash), and arbitrary signals have no place in a restart drill.
KILL_SIGNALS = frozenset({"SIGKILL", "SIGTERM", "SIGINT"})


class KernelHost(Protocol):
    """What a kernel op may do to the kernel (kernel/routing.py `Router`)."""

    def subscribe(self, topic: str, port: Port, ident: bytes, msg_id: int) -> None:
        """Send the peer at (`port`, `ident`) `topic`'s events under `msg_id`,
        starting with `Subscribed`."""
        ...

    def set_revocations(self, revoked: RevocationList) -> None: ...

    def kill(self, target: str, sig_name: str) -> list[str]:
        """Signal a supervised service or instance; the instances signalled."""
        ...

    def request_shutdown(self, reason: str) -> None: ...

    def status(self) -> kp.StatusReply: ...


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


def handle(host: KernelHost, port: Port, ident: bytes, header: Header, msg: Any,
           inst: Instance | None) -> Message | None:
    """Answer one decoded kernel op (None: it answered itself). `inst` is the
    registered service that asked, None for a client."""
    match msg:
        case kp.Status():
            return host.status()
        case kp.Subscribe(topic=topic):
            host.subscribe(topic, port, ident, header.msg_id)
            return None
        case kp.SetRevocations(tokens=tokens, keys=keys, principals=principals):
            if inst is None or inst.service != "security":
                raise Forbidden("only the security service may set the revocation list")
            host.set_revocations(RevocationList(frozenset(tokens), frozenset(keys), frozenset(principals)))
            return kp.RevocationsSet(len(tokens) + len(keys) + len(principals))
        case kp.Kill(target=target, signal=sig):
            if sig not in KILL_SIGNALS:
                raise BadRequest(f"Kill sends one of {sorted(KILL_SIGNALS)}, not {sig!r}",
                                 detail={"field": "signal"})
            return kp.Killed(host.kill(target, sig))
        case kp.Shutdown(reason=reason):
            host.request_shutdown(reason)
            return kp.ShuttingDown()
    raise BadRequest(f"unknown kernel op {header.op!r}")


__all__ = ["KILL_SIGNALS", "KernelHost", "audited", "check", "handle", "target_of"]
