"""The memory server over the kernel, following a real driver's life."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from ipc.protocol import memory as mp
from kernel.config import ChildSpec
from tools.testing import running_llmos
from tests.helpers.model_fixtures import make_checkpoint
from tests.helpers.stacks import DRIVER_DTYPE_ARGS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama")
    return d


def children(ckpt: Path) -> list[ChildSpec]:
    return [ChildSpec("memory", "services.memory"),
            ChildSpec("cpu", "drivers.cpu", service="driver",
                      args=["--model", str(ckpt), "--kv-cache-mb", "1", "--threads", "1", *DRIVER_DTYPE_ARGS])]


async def next_event(events: Any, kind: type, timeout: float = 60) -> Any:
    with anyio.fail_after(timeout):
        async for ev in events:
            if isinstance(ev, kind):
                return ev
    raise AssertionError("event stream ended")


async def test_pools_follow_drivers_and_recoveries_are_announced(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        await llmos.wait_for(lambda st: True, what="boot")
        with anyio.fail_after(30):
            while (await c.call("memory", mp.ListPools())).pools != ["cpu"]:
                await anyio.sleep(0.05)
        stats = await c.call("memory", mp.MemoryStats())
        num_blocks = stats.pools[0].num_blocks
        meta = llmos.instance(await llmos.status(), "cpu").meta
        assert num_blocks == meta["num_blocks"] > 0

        r = await c.call("memory", mp.Reserve([mp.SeqReserve(1, 0, list(range(40)), 40, tenant="t1", pool="cpu")]))
        assert r.seqs[0].error is None and len(r.seqs[0].blocks) == 3  # 40 tokens in 16-token blocks

        events = c.subscribe(mp.MEMORY_TOPIC)
        await events.__anext__()
        # the driver dies: its pool is dropped and sequence 1 is announced lost
        os.kill(llmos.instance(await llmos.status(), "cpu").pid, signal.SIGKILL)
        lost = await next_event(events, mp.PoolLost)
        assert lost.pool == "cpu" and lost.seq_ids == [1]
        with anyio.fail_after(60):
            while (await c.call("memory", mp.ListPools())).pools != ["cpu"]:
                await anyio.sleep(0.05)
        stats = await c.call("memory", mp.MemoryStats())
        assert stats.pools[0].used == 0  # the restarted driver's pool starts empty

        # stale ids get clear errors, not crashes
        bad = await c.call("memory", mp.Reserve([mp.SeqReserve(1, 40, [1], 1)]))
        assert bad.seqs[0].error is not None and "unknown sequence 1 " in bad.seqs[0].error.message

        # the memory server dies: it comes back empty and announces it, pool included
        os.kill(llmos.instance(await llmos.status(), "memory").pid, signal.SIGKILL)
        restarted = await next_event(events, mp.MemoryRestarted)
        await events.aclose()
        assert restarted.pools == ["cpu"]
        r = await c.call("memory", mp.Reregister([mp.SeqState(2, "t1", "cpu", list(range(20)))]))
        assert r.failures == []
        stats = await c.call("memory", mp.MemoryStats())
        assert stats.pools[0].num_seqs == 1
