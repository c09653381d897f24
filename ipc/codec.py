"""Typed body codec: one msgspec encoder, one decoder per union, built once."""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Union

import msgspec

from ipc.errors import BadRequest, Error
from ipc.envelope import FrameLike
from ipc.protocol.base import Message

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


class AnyDecoder:
    """Decodes any message type defined so far; rebuilt only when new types appear."""

    def __init__(self) -> None:
        self._version = -1
        self._dec: msgspec.msgpack.Decoder[Any] | None = None

    def decode(self, frame: FrameLike, what: str = "body") -> Any:
        from ipc.protocol.base import message_types, registry_version

        if self._version != registry_version() or self._dec is None:
            self._version = registry_version()
            self._dec = decoder(message_types())
        return decode_body(self._dec, frame, what)


_ARRAY_PATH = re.compile(r"`\$\[(\d+)\]")


def _name_field(message: str, frame: FrameLike) -> str:
    """Array-like structs report paths as ``$[i]``; name the field instead (error path only)."""
    from ipc.protocol.base import Message

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
