"""Publish/subscribe on the kernel's sockets: which peers follow which topic.

A subscriber is (port, identity); its `Subscribe` request's msg id is the
stream every event on that topic is sent under, so the SDK's ordinary
streaming machinery receives them. A peer whose socket refuses an event (gone,
or its queue full) is dropped from that topic; a departed peer is forgotten
on every topic.
"""

from __future__ import annotations

from typing import Any, Sequence

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, encode_header
from kernel.ports import Port

_EMPTY = b""


class Topics:
    def __init__(self, ports: Sequence[Port]):
        self._ports = list(ports)
        self._subs: dict[str, dict[tuple[int, bytes], int]] = {}

    def subscribe(self, topic: str, port: Port, ident: bytes, msg_id: int) -> None:
        self._subs.setdefault(topic, {})[(self._index(port), ident)] = msg_id

    def has_subscribers(self, topic: str) -> bool:
        return bool(self._subs.get(topic))

    def forget(self, port: Port, ident: bytes) -> None:
        key = (self._index(port), ident)
        for subs in self._subs.values():
            subs.pop(key, None)

    def _index(self, port: Port) -> int:
        return next(i for i, p in enumerate(self._ports) if p is port)  # by identity, not ==

    def publish(self, topic: str, src: str, payload: list[Any], op: str) -> None:
        """Send `payload[1:]` (the body frames) to every subscriber of `topic`."""
        subs = self._subs.get(topic)
        if not subs:
            return
        gone = []
        for (port_idx, ident), msg_id in subs.items():
            header = Header(PROTOCOL_VERSION, Kind.EVENT, msg_id, src=src, dst=topic, op=op)
            if not self._ports[port_idx].send([ident, _EMPTY, encode_header(header), *payload[1:]]):
                gone.append((port_idx, ident))
        for key in gone:
            del subs[key]


__all__ = ["Topics"]
