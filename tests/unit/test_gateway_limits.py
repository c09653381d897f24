"""What an attacker can send the gateway (issue 12 #4, #11, lows): refused
before the body is read, bodies cut off at the limit, absurd values and
malformed bodies answered 400 naming the field, and an honest caller still
served afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from common.config.gateway import GatewayConfig
from ipc.errors import BadRequest
from tests.helpers.gateway import KEY, FakeBackend, client

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
