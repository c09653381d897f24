"""The tuning benchmark's client side (tools/bench/tuning.py): boot the
system, restart the scheduler with an arm's setting, measure the machine
(`calibrate`), and replay a workload as streaming clients, each request's
`Outcome` judged on its objective."""

from __future__ import annotations

import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec

from common.config.scheduler import Objective
from ipc.errors import LlmosError, Overloaded
from ipc.protocol.sampling import SamplingParams
from kernel.config import ChildSpec, default_children
from sdk.client import AsyncClient
from tools.bench._serve_load import Req, Timing, random_ids
from tools.bench._tuning_workloads import CHAT, DOC, REFERENCE_PREFILL_TPS
from tools.bench.common import percentile
from tools.testing import running_llmos

GREEDY = SamplingParams(temperature=0.0)
OBJECTIVES = {CHAT: Objective(), DOC: Objective(ttft_ms=10_000, tpot_ms=100)}
GIVE_UP_X = 5.0
CALIBRATION_DOCS = 3
CALIBRATION_DOC_TOKENS = 1536  # three 512-token chunks at the default budget


@dataclass
class Outcome:
    timing: Timing = field(default_factory=Timing)
    objective: Objective = OBJECTIVES[CHAT]
    refused: bool = False
    gave_up: bool = False

    @property
    def met(self) -> bool:
        t, o = self.timing, self.objective
        if self.refused or self.gave_up or not t.tokens:
            return False
        return t.ttft * 1e3 <= o.ttft_ms and (t.tpot or 0.0) * 1e3 <= o.tpot_ms


async def serve(client: AsyncClient, req: Req, out: Outcome) -> None:
    give_up = GIVE_UP_X * out.objective.ttft_ms / 1e3
    out.timing.submitted = time.perf_counter()
    try:
        with anyio.move_on_after(give_up) as scope:
            async with client.stream_generate(req.prompt, max_tokens=req.max_tokens, params=GREEDY,
                                              ignore_eos=True, priority=req.priority) as stream:
                async for chunk in stream:
                    if chunk.token_ids and not out.timing.tokens:
                        scope.deadline = math.inf  # it started: the user stays
                    out.timing.got(len(chunk.token_ids))
        out.gave_up = scope.cancelled_caught
    except Overloaded:
        out.refused = True


async def replay(client: AsyncClient, workload: list[Req]) -> list[Outcome]:
    outcomes = [Outcome(objective=OBJECTIVES[r.priority]) for r in workload]
    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for req, out in zip(workload, outcomes):
            delay = began + req.at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)  # the arrival schedule is the workload
            tg.start_soon(serve, client, req, out)
    return outcomes


def scheduler_table(path: Path, budget: int, seqs: int, tuner: bool) -> None:
    doc = OBJECTIVES[DOC]
    path.write_text(f"[scheduler]\ntoken_budget = {budget}\nmax_num_seqs = {seqs}\nprefill_chunk = 512\n"
                    f"[scheduler.tuner]\nenabled = {'true' if tuner else 'false'}\n"
                    f'[scheduler.tuner.priorities."{DOC}"]\nttft_ms = {doc.ttft_ms}\ntpot_ms = {doc.tpot_ms}\n')


@asynccontextmanager
async def booted(home: Path, table: Path) -> AsyncIterator[AsyncClient]:
    """`llmos up`'s children (auth off), the scheduler's table from `table`."""
    children: list[ChildSpec] = []
    for c in default_children("demo", {"cpu": 1}, kv_cache_mb=512):
        if c.name in ("security", "echo"):
            continue
        if c.name == "scheduler":
            c = msgspec.structs.replace(c, args=["--config", str(table)])
        children.append(c)
    async with running_llmos(home, children, ready_timeout=300.0) as llmos:
        yield llmos.client


async def restart_scheduler(client: AsyncClient, budget: int, tuner: bool) -> None:
    """Stop the scheduler (the supervisor starts it again, reading its table
    anew) and wait until the new one answers with the new setting."""
    await client.kill("scheduler", "SIGTERM")
    with anyio.fail_after(120):
        while True:
            try:
                st = await client.scheduler_stats()
                if st.steps == 0 and st.token_budget == budget and (st.tuner != "off") == tuner:
                    return
            except LlmosError:
                pass  # not back yet
            await anyio.sleep(0.2)


async def idle(client: AsyncClient) -> None:
    """Wait (bounded) until nothing runs or waits: the next workload starts clean."""
    with anyio.move_on_after(120):
        while True:
            st = await client.scheduler_stats()
            if not st.running and not st.waiting:
                return
            await anyio.sleep(0.2)


async def warm_up(client: AsyncClient) -> None:
    """A document and a few chats at once, discarded, right after boot: the
    first arm must not pay the driver's first long prefill (allocations,
    pages of the KV cache touched) for the others."""
    rng = random.Random(0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.generate(random_ids(rng, 1300), max_tokens=4, params=GREEDY, ignore_eos=True))
        for _ in range(4):
            tg.start_soon(lambda: client.generate(random_ids(rng, 96), max_tokens=32, params=GREEDY, ignore_eos=True))


@dataclass
class Calibration:
    """What this machine did with the demo model through the OS at the default static setting, alone."""
    prefill_tps: float  # the median of the documents' prompt tokens / time to first token
    prefill_runs_tps: list[float]
    decode_step_ms: float  # a lone chat's mean time per output token
    reference_prefill_tps: float = REFERENCE_PREFILL_TPS
    fixed_load: bool = False  # the fixed bursty workload was served (not sized from this)
    burst_size: int = 0  # documents per burst served
    burst_prefill_s: float = 0.0  # one burst's prefill at prefill_tps
    reference_burst_prefill_s: float = 0.0  # the fixed burst's on the reference machine


async def calibrate(client: AsyncClient, rng: random.Random) -> Calibration:
    """Time CALIBRATION_DOCS documents one at a time (their first token: the prompt's prefill) and one
    chat's decode, nothing else running. The documents' prompts are random: no prefix is cached."""
    runs = []
    for _ in range(CALIBRATION_DOCS):
        t = Timing(submitted=time.perf_counter())
        async with client.stream_generate(random_ids(rng, CALIBRATION_DOC_TOKENS), max_tokens=1, params=GREEDY,
                                          ignore_eos=True) as stream:
            async for chunk in stream:
                t.got(len(chunk.token_ids))
        if not t.tokens:
            raise RuntimeError("calibration: a document got no token")
        runs.append(CALIBRATION_DOC_TOKENS / t.ttft)
    chat = Timing(submitted=time.perf_counter())
    async with client.stream_generate(random_ids(rng, 64), max_tokens=33, params=GREEDY, ignore_eos=True) as stream:
        async for chunk in stream:
            chat.got(len(chunk.token_ids))
    if chat.tpot is None:
        raise RuntimeError(f"calibration: the chat got {chat.tokens} tokens, not 33")
    return Calibration(percentile(runs, 50), runs, chat.tpot * 1e3)


def salted(workload: list[Req], salt: int) -> list[Req]:
    """The workload with each prompt's first token replaced by `salt`: the
    same lengths and arrivals, but no prompt shares a cached prefix with an
    earlier arm's (the memory server's prefix cache would hand every arm
    after the first the documents' prefill for free)."""
    return [Req(r.index, [salt, *r.prompt[1:]], r.max_tokens, r.at, r.priority) for r in workload]


async def serve_arm(client: AsyncClient, workload: list[Req], salt: int) -> tuple[list[Outcome], int]:
    """One setting serves `workload` once (its prompts salted): each request's
    outcome, and the tuner's changes counted by the scheduler."""
    await client.generate(list(range(32, 96)), max_tokens=4, params=GREEDY, ignore_eos=True)  # warm up
    outcomes = await replay(client, salted(workload, salt))
    await idle(client)
    st = await client.scheduler_stats()
    return outcomes, st.tuner_changes
