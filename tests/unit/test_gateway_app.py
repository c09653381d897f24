"""The OpenAI-compatible HTTP layer against an in-memory backend (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config.gateway import GatewayConfig
from ipc.errors import LlmosError, Overloaded, Unauthorized, Unavailable
from ipc.protocol.scheduler import Submit
from services.gateway.app import create_app
from tests.helpers.gateway import KEY, FakeBackend, SlowBackend, client, leave_after_first_event


async def test_completion_in_openai_shape() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4,
                                                  "temperature": 0, "priority": 3, "session_id": "s1"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == "Hello world" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}, "prefill_tokens": 3}
    key, submit = b.submits[0]
    assert key == "k-1" and submit.prompt == "Hi" and submit.max_tokens == 4
    assert submit.params.temperature == 0 and submit.priority == 3 and submit.session == "s1"


async def test_a_priority_ahead_of_the_default_is_sent_as_the_op_its_right_covers() -> None:
    """priority < 0 travels as PrioritySubmit, so the kernel's rights check
    (the `priority` right) decides; 0 and above stay a plain Submit."""
    b = FakeBackend()
    async with client(b) as c:
        for priority in (-5, 0, 2):
            r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "priority": priority})
            assert r.status_code == 200
    assert [type(s).__name__ for _, s in b.submits] == ["PrioritySubmit", "Submit", "Submit"]


async def test_streamed_completion_is_openai_sse_and_concatenates() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "stream": True},
                         headers={"Authorization": "Bearer k-123"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
    assert "".join(texts) == "Hello world"
    rid = b.submits[0][1].request_id
    assert all(ch["object"] == "text_completion" and ch["id"] == f"cmpl-{rid}" for ch in chunks)
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert b.submits[0][0] == "k-123" and b.submits[0][1].prompt_ids == [1, 2, 3]
    assert b.cancelled == []  # it finished: nothing to cancel


async def test_chat_uses_the_checkpoints_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    b = FakeBackend(str(tmp_path))
    async with client(b) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == "Hello world"
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    submit = b.submits[0][1]
    assert submit.prompt == "<s><|system|>Be brief.<|user|>Hi<|assistant|>" and not submit.add_special_tokens


async def test_chat_without_a_template_gets_a_plain_transcript() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert b.submits[0][1].prompt == "user: Hi\nassistant:"


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "n": 17}, 400, "max_n"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "batches"),
])
async def test_bad_bodies_are_400_naming_the_field(body: dict, status: int, fragment: str) -> None:  # type: ignore[type-arg]
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


async def test_not_json_and_bad_roles() -> None:
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/completions", content=b"{nope")
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "messages[0].role" in r.json()["error"]["message"]


@pytest.mark.parametrize("exc, status, retry", [
    (Overloaded("queue full", detail={"retry_after_s": 2.4}), 429, "2"),
    (Unauthorized("bad key"), 401, None),
    (Unavailable("scheduler down"), 503, None),
])
async def test_backend_errors_map_to_http_statuses(exc: LlmosError, status: int, retry: str | None) -> None:
    b = FakeBackend()
    b.fail_with = exc
    async with client(b) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == status and r.json()["error"]["code"] == str(exc.code)
    assert r.headers.get("retry-after") == retry


async def test_malformed_authorization_is_401() -> None:
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]


async def test_models_health_and_metrics() -> None:
    b = FakeBackend()
    async with client(b) as c:
        models = (await c.get("/v1/models")).json()
        assert models["data"][0]["id"] == "tiny" and models["object"] == "list"
        health = (await c.get("/health")).json()
        assert health["status"] == "ok" and health["services"] == {"echo": "ready", "scheduler": "ready",
                                                                   "cpu": "ready"}
        await c.post("/v1/completions", json={"prompt": "x"})
        text = (await c.get("/metrics", headers={"Authorization": "Bearer ops-1"})).text
    assert 'llmos_service_restarts_total{instance="echo",service="echo"} 2.0' in text
    assert "llmos_kernel_messages_routed_total 7.0" in text
    assert "llmos_generation_tokens_total 4.0" in text
    assert 'llmos_http_requests_total{endpoint="completions",status="200"} 1.0' in text


async def test_a_client_that_disconnects_mid_stream_cancels_its_request() -> None:
    """Over a real socket (uvicorn): closing the SSE stream cancels the generation."""
    b = SlowBackend()
    await leave_after_first_event(b, {"prompt": "x", "stream": True, "request_id": "slow-1"}, KEY,
                                  lambda: b.cancelled)
    assert b.cancelled == ["slow-1"]


async def test_an_unknown_model_is_404() -> None:
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        assert (await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})).status_code == 200


async def test_a_null_content_is_an_empty_turn() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "?"}]})
    assert r.status_code == 200 and b.submits[0][1].prompt == "user: Hi\nassistant: \nuser: ?\nassistant:"


async def test_metrics_need_a_key_with_the_status_right() -> None:
    b = FakeBackend()
    async with client(b, key=None) as c:
        r = await c.get("/metrics")
        assert r.status_code == 401
        r = await c.get("/metrics", headers={"Authorization": "Bearer gen-1"})  # generate only
        assert r.status_code == 403 and "Status" in r.json()["error"]["message"]
        r = await c.get("/metrics", headers={"Authorization": "Bearer ops-1"})
        assert r.status_code == 200 and "llmos_kernel_messages_routed_total 7.0" in r.text
        assert (await c.get("/health")).status_code == 200  # liveness stays public
        assert (await c.get("/v1/models")).status_code == 401


async def test_anonymous_callers_only_when_configured() -> None:
    b = FakeBackend()
    async with client(b, GatewayConfig(allow_anonymous=True), key=None) as c:
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 200 and b.submits[0][0] is None and b.logins == []
