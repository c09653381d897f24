"""Where the planner places a new sequence (planner.BlockLedger.placement):
by free KV and load together — free blocks less those queued prefill will
take, per sequence the pool runs. In-memory sequences only."""

from __future__ import annotations

import itertools

from common.config.scheduler import PolicyConfig
from services.scheduler._request import Seq
from services.scheduler.planner import BlockLedger, Limits, PoolShape, plan
from services.scheduler.policies import make_policy

BS = 4
_ids = itertools.count(1)
_blocks = itertools.count()


def running(pool: str, n: int, *, computed: int = 8, prompt: int = 8) -> list[Seq]:
    """`n` sequences on `pool`, each with `computed` of its `prompt` tokens' KV (blocks held)."""
    out = []
    for _ in range(n):
        s = Seq(next(_ids), [1] * prompt, prompt, pool=pool, num_computed=computed)
        s.block_table = [next(_blocks) for _ in range(-(-computed // BS))]
        out.append(s)
    return out


def waiting(n: int, prompt: int = 8) -> list[Seq]:
    return [Seq(next(_ids), [1] * prompt, prompt) for _ in range(n)]


def test_a_pool_with_free_blocks_but_a_full_batch_does_not_take_every_newcomer() -> None:
    # "big" has three times the free blocks, and ten times the sequences.
    pools = {"big": PoolShape(1000, BS), "small": PoolShape(400, BS)}
    run = running("big", 40) + running("small", 4)  # 2 blocks each: 920 and 392 free
    ledger = BlockLedger(pools, run)
    assert ledger.free == {"big": 920, "small": 392}
    ledger.count_load(run)
    assert ledger.placement() == "small"  # 392 / 5 per sequence against 920 / 41
    # A step's newcomers spread by the same measure as they are placed.
    new = waiting(30)
    p = plan(run, new, make_policy(PolicyConfig()), BlockLedger(pools, run), Limits(10_000, 200, 512), 0.0)
    placed = [s.pool for s, _ in p.scheduled if s in new]
    assert len(placed) == 30
    assert 0 < placed.count("big") < placed.count("small")
    # Roughly level afterwards: free blocks per sequence within one newcomer's share.
    ledger = BlockLedger(pools, run + new)
    per_seq = {q: ledger.free[q] / sum(1 for s in run + new if s.pool == q) for q in pools}
    assert abs(per_seq["big"] - per_seq["small"]) < 392 / 5 - 920 / 41


def test_queued_prefill_counts_against_a_pool() -> None:
    pools = {"a": PoolShape(200, BS), "b": PoolShape(200, BS)}
    # One sequence each, equal free blocks; a's has 400 prompt tokens still to prefill (100 blocks).
    run = running("a", 1, computed=4, prompt=404) + running("b", 1, computed=4, prompt=8)
    ledger = BlockLedger(pools, run)
    assert ledger.free["a"] == ledger.free["b"]
    ledger.count_load(run)
    assert ledger.placement() == "b"


def test_equal_load_places_by_free_blocks_then_name_and_fit_comes_first() -> None:
    pools = {"a": PoolShape(100, BS), "b": PoolShape(100, BS), "c": PoolShape(10, BS)}
    run = running("a", 2) + running("b", 2, computed=40, prompt=40)  # a: 96 free, b: 80
    ledger = BlockLedger(pools, run)
    ledger.count_load(run)
    assert ledger.placement() == "a"
    # c is idle and roomiest per sequence, but cannot hold 200 positions whole.
    assert ledger.placement(max_len=200) == "a"
    empty = BlockLedger({"y": PoolShape(50, BS), "x": PoolShape(50, BS)}, [])
    assert empty.placement() == "x"
    assert BlockLedger({}, []).placement() is None


def test_short_of_blocks_more_load_is_worse() -> None:
    pools = {"a": PoolShape(100, BS), "b": PoolShape(100, BS)}
    # Both have more queued prefill than free blocks; b runs more sequences for the same shortfall.
    run = running("a", 1, computed=4, prompt=800) + running("b", 3, computed=4, prompt=264)
    ledger = BlockLedger(pools, run)
    ledger.count_load(run)
    # Queued prefill: a 199 blocks, b 3 x 65: shortfalls of 100 and 98 blocks ...
    assert (ledger.free["a"], ledger.free["b"]) == (99, 97)
    assert ledger.placement() == "a"  # ... yet -100 x 2 sequences beats -98 x 4
