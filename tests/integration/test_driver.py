"""A CPU driver process started by the kernel, serving Execute steps."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from ipc.errors import BadRequest
from ipc.protocol import driver as dp
from ipc.protocol import kernel as kp
from ipc.protocol.sampling import SamplingParams
from tools.testing import running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import driver_spec

GREEDY = SamplingParams(temperature=0.0)


async def generate(llmos, prompt: list[int], n: int, first_block: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    table = list(range(first_block, first_block + (len(prompt) + n) // 16 + 1))
    reply = await llmos.client.call("driver", dp.Execute([dp.StepSeq(1, prompt, 0, table, params=GREEDY)]))
    out = [reply.outputs[0].token]
    for i in range(n - 1):
        reply = await llmos.client.call(
            "driver", dp.Execute([dp.StepSeq(1, [out[-1]], len(prompt) + i, table, params=GREEDY)]))
        out.append(reply.outputs[0].token)
    return out


async def test_driver_serves_execute_and_matches_the_model_run_locally(home: Path, checkpoint: Path) -> None:
    prompt = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    async with running_llmos(home, [driver_spec(checkpoint)]) as llmos:
        desc = await llmos.client.call("driver", dp.DescribeModel())
        assert desc.architecture == "LlamaForCausalLM" and desc.num_blocks > 4 and desc.block_size == 16
        served = await generate(llmos, prompt, 12)
    assert served == await local_greedy(checkpoint, prompt, 12)


async def test_bad_sequences_fail_alone(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, [driver_spec(checkpoint)]) as llmos:
        desc = await llmos.client.call("driver", dp.DescribeModel())
        good = dp.StepSeq(1, [1, 2, 3], 0, [0], params=GREEDY)
        steps = [
            good,
            dp.StepSeq(2, [1, desc.vocab_size + 5], 0, [1], params=GREEDY),          # out of vocabulary
            dp.StepSeq(3, [1, 2], 0, [desc.num_blocks + 1], params=GREEDY),         # a block it does not own
            dp.StepSeq(4, [], 0, [2], params=GREEDY),                                # empty
            dp.StepSeq(5, [1], 0, [3], params=SamplingParams(top_p=0.0)),            # bad sampling parameter
            dp.StepSeq(6, [1] * (desc.max_model_len + 1), 0, list(range(4)), params=GREEDY),  # too long
        ]
        reply = await llmos.client.call("driver", dp.Execute(steps))
        by_id = {o.seq_id: o for o in reply.outputs}
        assert by_id[1].error == "" and by_id[1].token >= 0
        assert "vocab" in by_id[2].error
        assert "block" in by_id[3].error
        assert by_id[4].error
        assert "top_p" in by_id[5].error
        assert by_id[6].error
        with pytest.raises(BadRequest, match="copy"):
            await llmos.client.call("driver", dp.Execute([good], copies=[(0, desc.num_blocks)]))
        # the driver still serves
        again = await llmos.client.call("driver", dp.Execute([good]))
        assert again.outputs[0].token == by_id[1].token


async def test_heartbeats_and_health_flow_during_a_long_step(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, [driver_spec(checkpoint)]) as llmos:
        desc = await llmos.client.call("driver", dp.DescribeModel())
        per = desc.max_model_len - 1
        blocks = per // 16 + 1
        seqs = desc.num_blocks // blocks
        steps = [dp.StepSeq(i, [(i + j) % 250 for j in range(per)], 0,
                            list(range(i * blocks, (i + 1) * blocks)), params=GREEDY) for i in range(seqs)]
        busy_seen: list[bool] = []
        done = anyio.Event()

        async def long_step() -> None:
            for _ in range(5):
                await llmos.client.call("driver", dp.Execute(steps), timeout=120)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_step)
            while not done.is_set():
                h = await llmos.client.call("driver", dp.DriverHealth())
                busy_seen.append(h.busy)
        assert any(busy_seen), "health was only ever answered between steps"
        st = await llmos.status()
        assert llmos.instance(st, "cpu").restarts == 0  # no missed heartbeats during the long steps


async def test_sigkilled_driver_is_restarted_and_ready_again(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, [driver_spec(checkpoint)]) as llmos:
        events = llmos.client.subscribe(kp.SERVICES_TOPIC)
        assert isinstance(await events.__anext__(), kp.Subscribed)
        pid = llmos.instance(await llmos.status(), "cpu").pid
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(60):
            down = await events.__anext__()
            up = await events.__anext__()
        await events.aclose()
        assert down.instance == "cpu" and down.reason == "killed by SIGKILL"
        assert isinstance(up, kp.ServiceUp) and up.service == "driver" and up.meta["num_blocks"] > 0
        reply = await llmos.client.call("driver", dp.Execute([dp.StepSeq(1, [1, 2, 3], 0, [0], params=GREEDY)]))
        assert reply.outputs[0].token >= 0
        assert llmos.instance(await llmos.status(), "cpu").restarts == 1
