"""The envelope: ``[identity..., b"", header, body, *buffers]``.

Only the header is decoded on the kernel's hot path; the body stays an opaque
frame until the service that owns its type decodes it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Sequence

import msgspec

from ipc.errors import BadRequest

PROTOCOL_VERSION = 1

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


class Header(msgspec.Struct, array_like=True, gc=False):
    """Routing metadata. The kernel rewrites `msg_id` (its own routing id) on the
    way to a service and back on the way to the requester, and stamps
    `principal`; services trust only what the kernel stamped."""

    version: int
    kind: int
    msg_id: int = 0
    src: str = ""
    dst: str = ""
    op: str = ""
    principal: str = ""
    token: bytes = b""
    deadline_ns: int = 0
    trace_id: str = ""
    attempt: int = 0
    # Caveats of the verified token that depend on the body (max_tokens,
    # session), stamped by the kernel: `ipc.capability.Restrictions.decode`.
    restrictions: bytes = b""


_encode_header = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(Header).decode


def encode_header(header: Header) -> bytes:
    return _encode_header(header)


def decode_header(frame: FrameLike) -> Header:
    """Decode and check a header frame; raises `BadRequest` naming the fault."""
    try:
        header = _decode_header(frame)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"malformed header: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for a bad str
        raise BadRequest(f"undecodable header: {exc}") from None
    if header.version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported protocol version {header.version} (want {PROTOCOL_VERSION})")
    if header.kind not in _KINDS:
        raise BadRequest(f"unknown message kind {header.kind}")
    return header


_KINDS = frozenset(int(k) for k in Kind)


def split_route(frames: Sequence[FrameLike]) -> tuple[bytes, list[FrameLike]]:
    """Split what a ROUTER received into (identity, payload after the empty delimiter).

    Our peers are DEALERs, so the route is exactly one identity frame.
    Raises `BadRequest` when the delimiter is missing.
    """
    if len(frames) < 2 or len(frames[1]) != 0:
        raise BadRequest("missing empty delimiter frame after the identity")
    return bytes(frames[0]), list(frames[2:])
