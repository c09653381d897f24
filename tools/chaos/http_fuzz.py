"""Hypothesis against the gateway's HTTP endpoints: random methods, paths,
headers and bodies (JSON shaped like OpenAI requests, and raw bytes). Every
request must get an HTTP answer below 500 within the timeout — a 5xx, a
dropped connection or a hang is a finding."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import msgspec
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/nope", "/",
         "/v1/completions/../models", "/%00", "/v1/" + "a" * 300]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
          "stop", "seed", "priority", "request_id", "session_id", "logprobs", "echo", "stream_options",
          "repetition_penalty", "max_completion_tokens", "top_logprobs", "user"]
# A body may happen to be a valid streaming request: the answer is read to its end (bounded by this).
READ_TIMEOUT_S = 60.0

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-5, 24),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x", ""]),
                                           "content": st.one_of(st.text(max_size=30), json_values)}), max_size=3)
request_bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8).flatmap(
    lambda d: st.fixed_dictionaries({**{k: st.just(v) for k, v in d.items()},
                                     "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 400),
                                                                                        max_size=8), json_values),
                                     "messages": messages,
                                     "max_tokens": st.one_of(st.integers(-2, 8), st.none(), json_values)}))


class HttpFuzzStats(msgspec.Struct):
    examples: int = 0
    statuses: dict[int, int] = {}
    unexpected: list[str] = []


def fuzz_http(base_url: str, api_key: str, examples: int, seed_: int = 0) -> HttpFuzzStats:
    """Blocking (run it in a worker thread)."""
    stats = HttpFuzzStats()
    statuses: Counter[int] = Counter()
    auths = [None, f"Bearer {api_key}", "Bearer nope", "Basic abc", "Bearer", "bearer " + api_key + "x"]
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=5.0)) as client:

        @seed(seed_)
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
               path=st.sampled_from(PATHS), auth=st.sampled_from(auths),
               body=st.one_of(request_bodies, json_values, st.binary(max_size=200)),
               content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
        def one(method: str, path: str, auth: str | None, body: Any, content_type: str) -> None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Content-Type": content_type} if content_type else {}
            if auth is not None:
                headers["Authorization"] = auth
            stats.examples += 1
            try:
                with client.stream(method, path, content=raw, headers=headers) as resp:
                    for _ in resp.iter_raw():
                        pass
                    statuses[resp.status_code] += 1
                    if resp.status_code >= 500 and resp.status_code != 503:
                        stats.unexpected.append(f"{method} {path} {raw[:120]!r}: HTTP {resp.status_code}")
            except httpx.HTTPError as exc:
                stats.unexpected.append(f"{method} {path} {raw[:120]!r}: {type(exc).__name__}: {exc}")

        one()
    stats.statuses = dict(statuses)
    return stats
