"""Sessions over real processes: suspend swaps a running generation's KV to
the driver's host tier, resume brings it back and the continuation is the
undisturbed greedy one; the conversation (and its KV) is kept for its next turn."""

from __future__ import annotations

from pathlib import Path

import anyio

from ipc.protocol import memory as mp
from kernel.config import ChildSpec
from tools.testing import running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import DRIVER_DTYPE_ARGS

GREEDY = dict(temperature=0.0, ignore_eos=True)


def children(ckpt: Path) -> list[ChildSpec]:
    return [ChildSpec("memory", "services.memory"),
            ChildSpec("cpu", "drivers", service="driver",
                      args=["cpu", "--model", str(ckpt), "--kv-cache-mb", "2", "--threads", "1",
                            "--host-slots", "64", *DRIVER_DTYPE_ARGS]),
            ChildSpec("scheduler", "services.scheduler")]


async def test_suspend_and_resume_give_the_same_continuation_and_the_kv_outlives_a_turn(
        home: Path, checkpoint: Path) -> None:
    prompt = [9, 31, 44, 57, 68, 70, 81, 92, 103, 114, 125, 136]
    n = 160
    want = await local_greedy(checkpoint, prompt, n)
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        held: list[int] = []
        started = anyio.Event()
        finals = []

        async def turn() -> None:
            async for ch in c.stream_generate(prompt, max_tokens=n, session="chat", request_id="t1", **GREEDY):
                held.extend(ch.token_ids)
                if len(held) >= 8:
                    started.set()
                if ch.finish_reason is not None:
                    finals.append(ch)

        async with anyio.create_task_group() as tg:
            tg.start_soon(turn)
            with anyio.fail_after(60):
                await started.wait()
            assert (await c.sessions.suspend("chat")).state == "suspended"
            with anyio.fail_after(30):
                while (await c.sessions.get("chat")).kv_where != "swap":
                    await anyio.sleep(0.05)
            status = await c.request_status("t1")
            assert status.state == "suspended" and status.generated < n
            stats: mp.MemoryStatsReply = await c.call("memory", mp.MemoryStats())
            assert stats.pools[0].swapped_out > 0 and stats.pools[0].swap_used > 0
            assert (await c.request_status("t1")).generated == status.generated  # it does not run
            assert (await c.sessions.resume("chat")).state != "suspended"
        assert held == want  # swapped back in, continued exactly
        assert finals[0].usage.preemptions == 0

        # The next turn sends only its new text; the scheduler holds the
        # history, and its KV was kept (pinned) even though the prefix cache
        # was emptied in between.
        await c.call("memory", mp.EvictCached())
        second = await c.generate([7, 7], max_tokens=4, session="chat", **GREEDY)
        assert second.usage.history_tokens == len(prompt) + n
        assert second.usage.cached_tokens >= len(prompt) + n - 16
        assert second.token_ids == await local_greedy(checkpoint, prompt + want + [7, 7], 4)
        assert (await c.sessions.close("chat")).kv_where == ""
