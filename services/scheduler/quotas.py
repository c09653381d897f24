"""Per-principal quotas at admission: requests/min, tokens/min and concurrent
requests, from the security server's published policy (0 = unlimited).

Tokens are charged at admission as prompt + max_tokens — the most the request
may spend — so a principal cannot start more work than its budget covers.
A charge belongs to the request (`charge`), not to the stream that asked:
its concurrency slot is given back when the request finishes, so attaching
a second stream to it (a re-submission) neither frees nor takes a slot.
Windows slide over the last 60 s. A refusal is `Overloaded` with
`retry_after_s`: when the oldest charge in the window expires, or 1 s for the
concurrency limit.

The KV-block quota (`kv_blocks`) is the memory server's to enforce; the
engine plans by it (`kv_blocks()`), and a request that could never fit it is
refused as a bad request (`kv_quota_refusal`): waiting would not help."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ipc.errors import BadRequest, Overloaded
from ipc.protocol.security import Quota, QuotaPolicy
from services.scheduler._request import Request

WINDOW_S = 60.0


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    running: int = 0

    def expire(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class QuotaGate:
    def __init__(self) -> None:
        self._quotas: dict[str, Quota] = {}
        self._usage: dict[str, _Usage] = {}
        self.version = -1

    def apply(self, policy: QuotaPolicy) -> None:
        self._quotas = dict(policy.quotas)
        self.version = policy.version

    def kv_blocks(self) -> dict[str, int]:
        """The KV-block quota of each principal that has one."""
        return {p: q.kv_blocks for p, q in self._quotas.items() if q.kv_blocks > 0}

    def admit(self, principal: str, tokens: int, now: float | None = None) -> None:
        """Charge one request of up to `tokens` tokens, or raise Overloaded."""
        q = self._quotas.get(principal)
        if q is None:
            return
        now = time.monotonic() if now is None else now
        u = self._usage.setdefault(principal, _Usage())
        u.expire(now)
        if q.concurrent_requests and u.running >= q.concurrent_requests:
            raise Overloaded(f"{principal!r} already runs {u.running} requests (quota {q.concurrent_requests})",
                             detail={"retry_after_s": 1.0, "quota": "concurrent_requests"})
        if q.requests_per_min and len(u.requests) >= q.requests_per_min:
            raise Overloaded(f"{principal!r} made {len(u.requests)} requests in the last minute "
                             f"(quota {q.requests_per_min})",
                             detail={"retry_after_s": round(WINDOW_S - (now - u.requests[0]), 2),
                                     "quota": "requests_per_min"})
        if q.tokens_per_min and u.token_sum + tokens > q.tokens_per_min:
            wait = WINDOW_S - (now - u.tokens[0][0]) if u.tokens else WINDOW_S
            raise Overloaded(f"{principal!r} would use {u.token_sum + tokens} tokens in a minute "
                             f"(quota {q.tokens_per_min})",
                             detail={"retry_after_s": round(wait, 2), "quota": "tokens_per_min"})
        u.requests.append(now)
        u.tokens.append((now, tokens))
        u.token_sum += tokens
        u.running += 1

    def charge(self, principal: str, req: Request) -> None:
        """Admit a new request (its prompt, replayed ids and max_tokens) for
        its lifetime, or raise Overloaded. A request already finished (a
        re-submission that had every token) spends nothing."""
        if req.done.is_set():
            return
        self.admit(principal, len(req.prompt_ids) + req.submit.max_tokens)
        req.on_finish.append(lambda: self.done(principal))

    def done(self, principal: str) -> None:
        u = self._usage.get(principal)
        if u is not None and u.running > 0:
            u.running -= 1


def kv_quota_refusal(tenant: str, limit: int, needed: int, block_size: int, prompt_tokens: int,
                     max_tokens: int) -> BadRequest:
    """The error for a request that needs more KV blocks than its tenant's
    quota allows even alone: the numbers, and the largest max_tokens that fits."""
    fit = limit * block_size - prompt_tokens + 1  # positions: prompt + max_tokens - 1
    hint = (f"; max_tokens {fit} or less would fit" if fit >= 1 else
            f"; its prompt alone needs {-(-prompt_tokens // block_size)} blocks")
    return BadRequest(
        f"{tenant!r} has a KV-block quota (kv_blocks) of {limit}; this request needs {needed} blocks of "
        f"{block_size} tokens for its prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}), "
        f"so it could never run{hint}",
        detail={"field": "max_tokens", "quota": "kv_blocks", "limit": limit, "needed": needed,
                "block_size": block_size})
