"""Batched events (Kind.EVENTS, issue 15) over real processes and sockets:
a scheduler step's token deltas leave in one frame and reach every stream of
several clients exactly once, in order; a registered service that forges
events for others' calls inside its batches is refused and audited, and the
streams it aimed at go on untouched."""

from __future__ import annotations

from pathlib import Path

import anyio

from drivers.null import continuation
from ipc.protocol import scheduler as sp
from ipc.protocol.echo import Count, CountDone, Counted
from ipc.protocol.sampling import SamplingParams
from kernel.config import ChildSpec
from sdk.client import AsyncClient
from tests.helpers.audit import wait_audit
from tests.helpers.forger import FORGED_TOKEN
from tests.helpers.stacks import null_children
from text.tokenizer import ByteTokenizer
from tools.testing import running_llmos

GREEDY = SamplingParams(temperature=0.0)


async def collect(client: AsyncClient, prompt: str, n: int, rid: str) -> tuple[list[sp.TokenDelta], sp.Finished]:
    """Every TokenDelta of one generation, raw (no SDK reassembly), and its Finished."""
    deltas: list[sp.TokenDelta] = []
    async for ev in client.stream(sp.SCHEDULER, sp.Submit(prompt, params=GREEDY, max_tokens=n, ignore_eos=True,
                                                         request_id=rid)):
        if isinstance(ev, sp.TokenDelta):
            deltas.append(ev)
        else:
            assert isinstance(ev, sp.Finished), ev
            return deltas, ev
    raise AssertionError("the stream ended without Finished")


def check_stream(deltas: list[sp.TokenDelta], done: sp.Finished, expected: list[int], rid: str) -> None:
    ids = [t for d in deltas for t in d.token_ids]
    assert [d.offset for d in deltas] == [sum(len(e.token_ids) for e in deltas[:i]) for i in range(len(deltas))]
    assert all(d.request_id == rid for d in deltas) and done.offset == len(ids)  # Finished: the rest
    assert ids + done.token_ids == expected, rid  # every token once, in order, none of another stream's


async def test_several_clients_streams_get_every_token_once_in_order(home: Path) -> None:
    tok = ByteTokenizer()
    n = 150
    children = [*null_children("--step-ms", "1", scheduler_args=()), ChildSpec("echo", "services.echo")]
    async with running_llmos(home, children) as llmos:
        clients = [llmos.client] + [await AsyncClient.connect(home=home) for _ in range(2)]
        try:
            jobs = [(c, f"client {ci} stream {si} says", f"c{ci}-s{si}") for ci, c in enumerate(clients)
                    for si in range(4)]
            got: dict[str, tuple[list[sp.TokenDelta], sp.Finished]] = {}
            counted: list[list[int]] = []

            async def gen(c: AsyncClient, prompt: str, rid: str) -> None:
                with anyio.fail_after(60):
                    while True:
                        try:
                            got[rid] = await collect(c, prompt, n, rid)
                            return
                        except Exception as exc:  # noqa: BLE001 - until the model is described
                            if "no model" not in str(exc):
                                raise
                            await anyio.sleep(0.1)

            async def count(c: AsyncClient) -> None:
                seen = []
                async for ev in c.stream("echo", Count(700)):  # 700 events in one tick: batched
                    if isinstance(ev, Counted):
                        seen.append(ev.i)
                    else:
                        assert ev == CountDone(700)
                counted.append(seen)

            async with anyio.create_task_group() as tg:
                for c, prompt, rid in jobs:
                    tg.start_soon(gen, c, prompt, rid)
                for c in clients:
                    tg.start_soon(count, c)
            for c, prompt, rid in jobs:
                check_stream(*got[rid], continuation(tok.encode(prompt), n), rid)
            assert counted == [list(range(700))] * len(clients)
        finally:
            for c in clients[1:]:
                await c.aclose()


async def test_events_forged_inside_a_batch_are_refused_and_audited_and_the_victims_stream_goes_on(home: Path) -> None:
    tok = ByteTokenizer()
    n = 120
    children = [ChildSpec("security", "services.security"), *null_children("--step-ms", "10"),
                ChildSpec("forger", "tests.helpers.forger")]
    async with running_llmos(home, children, auth=True) as llmos:
        c = llmos.client
        prompts = [f"victim {i} streams" for i in range(3)]
        got: dict[str, tuple[list[sp.TokenDelta], sp.Finished]] = {}
        started = anyio.Event()

        async def victim(i: int) -> None:
            rid = f"victim-{i}"
            with anyio.fail_after(60):
                while True:
                    try:
                        got[rid] = await collect(c, prompts[i], n, rid)
                        return
                    except Exception as exc:  # noqa: BLE001 - until the model is described
                        if "no model" not in str(exc):
                            raise
                        await anyio.sleep(0.1)

        async def watch() -> None:
            with anyio.fail_after(60):
                while (await c.scheduler_stats()).running < len(prompts):
                    await anyio.sleep(0.05)
            started.set()

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(victim, i)
            tg.start_soon(watch)
            await started.wait()
            # the forger's own stream gets its own events, and only those
            seen = [ev async for ev in c.stream("forger", Count(5))]
            assert seen == [*(Counted(i) for i in range(5)), CountDone(5)]
        for i, prompt in enumerate(prompts):
            deltas, done = got[f"victim-{i}"]
            assert all(FORGED_TOKEN not in d.token_ids for d in deltas)
            check_stream(deltas, done, continuation(tok.encode(prompt), n), f"victim-{i}")
        rec = await wait_audit(home, lambda r: r["action"] == "access" and r["target"] == "kernel:EVENTS"
                               and "does not serve" in r["detail"].get("reason", ""), "forged events")
        assert rec["result"] == "unauthorized" and str(rec["detail"]["source"]).startswith("back:")
        assert (await llmos.status()).counters.dropped > 0  # the forged events, dropped
