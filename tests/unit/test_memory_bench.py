"""The memory benchmark's workloads and its through-the-kernel hook (no timing asserted)."""

from __future__ import annotations

from typing import Any

import anyio

from ipc.protocol.memory import MemoryStats, RegisterPool
from services.memory import MemoryManager
from tools.bench.memory import (
    BLOCK, _decode_workload, prefix_hit_rate, reserve_steps_per_s_kernel, waste,
)


def test_kernel_hook_drives_a_memory_server_through_any_async_call() -> None:
    m = MemoryManager()
    m.register_pool(RegisterPool("drv", _decode_workload(1, 8).slots_needed(), BLOCK))
    sent: list[str] = []

    async def call(msg: Any) -> Any:
        sent.append(type(msg).__name__)
        await anyio.lowlevel.checkpoint()
        return m.handle(msg)

    rate = anyio.run(lambda: reserve_steps_per_s_kernel(call, "drv", steps=20, width=8))
    assert rate > 0
    assert sent.count("Reserve") == 20 + 8 and "Release" in sent
    s = m.stats(MemoryStats("drv")).pools[0]
    assert s.used == 0 and s.num_seqs == 0  # it released everything it started
    assert s.prompt_tokens > 0


def test_paged_blocks_waste_less_than_contiguous_slabs() -> None:
    paged, contiguous, model_len = waste(steps=3, warmup=2)
    assert 0 < paged < 100 * (BLOCK - 1) / BLOCK
    assert paged < contiguous < model_len < 100


def test_shared_system_prompt_is_served_from_the_cache() -> None:
    hit, best, steps = prefix_hit_rate(requests=24)
    assert 0.5 < hit <= best < 1 and steps > 6
