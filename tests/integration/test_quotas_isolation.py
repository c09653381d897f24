"""Quotas enforced where the resource is spent, and tenants isolated, with auth on."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from ipc.errors import NotFound, Overloaded
from ipc.protocol import memory as mp
from ipc.protocol import security as sec
from sdk.client import AsyncClient
from tools.testing import running_llmos
from tests.helpers.stacks import secured_children
from tests.helpers.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", max_position_embeddings=4096)
    return d


async def test_quotas_and_isolation_between_tenants(home: Path, checkpoint: Path) -> None:
    children = secured_children(checkpoint)
    async with running_llmos(home, children, auth=True) as llmos:
        admin = llmos.client
        quota = sec.Quota(concurrent_requests=1, kv_blocks=200)
        alice_key = (await admin.call(sec.SECURITY, sec.CreateKey("alice", ["generate"], quota=quota))).api_key
        bob_key = (await admin.call(sec.SECURITY, sec.CreateKey("bob", ["generate"]))).api_key
        async with await AsyncClient.connect(home=home, api_key=alice_key) as alice, \
                await AsyncClient.connect(home=home, api_key=bob_key) as bob:
            # the memory server applied alice's KV-block quota from the published policy
            with anyio.fail_after(30):
                while not any(t.tenant == "alice" and t.limit == 200
                              for t in (await admin.call("memory", mp.MemoryStats())).tenants):
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: alice.generate("x" * 20, max_tokens=3000, temperature=0.0, ignore_eos=True,
                                                     request_id="long-1"))
                with anyio.fail_after(30):
                    while True:
                        try:
                            if (await alice.request_status("long-1")).generated > 0:
                                break
                        except NotFound:
                            pass
                        await anyio.sleep(0.05)
                # alice's concurrency quota (1) refuses a second request, with a retry hint
                with pytest.raises(Overloaded, match="concurrent_requests|already runs") as ei:
                    await alice.generate("again", max_tokens=4)
                assert float(ei.value.detail["retry_after_s"]) > 0
                # bob is not limited by alice's quota ...
                assert len((await bob.generate("hi", max_tokens=4, temperature=0.0)).token_ids) == 4
                # ... and cannot see or cancel alice's request: it does not exist for him
                with pytest.raises(NotFound):
                    await bob.request_status("long-1")
                assert await bob.cancel("long-1") is False
                assert (await alice.request_status("long-1")).state == "running"
                assert await alice.cancel("long-1") is True
            # her KV-block quota (200 blocks of 16 slots) holds the whole long request: it ran until
            # cancelled (one that could never fit is refused at once: test_kv_quota.py)
            info = await alice.request_status("long-1")
            assert info.state == "finished" and info.finish_reason == "cancelled"
