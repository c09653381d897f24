"""Text generation end to end: kernel, memory server, a CPU driver on a tiny
checkpoint and the scheduler, as real processes over real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from text.tokenizer import load_tokenizer
from ipc.errors import DeadlineExceeded, Overloaded
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from kernel.config import ChildSpec
from sdk.client import AsyncClient
from sdk.generate import Completion
from tools.testing import REPO_ROOT, RunningLlmos, running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import DRIVER_DTYPE_ARGS, children

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def used_blocks(llmos: RunningLlmos) -> int:
    reply = await llmos.client.call("memory", mp.MemoryStats())
    return sum(p.used for p in reply.pools)


async def wait_until_free(llmos: RunningLlmos) -> None:
    with anyio.fail_after(30):
        while await used_blocks(llmos):
            await anyio.sleep(0.05)


async def test_generation_through_the_scheduler(home: Path, checkpoint: Path) -> None:
    tok = load_tokenizer(checkpoint)
    async with running_llmos(home, children(checkpoint, "--max-seqs", "2", "--max-waiting", "2")) as llmos:
        c = llmos.client

        # Greedy through the whole OS equals the model run locally (the driver's own greedy).
        prompt = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
        done = await c.generate(prompt, max_tokens=24, **GREEDY)
        assert done.finish_reason == FinishReason.LENGTH and done.usage.completion_tokens == 24
        assert done.token_ids == await local_greedy(checkpoint, prompt, 24)

        # Streaming: contiguous chunks whose text concatenates to the text of the ids.
        text_prompt = "hello world, the quick brown fox"
        chunks = [ch async for ch in c.stream_generate(text_prompt, max_tokens=30, **GREEDY)]
        assert len(chunks) > 1 and chunks[-1].finish_reason == FinishReason.LENGTH
        ids = [t for ch in chunks for t in ch.token_ids]
        assert [ch.offset for ch in chunks] == [sum(len(x.token_ids) for x in chunks[:i]) for i in range(len(chunks))]
        assert ids == await local_greedy(checkpoint, tok.encode(text_prompt), 30)
        full = "".join(ch.text for ch in chunks)
        assert full == tok.decode(ids)

        # Stop strings: the text ends before the first match; the client never saw it.
        stop = full[12:15]
        stopped = [ch async for ch in c.stream_generate(text_prompt, max_tokens=30, stop=[stop], **GREEDY)]
        assert stopped[-1].finish_reason == FinishReason.STOP
        assert "".join(ch.text for ch in stopped) == full[:full.index(stop)]

        # Cancel: the request ends "cancelled" and its blocks are freed.
        stream = c.stream_generate(prompt, max_tokens=200, request_id="to-cancel", **GREEDY)
        first = await stream.__anext__()
        assert await c.cancel("to-cancel")
        rest = [ch async for ch in stream]
        assert rest[-1].finish_reason == FinishReason.CANCELLED
        assert len(first.token_ids) + sum(len(ch.token_ids) for ch in rest) < 200
        await wait_until_free(llmos)
        assert not await c.cancel("to-cancel")

        # A deadline that passed before the first token.
        with pytest.raises(DeadlineExceeded):
            await c.generate(prompt, max_tokens=10, timeout=1e-9, **GREEDY)

        # Admission control: 2 running + 2 waiting; a burst beyond that is refused.
        results: list[Completion | Overloaded] = []

        async def one(i: int) -> None:
            try:
                results.append(await c.generate([1 + i, 2, 3], max_tokens=64, **GREEDY))
            except Overloaded as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
        refused = [r for r in results if isinstance(r, Overloaded)]
        served = [r for r in results if isinstance(r, Completion)]
        assert refused and all(float(r.detail["retry_after_s"]) > 0 for r in refused)
        assert len(served) >= 2 and all(r.finish_reason == FinishReason.LENGTH for r in served)
        await wait_until_free(llmos)
        stats = await c.scheduler_stats()
        assert stats.waiting == 0 and stats.running == 0 and stats.drivers[0].instance == "cpu"

        # The CLI.
        out = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "tools.cli", "--home", str(home), "generate", text_prompt, "--max-tokens", "30",
             "--temperature", "0", "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["token_ids"] == ids[:len(json.loads(out.stdout)["token_ids"])]


async def test_every_request_completes_exactly_once_through_kills(home: Path, checkpoint: Path) -> None:
    """Kill the driver, then the memory server, then the scheduler, each during
    generation: every request still completes once, with exactly the tokens
    of an undisturbed greedy run (no repeat, no gap: the SDK checks offsets)."""
    prompts = [[7 + i, 30, 41, 52, 63, 74, 85, 96, 107] for i in range(3)]
    n = 160
    expected = [await local_greedy(checkpoint, p, n) for p in prompts]
    async with running_llmos(home, children(checkpoint)) as llmos:
        for target in ("cpu", "memory", "scheduler"):
            async with await AsyncClient.connect(home=home) as c:
                held: list[list[int]] = [[] for _ in prompts]
                finals: list[FinishReason] = []
                progressed = anyio.Event()

                async def run(i: int) -> None:
                    async for ch in c.stream_generate(prompts[i], max_tokens=n, **GREEDY):
                        held[i].extend(ch.token_ids)
                        if all(held):
                            progressed.set()
                        if ch.finish_reason is not None:
                            finals.append(ch.finish_reason)

                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(run, i)
                    with anyio.fail_after(30):
                        await progressed.wait()
                    pid = llmos.instance(await llmos.status(), target).pid
                    at_kill = [len(h) for h in held]
                    assert await c.kill(target) == [target]
                    with anyio.fail_after(120):
                        await llmos.wait_for(lambda st: llmos.instance(st, target).pid != pid
                                             and llmos.instance(st, target).state == "ready",
                                             what=f"{target} restarted")
                assert all(k < n for k in at_kill), f"{target} was killed after the requests ended"
                assert finals == [FinishReason.LENGTH] * len(prompts)
                assert held == expected, f"output differs after killing {target}"
        await wait_until_free(llmos)
        restarts = {t: llmos.instance(await llmos.status(), t).restarts for t in ("cpu", "memory", "scheduler")}
        assert restarts == {"cpu": 1, "memory": 1, "scheduler": 1}


async def test_swap_mode_preemption_keeps_outputs_exact_over_real_processes(home: Path, checkpoint: Path) -> None:
    """A KV cache of 12 blocks of 16 for six 58-token sequences: the scheduler
    must preempt, and with `--preemption swap` the victims' KV goes to the
    driver's host tier and comes back — outputs equal the undisturbed run."""
    driver = ChildSpec("cpu", "drivers", service="driver",
                       args=["cpu", "--model", str(checkpoint), "--kv-cache-mb", str(12 * 8192 / 2**20),
                             "--host-slots", "64", "--threads", "1", *DRIVER_DTYPE_ARGS])
    kids = [ChildSpec("memory", "services.memory"), driver,
            ChildSpec("scheduler", "services.scheduler", args=["--preemption", "swap", "--max-seqs", "8"])]
    prompts = [[11 + i, 30, 41, 52, 63, 74, 85, 96, 107, 20, 21, 22, 23, 24, 25, 26, 27, 28] for i in range(6)]
    n = 40
    async with running_llmos(home, kids) as llmos:
        pools = (await llmos.client.call("memory", mp.MemoryStats())).pools
        assert [(p.num_blocks, p.swap_slots) for p in pools] == [(12, 64)]
        done: dict[int, Completion] = {}

        async def run(i: int) -> None:
            done[i] = await llmos.client.generate(prompts[i], max_tokens=n, **GREEDY)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(run, i)
        stats = await llmos.client.scheduler_stats()
        await wait_until_free(llmos)
    assert stats.preemption == "swap" and stats.preemptions > 0
    assert stats.swapped_out > 0 and stats.swapped_in == stats.swapped_out
    for i, p in enumerate(prompts):
        assert done[i].finish_reason == FinishReason.LENGTH
        assert done[i].token_ids == await local_greedy(checkpoint, p, n)
