"""A resumable request (`Submit.linger_s`) whose requester went away: a
gateway instance was killed, say, while its client will reconnect to another
one and re-attach. The request runs on meanwhile; it is cancelled only if no
Submit re-attached to it within its window."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from ipc.protocol.base import Message
from services.scheduler._request import Sink


def _nobody(event: Message) -> None:
    """The emit of a stream whose reader is gone."""


async def linger(sink: Sink, seconds: float, cancel: Callable[[], object]) -> None:
    """Call `cancel` unless `sink` is superseded (a re-attach) or its request
    finishes (it is then remembered for a re-attach) within `seconds`."""
    sink.emit = _nobody
    with anyio.move_on_after(seconds):
        while not (sink.superseded or sink.request.done.is_set()):
            await sink.changed.wait()
            sink.changed = anyio.Event()
    if not (sink.superseded or sink.request.done.is_set()):
        cancel()
