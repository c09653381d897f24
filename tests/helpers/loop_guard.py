"""A pytest plugin: async tests run on uvloop (what production runs), and a
test fails if anything blocked its event loop for longer than BOUND_S.

The detector is a heartbeat on the loop: a `call_later` chain every
BEAT_S that records how late each beat ran. A beat is late only while
something else holds the loop (a blocking call in a coroutine, CPU work on
the loop thread), so the worst lateness over a test bounds the longest
block, to within one beat. It costs one timer callback per BEAT_S, not
asyncio debug mode's per-callback timing (which uvloop does not offer
cheaply either). It wraps the test coroutine itself rather than living in a
fixture, because pytest-asyncio stops the loop between fixture set-up and
the test: a fixture's heartbeat would count those pauses as blocks.

Not covered: async fixtures' own set-up and teardown, and loops a test
starts itself (`anyio.run`, a blocking portal).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

# One second: the blocks the guard found in the suite (a reference model run,
# a CLI subprocess, importing openai, on the loop) lasted 1.6-3.7 s, while on
# a loaded 2-core machine (child processes, other test runs) healthy tests
# stayed under 0.11 s, and the worst, a deliberate flood through the
# kernel's pump in one test, at 0.41 s: room for a slower machine. A
# test that needs more says so with `@pytest.mark.loop_block(seconds)`, or
# `loop_block()` where blocking is the point (a raw blocking socket probing
# a kernel that runs in another process).
BOUND_S = float(os.environ.get("LLMOS_TEST_LOOP_BLOCK_S", "1.0"))
BEAT_S = 0.05


class LoopGuard:
    """Heartbeat on one running loop; `worst_s` is the latest any beat ran."""

    def __init__(self, loop: asyncio.AbstractEventLoop, beat_s: float = BEAT_S):
        self.loop = loop
        self.beat_s = beat_s
        self.worst_s = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._due = time.monotonic() + self.beat_s
        self._handle = self.loop.call_later(self.beat_s, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # a block still in progress when the test returned counts too
        self.worst_s = max(self.worst_s, time.monotonic() - self._due)

    def _beat(self) -> None:
        now = time.monotonic()
        self.worst_s = max(self.worst_s, now - self._due)
        self._due = now + self.beat_s
        self._handle = self.loop.call_later(self.beat_s, self._beat)

    def failure(self, bound_s: float) -> str | None:
        if self.worst_s <= bound_s:
            return None
        return (f"the event loop was blocked for {self.worst_s:.2f}s (bound {bound_s:g}s): something "
                f"synchronous ran on the loop thread; move it to a worker thread "
                f"(or mark the test loop_block(seconds) if that is the point)")


def guarded(fn: Callable[..., Any], bound_s: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        guard = LoopGuard(asyncio.get_running_loop())
        guard.start()
        try:
            result = await fn(*args, **kwargs)
        finally:
            guard.stop()
        failure = guard.failure(bound_s)
        if failure:
            pytest.fail(failure, pytrace=False)
        return result
    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "loop_block(seconds): this test may block its event loop that long "
                                       "(no seconds: as long as it likes, e.g. a raw blocking socket on purpose)")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(item.obj):
            continue
        mark = item.get_closest_marker("loop_block")
        bound = BOUND_S if mark is None else float(mark.args[0]) if mark.args else math.inf
        item.obj = guarded(item.obj, bound)
