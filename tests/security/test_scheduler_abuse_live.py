"""Issue 12, the scheduler's part, over real processes (auth on): each attack
is refused with an error naming what was wrong, an honest tenant's request in
flight still finishes, the scheduler is the same process afterwards, and
caveat refusals and operator reads reach `security.audit`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from common import capability as cap
from ipc.errors import BadRequest, Forbidden, NotFound, Overloaded
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol import security as sec
from ipc.protocol.sampling import SamplingParams
from sdk.client import AsyncClient
from tools.testing import RunningLlmos, running_llmos
from tests.helpers.stacks import secured_children
from tests.helpers.model_fixtures import make_checkpoint

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", max_position_embeddings=4096)
    return d


async def key(llmos: RunningLlmos, tenant: str, rights: list[str], quota: sec.Quota | None = None) -> str:
    created: sec.KeyCreated = await llmos.client.call(sec.SECURITY, sec.CreateKey(tenant, rights, quota=quota))
    return created.api_key


async def scheduler_pid(llmos: RunningLlmos) -> tuple[int, int]:
    st = await llmos.status()
    i = llmos.instance(st, "scheduler")
    return i.pid, i.restarts


async def until_generating(client: AsyncClient, request_id: str) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                if (await client.request_status(request_id)).generated > 0:
                    return
            except NotFound:
                pass
            await anyio.sleep(0.02)


class AuditTap:
    """`security.audit` as the admin sees it (notes the scheduler publishes)."""

    def __init__(self, admin: AsyncClient):
        self.notes: list[sec.AuditNote] = []
        self._events = admin.subscribe(sec.AUDIT_TOPIC)

    async def start(self) -> None:
        await self._events.__anext__()  # Subscribed

    async def pump(self) -> None:
        async for ev in self._events:
            if isinstance(ev, sec.AuditNote):
                self.notes.append(ev)

    async def wait(self, action: str, principal: str, target: str) -> sec.AuditNote:
        with anyio.fail_after(30):
            while True:
                for n in self.notes:
                    if (n.action, n.principal, n.target) == (action, principal, target):
                        return n
                await anyio.sleep(0.02)


async def test_quota_bypass_huge_prompt_priority_caveats_and_sessions(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, secured_children(checkpoint), auth=True) as llmos:
        alice_key = await key(llmos, "alice", ["generate", "session"], sec.Quota(concurrent_requests=1))
        bob_key = await key(llmos, "bob", ["generate"])
        tap = AuditTap(llmos.client)
        await tap.start()
        async with await AsyncClient.connect(home=home, api_key=alice_key) as alice, \
                await AsyncClient.connect(home=home, api_key=bob_key) as bob, anyio.create_task_group() as tg:
            tg.start_soon(tap.pump)
            pid = await scheduler_pid(llmos)
            # bob's request is in flight through all of what follows
            results: dict[str, Any] = {}

            async def bobs() -> None:
                results["bob"] = await bob.generate("honest", max_tokens=400, temperature=0.0, ignore_eos=True,
                                                    request_id="bob-1")
            tg.start_soon(bobs)
            await until_generating(bob, "bob-1")

            # #3: ten Submits dressed as re-submissions; alice may run one at a time.
            outcomes: list[str] = []

            async def claimed(i: int) -> None:
                msg = sp.Submit(prompt="x" * 8, params=GREEDY, max_tokens=3000, ignore_eos=True,
                                request_id=f"claim-{i}", resume_from=1, resume_ids=[65], attempt=1)
                try:
                    async for _ in alice.stream(sp.SCHEDULER, msg):
                        if "admitted" not in outcomes:
                            outcomes.append("admitted")
                except Overloaded as exc:
                    assert "concurrent_requests" in str(exc.detail) or "already runs" in exc.message
                    outcomes.append("refused")
            async with anyio.create_task_group() as claims:
                for i in range(10):
                    claims.start_soon(claimed, i)
                with anyio.fail_after(60):
                    while outcomes.count("refused") < 9:
                        await anyio.sleep(0.02)
                assert outcomes.count("refused") == 9
                for i in range(10):
                    await alice.cancel(f"claim-{i}")

            # #4: a prompt far past the model's context is refused before it is tokenized.
            with pytest.raises(BadRequest, match="characters") as info:
                await alice.generate("y" * (6 * 2**20), max_tokens=4)  # under the 8 MiB a client may send
            assert info.value.detail.get("field") == "prompt"

            # lows: priority ahead of the default needs the `priority` right ...
            with pytest.raises(Forbidden, match="PrioritySubmit|priority"):
                await alice.generate("me first", max_tokens=2, priority=-5)  # the kernel refuses the op
            with pytest.raises(Forbidden, match="priority"):
                await alice.call(sp.SCHEDULER, sp.Submit(prompt="me first", priority=-5), timeout=30)
            await tap.wait("priority", "alice", "scheduler:Submit")
            # ... yielding (priority > 0) needs none, and the admin holds it
            # (ignore_eos: a sampled end of sequence would cut the count short)
            assert len((await alice.generate("after you", max_tokens=2, priority=3, ignore_eos=True)).token_ids) == 2
            assert len((await llmos.client.generate("operator", max_tokens=2, priority=-5,
                                                     ignore_eos=True)).token_ids) == 2
            with pytest.raises(BadRequest, match="vocabulary"):
                await alice.generate([1, 10**6], max_tokens=2)
            # review: ids past the context are refused before any is looked at, jobs included
            with pytest.raises(BadRequest, match="ids; this model takes at most") as info:
                await alice.generate([1] * 500_000, max_tokens=2)
            assert info.value.detail.get("field") == "prompt_ids"

            # #8 / lows: caveats are enforced and audited, sessions confine Cancel and RequestStatus.
            base = alice.connection.token
            async with await AsyncClient.connect(home=home, check=False) as delegate:
                delegate.use_token(cap.attenuate(base, max_tokens=4))
                with pytest.raises(Forbidden, match="at most 4 tokens"):
                    await delegate.generate("long", max_tokens=50)
                await tap.wait("caveat", "alice", "scheduler:Submit")
                tg.start_soon(lambda: alice.generate("in s2", max_tokens=3000, ignore_eos=True, session="s2",
                                                     request_id="s2-req"))
                await until_generating(alice, "s2-req")
                delegate.use_token(cap.attenuate(base, session="s1"))
                # re-attaching to another session's request (same prompt, same id) would read its stream
                with pytest.raises(Forbidden, match="confined to session 's1'"):
                    await delegate.generate("in s2", max_tokens=3000, ignore_eos=True, session="s1",
                                            request_id="s2-req")
                with pytest.raises(Forbidden, match="confined to session 's1'"):
                    await delegate.cancel("s2-req")
                with pytest.raises(Forbidden, match="confined to session 's1'"):
                    await delegate.request_status("s2-req")
                await tap.wait("caveat", "alice", "scheduler:Cancel")
                assert (await alice.request_status("s2-req")).state == "running"
                assert await alice.cancel("s2-req")

            # Nothing else was lost: bob's request finished whole, on the same scheduler.
            with anyio.fail_after(120):
                while "bob" not in results:
                    await anyio.sleep(0.05)
            assert len(results["bob"].token_ids) == 400
            assert await scheduler_pid(llmos) == pid
            tg.cancel_scope.cancel()


async def test_operators_see_and_cancel_every_job_and_revocation_stops_them(home: Path,
                                                                              checkpoint: Path) -> None:
    async with running_llmos(home, secured_children(checkpoint), auth=True) as llmos:
        admin = llmos.client
        alice_key = await key(llmos, "alice", ["generate", "jobs"])
        mallory_key = await key(llmos, "mallory", ["generate", "jobs"])
        tap = AuditTap(admin)
        await tap.start()
        async with await AsyncClient.connect(home=home, api_key=alice_key) as alice, \
                await AsyncClient.connect(home=home, api_key=mallory_key) as mallory, \
                anyio.create_task_group() as tg:
            tg.start_soon(tap.pump)
            # review: a job's prompt past the context is refused, never stored
            with pytest.raises(BadRequest, match="ids; this model takes at most"):
                await alice.jobs.submit([1] * 500_000, at=time.time() + 3600, max_tokens=2)
            await alice.jobs.submit("tick", every=0.2, max_tokens=2, job_id="daily")
            await mallory.jobs.submit("tock", every=0.2, max_tokens=2, job_id="daily")  # her own "daily"
            assert [j.job_id for j in await mallory.jobs.list()] == ["daily"]
            # A tenant cannot use the operator's ops (the kernel's rights check) ...
            with pytest.raises(Forbidden):
                await alice.jobs.list_all()
            with pytest.raises(Forbidden):
                await alice.jobs.cancel_any("mallory", "daily")
            # ... the operator sees both, with owners, and may cancel either (audited).
            owners = sorted((j.principal, j.job_id) for j in await admin.jobs.list_all())
            assert owners == [("alice", "daily"), ("mallory", "daily")]
            await tap.wait("jobs.list_all", "admin", "scheduler:AdminList")
            done = await admin.jobs.cancel_any("alice", "daily")
            assert done.state in (jp.JobState.CANCELLED, jp.JobState.RUNNING)
            await tap.wait("jobs.cancel_any", "admin", "scheduler:AdminCancel")
            assert (await alice.jobs.get("daily")).state in (jp.JobState.CANCELLED, jp.JobState.RUNNING)

            # #10: revoking mallory cancels her job (the policy the security server publishes names her).
            await admin.call(sec.SECURITY, sec.Revoke(sec.RevokeKind.PRINCIPAL, "mallory"))
            policy: sec.QuotaPolicy = await admin.call(sec.SECURITY, sec.GetQuotas())
            if "mallory" not in policy.revoked:
                tg.cancel_scope.cancel()
                pytest.skip("the security server does not publish revoked principals in QuotaPolicy yet")
            with anyio.fail_after(30):
                while True:
                    mine = [j for j in await admin.jobs.list_all("mallory")]
                    if mine and mine[0].state == jp.JobState.CANCELLED:
                        break
                    await anyio.sleep(0.05)
            assert "revoked" in mine[0].error
            runs = mine[0].runs
            # A witness on the same period runs three times meanwhile; mallory's does not run again.
            await admin.jobs.submit("witness", every=0.2, max_runs=3, max_tokens=2, job_id="witness")
            with anyio.fail_after(60):
                while (await admin.jobs.get("witness")).runs < 3:
                    await anyio.sleep(0.05)
            assert (await admin.jobs.list_all("mallory"))[0].runs == runs
            tg.cancel_scope.cancel()
