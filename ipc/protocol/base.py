"""The base every wire message derives from.

Messages are tagged msgspec Structs (the tag is the class name, and the same
string is the header's `op`), encoded as arrays so field names never travel.
Op names are global: two message classes may not share a name, which lets any
peer decode any body with one union (`codec.AnyDecoder`).
Schema evolution: append fields with defaults, never reorder or remove.

A request declares the one message type it is answered with, as the type
argument of `Request`: ``class Status(Request[StatusReply])`` (a string
``Request["StatusReply"]`` when the reply is defined further down). The SDK's
`call()` is typed by it and decodes the reply with that type alone. The
declaration is class-level only: it adds nothing to the wire.
"""

from __future__ import annotations

import functools
import sys
import typing
from typing import Any, ClassVar, Generic, TypeVar

import msgspec


_version = 0


class Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """A request, reply or event body."""

    _registry: ClassVar[dict[str, type["Message"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__parameters__", ()):
            return  # a generic base (`Request`) is no message of its own
        tag = cls.__name__
        prior = Message._registry.get(tag)
        if prior is not None and prior.__module__ != cls.__module__:
            raise TypeError(f"message name {tag!r} defined twice ({prior.__module__}, {cls.__module__})")
        Message._registry[tag] = cls
        global _version
        _version += 1


ReplyT = TypeVar("ReplyT", bound=Message)


class Request(Message, Generic[ReplyT]):
    """A message answered by one REPLY of type `ReplyT` (after any EVENTs)."""


def reply_type(request: type[Request[ReplyT]]) -> type[ReplyT]:
    """The reply type `request` declared (inherited by its subclasses)."""
    return _reply_types(request)  # type: ignore[return-value]


@functools.cache
def _reply_types(request: type[Message]) -> type[Message]:
    for klass in request.__mro__:
        for base in klass.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is not Request:
                continue
            (arg,) = typing.get_args(base)
            if isinstance(arg, typing.ForwardRef):
                arg = vars(sys.modules[klass.__module__]).get(arg.__forward_arg__)
            if isinstance(arg, type) and issubclass(arg, Message):
                return arg
            raise TypeError(f"{klass.__name__}: the reply type {typing.get_args(base)[0]!r} names no Message "
                            f"in {klass.__module__}")
    raise TypeError(f"{request.__name__} is not a Request: it declares no reply type")


def op_of(msg: Message | type[Message]) -> str:
    """The wire op name of a message (its tag)."""
    cls = msg if isinstance(msg, type) else type(msg)
    return cls.__name__


def message_types() -> tuple[type[Message], ...]:
    return tuple(Message._registry.values())


def registry_version() -> int:
    """Bumped whenever a message type is defined (decoders built earlier are stale)."""
    return _version
