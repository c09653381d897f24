"""Resumable HTTP requests against an in-memory backend: SSE event ids,
Last-Event-ID and Idempotency-Key, their refusals, and /health."""

from __future__ import annotations

import json

import pytest

from common.config.gateway import GatewayConfig
from ipc.errors import BadRequest, Forbidden
from ipc.protocol import kernel as kp
from ipc.protocol.scheduler import RequestInfo, Submit
from services.gateway.app import create_app
from services.gateway.resume import Resume, keyed_id, parse_last_event_id, request_id
from tests.helpers.gateway import KEY, FakeBackend, SlowBackend, client, leave_after_first_event


def events(text: str) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE event."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("id"), fields["data"]))
    return out


def texts(evs: list[tuple[str | None, str]]) -> str:
    out = []
    for _, data in evs:
        if data != "[DONE]":
            for ch in json.loads(data)["choices"]:
                out.append(ch.get("text") or ch.get("delta", {}).get("content") or "")
    return "".join(out)


async def test_every_event_carries_the_offset_it_resumes_from() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
    rid = b.submits[0][1].request_id
    evs = events(r.text)
    # a piece per token; the finish is marked; usage and [DONE] keep the last id (SSE)
    assert [i for i, _ in evs] == [f"{rid}:1", f"{rid}:2", f"{rid}:3", f"{rid}:4:end", None, None]
    assert b.submits[0][1].linger_s == GatewayConfig().resume_grace_s  # left running if this instance dies


@pytest.mark.parametrize("how", ["header", "query"])
async def test_a_resent_stream_gets_exactly_the_rest(how: str) -> None:
    b = FakeBackend()
    async with client(b) as c:
        first = events((await c.post("/v1/completions", json={"prompt": "x", "stream": True})).text)
        last_id = first[1][0]  # the client got two events, then its connection was cut
        assert last_id is not None
        headers, url = ({"Last-Event-ID": last_id}, "/v1/completions") if how == "header" else \
            ({}, f"/v1/completions?last_event_id={last_id}")
        r = await c.post(url, json={"prompt": "x", "stream": True}, headers=headers)
    rest = events(r.text)
    assert r.status_code == 200
    assert texts(first[:2]) + texts(rest) == "Hello world" and texts(rest) == " world"
    resent = b.submits[1][1]
    assert resent.request_id == b.submits[0][1].request_id and resent.resume_from == 2
    assert json.loads(rest[0][1])["id"] == json.loads(first[0][1])["id"]  # the same completion id


async def test_a_resumed_chat_stream_sends_no_second_role_and_an_ended_one_only_its_tail() -> None:
    b = FakeBackend()
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with client(b) as c:
        first = events((await c.post("/v1/chat/completions", json=body)).text)
        assert json.loads(first[0][1])["choices"][0]["delta"]["role"] == "assistant"
        rest = events((await c.post("/v1/chat/completions", json=body,
                                    headers={"Last-Event-ID": str(first[0][0])})).text)
        assert texts(rest) == "Hello world" and all("role" not in d for _, d in rest)
        end_id = next(i for i, _ in first if i and i.endswith(":end"))
        tail = events((await c.post("/v1/chat/completions", json=body, headers={"Last-Event-ID": end_id})).text)
    assert [d for _, d in tail][-1] == "[DONE]" and json.loads(tail[0][1])["usage"]["completion_tokens"] == 4
    assert len(tail) == 2  # usage and [DONE]: the finish event is not sent twice


async def test_another_callers_stream_is_refused() -> None:
    b = FakeBackend()
    async with client(b) as c:
        first = events((await c.post("/v1/completions", json={"prompt": "x", "stream": True})).text)
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True},
                         headers={"Last-Event-ID": str(first[0][0]), "Authorization": "Bearer k-2"})
    assert r.status_code == 403 and "did not start" in r.json()["error"]["message"]
    assert len(b.submits) == 1  # nothing reached the scheduler


@pytest.mark.parametrize("headers, fragment", [
    ({"Last-Event-ID": "r" * 200 + ":1"}, "longer than"),
    ({"Last-Event-ID": "no-offset"}, "event id this gateway sent"),
    ({"Last-Event-ID": "r1:-3"}, "event id this gateway sent"),
    ({"Last-Event-ID": "done-1:99"}, "past this request's max_tokens"),
    ({"Last-Event-ID": "done-1:7"}, "past the 4 tokens"),
    ({"Last-Event-ID": "other:1"}, "names request"),
    ({"Idempotency-Key": "x" * 129}, "Idempotency-Key"),
    ({"Idempotency-Key": "bad key!"}, "Idempotency-Key"),
])
async def test_malformed_resumption_headers_are_a_clear_400(headers: dict[str, str], fragment: str) -> None:
    b = FakeBackend()
    b.known["done-1"] = RequestInfo("done-1", "finished", generated=4)
    rid = "other" if "other" in headers.get("Last-Event-ID", "") else "done-1"
    body = {"prompt": "x", "stream": True, "max_tokens": 16, "request_id": "done-1" if rid == "other" else rid}
    if "Idempotency-Key" in headers:
        del body["request_id"]
    async with client(b) as c:
        r = await c.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert not b.submits


async def test_a_plain_request_is_resumable_only_with_an_idempotency_key() -> None:
    b = FakeBackend()
    async with client(b) as c:
        assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Idempotency-Key": "order-7"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world"
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True},
                         headers={"Last-Event-ID": "r1:1"})
        assert r.status_code in (400, 403)
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Last-Event-ID": "r1:1"})
        assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    plain, keyed = b.submits[0][1], b.submits[1][1]
    assert plain.linger_s == 0 and keyed.linger_s > 0
    assert keyed.request_id == keyed_id("tenant-of-k-1", "order-7") != keyed_id("tenant-of-k-2", "order-7")


def test_request_ids_are_named_by_body_key_or_tag() -> None:
    assert request_id("alice", body_id="mine", key=None, resume=None) == "mine"
    with pytest.raises(BadRequest, match="one of"):
        request_id("alice", body_id="mine", key="k", resume=None)
    fresh = request_id("alice", body_id="", key=None, resume=None)
    assert request_id("alice", body_id="", key=None, resume=Resume(fresh, 3)) == fresh
    with pytest.raises(Forbidden):
        request_id("bob", body_id="", key=None, resume=Resume(fresh, 3))
    with pytest.raises(Forbidden):
        request_id("alice", body_id="", key=None, resume=Resume("g" + fresh[1:-1] + "0", 3))
    keyed = request_id("alice", body_id="", key="k-1", resume=None)
    assert request_id("alice", body_id="", key="k-1", resume=Resume(keyed, 2, ended=True)) == keyed
    assert parse_last_event_id(f"{keyed}:2:end") == Resume(keyed, 2, ended=True)
    assert parse_last_event_id("a:b:c:12") == Resume("a:b:c", 12)  # a body's request_id may hold ':'


async def test_health_is_503_with_the_reason_when_nothing_can_generate() -> None:
    b = FakeBackend()
    b.instances = [i if i.service != "scheduler" else kp.InstanceInfo("scheduler", "scheduler", 0,
                                                                       kp.ChildState.BACKOFF)
                   for i in b.instances]
    async with client(b) as c:
        r = await c.get("/health")
    assert r.status_code == 503 and r.json()["reason"] == "no scheduler instance is ready"
    b.instances = [i for i in b.instances if i.service == "echo"]
    async with client(b) as c:
        r = await c.get("/health")
    assert r.status_code == 503 and "no driver instance is ready" in r.json()["reason"]
    async with client(FakeBackend(), draining=True) as c:
        r = await c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "draining"


async def test_a_keyed_stream_whose_client_leaves_is_left_running_not_cancelled() -> None:
    """Over a real socket (uvicorn), as test_gateway_app's cancel-on-disconnect."""
    b = SlowBackend()
    await leave_after_first_event(b, {"prompt": "x", "stream": True}, {**KEY, "Idempotency-Key": "job-1"},
                                  lambda: b.detached)
    assert b.detached == [keyed_id("tenant-of-k-1", "job-1")] and b.cancelled == []
