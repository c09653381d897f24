"""tools/bench/steps.py's measuring parts, on the in-process target (the
engine over the null driver's handler): the counters it reads move the way
the figures assume, and a stall is the largest gap spanning the window."""

from __future__ import annotations

import random
from pathlib import Path

from tools.bench._steps_targets import inproc_engine
from tools.bench.steps import largest_gap, saturate


def test_largest_gap_counts_the_gaps_that_touch_the_window() -> None:
    arrivals = [[0.0, 1.0, 1.1, 3.0], [0.5, 0.6]]
    assert abs(largest_gap(arrivals, 1.05, 1.2) - 1.9) < 1e-9  # (1.1, 3.0) ends past the window's start
    assert largest_gap(arrivals, 0.55, 0.58) == 1.0       # (0.0, 1.0) spans it
    assert largest_gap([[]], 0, 1) != largest_gap([[]], 0, 1)   # nan: nothing to measure


async def test_saturate_reads_steps_round_trips_and_bytes(tmp_path: Path) -> None:
    async with inproc_engine(tmp_path, 1.0, 16, 4096) as target:
        r = await saturate(target, 8, 32, 0.3, random.Random(0))
        assert r["running_at_end"] == 8 and r["steps_per_s"] > 0
        # Every step awaits at least its Execute; a decode Execute of 8
        # sequences carries at least their ids.
        assert r["rpcs_per_step"] >= 1 and r["execute_bytes_per_step"] > 8 * 2
        assert (await target.stats()).running == 0   # saturate cancels what it started
