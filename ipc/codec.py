"""Typed body codec: one msgspec encoder, one decoder per union, built once.

A reply is decoded with the one type its request declared (`decode_reply`);
only events, whose types a topic does not fix, use the any-message union.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Union

import msgspec

from ipc.errors import BadRequest, Error, Internal
from ipc.envelope import FrameLike
from ipc.protocol.base import Message, ReplyT, Request, message_types, registry_version, reply_type

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode


@functools.lru_cache(maxsize=256)
def _decoder_for(types: tuple[type, ...]) -> msgspec.msgpack.Decoder[Any]:
    target: Any = types[0] if len(types) == 1 else Union[types]  # noqa: UP007 - runtime union
    return msgspec.msgpack.Decoder(target)


def decoder(types: Iterable[type[Message] | type[Error]]) -> msgspec.msgpack.Decoder[Any]:
    """The decoder for a set of tagged body types (cached: build it once)."""
    return _decoder_for(tuple(sorted(set(types), key=lambda t: t.__qualname__)))


def decode_body(dec: msgspec.msgpack.Decoder[Any], frame: FrameLike, what: str = "body") -> Any:
    """Decode a body; raises `BadRequest` naming what was wrong (and which field)."""
    try:
        return dec.decode(frame)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid {what}: {_name_field(str(exc), frame)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for a bad str
        raise BadRequest(f"undecodable {what}: {exc}") from None


error_decoder = msgspec.msgpack.Decoder(Error)


def decode_reply(request: type[Request[ReplyT]], frame: FrameLike) -> ReplyT:
    """The reply to a `request`, decoded with the one type it declared. Any
    other body is the answering peer's fault, not the caller's: `Internal`,
    naming both types when the body is a different message."""
    expected = reply_type(request)
    try:
        reply: ReplyT = _decoder_for((expected,)).decode(frame)
        return reply
    except msgspec.ValidationError as exc:
        got = _tag_of(frame)
        if got is not None and got != expected.__name__:
            raise Internal(f"protocol error: {request.__name__} is answered with {expected.__name__}, "
                           f"got {got}", detail={"expected": expected.__name__, "got": got}) from None
        raise Internal(f"invalid {expected.__name__} reply to {request.__name__}: "
                       f"{_name_field(str(exc), frame)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Internal(f"undecodable reply to {request.__name__}: {exc}") from None


def _tag_of(frame: FrameLike) -> str | None:
    """The tag of a message body (its first element), None when it has none."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], str) else None


class AnyDecoder:
    """Decodes any message type defined so far; rebuilt only when new types appear."""

    def __init__(self) -> None:
        self._version = -1
        self._dec: msgspec.msgpack.Decoder[Any] | None = None

    def decode(self, frame: FrameLike, what: str = "body") -> Any:
        if self._version != registry_version() or self._dec is None:
            self._version = registry_version()
            self._dec = decoder(message_types())
        return decode_body(self._dec, frame, what)


_ARRAY_PATH = re.compile(r"`\$\[(\d+)\]")


def _name_field(message: str, frame: FrameLike) -> str:
    """Array-like structs report paths as ``$[i]``; name the field instead (error path only)."""
    from ipc.protocol.base import Message, ReplyT, Request, message_types, registry_version, reply_type

    m = _ARRAY_PATH.search(message)
    if not m:
        return message
    try:
        raw = msgspec.msgpack.decode(frame)
        cls = Message._registry.get(raw[0]) if isinstance(raw, list) and raw else None
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
        cls = None
    idx = int(m.group(1)) - 1  # element 0 is the tag
    if cls is None or not 0 <= idx < len(cls.__struct_fields__):
        return message
    return f"{message} (field `{cls.__name__}.{cls.__struct_fields__[idx]}`)"
