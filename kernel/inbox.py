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
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, split_route
from ipc.errors import BadRequest, LlmosError, Unauthorized
from kernel.events import answer_events
from kernel.ports import Port
from kernel.routing import Router, source


# What an audit record names for a frame whose header did not parse.
_MALFORMED = Header(PROTOCOL_VERSION, Kind.REQUEST, dst="kernel", op="(malformed frame)")


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
            msg_id = msg_id if isinstance(msg_id, int) else 0
            if side == "back":
                self._refuse_back(frames, exc, None, msg_id)
            else:
                self._replies.reject(port, side, frames, exc, msg_id=msg_id)
            return None

    def _refuse_back(self, frames: list[Any], exc: LlmosError, header: Header | None, msg_id: int = 0) -> None:
        """Refuse a frame on the back socket, and audit it: a peer there that
        is not a registered service (malformed frames, a forged or a replaced
        incarnation's boot secret, another's identity) is an attack."""
        self._replies.reject(self.router.back, "back", frames, exc, header, msg_id)
        if self.router.guard is not None:
            ident = bytes(frames[0]) if frames else b""
            self.router.guard.note(header or _MALFORMED, exc, f"back:{ident.hex()}")

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
            refused = router.register(ident, header, payload)
            if refused is not None:
                self._refuse_back(frames, refused, header)
            return
        if inst is None:
            self._refuse_back(frames, Unauthorized("not registered: send READY with the boot secret first"), header)
            # A stale instance the kernel already declared dead must stop, not linger.
            self._replies.control(back, ident, Kind.DISCONNECT)
            return
        if inst.peer_key and peer_key(payload[0]) != inst.peer_key:
            self._refuse_back(frames, Unauthorized(f"{inst.name} registered with another CURVE key"), header)
            return
        inst.last_seen = router.clock()
        if kind == Kind.REPLY or kind == Kind.ERROR:
            router.answer(inst, header, payload, final=True)
        elif kind == Kind.EVENT:
            if header.msg_id:
                router.answer(inst, header, payload, final=False)
            else:
                router.topics.publish(header.dst, inst.name, payload, header.op)
        elif kind == Kind.EVENTS:
            refused = answer_events(router, inst, header, payload)
            if refused is not None:  # (audited as an op named EVENTS: the frame's own op is empty)
                self._refuse_back(frames, refused, Header(PROTOCOL_VERSION, Kind.EVENTS, op="EVENTS"))
        elif kind == Kind.REQUEST:
            router.route(back, ident, header, payload, inst)
        elif kind == Kind.DISCONNECT:
            router.topics.forget(back, ident)
            router.instance_down(inst, "disconnected")


__all__ = ["Inbox"]
