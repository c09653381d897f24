"""n > 1, best_of and logprobs at the gateway (services/gateway/choices.py),
against the in-memory backend: the bodies in OpenAI's schema, the Submits
each choice sends, and every bad value refused naming its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config.gateway import GatewayConfig
from text.tokenizer import BYTE_TOKENIZER_FILE
from ipc.errors import Overloaded
from tests.helpers.gateway import KEY, FakeBackend, SlowBackend, client, leave_after_first_event


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "byte"}))
    return FakeBackend(str(tmp_path))


def events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


async def test_n_choices_fork_one_group_with_a_seed_each(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi", "n": 3, "seed": 5, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert [ch["text"] for ch in body["choices"]] == [f"Hello world#{j}" for j in range(3)]
    subs = [s for _, s in backend.submits]
    assert len({s.request_id for s in subs}) == 3 and len({s.fork_group for s in subs}) == 1
    assert all(s.fork_size == 3 for s in subs) and [s.params.seed for s in subs] == [5, 6, 7]
    # the prompt once, every choice's tokens
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 12


async def test_completion_logprobs_in_openai_shape(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi", "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["A", "B", "C", "D"]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert lp["top_logprobs"][0] == pytest.approx({"A": -0.1, "a": -1.1})
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert backend.submits[0][1].params.logprobs == 2


async def test_no_logprobs_asked_none_shown(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi"})
        chat = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["choices"][0]["logprobs"] is None and chat.json()["choices"][0]["logprobs"] is None


async def test_chat_logprobs_in_openai_shape(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "logprobs": True, "top_logprobs": 1})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["A", "B", "C", "D"]
    assert content[1]["logprob"] == pytest.approx(-0.2) and content[1]["bytes"] == [66]
    assert content[1]["top_logprobs"] == [{"token": "B", "logprob": pytest.approx(-0.2), "bytes": [66]}]


async def test_best_of_returns_the_choice_of_highest_mean_logprob(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi", "best_of": 3})
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["text"] == "Hello world#2"  # choice 2 scores highest
    assert len(backend.submits) == 3 and body["usage"]["completion_tokens"] == 12  # all three ran


async def test_n_choices_stream_interleaved_with_their_index(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                       "stream": True, "logprobs": True})
    evs = events(r.text)
    text = {0: "", 1: ""}
    roles = set()
    for ev in evs[:-1]:
        (ch,) = ev["choices"]
        text[ch["index"]] += ch["delta"].get("content", "")
        if ch["delta"].get("role"):
            roles.add(ch["index"])
    assert text == {0: "Hello world#0", 1: "Hello world#1"} and roles == {0, 1}
    assert sum(1 for ev in evs[:-1] if ev["choices"][0]["finish_reason"] == "length") == 2
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 8
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("body, field, fragment", [
    ({"prompt": "x", "n": 0}, "n", "n"),
    ({"prompt": "x", "n": 10**30}, "n", "n"),
    ({"prompt": "x", "n": 17}, "n", "max_n"),
    ({"prompt": "x", "n": 2, "best_of": 1}, "best_of", "best_of"),
    ({"prompt": "x", "best_of": 17}, "best_of", "max_n"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "streamed"),
    ({"prompt": "x", "n": 2, "session_id": "s"}, "n", "session"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "logprobs"),
])
async def test_bad_choice_counts_are_refused_naming_the_field(backend: FakeBackend, body: dict[str, Any],
                                                              field: str, fragment: str) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and fragment in err["message"]
    assert backend.submits == []


async def test_chat_top_logprobs_past_the_bound_is_refused(backend: FakeBackend) -> None:
    async with client(backend) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


async def test_max_n_is_the_servers_config(backend: FakeBackend) -> None:
    async with client(backend, GatewayConfig(max_n=2)) as c:
        ok = await c.post("/v1/completions", json={"prompt": "x", "n": 2})
        refused = await c.post("/v1/completions", json={"prompt": "x", "n": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    assert refused.status_code == 400 and "max_n" in refused.json()["error"]["message"]


async def test_a_resumed_stream_of_several_choices_is_refused(backend: FakeBackend) -> None:
    async with client(backend) as c:
        one = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
        last = [line[4:] for line in one.text.splitlines() if line.startswith("id: ")][1]
        r = await c.post("/v1/completions", json={"prompt": "x", "n": 2, "stream": True},
                         headers={"Last-Event-ID": last})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert len(backend.submits) == 1


async def test_a_client_that_leaves_a_stream_of_choices_cancels_every_choice() -> None:
    """Over a real socket (uvicorn): closing the SSE stream of n = 3 cancels all three generations."""
    b = SlowBackend()
    await leave_after_first_event(b, {"prompt": "x", "stream": True, "n": 3, "request_id": "slow-n"}, KEY,
                                  lambda: len(b.cancelled) == 3)
    assert sorted(b.cancelled) == [s.request_id for _, s in b.submits] and len(set(b.cancelled)) == 3


async def test_a_choice_that_fails_fails_the_request_and_cancels_the_rest(backend: FakeBackend) -> None:
    backend.fail_with = Overloaded("the queue is full", detail={"retry_after_s": 2.0})
    async with client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "n": 3})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
