"""What the kernel's two sockets received, parsed and handed to the router.

A message is `[identity, b"", header, body, *buffers]`; only the header is
decoded. One that cannot be parsed, or whose kind its sender may not send,
is refused here (answered where it has a return identity); the rest become
the router's events by kind: a request routed, an answer matched to its
pending request, a registration, a departure. No I/O: kernel/pump.py calls
`on_front` and `on_back` with what it drained.
"""

from __future__ import annotations

from typing import Any

from ipc.curve import peer_key
from ipc.envelope import Header, Kind, decode_header, split_route
from ipc.errors import BadRequest, Unauthorized
from kernel.ports import Port
from kernel.routing import Router, source


class Inbox:
    def __init__(self, router: Router):
        self.router = router
        self._replies = router.replies

    def _parse(self, port: Port, side: str, frames: list[Any]) -> tuple[bytes, list[Any], Header] | None:
        """(identity, payload, header), or None after rejecting a malformed message."""
        try:
            ident, payload = split_route(frames)
            if not payload:
                raise BadRequest("missing header frame")
            return ident, payload, decode_header(payload[0])
        except BadRequest as exc:
            msg_id = exc.detail.get("msg_id", 0)
            self._replies.reject(port, side, frames, exc, msg_id=msg_id if isinstance(msg_id, int) else 0)
            return None

    def on_front(self, frames: list[Any]) -> None:
        """One message from a client."""
        router = self.router
        front = router.front
        parsed = self._parse(front, "front", frames)
        if parsed is None:
            return
        ident, payload, header = parsed
        router.clients_seen[ident] = router.clock()
        kind = header.kind
        if kind == Kind.REQUEST:
            router.route(front, ident, header, payload)
        elif kind == Kind.HEARTBEAT:
            self._replies.control(front, ident, Kind.HEARTBEAT)
        elif kind == Kind.DISCONNECT:
            router.client_gone(ident, "client disconnected")
        elif kind == Kind.READY:
            exc = Unauthorized("clients cannot register as services")
            self._replies.reject(front, "front", frames, exc, header)
            if router.guard is not None:
                router.guard.note(header, exc, source(ident, None))
        else:
            self._replies.reject(front, "front", frames, BadRequest(f"a client may not send {Kind(kind).name}"),
                                 header)

    def on_back(self, frames: list[Any]) -> None:
        """One message from a service: only READY until it is registered."""
        router = self.router
        back = router.back
        parsed = self._parse(back, "back", frames)
        if parsed is None:
            return
        ident, payload, header = parsed
        inst = router.registry.by_identity.get(ident)
        kind = header.kind
        if kind == Kind.READY:
            router.register(ident, header, payload)
            return
        if inst is None:
            self._replies.reject(back, "back", frames,
                                 Unauthorized("not registered: send READY with the boot secret first"), header)
            # A stale instance the kernel already declared dead must stop, not linger.
            self._replies.control(back, ident, Kind.DISCONNECT)
            return
        if inst.peer_key and peer_key(payload[0]) != inst.peer_key:
            self._replies.reject(back, "back", frames,
                                 Unauthorized(f"{inst.name} registered with another CURVE key"), header)
            return
        inst.last_seen = router.clock()
        if kind == Kind.REPLY or kind == Kind.ERROR:
            router.answer(inst, header, payload, final=True)
        elif kind == Kind.EVENT:
            if header.msg_id:
                router.answer(inst, header, payload, final=False)
            else:
                router.topics.publish(header.dst, inst.name, payload, header.op)
        elif kind == Kind.REQUEST:
            router.route(back, ident, header, payload, inst)
        elif kind == Kind.DISCONNECT:
            router.topics.forget(back, ident)
            router.instance_down(inst, "disconnected")


__all__ = ["Inbox"]
