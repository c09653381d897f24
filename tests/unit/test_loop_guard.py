"""The loop guard (tests/helpers/loop_guard.py): async tests run on uvloop, a
coroutine that blocks the loop past the bound is reported, a test that only
awaits is not, and a test that blocks fails when pytest runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import uvloop

from tests.helpers.loop_guard import BOUND_S, LoopGuard
from tools.testing import REPO_ROOT


async def test_async_tests_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_a_blocking_call_on_the_loop_is_reported() -> None:
    guard = LoopGuard(asyncio.get_running_loop())
    guard.start()
    await asyncio.sleep(0.2)  # a few beats on time first
    time.sleep(0.5)  # the block under test, well under this test's own bound
    await asyncio.sleep(0.1)
    guard.stop()
    assert guard.worst_s >= 0.4
    failure = guard.failure(0.3)
    assert failure is not None and "blocked for" in failure and "bound 0.3s" in failure


async def test_awaiting_is_not_blocking() -> None:
    guard = LoopGuard(asyncio.get_running_loop())
    guard.start()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(time.sleep, 0.5)  # a worker thread may block all it likes
    guard.stop()
    assert guard.failure(BOUND_S) is None


def test_pytest_fails_a_test_that_blocks_its_loop_and_passes_one_that_awaits(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(
        "import asyncio, time\n"
        "import pytest\n"
        "async def test_blocks():\n"
        "    time.sleep(0.6)\n"
        "async def test_awaits():\n"
        "    await asyncio.sleep(0.6)\n"
        "@pytest.mark.loop_block(5)\n"
        "async def test_allowed_to_block():\n"
        "    time.sleep(0.6)\n"
        "@pytest.mark.loop_block()\n"
        "async def test_blocking_is_the_point():\n"
        "    time.sleep(0.6)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.helpers.loop_guard",
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", "test_probe.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LLMOS_TEST_LOOP_BLOCK_S": "0.3"})
    assert "1 failed, 3 passed" in out.stdout, out.stdout + out.stderr
    assert "FAILED test_probe.py::test_blocks" in out.stdout and "the event loop was blocked for" in out.stdout
