"""Two gateway instances on one kernel-held port, as real processes: a stream
cut by a killed instance resumes on the other, exactly; a rolling restart
refuses no connection; /health tells the truth about the scheduler."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from ipc.protocol import kernel as kp
from ipc.protocol import security as sec
from kernel.config import ChildSpec, SupervisorConfig
from tests.helpers.cli import llmos as run_cli
from tests.helpers.net import free_port
from tools.testing import RunningLlmos, running_llmos
from tests.helpers.stacks import DRIVER_DTYPE_ARGS

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.model_fixtures import make_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    # a long context: a stream must still be running when its gateway is killed
    make_checkpoint(d, "llama", sharp=True, max_position_embeddings=1024)
    return d


def children(ckpt: Path, port: int) -> list[ChildSpec]:
    listen = f"127.0.0.1:{port}"
    return [ChildSpec("security", "services.security"),
            ChildSpec("memory", "services.memory"),
            ChildSpec("cpu", "drivers", service="driver",
                      args=["cpu", "--model", str(ckpt), "--kv-cache-mb", "8", "--threads", "1", *DRIVER_DTYPE_ARGS]),
            ChildSpec("scheduler", "services.scheduler"),
            ChildSpec("gateway", "services.gateway", args=["--listen", listen], listen=listen, instances=2,
                      significant=False, shutdown_timeout_s=35.0)]


async def sse(resp: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(last event id, data) per event."""
    eid = None
    async for line in resp.aiter_lines():
        if line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("data: "):
            yield eid, line[6:]


def text_of(data: str) -> str:
    return "" if data == "[DONE]" else "".join(c["text"] for c in json.loads(data)["choices"])


def gateways_ready(st: kp.StatusReply) -> bool:
    return sum(1 for i in st.instances if i.service == "gateway" and i.state == kp.ChildState.READY) == 2


async def keys(llmos: RunningLlmos, *tenants: str) -> list[dict[str, str]]:
    out = []
    for t in tenants:
        key = (await llmos.client.call(sec.SECURITY, sec.CreateKey(t, ["generate"]))).api_key
        out.append({"Authorization": f"Bearer {key}"})
    return out


async def test_a_stream_cut_by_a_killed_instance_resumes_exactly_on_the_other(home: Path, checkpoint: Path) -> None:
    port = free_port()
    async with running_llmos(home, children(checkpoint, port), auth=True, ready_timeout=120) as llmos:
        await llmos.wait_for(gateways_ready, timeout=60, what="two gateway instances")
        alice, mallory = await keys(llmos, "alice", "mallory")
        body = {"prompt": "Tell me everything", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            reference = ""
            async with http.stream("POST", "/v1/completions", json=body, headers=alice) as r:
                async for _, data in sse(r):
                    reference += text_of(data)

            got, last, ids, done = "", None, [], False
            try:
                async with http.stream("POST", "/v1/completions", json=body, headers=alice) as r:
                    served_by = r.headers["llmos-instance"]
                    async for eid, data in sse(r):
                        got, last = got + text_of(data), eid
                        ids.append(eid)
                        done = data == "[DONE]"
                        if len(ids) == 3:
                            victim = llmos.instance(await llmos.client.status(), served_by)
                            os.kill(victim.pid, signal.SIGKILL)
            except httpx.HTTPError:
                pass  # the cut
            assert not done, "the stream ended before its gateway was killed: nothing was tested"
            assert last is not None

            async with http.stream("POST", "/v1/completions", json=body,
                                   headers={**alice, "Last-Event-ID": last}) as r:
                assert r.status_code == 200 and r.headers["llmos-instance"] != served_by
                async for eid, data in sse(r):
                    got += text_of(data)
                    ids.append(eid)
            # no token repeated or missing: the greedy text of an uninterrupted run, offsets rising to the end
            assert got == reference
            offsets = [int(i.split(":")[1]) for i in ids if i is not None]
            assert offsets == sorted(offsets) and ids[-1] is not None and ids[-1].endswith(f":{MAX_TOKENS}:end")

            # another tenant cannot resume it; a bad offset is named
            rid = last.split(":")[0]
            r = await http.post("/v1/completions", json=body, headers={**mallory, "Last-Event-ID": last})
            assert r.status_code == 403 and "did not start" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={**body, "max_tokens": MAX_TOKENS + 50},
                                headers={**alice, "Last-Event-ID": f"{rid}:{MAX_TOKENS + 5}"})
            assert r.status_code == 400 and f"past the {MAX_TOKENS} tokens" in r.json()["error"]["message"]
            r = await http.post("/v1/completions", json=body, headers={**alice, "Last-Event-ID": "x\x01:1"})
            assert r.status_code == 400


@pytest.mark.slow  # about 30 s: every instance restarted in turn under load
async def test_a_rolling_restart_refuses_no_connection_and_health_tells_the_truth(home: Path,
                                                                                  checkpoint: Path) -> None:
    port = free_port()
    # Restarts after a 3 s pause: a killed scheduler is visibly absent for longer than /health caches.
    slow = SupervisorConfig(backoff_initial_s=3.0, backoff_max_s=3.0)
    async with running_llmos(home, children(checkpoint, port), supervisor=slow, auth=True,
                             ready_timeout=120) as llmos:
        before = await llmos.wait_for(gateways_ready, timeout=60, what="two gateway instances")
        (alice,) = await keys(llmos, "alice")
        base = f"http://127.0.0.1:{port}"
        outcomes: Counter[str] = Counter()
        stop = anyio.Event()

        async def load() -> None:
            # No keep-alive: every request is a new connection, so a refusal would show.
            async with httpx.AsyncClient(base_url=base, timeout=60,
                                         limits=httpx.Limits(max_keepalive_connections=0)) as http:
                while not stop.is_set():
                    try:
                        r = await http.post("/v1/completions", headers=alice,
                                            json={"prompt": "Hi", "max_tokens": 4, "temperature": 0})
                        outcomes["ok" if r.status_code == 200 else f"http_{r.status_code}"] += 1
                    except httpx.HTTPError as exc:
                        outcomes[type(exc).__name__] += 1

        long_stream: list[str] = []

        async def one_long_stream() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", headers=alice, json={
                        "prompt": "Go on", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                    async for _, data in sse(r):
                        long_stream.append(data)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(load)
            tg.start_soon(one_long_stream)
            out = await anyio.to_thread.run_sync(run_cli, home, "restart", "gateway", "--timeout", "50")
            stop.set()
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("restarted") == 2
        assert set(outcomes) == {"ok"} and outcomes["ok"] > 0, outcomes
        assert long_stream and long_stream[-1] == "[DONE]"  # the drained instance let it finish
        after = await llmos.wait_for(gateways_ready, timeout=60, what="two gateway instances")
        pids = {i.pid for i in before.instances if i.service == "gateway"}
        assert not pids & {i.pid for i in after.instances if i.service == "gateway"}

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            assert (await http.get("/health")).status_code == 200
            await llmos.client.kill("scheduler")
            with anyio.fail_after(30):
                while (r := await http.get("/health")).status_code != 503:
                    await anyio.sleep(0.1)
            assert r.json()["reason"] == "no scheduler instance is ready"
            with anyio.fail_after(60):
                while (r := await http.get("/health")).status_code != 200:
                    await anyio.sleep(0.1)
            assert r.json()["status"] in ("ok", "degraded")
