"""The envelope: ``[identity..., b"", header, body, *buffers]``.

Only the header is decoded on the kernel's hot path; the body stays an opaque
frame until the service that owns its type decodes it.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Annotated, Sequence

import msgspec
from msgspec import Meta

from ipc.errors import BadRequest

# 2: Kind.EVENTS (issue 15), a batch of events for several calls in one
# frame; a peer of version 1 would drop it unread, so it is refused instead.
PROTOCOL_VERSION = 2

# Anything that travels as one frame: bytes from us, zmq.Frame / memoryview from zmq.
FrameLike = bytes | memoryview | bytearray


class Kind(IntEnum):
    REQUEST = 1
    REPLY = 2
    EVENT = 3
    ERROR = 4
    HEARTBEAT = 5
    READY = 6
    DISCONNECT = 7
    # Several calls' events in one frame (`EventBatch`, header msg_id 0):
    # a service sends one per loop tick, the kernel one per requester.
    EVENTS = 8


# Bounds on what a header may carry, checked as it is decoded. Header strings
# are copied into routing tables, error messages, log lines and audit records;
# unbounded, one 1 MB `dst` cost the kernel 1 MB per unread error reply and the
# audit log 2 MB per refusal (issue 12 #5, #6). Real names are a few dozen bytes.
MAX_NAME = 128  # src, dst, principal: service, instance and tenant names
MAX_OP = 64  # a message tag
MAX_TRACE_ID = 128
MAX_TOKEN = 4096  # a capability token (common.capability.MAX_TOKEN_BYTES)
MAX_RESTRICTIONS = 1024  # stamped by the kernel; bounded like the rest
_I64 = 2**63 - 1  # what msgspec can bound; ids and unix ns fit

Name = Annotated[str, Meta(max_length=MAX_NAME)]


class Header(msgspec.Struct, array_like=True, gc=False):
    """Routing metadata. The kernel rewrites `msg_id` (its own routing id) on the
    way to a service and back on the way to the requester, and stamps
    `principal`; services trust only what the kernel stamped."""

    version: int
    kind: int
    msg_id: Annotated[int, Meta(ge=0, le=_I64)] = 0
    src: Name = ""
    dst: Name = ""
    op: Annotated[str, Meta(max_length=MAX_OP)] = ""
    principal: Name = ""
    token: Annotated[bytes, Meta(max_length=MAX_TOKEN)] = b""
    deadline_ns: Annotated[int, Meta(ge=0, le=_I64)] = 0
    trace_id: Annotated[str, Meta(max_length=MAX_TRACE_ID)] = ""
    attempt: Annotated[int, Meta(ge=0, le=255)] = 0
    # Caveats of the verified token that depend on the body (max_tokens,
    # session), stamped by the kernel: `common.capability.Restrictions.decode`.
    restrictions: Annotated[bytes, Meta(max_length=MAX_RESTRICTIONS)] = b""


_encode_header = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(Header).decode


def encode_header(header: Header) -> bytes:
    return _encode_header(header)


# Events in one EVENTS frame; a service flushes well before (sdk/service.py).
MAX_BATCH = 4096


class BatchedEvent(msgspec.Struct, array_like=True, gc=False):
    """One event of a batch: the call it answers (the msg id its receiver
    knows: the kernel's routing id from a service, the requester's own id
    from the kernel), its op, and its encoded body (opaque to the kernel)."""

    msg_id: Annotated[int, Meta(ge=1, le=_I64)]
    op: Annotated[str, Meta(min_length=1, max_length=MAX_OP)]
    body: bytes


class EventBatch(msgspec.Struct, array_like=True, gc=False):
    """The body of a `Kind.EVENTS` frame. Each call's events keep their order
    within a batch and from batch to batch."""

    events: Annotated[list[BatchedEvent], Meta(min_length=1, max_length=MAX_BATCH)]


_encode_batch = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(EventBatch).decode


def encode_event_batch(events: list[BatchedEvent]) -> bytes:
    return _encode_batch(EventBatch(events))


def events_message(events: list[BatchedEvent], src: str) -> tuple[Header, bytes]:
    """The header and body that carry `events` (at least one) from `src`:
    a lone event goes as a plain EVENT, several as one EVENTS batch."""
    if len(events) == 1:
        ev = events[0]
        return Header(PROTOCOL_VERSION, Kind.EVENT, ev.msg_id, src=src, op=ev.op), ev.body
    return Header(PROTOCOL_VERSION, Kind.EVENTS, 0, src=src), encode_event_batch(events)


def decode_event_batch(payload: Sequence[FrameLike]) -> EventBatch:
    """The batch in an EVENTS frame's body (`payload`: the frames after the
    header); raises `BadRequest` naming what is wrong."""
    if len(payload) != 1:
        raise BadRequest(f"an EVENTS frame carries exactly one body frame, got {len(payload)}")
    try:
        return _decode_batch(payload[0])
    except msgspec.ValidationError as exc:
        raise BadRequest(f"malformed event batch: {_name_batch_fields(str(exc))}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"undecodable event batch: {exc}") from None


def _name_batch_fields(message: str) -> str:
    """`$[0][3][1]` -> `events[3].op`: the batch is array-like on the wire."""
    names = BatchedEvent.__struct_fields__

    def name(m: re.Match[str]) -> str:
        at, field = m.group(1), m.group(2)
        return "`events" + (f"[{at}]" if at else "") + (f".{names[int(field)]}" if field else "") + "`"
    return _BATCH_PATH.sub(name, message)


_BATCH_PATH = re.compile(r"`\$\[0\](?:\[(\d+)\](?:\[([0-2])\])?)?`")


class _Ids(msgspec.Struct, array_like=True):
    """The leading fields of a header, trailing ones ignored: enough to answer
    a header that failed its checks under the sender's msg id."""

    version: int
    kind: int
    msg_id: int = 0


_decode_ids = msgspec.msgpack.Decoder(_Ids).decode


def decode_header(frame: FrameLike) -> Header:
    """Decode and check a header frame; raises `BadRequest` naming the fault,
    with the sender's msg id in `detail["msg_id"]` when it could be read (so
    the refusal reaches the call that sent it instead of timing it out)."""
    try:
        header = _decode_header(frame)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"malformed header: {_name_fields(str(exc))}", detail=_msg_id_of(frame)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for a bad str
        raise BadRequest(f"undecodable header: {exc}") from None
    if header.version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version {header.version} (want {PROTOCOL_VERSION})")
    if header.kind not in _KINDS:
        raise BadRequest(f"unknown message kind {header.kind}")
    return header


def _msg_id_of(frame: FrameLike) -> dict[str, str | int | float | bool]:
    try:
        msg_id = _decode_ids(frame).msg_id
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return {}
    return {"msg_id": msg_id} if 0 < msg_id < 2**63 else {}


_KINDS = frozenset(int(k) for k in Kind)
_FIELD_AT = {f"`$[{i}]`": f"`{name}`" for i, name in enumerate(Header.__struct_fields__)}


def _name_fields(message: str) -> str:
    """The header is array-like on the wire: say `dst`, not `$[4]`."""
    for at, name in _FIELD_AT.items():
        if message.endswith(at):
            return message[: -len(at)] + name
    return message


def split_route(frames: Sequence[FrameLike]) -> tuple[bytes, list[FrameLike]]:
    """Split what a ROUTER received into (identity, payload after the empty delimiter).

    Our peers are DEALERs, so the route is exactly one identity frame.
    Raises `BadRequest` when the delimiter is missing.
    """
    if len(frames) < 2 or len(frames[1]) != 0:
        raise BadRequest("missing empty delimiter frame after the identity")
    return bytes(frames[0]), list(frames[2:])
