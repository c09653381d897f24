"""The HTTP gateway over the whole system: security, memory, a driver, the
scheduler and the gateway as real processes, auth on."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import anyio
import httpx
import pytest

from ipc.protocol import security as sec
from sdk.client import AsyncClient
from tools.testing import running_llmos
from tests.helpers.net import free_port
from tests.helpers.stacks import gateway_children


async def test_openai_endpoints_over_the_whole_system(home: Path, checkpoint: Path) -> None:
    # imported here, in a worker thread: only this test needs them, and importing openai takes seconds
    openai = await anyio.to_thread.run_sync(importlib.import_module, "openai")
    parser = await anyio.to_thread.run_sync(importlib.import_module, "prometheus_client.parser")
    text_string_to_metric_families = parser.text_string_to_metric_families
    port = free_port()
    async with running_llmos(home, gateway_children(checkpoint, port), auth=True, ready_timeout=120) as llmos:
        admin = llmos.client
        key = (await admin.call(sec.SECURITY, sec.CreateKey("alice", ["generate"]))).api_key
        sdk_greedy = await admin.generate("Hello there", max_tokens=8, temperature=0.0)
        base = f"http://127.0.0.1:{port}/v1"
        oai = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
        model = str(checkpoint)

        # completions, plain and streamed (usage in the last chunk)
        done = await oai.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
        assert done.choices[0].text == sdk_greedy.text and done.usage.completion_tokens == 8
        stream = await oai.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == sdk_greedy.text and usage is not None and usage.completion_tokens == 8

        # chat, plain and streamed: the same text both ways
        msgs = [{"role": "user", "content": "Say something"}]
        chat = await oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
        stream = await oai.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                                   stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed == chat.choices[0].message.content

        models = await oai.models.list()
        assert [m.id for m in models.data] == [model]

        # errors, as the openai package raises them
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=base, api_key="llmos.nope.nope", max_retries=0).completions.create(
                model=model, prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await oai.completions.create(model=model, prompt="x", max_tokens=0)
        with pytest.raises(openai.NotFoundError, match="gpt-9"):
            await oai.completions.create(model="gpt-9", prompt="x", max_tokens=2)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            r = await http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 8})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

            # a client that hangs up mid-stream cancels its request
            auth = {"Authorization": f"Bearer {key}"}
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

            # /metrics shows every tenant's activity: a key with the status right reads it
            assert (await http.get("/metrics", headers=auth)).status_code == 403
            ops = (await admin.call(sec.SECURITY, sec.CreateKey("ops", ["status"]))).api_key
            scrape = await http.get("/metrics", headers={"Authorization": f"Bearer {ops}"})
            families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
            for name in ("llmos_kernel_messages_routed", "llmos_service_restarts", "llmos_scheduler_requests_running",
                         "llmos_scheduler_tokens_generated", "llmos_kv_blocks", "llmos_prefix_cache_hit_rate",
                         "llmos_time_to_first_token_seconds", "llmos_generation_tokens"):
                assert name in families, name
            up = {s.labels["instance"]: s.value for s in families["llmos_service_up"].samples}
            assert up["scheduler"] == 1.0 and up["cpu"] == 1.0
            generated = [s.value for s in families["llmos_generation_tokens"].samples if s.name.endswith("_total")]
            assert generated and generated[0] >= 8 + 8 + 6 + 6
            assert (await http.get("/health")).json()["status"] == "ok"
