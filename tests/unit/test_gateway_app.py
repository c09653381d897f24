"""The OpenAI-compatible HTTP layer against an in-memory backend (no sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ipc.errors import BadRequest, Forbidden, LlmosError, Overloaded, Unauthorized, Unavailable
from ipc.protocol import kernel as kp
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import FinishReason, Submit, Usage
from sdk.generate import Chunk, GenerationStream
from services.gateway.app import create_app
from services.gateway.backend import Stats
from common.config.gateway import GatewayConfig

USAGE = Usage(prompt_tokens=3, completion_tokens=4, ttft_s=0.01, total_s=0.05)


class FakeBackend:
    def __init__(self, model_dir: str = "") -> None:
        self.submits: list[tuple[str | None, Submit]] = []
        self.cancelled: list[str] = []
        self.fail_with: LlmosError | None = None
        self.pieces = ["Hel", "lo", " wor", "ld"]
        self.model_dir = model_dir
        self.logins: list[str] = []

    async def authenticate(self, api_key: str) -> None:
        self.logins.append(api_key)
        if api_key.startswith("bad"):
            raise Unauthorized("unknown API key")

    rid = "r1"

    async def stream(self, api_key: str | None, submit: Submit) -> GenerationStream:
        self.submits.append((api_key, submit))
        return GenerationStream(self.rid, self.chunks(submit), self.cancel)

    async def chunks(self, submit: Submit) -> AsyncIterator[Chunk]:
        if self.fail_with is not None:
            raise self.fail_with
        for i, p in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield Chunk("r1", i, [i], p, FinishReason.LENGTH if last else None, USAGE if last else None)

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def model(self, api_key: str | None) -> ModelDescription:
        return ModelDescription("tiny", "LlamaForCausalLM", self.model_dir, 300, 280, 256, 64, 16, [257], 256,
                                "float32", "cpu", 1000, 0)

    async def stats(self, api_key: str | None = None) -> Stats:
        if api_key is not None and not api_key.startswith("ops"):
            raise Forbidden(f"principal {api_key!r} holds no right covering Status on 'kernel'")
        st = kp.StatusReply(1, 2.0, [kp.InstanceInfo("echo", "echo", 5, "ready", restarts=2)],
                            kp.KernelCounters(routed=7))
        return Stats(st, None, None)


KEY = {"Authorization": "Bearer k-1"}


def client(backend: FakeBackend, config: GatewayConfig | None = None, key: str | None = "k-1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(backend, config)), base_url="http://t",
                             headers={"Authorization": f"Bearer {key}"} if key else {})


async def test_completion_in_openai_shape() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4,
                                                  "temperature": 0, "priority": 3, "session_id": "s1"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == "Hello world" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
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
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
    assert "".join(texts) == "Hello world"
    assert all(ch["object"] == "text_completion" and ch["id"] == "cmpl-r1" for ch in chunks)
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
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
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
    ({"prompt": "x", "n": 2}, 400, "n > 1"),
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
        assert health["status"] == "ok" and health["services"] == {"echo": "ready"}
        await c.post("/v1/completions", json={"prompt": "x"})
        text = (await c.get("/metrics", headers={"Authorization": "Bearer ops-1"})).text
    assert 'llmos_service_restarts_total{instance="echo",service="echo"} 2.0' in text
    assert "llmos_kernel_messages_routed_total 7.0" in text
    assert "llmos_generation_tokens_total 4.0" in text
    assert 'llmos_http_requests_total{endpoint="completions",status="200"} 1.0' in text


async def test_a_client_that_disconnects_mid_stream_cancels_its_request() -> None:
    """Over a real socket (uvicorn): closing the SSE stream cancels the generation."""
    import anyio
    import uvicorn

    class SlowBackend(FakeBackend):
        rid = "slow-1"

        async def chunks(self, submit: Submit) -> AsyncIterator[Chunk]:
            for i in range(10_000):
                yield Chunk("slow-1", i, [i], f"t{i} ")
                await anyio.sleep(0.01)

    b = SlowBackend()
    config = uvicorn.Config(create_app(b), host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            async with c.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}, headers=KEY) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
        with anyio.fail_after(10):
            while not b.cancelled:
                await anyio.sleep(0.01)
        server.should_exit = True
    assert b.cancelled == ["slow-1"]


async def test_an_unknown_model_is_404() -> None:
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert r.status_code == 404 and "gpt-9" in r.json()["error"]["message"]
        r = await c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        assert (await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})).status_code == 200


# -- issue 12: what an attacker can send (#4, #11, lows) -----------------------

class CountingBody:
    """A request body that records how much of it the app pulled."""

    def __init__(self, chunks: int, size: int = 64 * 1024) -> None:
        self.chunks, self.size, self.pulled = chunks, size, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"x" * self.size


async def honest(c: httpx.AsyncClient) -> None:
    r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, headers=KEY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world"


@pytest.mark.parametrize("key, why", [(None, "no API key"), ("bad-key", "unknown API key")])
async def test_a_caller_without_a_valid_key_is_refused_before_its_body_is_read(key: str | None, why: str) -> None:
    b = FakeBackend()
    body = CountingBody(chunks=3200)  # 200 MiB, never pulled
    async with client(b, key=key) as c:
        r = await c.post("/v1/completions", content=body.__aiter__())
        assert r.status_code == 401 and why in r.json()["error"]["message"]
        assert r.headers["connection"] == "close"  # the body is unread: no next request on it
        assert body.pulled == 0 and b.submits == []
        await honest(c)


async def test_a_declared_length_over_the_limit_is_413_before_reading() -> None:
    b = FakeBackend()
    body = CountingBody(chunks=20)
    async with client(b, GatewayConfig(max_body_bytes=64 * 1024)) as c:
        r = await c.post("/v1/completions", content=body.__aiter__(), headers={"Content-Length": str(20 * 65536)})
        assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]
        assert body.pulled == 0 and b.submits == []
        r = await c.post("/v1/completions", content=b"{}", headers={"Content-Length": "9" * 40})
        assert r.status_code == 413
        await honest(c)


async def test_a_chunked_body_is_cut_off_at_the_limit() -> None:
    b = FakeBackend()
    body = CountingBody(chunks=3200)  # no Content-Length: sent chunked
    async with client(b, GatewayConfig(max_body_bytes=256 * 1024)) as c:
        r = await c.post("/v1/completions", content=body.__aiter__())
        assert r.status_code == 413 and "262144 bytes" in r.json()["error"]["message"]
        assert body.pulled == 5 and b.submits == []  # 4 chunks fit; the 5th is over
        await honest(c)


async def test_a_body_that_stops_arriving_is_408() -> None:
    import anyio

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        await anyio.Event().wait()
        yield b""

    b = FakeBackend()
    async with client(b, GatewayConfig(body_timeout_s=0.2)) as c:
        r = await c.post("/v1/completions", content=stalled())
        assert r.status_code == 408 and "body_timeout_s" in r.json()["error"]["message"]
        assert b.submits == []
        await honest(c)


BIG = 2**64


@pytest.mark.parametrize("field, value", [
    ("max_tokens", BIG), ("max_tokens", -1), ("max_tokens", 2**40), ("priority", BIG), ("priority", -2**62),
    ("top_k", BIG), ("top_k", -1), ("n", BIG), ("n", 0), ("seed", BIG), ("seed", -1), ("logprobs", BIG),
    ("logprobs", 10**6), ("temperature", 1e400), ("request_id", "r" * 1000), ("session_id", "s" * 10_000),
    ("stream", "yes"), ("stream", 1), ("stop", [1]), ("stop", {"a": 1}), ("model", ["tiny"]),
])
async def test_absurd_values_are_400_naming_the_field(field: str, value: object) -> None:
    b = FakeBackend()
    async with client(b) as c:
        # msgspec's JSON encoder refuses 1e400; the body is written by hand
        body = json.dumps({"prompt": "x", field: value}).replace("Infinity", "1e400")
        r = await c.post("/v1/completions", content=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert field in err["message"] and err["param"].startswith(field) and err["type"] == "invalid_request_error"
        assert b.submits == []
        await honest(c)


@pytest.mark.parametrize("field, value", [("max_completion_tokens", BIG), ("top_logprobs", BIG),
                                          ("max_tokens", -5), ("priority", -BIG)])
async def test_absurd_chat_values_are_400_naming_the_field(field: str, value: int) -> None:
    async with client(FakeBackend()) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize("prompt, fragment, param", [
    ([1, 2, 300], "prompt[2] = 300 is not a token id", "prompt[2]"),  # the fake model has 300 ids
    ([5, BIG], "prompt", "prompt[1]"),
    ([-1], "prompt", "prompt[0]"),
    ([1] * 301, "301 token ids", "prompt"),  # its context holds 280
])
async def test_prompt_ids_outside_the_model_are_400(prompt: list[int], fragment: str, param: str) -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", content=json.dumps({"prompt": prompt}))
        assert r.status_code == 400 and fragment in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == param and b.submits == []
        r = await c.post("/v1/completions", json={"prompt": [0, 299]})
        assert r.status_code == 200 and b.submits[0][1].prompt_ids == [0, 299]


async def test_the_schedulers_bad_request_is_400() -> None:
    b = FakeBackend()
    b.fail_with = BadRequest("prompt_ids[0] = 7 is outside the vocabulary", detail={"field": "prompt_ids"})
    async with client(b) as c:
        for stream in (False, True):
            r = await c.post("/v1/completions", json={"prompt": [7], "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', "UTF-8"),
    ("/v1/completions", b'{"prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": '
                             + b"[" * 100_000 + b"]" * 100_000 + b"}]}]}", "request body"),
    ("/v1/completions", b"", "not JSON"),
    ("/v1/completions", b"null", "Expected `object`"),
    ("/v1/completions", b'{"prompt": "x"} trailing', "not JSON"),
    ("/v1/completions", b'{"prompt": {"a": 1}}', "prompt"),
    ("/v1/completions", b'{"prompt": []}', "prompt"),
    ("/v1/completions", b'{"prompt": [1, "a"]}', "batches"),
    ("/v1/chat/completions", b'{"messages": []}', "messages must not be empty"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
    ("/v1/chat/completions", b'{"messages": [5]}', "messages[0]"),
    ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "' + b"u" * 5000 + b'", "content": "x"}]}', "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "text only"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ["x"]}]}', "content[0]"),
])
async def test_malformed_bodies_are_400_naming_what_was_wrong(path: str, body: bytes, fragment: str) -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post(path, content=body)
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]["message"] and len(r.text) < 1000
        assert b.submits == []
        await honest(c)


async def test_bad_content_length_and_long_keys_are_refused() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Length": "-1"})
        assert r.status_code == 400 and "Content-Length" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer " + "k" * 5000})
        assert r.status_code == 401 and "longer than" in r.json()["error"]["message"]
        await honest(c)


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
