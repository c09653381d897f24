"""The planner's count of free blocks kept from step to step (planner.py
`BlockCounts`): whatever the block tables went through between two steps,
it says what counting every table afresh says."""

from __future__ import annotations

import random

from services.scheduler._request import Seq
from services.scheduler.planner import BlockCounts, BlockLedger, PoolShape

POOLS = {"a": PoolShape(64, 4), "b": PoolShape(32, 4)}


def fresh(seqs: list[Seq]) -> dict[str, int]:
    return {p: len(set().union(*(s.block_table for s in seqs if s.pool == p))) for p in POOLS}


def test_the_counts_kept_between_steps_equal_a_fresh_count_after_any_change() -> None:
    rng = random.Random(15)
    for walk in range(60):
        counts = BlockCounts()
        seqs = [Seq(i, [1], 1, pool=rng.choice(["a", "b"])) for i in range(6)]
        for step in range(40):
            for s in rng.sample(seqs, rng.randint(0, len(seqs))):
                r = rng.random()
                if r < 0.35:
                    s.block_table.append(rng.randrange(64))  # a block taken (maybe another's: shared)
                elif r < 0.5 and s.block_table:
                    s.block_table[-1] = rng.randrange(64)  # a copy on write of the last block
                elif r < 0.6:
                    del s.block_table[rng.randint(0, len(s.block_table)):]  # cut back (recovery)
                elif r < 0.65 and s.block_table:
                    s.block_table[rng.randrange(len(s.block_table))] = rng.randrange(64)  # anywhere
                elif r < 0.75:
                    s.block_table = [rng.randrange(64) for _ in range(rng.randint(0, 5))]  # replaced
                elif r < 0.8:
                    s.pool = "b" if s.pool == "a" else "a"
                elif r < 0.85:
                    other = rng.choice(seqs)
                    s.block_table = list(other.block_table)  # a fork
            live = [s for s in seqs if rng.random() < 0.8]
            live += live[:1]  # a sequence listed twice counts once
            expect = fresh(live)
            got = counts.distinct(live)
            assert {p: got.get(p, 0) for p in POOLS} == expect, (walk, step)
            ledger = BlockLedger(POOLS, live, counts=counts)
            assert ledger.free == {p: POOLS[p].num_blocks - expect[p] for p in POOLS}
