"""The Responses API's bodies and transcript (services/gateway/responses.py)
against the in-memory backend: every bad input refused naming its field, and
a whole history sent as input renders to exactly what a chain's session holds."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway import responses as rs
from text.chat import ChatFormatter
from tests.helpers.gateway import FakeBackend, client


@pytest.mark.parametrize("body, status, field", [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({}, 400, ""),
    ({"input": [{"type": "function_call", "role": "user"}]}, 400, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, "input[0].content"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10**30}, 400, "max_output_tokens"),
    ({"input": "x", "temperature": -1}, 400, "temperature"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "x", "previous_response_id": "r" * 129}, 400, "previous_response_id"),
])
async def test_bad_bodies_are_refused_naming_the_field(body: dict[str, Any], status: int, field: str) -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == status, r.text
    if field:
        assert r.json()["error"]["param"] == field
    assert b.submits == []


async def test_an_unknown_or_malformed_id_is_404() -> None:
    async with client(FakeBackend()) as c:
        for rid in ("resp_" + "0" * 52, "nope", "resp_" + "x" * 52):
            assert (await c.get(f"/v1/responses/{rid}")).status_code == 404
            assert (await c.delete(f"/v1/responses/{rid}")).status_code == 404


async def test_a_new_unstored_response_is_a_plain_request_with_its_instructions() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/responses", json={"input": "Hi", "instructions": "Be brief", "store": False,
                                                "max_output_tokens": 4})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "response" and body["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == "Hello world"
    assert body["usage"]["input_tokens"] == 3 and body["usage"]["output_tokens"] == 4
    (_, submit), = b.submits
    assert submit.session == "" and submit.prompt == "system: Be brief\nuser: Hi\nassistant:"
    assert submit.request_id == body["id"] and submit.max_tokens == 4


async def test_a_stored_response_runs_in_its_chains_session() -> None:
    b = FakeBackend()
    async with client(b) as c:
        r = await c.post("/v1/responses", json={"input": [{"role": "user", "content": [{"type": "input_text",
                                                                                        "text": "Hi"}]}]})
    (_, submit), = b.submits
    assert submit.session == rs.CHAIN_PREFIX + r.json()["id"][5:37]
    assert rs.parse_id(r.json()["id"], "id")[0] == submit.session


def test_a_whole_history_renders_to_what_the_session_holds() -> None:
    fmt = ChatFormatter(None, {})
    turn1 = rs.decode(b'{"input": "Hello"}')
    turn2 = rs.decode(b'{"input": [{"role": "user", "content": "More"}]}')
    whole = rs.decode(b'{"input": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " out"},'
                      b' {"role": "user", "content": "More"}]}')
    held = rs.render(turn1, fmt, continuing=False) + " out" + rs.render(turn2, fmt, continuing=True)
    assert rs.render(whole, fmt, continuing=False) == held
