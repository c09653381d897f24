"""The HTTP gateway over the whole system: security, memory, a driver, the
scheduler and the gateway as real processes, auth on."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import anyio
import httpx
import pytest

from ipc.protocol import security as sec
from kernel.config import ChildSpec
from sdk.client import AsyncClient
from sdk.testing import running_llmos
from tests.unit.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama", sharp=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(ckpt: Path, port: int) -> list[ChildSpec]:
    return [ChildSpec("security", "services.security"),
            ChildSpec("memory", "services.memory"),
            ChildSpec("cpu", "drivers", service="driver",
                      args=["cpu", "--model", str(ckpt), "--kv-cache-mb", "2", "--threads", "1"]),
            ChildSpec("scheduler", "services.scheduler"),
            ChildSpec("gateway", "services.gateway", args=["--listen", f"127.0.0.1:{port}"])]


async def test_openai_endpoints_over_the_whole_system(home: Path, checkpoint: Path) -> None:
    port = free_port()
    async with running_llmos(home, children(checkpoint, port), auth=True, ready_timeout=120) as llmos:
        admin = llmos.client
        key = (await admin.call(sec.SECURITY, sec.CreateKey("alice", ["generate"]))).api_key
        sdk_greedy = await admin.generate("Hello there", max_tokens=8, temperature=0.0)
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            r = await http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8},
                                headers={"Authorization": "Bearer llmos.nope.nope"})
            assert r.status_code == 401

            r = await http.post("/v1/completions", headers=auth,
                                json={"prompt": "Hello there", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["text"] == sdk_greedy.text
            assert body["usage"]["completion_tokens"] == len(sdk_greedy.token_ids) == 8

            async with http.stream("POST", "/v1/completions", headers=auth, json={
                    "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stream": True}) as s:
                lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(line[6:]) for line in lines[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == sdk_greedy.text
            assert chunks[-1]["usage"]["completion_tokens"] == 8

            models = (await http.get("/v1/models", headers=auth)).json()
            assert models["data"][0]["id"] == str(checkpoint)

            # a client that hangs up mid-stream cancels its request
            async with http.stream("POST", "/v1/completions", headers=auth, json={
                    "prompt": "Tell me everything", "max_tokens": 200, "temperature": 0, "stream": True,
                    "request_id": "hangup-1"}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        rid = json.loads(line[6:])["id"].removeprefix("cmpl-")
                        break
            async with await AsyncClient.connect(home=home, api_key=key) as alice:
                with anyio.fail_after(30):
                    while (info := await alice.request_status(rid)).state != "finished":
                        await anyio.sleep(0.05)
            assert info.finish_reason == "cancelled" and info.generated < 200

            metrics = (await http.get("/metrics")).text
            assert "llmos_scheduler_tokens_generated_total" in metrics
            assert 'llmos_service_up{instance="scheduler",service="scheduler"} 1.0' in metrics
            assert (await http.get("/health")).json()["status"] == "ok"
