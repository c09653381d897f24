"""The preemption benchmark's KV sizing (no timing asserted)."""

from __future__ import annotations

import pytest

from common.config.scheduler import PreemptionMode
from tools.bench._serve_load import Req, mixed_workload
from tools.bench.preemption import (
    BLOCK_BYTES, BURST, FULL, QUICK, Plan, blocks_for, config, kv_cache_mb, least_positions, swap_mb,
)

MiB = 2**20


def reqs(*shapes: tuple[int, int]) -> list[Req]:
    return [Req(i, [1] * p, n) for i, (p, n) in enumerate(shapes)]


def test_block_bytes_are_the_demo_models_on_a_cpu_driver() -> None:
    # 8 layers, K and V, 4 KV heads x 64, 16 slots, fp32.
    assert BLOCK_BYTES == 2 * 8 * 4 * 64 * 16 * 4


def test_kv_cache_holds_the_asked_share_of_the_in_flight_requests() -> None:
    w = reqs(*[(32, 16)] * 6)  # 3 blocks each, 18 in all
    assert [blocks_for(r) for r in w] == [3] * 6
    assert kv_cache_mb(w, max_seqs=64, fits=1 / 3, block_bytes=MiB // 4) == 2  # 6 blocks: 1.5 MiB, rounded up
    # Only the first max_seqs are in flight together.
    assert kv_cache_mb(w, max_seqs=2, fits=1.0, block_bytes=MiB) == 6


def test_kv_cache_never_holds_less_than_the_largest_request() -> None:
    w = reqs((1000, 24), (8, 8), (8, 8))  # 64 blocks, then 1 and 1
    assert kv_cache_mb(w, max_seqs=64, fits=0.1, block_bytes=MiB) == 64


def test_swap_tier_holds_every_request_and_least_positions_counts_no_recompute() -> None:
    w = reqs((32, 16), (17, 1))  # 3 + 2 blocks
    assert swap_mb(w, block_bytes=MiB) == 5
    assert least_positions(w) == (32 + 15) + (17 + 0)


@pytest.mark.parametrize("plan", [QUICK, FULL])
def test_the_plans_pools_force_preemption_yet_fit_any_one_request(plan: Plan) -> None:
    w = mixed_workload(plan.requests, BURST, plan.prompt_len, plan.output_len, seed=3)
    need = [blocks_for(r) for r in w]
    assert plan.requests <= config(PreemptionMode.SWAP).max_num_seqs  # all in flight together
    pool = kv_cache_mb(w, plan.requests) * MiB // BLOCK_BYTES
    assert max(need) <= pool < sum(need) / 2
    assert swap_mb(w) * MiB // BLOCK_BYTES >= sum(need)
