"""llmos on the null driver (drivers/null.py), as real processes over real
sockets: it generates what the null driver's pure function says, the same on
every run, and the same when the driver is SIGKILLed mid-generation."""

from __future__ import annotations

from pathlib import Path

import anyio

from drivers.null import continuation
from ipc.protocol.scheduler import FinishReason
from text.tokenizer import ByteTokenizer
from tools.testing import running_llmos
from tests.helpers.stacks import null_children

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def test_generates_deterministically_and_through_a_driver_kill(home: Path) -> None:
    tok = ByteTokenizer()
    prompts = ["the null driver", "runs no model", "yet it streams"]
    n = 120
    expected = [continuation(tok.encode(p), n) for p in prompts]
    async with running_llmos(home, null_children("--step-ms", "5", "--block-size", "4")) as llmos:
        c = llmos.client
        done = await c.generate(prompts[0], max_tokens=n, **GREEDY)
        assert done.finish_reason == FinishReason.LENGTH and done.token_ids == expected[0]
        assert done.text == tok.decode(expected[0])
        # Sampling parameters do not change what the null driver picks.
        again = await c.generate(prompts[0], max_tokens=n, temperature=1.5, seed=3, ignore_eos=True)
        assert again.token_ids == expected[0]

        held: list[list[int]] = [[] for _ in prompts]
        progressed = anyio.Event()

        async def run(i: int) -> None:
            async for ch in c.stream_generate(prompts[i], max_tokens=n, **GREEDY):
                held[i].extend(ch.token_ids)
                if all(len(h) >= 10 for h in held):
                    progressed.set()

        pid = llmos.instance(await llmos.status(), "null").pid
        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
            with anyio.fail_after(30):
                await progressed.wait()
            at_kill = [len(h) for h in held]
            assert await c.kill("null") == ["null"]
            with anyio.fail_after(60):
                await llmos.wait_for(lambda st: llmos.instance(st, "null").pid != pid
                                     and llmos.instance(st, "null").state == "ready", what="null restarted")
        assert all(k < n for k in at_kill), "the driver was killed after the requests ended"
        assert held == expected
        assert llmos.instance(await llmos.status(), "null").restarts == 1
