"""Failed-login budgets and the aggregation of refusals into audit records.

A Login is checked first, always (a dict lookup and one HMAC-SHA256 over at
most `store.MAX_API_KEY` = 128 characters), so a valid key is never delayed or refused by
these limits: an attacker hammering someone's key id cannot lock its owner
out. What the budgets bound is the *failures*: past a budget a failure is
answered `overloaded` with `retry_after_s` (a brute-forcer is told to back
off, learning nothing new) and costs no audit write or log line of its own.

Budgets (token buckets, refilled continuously):

* per source (the requester as the kernel stamped it in `src`: a client's
  connection, "front:<routing id>", or a service instance): `SOURCE_RATE`/s,
  burst `SOURCE_BURST` (a client opening new connections gets a new source
  each time; the next two budgets do not care);
* per key-id prefix tried (the first 4 hex digits: 65,536 buckets at most,
  so random key ids cannot dodge it and it cannot grow without bound):
  `PREFIX_RATE`/s, burst `PREFIX_BURST`;
* all failures together: `GLOBAL_RATE`/s, burst `GLOBAL_BURST`.

Failures become audit records through `Aggregator`: the first of each
(source, cause) in an interval is written at once, the rest are one record
with a count at the end of the interval (`INTERVAL_S`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

SOURCE_RATE, SOURCE_BURST = 5.0, 20.0
PREFIX_RATE, PREFIX_BURST = 2.0, 10.0
GLOBAL_RATE, GLOBAL_BURST = 50.0, 200.0
MAX_BUCKETS = 4096
INTERVAL_S = 10.0
MAX_AGGREGATES = 1024
SAMPLE_KEY_IDS = 8
MAX_DISTINCT = 1024  # distinct key ids counted exactly up to this many per record


@dataclass
class Bucket:
    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _Buckets:
    """Buckets by key, the least recently used dropped past `MAX_BUCKETS`
    (a dropped bucket comes back full: cycling more keys than that gains a
    burst per key, still inside the global budget)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._b: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        b = self._b.get(key)
        if b is None:
            if len(self._b) >= MAX_BUCKETS:
                self._b.popitem(last=False)
            b = self._b[key] = Bucket(self.rate, self.burst, self.burst, now)
        else:
            self._b.move_to_end(key)
        return b.take(now)


class LoginLimiter:
    def __init__(self) -> None:
        self._source = _Buckets(SOURCE_RATE, SOURCE_BURST)
        self._prefix = _Buckets(PREFIX_RATE, PREFIX_BURST)
        self._global = Bucket(GLOBAL_RATE, GLOBAL_BURST, GLOBAL_BURST, time.monotonic())

    def failed(self, source: str, key_id: str, now: float | None = None) -> tuple[str, float]:
        """Charge one failure; ("", 0) within every budget, else (the budget
        exceeded, seconds to wait). Every budget is charged, so a flood spread
        over sources still drains the global one."""
        t = time.monotonic() if now is None else now
        waits = [("source", self._source.take(source, t)),
                 ("key id", self._prefix.take(key_id[:4], t)),
                 ("global", self._global.take(t))]
        over = [(name, w) for name, w in waits if w > 0]
        if not over:
            return "", 0.0
        return max(over, key=lambda x: x[1])


@dataclass
class Summary:
    action: str
    code: str
    source: str
    cause: str
    count: int
    first_at: float
    key_ids: list[str] = field(default_factory=list)
    distinct_key_ids: int = 0  # saturates at MAX_DISTINCT


@dataclass
class _Agg:
    started: float
    first_at: float
    count: int = 0
    key_ids: set[str] = field(default_factory=set)


Key = tuple[str, str, str, str]  # action, code, source, cause


class Aggregator:
    """Failures by (action, code, source, cause): `add` says whether to write
    this one now (the first of its interval); `flush` returns the counts of
    the rest. At most `MAX_AGGREGATES` keys are held (the oldest is flushed
    early past that)."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._aggs: OrderedDict[Key, _Agg] = OrderedDict()
        self.overflow: list[Summary] = []

    def add(self, action: str, code: str, source: str, cause: str, key_id: str = "",
            now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        k = (action, code, source, cause)
        agg = self._aggs.get(k)
        if agg is None:
            if len(self._aggs) >= MAX_AGGREGATES:
                old_key, old = self._aggs.popitem(last=False)
                if old.count:
                    self.overflow.append(self._summary(old_key, old))
            self._aggs[k] = _Agg(t, time.time())
            return True
        agg.count += 1
        if key_id and len(agg.key_ids) < MAX_DISTINCT:
            agg.key_ids.add(key_id)
        return False

    @staticmethod
    def _summary(k: Key, a: _Agg) -> Summary:
        return Summary(*k, a.count, a.first_at, sorted(a.key_ids)[:SAMPLE_KEY_IDS], len(a.key_ids))

    def flush(self, now: float | None = None, *, everything: bool = False) -> list[Summary]:
        t = time.monotonic() if now is None else now
        out, self.overflow = self.overflow, []
        for k in [k for k, a in self._aggs.items() if everything or t - a.started >= self.interval_s]:
            a = self._aggs.pop(k)
            if a.count:
                out.append(self._summary(k, a))
        return out
