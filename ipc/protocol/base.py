"""The base every wire message derives from.

Messages are tagged msgspec Structs (the tag is the class name, and the same
string is the header's `op`), encoded as arrays so field names never travel.
Op names are global: two message classes may not share a name, which lets any
peer decode any body with one union (`any_decoder`).
Schema evolution: append fields with defaults, never reorder or remove.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


_version = 0


class Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """A request, reply or event body."""

    _registry: ClassVar[dict[str, type["Message"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__name__
        prior = Message._registry.get(tag)
        if prior is not None and prior.__module__ != cls.__module__:
            raise TypeError(f"message name {tag!r} defined twice ({prior.__module__}, {cls.__module__})")
        Message._registry[tag] = cls
        global _version
        _version += 1


def op_of(msg: Message | type[Message]) -> str:
    """The wire op name of a message (its tag)."""
    cls = msg if isinstance(msg, type) else type(msg)
    return cls.__name__


def message_types() -> tuple[type[Message], ...]:
    return tuple(Message._registry.values())


def registry_version() -> int:
    """Bumped whenever a message type is defined (decoders built earlier are stale)."""
    return _version
