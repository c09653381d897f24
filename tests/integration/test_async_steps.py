"""Async scheduling (issue 15) over real processes: the model driver runs
step N+1 on the token it sampled in step N (`StepDelta.chain`), and greedy
output through the whole OS equals the model run step by step here. The
CPU driver is asked for them (`async_steps = true`): "auto", the default,
plans a CPU driver's steps one by one (its forward pass uses the host's
cores), which the second test checks."""

from __future__ import annotations

from pathlib import Path

import anyio

from common.config.scheduler import SchedulerConfig
from ipc.protocol import scheduler as sp
from ipc.protocol.scheduler import FinishReason
from tools.testing import running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import children

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def test_pipelined_greedy_output_equals_the_model_run_step_by_step(home: Path, checkpoint: Path) -> None:
    prompts = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [200, 201, 2, 9]]
    lengths = [24, 31, 9]
    async with running_llmos(home, children(checkpoint, "--max-seqs", "4"),
                             scheduler=SchedulerConfig(async_steps=True)) as llmos:
        c = llmos.client
        got: list[list[int]] = [[] for _ in prompts]
        reasons: list[FinishReason | None] = [None] * len(prompts)

        async def run(i: int) -> None:
            done = await c.generate(prompts[i], max_tokens=lengths[i], **GREEDY)
            got[i], reasons[i] = done.token_ids, done.finish_reason

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
        stats: sp.SchedulerStatsReply = await c.call(sp.SCHEDULER, sp.SchedulerStats())
    assert reasons == [FinishReason.LENGTH] * len(prompts)
    for i, p in enumerate(prompts):
        assert got[i] == await local_greedy(checkpoint, p, lengths[i]), i
    # most decode steps went to the driver before the step before them came back
    assert stats.steps_ahead >= max(lengths) // 2


async def test_by_default_a_cpu_driver_gets_its_steps_planned_one_by_one(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        done = await c.generate([5, 17, 42, 99], max_tokens=16, **GREEDY)
        stats: sp.SchedulerStatsReply = await c.call(sp.SCHEDULER, sp.SchedulerStats())
    assert done.token_ids == await local_greedy(checkpoint, [5, 17, 42, 99], 16)
    assert stats.steps >= 16 and stats.steps_ahead == 0
