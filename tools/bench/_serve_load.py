"""The serving benchmark's workload and measurements, independent of what serves it.

A workload is a list of `Req`: token-id prompts with an output length and an
arrival time (Poisson: exponential gaps). A `Target` serves one request and
notes when its tokens arrive in a `Timing`; `drive` replays a workload's
arrivals against a target (arrivals are paced by the clock: that is the
workload, not a wait for a condition).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from tools.bench.common import percentile

# Byte-level ids the demo tokenizer decodes (0..255); 256/257 are BOS/EOS.
VOCAB = 256


@dataclass(frozen=True, slots=True)
class Req:
    index: int
    prompt: list[int]
    max_tokens: int
    at: float = 0.0  # arrival, seconds after the run starts
    priority: int = 0


@dataclass(slots=True)
class Timing:
    submitted: float = 0.0
    first: float = 0.0  # first generated token received
    last: float = 0.0
    tokens: int = 0

    def got(self, n: int) -> None:
        """`n` more generated tokens arrived now."""
        if n <= 0:
            return
        now = time.perf_counter()
        if not self.tokens:
            self.first = now
        self.last = now
        self.tokens += n

    @property
    def ttft(self) -> float:
        return self.first - self.submitted

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one token)."""
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


class Target(Protocol):
    async def serve(self, req: Req, timing: Timing) -> None:
        """Submit `req`, call `timing.got` as tokens arrive, return when it is done."""


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    output_tokens: int
    elapsed_s: float
    tps: float  # generated tokens per second over the whole run
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float


def mixed_workload(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int = 0) -> list[Req]:
    """`n` requests, Poisson arrivals at `rate` per second, prompt and output
    lengths uniform in the given inclusive ranges, random byte prompts."""
    rng = random.Random(seed)
    at = 0.0
    out = []
    for i in range(n):
        out.append(Req(i, random_ids(rng, rng.randint(*prompt_len)), rng.randint(*output_len), at))
        at += rng.expovariate(rate)
    return out


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


async def drive(target: Target, workload: Sequence[Req]) -> tuple[list[Timing], float]:
    """Replay `workload` (each request submitted at its arrival time, all
    concurrently); returns the timings (workload order) and the wall time
    from the first arrival to the last token."""
    timings = [Timing() for _ in workload]

    async def one(req: Req, timing: Timing) -> None:
        timing.submitted = time.perf_counter()
        await target.serve(req, timing)
        if timing.tokens != req.max_tokens:
            raise RuntimeError(f"request {req.index}: {timing.tokens} tokens, wanted {req.max_tokens}")

    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for req, timing in zip(workload, timings):
            delay = began + req.at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, req, timing)
    return timings, max(t.last for t in timings) - began


async def sequentially(target: Target, reqs: Sequence[Req]) -> list[Timing]:
    """One request at a time (an unloaded probe)."""
    timings = []
    for req in reqs:
        t = Timing(submitted=time.perf_counter())
        await target.serve(req, t)
        timings.append(t)
    return timings


def summarize(timings: Sequence[Timing], elapsed_s: float) -> Summary:
    ttft = [t.ttft * 1e3 for t in timings]
    tpot = [x * 1e3 for t in timings if (x := t.tpot) is not None]
    tokens = sum(t.tokens for t in timings)
    return Summary(len(timings), tokens, elapsed_s, tokens / elapsed_s,
                   percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50), percentile(tpot, 99))
