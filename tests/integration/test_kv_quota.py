"""KV-block quotas over real processes, auth on (issue 13 #3): a request that
could never fit its tenant's `kv_blocks` quota is refused at once, naming the
quota and the numbers (it used to wait forever, silently — and hung `llmos
demo`); one that fits later waits in the open (RequestStatus, SchedulerStats,
`llmos top`, one log line) and runs when the tenant's other request ends;
other tenants' requests go on meanwhile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from ipc.errors import BadRequest, LlmosError, NotFound
from common.home import logs_dir
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from ipc.protocol import security as sec
from sdk.client import AsyncClient
from sdk.generate import Completion
from tools.testing import FIXED_LIMITS, running_llmos
from tests.helpers.stacks import secured_children
from tests.helpers.model_fixtures import make_checkpoint
from tools.top import frame

QUOTA = 32  # blocks of 16 slots: 512 positions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", max_position_embeddings=1024)
    return d


async def poll(what: str, cond: object) -> None:
    """Wait (with a deadline) until the async predicate `cond` holds."""
    with anyio.fail_after(30):
        while not await cond():  # type: ignore[operator]
            await anyio.sleep(0.05)


def quota_lines(home: Path) -> list[dict[str, object]]:
    lines = []
    for path in logs_dir(home).glob("scheduler*.log*"):
        for raw in path.read_text().splitlines():
            if '"scheduler.waiting_on_quota"' in raw:
                lines.append(json.loads(raw))
    return lines


async def test_over_quota_is_refused_at_once_and_a_fitting_one_waits_visibly(home: Path, checkpoint: Path) -> None:
    children = secured_children(checkpoint)
    async with running_llmos(home, children, auth=True, scheduler=FIXED_LIMITS) as llmos:
        admin = llmos.client
        carol_key = (await admin.call(sec.SECURITY, sec.CreateKey("carol", ["generate"],
                                                                  quota=sec.Quota(kv_blocks=QUOTA)))).api_key
        bob_key = (await admin.call(sec.SECURITY, sec.CreateKey("bob", ["generate"]))).api_key

        async def memory_applied() -> bool:
            tenants = (await admin.call("memory", mp.MemoryStats())).tenants
            return any(t.tenant == "carol" and t.limit == QUOTA for t in tenants)

        await poll("the memory server applied carol's quota", memory_applied)
        async with await AsyncClient.connect(home=home, api_key=carol_key) as carol, \
                await AsyncClient.connect(home=home, api_key=bob_key) as bob:
            # 8 prompt tokens + 1,000 to generate: 1,007 positions = 63 blocks of 16, over 32
            with anyio.fail_after(30):  # it used to wait here forever
                with pytest.raises(BadRequest) as ei:
                    await carol.generate(list(range(1, 9)), max_tokens=1000, request_id="too-big")
            msg = str(ei.value)
            assert "'carol' has a KV-block quota (kv_blocks) of 32; this request needs 63 blocks of 16" in msg
            assert "max_tokens 505 or less would fit" in msg
            assert ei.value.detail["quota"] == "kv_blocks" and ei.value.detail["needed"] == 63
            with pytest.raises(NotFound):  # refused: it never became a request
                await carol.request_status("too-big")

            async with anyio.create_task_group() as tg:
                done: dict[str, object] = {}

                async def gen(name: str, prompt: list[int], n: int) -> None:
                    try:
                        done[name] = await carol.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                                                          request_id=name)
                    except LlmosError as exc:  # reported by the assertions below
                        done[name] = exc

                # "a" fits alone (8 + 500: 32 blocks) and runs for 500 steps
                tg.start_soon(gen, "a", list(range(1, 9)), 500)

                async def started(rid: str) -> bool:
                    try:
                        return (await carol.request_status(rid)).generated > 0
                    except NotFound:
                        return False

                await poll("a generating", lambda: started("a"))
                # "b" fits alone too (497 + 4: 32 blocks) but not beside a: it waits on the quota
                tg.start_soon(gen, "b", [1 + i % 250 for i in range(497)], 4)

                async def b_on_quota() -> bool:
                    try:
                        info = await carol.request_status("b")
                    except NotFound:
                        return False
                    return info.state == "waiting" and info.waiting_on == sp.WAITING_ON_KV_QUOTA

                await poll("b waiting on its quota", b_on_quota)
                # another tenant's demo-like requests are not held back by carol's line
                results: list[Completion | None] = [None] * 3

                async def honest(i: int) -> None:
                    results[i] = await bob.generate(f"hello {i}", max_tokens=8, temperature=0.0, ignore_eos=True)

                async with anyio.create_task_group() as others:
                    for i in range(3):
                        others.start_soon(honest, i)
                assert all(r is not None and len(r.token_ids) == 8 for r in results)
                assert (await carol.request_status("b")).waiting_on == sp.WAITING_ON_KV_QUOTA

                # the operator sees it: SchedulerStats and `llmos top`
                stats: sp.SchedulerStatsReply = await admin.call(sp.SCHEDULER, sp.SchedulerStats())
                assert [(w.tenant, w.requests, w.limit) for w in stats.quota_waits] == [("carol", 1, QUOTA)]
                assert stats.quota_waits[0].held >= 1 and stats.kv_quota_refused == 1
                view, _ = await frame(admin, None)
                console = Console(file=io.StringIO(), width=120, record=True)
                console.print(view)
                screen = console.export_text()
                assert "waiting on quota (1 refused: could never fit)" in screen
                assert any("carol" in line and "kv_blocks" in line and f"/{QUOTA}" in line
                           for line in screen.splitlines())

                # ... and one log line says so
                async def logged() -> bool:
                    return bool(quota_lines(home))

                await poll("the waiting_on_quota log line", logged)

                # when a ends, b runs and finishes
                assert await carol.cancel("a") is True
                with anyio.fail_after(60):
                    while "b" not in done:
                        await anyio.sleep(0.05)
            b = done["b"]
            assert b.finish_reason == "length" and len(b.token_ids) == 4  # type: ignore[attr-defined]
            assert (await carol.request_status("a")).finish_reason == "cancelled"
            [line] = quota_lines(home)  # once per request, however many steps it waited
            assert (line["request_id"], line["tenant"], line["quota"], line["limit"]) == ("b", "carol", "kv_blocks", QUOTA)
            stats = await admin.call(sp.SCHEDULER, sp.SchedulerStats())
            assert stats.quota_waits == []
