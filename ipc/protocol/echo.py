"""The echo service: the smallest real service, used by tests and the routing benchmark."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ipc.protocol.base import Message, Request

# How long a reply may be held (seconds), and how many events a Count streams.
Delay = Annotated[float, msgspec.Meta(ge=0, le=600)]
MaxCount = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class Echo(Request["EchoReply"]):
    payload: bytes = b""
    # Hold the reply this long; lets tests catch a request in flight.
    delay_s: Delay = 0.0


class EchoOnce(Request["EchoReply"]):
    """Like Echo but not idempotent: after a crash it is answered `unavailable`."""

    payload: bytes = b""
    delay_s: Delay = 0.0


class EchoReply(Message):
    payload: bytes
    instance: str
    attempt: int = 0


class Count(Request["CountDone"]):
    """Stream `n` Counted events, then reply CountDone."""

    n: MaxCount


class Counted(Message):
    i: int


class CountDone(Message):
    n: int


class WhoAmI(Request["Identity"]):
    """Answered with what the service was told about the caller (tests of the
    kernel's principal stamping)."""


class Identity(Message):
    principal: str
    max_tokens: int = 0
    session: str = ""
