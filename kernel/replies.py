"""What the kernel says on its own account: errors, control frames
(heartbeat, disconnect), its own messages, and the refusal of malformed or
forbidden frames. Refusals are counted; they are logged one by one only
within a budget per liveness tick, past which a flood costs one line per tick
(`end_tick`), while every frame is still answered."""

from __future__ import annotations

from typing import Any, Sequence

from common.logs import get_logger
from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, encode_header
from ipc.errors import Error, LlmosError
from ipc.protocol import kernel as kp
from ipc.protocol.base import Message
from kernel.ports import Port

log = get_logger()

_EMPTY = b""
REJECTS_LOGGED_PER_TICK = 25


class Replies:
    def __init__(self, counters: kp.KernelCounters):
        self._counters = counters
        self._log_budget = REJECTS_LOGGED_PER_TICK
        self._unlogged = 0

    def error(self, port: Port, ident: bytes, msg_id: int, err: Error) -> None:
        header = Header(PROTOCOL_VERSION, Kind.ERROR, msg_id, src=kp.KERNEL, op="Error")
        if not port.send([ident, _EMPTY, encode_header(header), codec.encode(err)]):
            self._counters.dropped += 1

    def control(self, port: Port, ident: bytes, kind: Kind, msg_id: int = 0) -> None:
        port.send([ident, _EMPTY, encode_header(Header(PROTOCOL_VERSION, kind, msg_id, src=kp.KERNEL))])

    def message(self, port: Port, ident: bytes, msg_id: int, kind: Kind, body: Message) -> bool:
        header = Header(PROTOCOL_VERSION, kind, msg_id, src=kp.KERNEL, op=type(body).__name__)
        return port.send([ident, _EMPTY, encode_header(header), codec.encode(body)])

    def reject(self, port: Port, side: str, frames: Sequence[Any], exc: LlmosError, header: Header | None = None,
               msg_id: int = 0) -> None:
        """Answer a malformed or forbidden frame where a return identity
        exists (`frames[0]`), under the header's msg id when it was read."""
        self._counters.rejected += 1
        if self._log_budget > 0:
            self._log_budget -= 1
            log.warning("kernel.rejected", code=exc.code, error=exc.message, socket=side)
        else:
            self._unlogged += 1
        if not frames or len(frames[0]) == 0:
            return
        if header is not None:
            msg_id = header.msg_id
        self.error(port, bytes(frames[0]), msg_id, exc.to_wire())

    def end_tick(self) -> None:
        """Log what the budget left unlogged, and renew the budget."""
        if self._unlogged:
            log.warning("kernel.rejected_unlogged", count=self._unlogged,
                        note="more rejected frames than are logged one by one; see counters.rejected")
            self._unlogged = 0
        self._log_budget = REJECTS_LOGGED_PER_TICK


__all__ = ["REJECTS_LOGGED_PER_TICK", "Replies"]
