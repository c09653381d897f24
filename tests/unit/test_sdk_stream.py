"""`GenerationStream` (sdk/generate.py) over an in-memory scheduler: leaving
a stream before its last chunk cancels the request, once; a stream that
ended has nothing to cancel; the request path renews the token first."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest

from ipc.errors import Overloaded
from ipc.protocol.scheduler import Cancel, CancelReply, Finished, FinishReason, Submit, TokenDelta
from sdk.generate import build_submit, stream_generate


class Scheduler:
    """Streams `total` tokens of each Submit; records Cancels."""

    def __init__(self, total: int = 100, refuse: bool = False):
        self.total = total
        self.refuse = refuse
        self.cancelled: list[str] = []

    async def stream(self, dst: str, msg: Submit, **_: Any) -> AsyncGenerator[Any, None]:
        if self.refuse:
            raise Overloaded("queue full")
        for i in range(self.total - 1):
            yield TokenDelta(msg.request_id, i, [i])
            await anyio.sleep(0)
        yield Finished(msg.request_id, FinishReason.LENGTH, self.total - 1, [self.total - 1])

    async def call(self, dst: str, msg: Any, **_: Any) -> Any:
        assert isinstance(msg, Cancel)
        self.cancelled.append(msg.request_id)
        return CancelReply(msg.request_id, True)


async def test_leaving_an_async_with_block_early_cancels_the_request() -> None:
    s = Scheduler()
    async with stream_generate(s, build_submit("hi", request_id="r1")) as chunks:  # type: ignore[arg-type]
        async for c in chunks:
            if c.offset >= 2:
                break
    assert s.cancelled == ["r1"]
    await chunks.aclose()  # idempotent
    assert s.cancelled == ["r1"]


async def test_break_then_aclose_cancels_and_a_finished_stream_does_not() -> None:
    s = Scheduler(total=5)
    stream = stream_generate(s, build_submit("hi", request_id="r2"))  # type: ignore[arg-type]
    async for _ in stream:
        break
    await stream.aclose()
    async with stream_generate(s, build_submit("hi", request_id="r3")) as whole:  # type: ignore[arg-type]
        assert [c.finish_reason async for c in whole][-1] == FinishReason.LENGTH
    async with stream_generate(s, build_submit("hi", request_id="r4")):  # type: ignore[arg-type]
        pass  # never read: never submitted, nothing to cancel
    assert s.cancelled == ["r2"]


async def test_a_refused_request_is_not_cancelled_and_a_cancelled_caller_still_cancels() -> None:
    s = Scheduler(refuse=True)
    with pytest.raises(Overloaded):
        async with stream_generate(s, build_submit("hi", request_id="r5")) as chunks:  # type: ignore[arg-type]
            await chunks.__anext__()
    assert s.cancelled == []

    s = Scheduler(total=10_000)
    with anyio.move_on_after(0.05):  # the caller's own deadline ends it mid-stream
        async with stream_generate(s, build_submit("hi", request_id="r6")) as chunks:  # type: ignore[arg-type]
            async for _ in chunks:
                await anyio.sleep(0.001)
    assert s.cancelled == ["r6"]
