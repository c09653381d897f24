"""Auto-tuning of the token budget and batch cap against a per-token latency
target, with modelled step times (no real clock)."""

from __future__ import annotations

import random

from ipc.protocol import driver as dp
from services.scheduler.autotune import AutoTuner
from common.config.scheduler import SchedulerConfig
from tests.helpers.scheduler_fakes import FakeDriver, Stream, expected, running


def cost(tokens: int) -> float:
    """A device whose step takes 20 ms plus 1 ms per token."""
    return 0.020 + 0.001 * tokens


def converge(tuner: AutoTuner, steps: int, sizes: random.Random | None = None) -> tuple[int, int]:
    budget, seqs = tuner.max_budget, tuner.max_seqs
    for _ in range(steps):
        # Demand exceeds the budget: a step computes what the budget allows,
        # or (sizes) a varying amount under it.
        tokens = budget if sizes is None else sizes.randint(1, budget)
        tuned = tuner.observe(tokens, cost(tokens))
        if tuned is not None:
            budget, seqs = tuned.token_budget, tuned.max_num_seqs
    return budget, seqs


def test_the_budget_settles_where_a_step_meets_the_target() -> None:
    # 100 ms per token: 20 ms + 1 ms * 80 tokens.
    budget, seqs = converge(AutoTuner(0.100, 512, 64), 400)
    assert 76 <= budget <= 84 and seqs == 64  # the batch cap is a ceiling
    budget, seqs = converge(AutoTuner(0.050, 512, 64), 400)
    assert 28 <= budget <= 32 and seqs == budget  # a decode step of `seqs` sequences fits too


def test_varied_step_sizes_are_fitted_with_their_fixed_cost() -> None:
    budget, _ = converge(AutoTuner(0.100, 512, 64), 400, random.Random(1))
    assert 76 <= budget <= 84


def test_limits_stay_within_the_ceilings_and_the_floor() -> None:
    assert converge(AutoTuner(10.0, 256, 32), 200) == (256, 32)  # loose target: the configured limits
    budget, seqs = converge(AutoTuner(0.010, 512, 64), 200)  # below the fixed cost: the floor
    assert budget == 16 and seqs == 16


async def test_the_engine_reports_and_obeys_the_tuned_limits() -> None:
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256, tpot_target_ms=50.0)
    async with running(config, {"cpu": FakeDriver(256)}) as (engine, backend):
        now = [0.0]
        engine.clock = lambda: now[0]
        execute = backend.execute

        async def timed(instance: str, req: dp.Execute) -> dp.Executed:
            now[0] += cost(sum(len(s.token_ids) for s in req.steps))
            return await execute(instance, req)

        backend.execute = timed  # type: ignore[method-assign]
        prompts = [f"{i} " + "long prompt text " * 8 for i in range(12)]
        streams = [Stream(engine, prompt=p, max_tokens=20) for p in prompts]
        finals = [await s.result() for s in streams]
        stats = engine.stats()
        sizes = backend.drivers["cpu"].tokens_per_step
    assert [s.tokens(f) for s, f in zip(streams, finals)] == [expected(p, 20) for p in prompts]
    assert stats.tpot_target_ms == 50.0 and stats.step_ms > 0
    assert 20 <= stats.token_budget <= 40 and stats.max_num_seqs == min(32, stats.token_budget)
    assert max(sizes[-20:]) <= 40 < max(sizes)  # it started at 256-token steps
