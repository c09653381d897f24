"""The clients of a chaos run: streaming generations from several tenants at
several priorities, through the SDK and through the HTTP gateway, each
recording every operation in the history.

A client runs requests one after another until `stop` is set, then finishes
the one in flight. SDK clients rely on the SDK's exactly-once re-submission
when the scheduler dies. HTTP clients follow the documented reconnect rule
(README, docs/reliability.md): every request carries an Idempotency-Key; on a
connection error, or a stream cut before `[DONE]`, the same request is sent
again to the same port with the last event id received (`Last-Event-ID`),
at most `HTTP_RETRIES` times with a doubling backoff, and the stream goes on
from where it was cut.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import anyio
import httpx

from ipc.errors import ErrorCode, LlmosError
from sdk.client import AsyncClient
from tools.chaos.history import History, Op, OpKind, Via

PROMPTS = ["Once upon a time", "The kernel routes messages", "Paged attention stores keys",
           "A supervisor restarts", "Tokens per second", "Hello, llmos!", "Exactly once, no matter what",
           "The scheduler batches"]
MAX_TOKENS = (8, 16, 24, 32)
HTTP_MAX_TOKENS = 32  # HTTP greedy requests compare text with the reference, so one length
RETRY_BACKOFF_S = 0.2  # after an `overloaded` or a refused connection, as an HTTP client would
# The reconnect rule: retries of one request, and the pause before each (doubling, capped).
HTTP_RETRIES = 8
HTTP_RETRY_S = (0.1, 2.0)
# Answers to a re-sent request that are worth sending it again: the gateway
# or the scheduler was restarting.
RETRY_STATUSES = (429, 502, 503, 504)


@dataclass(frozen=True)
class Pick:
    prompt: int
    max_tokens: int
    greedy: bool
    priority: int
    seed: int


def pick(rng: random.Random, *, http: bool) -> Pick:
    greedy = rng.random() < 0.5
    return Pick(rng.randrange(len(PROMPTS)), HTTP_MAX_TOKENS if http else rng.choice(MAX_TOKENS),
                greedy, rng.randrange(3), rng.randrange(2**31))


async def sdk_client(name: str, tenant: str, client: AsyncClient, rng: random.Random, history: History,
                     stop: anyio.Event) -> None:
    n = 0
    while not stop.is_set():
        p = pick(rng, http=False)
        rid = f"{name}-{n}"
        n += 1
        history.record(Op(history.now(), OpKind.INVOKE, rid, name, via=Via.SDK, tenant=tenant, prompt=p.prompt,
                          max_tokens=p.max_tokens, greedy=p.greedy, priority=p.priority))
        done = False
        try:
            async for ch in client.stream_generate(PROMPTS[p.prompt], max_tokens=p.max_tokens,
                                                   temperature=0.0 if p.greedy else 0.8,
                                                   seed=None if p.greedy else p.seed, priority=p.priority,
                                                   ignore_eos=True, request_id=rid):
                if ch.finish_reason is None:
                    history.record(Op(history.now(), OpKind.CHUNK, rid, name, offset=ch.offset,
                                      token_ids=ch.token_ids, text=ch.text))
                else:
                    done = True
                    history.record(Op(history.now(), OpKind.OK, rid, name, offset=ch.offset, token_ids=ch.token_ids,
                                      text=ch.text, finish_reason=str(ch.finish_reason),
                                      completion_tokens=ch.usage.completion_tokens if ch.usage else -1,
                                      message=ch.error))
            if not done:
                history.record(Op(history.now(), OpKind.UNKNOWN, rid, name, code="no_finish",
                                  message="the stream ended without a final chunk"))
        except LlmosError as exc:
            history.record(Op(history.now(), OpKind.FAIL, rid, name, code=str(exc.code), message=exc.message))
            if exc.code == ErrorCode.OVERLOADED:
                await anyio.sleep(RETRY_BACKOFF_S)
        except BaseException:
            if not done:
                history.record(Op(history.now(), OpKind.UNKNOWN, rid, name, code="abandoned",
                                  message="still running when the run ended"))
            raise


async def http_client(name: str, tenant: str, api_key: str, base_url: str, rng: random.Random,
                      history: History, stop: anyio.Event) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = httpx.Timeout(60.0, connect=5.0)
    n = 0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        while not stop.is_set():
            p = pick(rng, http=True)
            rid = f"{name}-{n}"
            n += 1
            history.record(Op(history.now(), OpKind.INVOKE, rid, name, via=Via.HTTP, tenant=tenant,
                              prompt=p.prompt, max_tokens=p.max_tokens, greedy=p.greedy, priority=p.priority))
            body = {"prompt": PROMPTS[p.prompt], "max_tokens": p.max_tokens, "stream": True,
                    "temperature": 0.0 if p.greedy else 0.8, "priority": p.priority}
            if not p.greedy:
                body["seed"] = p.seed
            if await _one_http(http, rid, name, body, history):
                await anyio.sleep(RETRY_BACKOFF_S)


class _Stream:
    """What one HTTP client has of one request across its connections."""

    def __init__(self) -> None:
        self.last_id: str | None = None  # the last SSE event id received
        self.index = 0  # text chunks recorded
        self.finish = ""
        self.usage = -1
        self.accepted = False  # an answer 200 came (the request runs in the scheduler)


async def _one_http(http: httpx.AsyncClient, rid: str, name: str, body: dict[str, object],
                    history: History) -> bool:
    """One streamed completion, sent again by the reconnect rule when its
    connection fails or its stream is cut; True when the client should back
    off before the next."""
    st = _Stream()
    why = "connect"
    try:
        for attempt in range(HTTP_RETRIES + 1):
            if attempt:
                await anyio.sleep(min(HTTP_RETRY_S[0] * 2 ** (attempt - 1), HTTP_RETRY_S[1]))
            outcome = await _attempt(http, rid, name, body, history, st, retry=attempt > 0)
            if outcome is None:
                return False
            why = outcome
            if why.startswith("fail:") or attempt == HTTP_RETRIES:
                break
            offset = int(st.last_id.split(":")[1]) if st.last_id else 0
            history.record(Op(history.now(), OpKind.RETRY, rid, name, code=why, offset=offset))
        if why.startswith("fail:"):
            return True
        if st.accepted:
            history.record(Op(history.now(), OpKind.UNKNOWN, rid, name, code="stream_cut",
                              message=f"still cut after {HTTP_RETRIES} retries: {why}"))
        else:
            history.record(Op(history.now(), OpKind.FAIL, rid, name, code="connect",
                              message=f"no answer after {HTTP_RETRIES} retries: {why}"))
        return True
    except BaseException:
        history.record(Op(history.now(), OpKind.UNKNOWN, rid, name, code="abandoned",
                          message="still running when the run ended"))
        raise


async def _attempt(http: httpx.AsyncClient, rid: str, name: str, body: dict[str, object], history: History,
                   st: _Stream, *, retry: bool) -> str | None:
    """One connection's worth of the request: None when it ended (recorded),
    "fail:..." when it ended in an error (recorded), else why to send it
    again ("connect", "stream_cut", "http_503")."""
    headers = {"Idempotency-Key": rid, **({"Last-Event-ID": st.last_id} if st.last_id else {})}
    try:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                if retry and resp.status_code in RETRY_STATUSES:
                    return f"http_{resp.status_code}"
                code, msg = _error_code(raw, resp.status_code)
                history.record(Op(history.now(), OpKind.FAIL, rid, name, code=code, message=msg))
                return f"fail:{code}"
            st.accepted = True
            event_id = None
            async for line in resp.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                    continue
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    history.record(Op(history.now(), OpKind.OK, rid, name, offset=st.index, finish_reason=st.finish,
                                      completion_tokens=st.usage))
                    return None
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    history.record(Op(history.now(), OpKind.FAIL, rid, name, code=str(err.get("code")),
                                      message=str(err.get("message"))))
                    return f"fail:{err.get('code')}"
                if obj.get("usage"):
                    st.usage = int(obj["usage"]["completion_tokens"])
                for choice in obj.get("choices", []):
                    st.finish = choice.get("finish_reason") or st.finish
                    if choice.get("text"):
                        history.record(Op(history.now(), OpKind.CHUNK, rid, name, offset=st.index,
                                          text=choice["text"]))
                        st.index += 1
                st.last_id = event_id or st.last_id
            return "stream_cut"
    except httpx.HTTPError:
        return "stream_cut" if st.accepted else "connect"


def _error_code(raw: bytes, status: int) -> tuple[str, str]:
    try:
        err = json.loads(raw)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{status}", raw[:200].decode(errors="replace")
