"""Swap-mode preemption over the real engine loop and memory manager with
fake paged drivers that read each sequence's history back from its blocks
(so a wrong swap, a stale block or a lost copy changes the output)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from ipc.errors import BadRequest, Error, ErrorCode

from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from common.config.scheduler import PreemptionMode, SchedulerConfig, load_scheduler_config
from tests.helpers.scheduler_fakes import TOK, FakeDriver, InProcessBackend, Stream, expected, running

# 12 blocks of 4 slots and six 30-token sequences: they cannot all fit, so
# the engine has to preempt.
TIGHT = dict(token_budget=16, max_num_seqs=8, prefill_chunk=8)
PROMPTS = [f"{i} prompt number {i}" for i in range(6)]
MAX_TOKENS = 14


def useful_positions() -> int:
    """Positions whose KV a run computes when nothing is ever recomputed
    (the last generated token of each request is never fed back)."""
    return sum(len(TOK.encode(p)) + MAX_TOKENS - 1 for p in PROMPTS)


def pool(backend: InProcessBackend, name: str = "cpu") -> mp.PoolStats:
    return next(p for p in backend.memory.stats(mp.MemoryStats()).pools if p.pool == name)


async def crowded_run(preemption: PreemptionMode, driver: FakeDriver) -> tuple[int, int, int, int]:
    """Six requests on too few blocks; returns (preemptions, swapped out,
    swapped in, positions the driver computed), after checking every output."""
    config = SchedulerConfig(**TIGHT, preemption=preemption)  # type: ignore[arg-type]
    async with running(config, {"cpu": driver}) as (engine, backend):
        streams = [Stream(engine, prompt=p, max_tokens=MAX_TOKENS, request_id=f"r{i}")
                   for i, p in enumerate(PROMPTS)]
        finals = [await s.result() for s in streams]
        with anyio.fail_after(10):
            while pool(backend).used or pool(backend).swap_used:
                await anyio.sleep(0)
        stats = engine.stats()
    for p, s, f in zip(PROMPTS, streams, finals):
        assert f.finish_reason == FinishReason.LENGTH
        assert s.tokens(f) == expected(p, MAX_TOKENS)
    assert stats.preemption == preemption.value
    return stats.preemptions, stats.swapped_out, stats.swapped_in, sum(driver.tokens_per_step)


async def test_swap_mode_preempts_without_recomputing_and_matches_the_reference() -> None:
    preempted, out, back, computed = await crowded_run(PreemptionMode.SWAP, FakeDriver(12, host_slots=64))
    assert preempted > 0 and out > 0 and back == out
    # Every position's KV was computed at most once (prefix-cache hits make
    # it fewer): the preempted ones came back from the host tier.
    assert computed <= useful_positions()


async def test_recompute_mode_on_the_same_load_computes_positions_again() -> None:
    preempted, out, back, computed = await crowded_run(PreemptionMode.RECOMPUTE, FakeDriver(12, host_slots=64))
    assert preempted > 0 and out == back == 0
    assert computed > useful_positions()


async def test_swap_mode_without_a_swap_tier_falls_back_to_recompute() -> None:
    preempted, out, back, computed = await crowded_run(PreemptionMode.SWAP, FakeDriver(12, host_slots=0))
    assert preempted > 0 and out == back == 0
    assert computed > useful_positions()


async def test_a_cancelled_swapped_out_request_frees_its_swap_slots() -> None:
    config = SchedulerConfig(**TIGHT, preemption=PreemptionMode.SWAP)  # type: ignore[arg-type]
    async with running(config, {"cpu": FakeDriver(12, host_slots=64)}) as (engine, backend):
        streams = [Stream(engine, prompt=p, max_tokens=MAX_TOKENS, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        with anyio.fail_after(10):
            while not any(s.sink.request.seq.swapped for s in streams):
                await anyio.sleep(0)
        victim = next(s for s in streams if s.sink.request.seq.swapped)
        assert engine.request_info("", victim.submit.request_id).state == "waiting"
        assert engine.cancel("", victim.submit.request_id)
        assert (await victim.result()).finish_reason == FinishReason.CANCELLED
        others = [s for s in streams if s is not victim]
        finals = [await s.result() for s in others]
        with anyio.fail_after(10):
            while pool(backend).used or pool(backend).swap_used:
                await anyio.sleep(0)
    for s, f in zip(others, finals):
        assert s.tokens(f) == expected(PROMPTS[streams.index(s)], MAX_TOKENS)


async def test_swapped_out_sequences_of_a_dead_driver_are_recomputed_on_another() -> None:
    drivers = {"a": FakeDriver(12, host_slots=64), "b": FakeDriver(12, host_slots=64)}
    config = SchedulerConfig(**TIGHT, preemption=PreemptionMode.SWAP)  # type: ignore[arg-type]
    async with running(config, drivers) as (engine, backend):
        streams = [Stream(engine, prompt=p, max_tokens=MAX_TOKENS, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        with anyio.fail_after(10):
            while not any(s.sink.request.seq.swapped and s.sink.request.seq.pool == "a" for s in streams):
                await anyio.sleep(0)
        drivers["a"].alive = False
        backend.memory.drop_pool(mp.DropPool("a"))
        engine.driver_down("a")
        finals = [await s.result() for s in streams]
    for p, s, f in zip(PROMPTS, streams, finals):
        assert s.tokens(f) == expected(p, MAX_TOKENS)
        assert s.sink.request.seq.pool == "b"


def test_the_preemption_mode_is_read_from_config_and_a_bad_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "llmos.toml"
    path.write_text('[scheduler]\npreemption = "swap"\n')
    assert load_scheduler_config(path).preemption == PreemptionMode.SWAP
    assert load_scheduler_config(None).preemption == PreemptionMode.RECOMPUTE
    path.write_text('[scheduler]\npreemption = "teleport"\n')
    with pytest.raises(BadRequest, match="preemption"):
        load_scheduler_config(path)


@pytest.mark.parametrize("nth_swap_in", range(5))
async def test_a_swapped_in_sequence_whose_reserve_is_refused_still_counts_its_blocks(nth_swap_in: int) -> None:
    """The memory server gives a sequence its device blocks back (SwapIn), then
    refuses the same step's Reserve for it (an earlier item took idle cached
    blocks, or a quota). It holds blocks either way; if the planner forgot
    them it would never preempt again and the engine would stall for good."""
    config = SchedulerConfig(**TIGHT, preemption=PreemptionMode.SWAP)  # type: ignore[arg-type]
    async with running(config, {"cpu": FakeDriver(12, host_slots=64)}) as (engine, backend):
        real_swap_in, real_reserve = backend.swap_in, backend.reserve
        seen = {"swap_ins": 0, "victim": "", "refused": 0}

        async def swap_in(req: mp.SwapIn) -> mp.SwapInReply:
            reply = await real_swap_in(req)
            for got in reply.seqs:
                if got.error is None and not seen["victim"]:
                    if seen["swap_ins"] == nth_swap_in:
                        seen["victim"] = got.seq_id
                    seen["swap_ins"] += 1
            return reply

        async def reserve(req: mp.Reserve) -> mp.ReserveReply:
            victim = seen["victim"]
            if not victim or seen["refused"] or all(i.seq_id != victim for i in req.seqs):
                return await real_reserve(req)
            seen["refused"] = 1
            rest = [i for i in req.seqs if i.seq_id != victim]
            granted = iter((await real_reserve(mp.Reserve(rest))).seqs if rest else [])
            return mp.ReserveReply([mp.SeqBlocks(i.seq_id, error=Error(ErrorCode.OVERLOADED, "out of blocks"))
                                    if i.seq_id == victim else next(granted) for i in req.seqs])

        backend.swap_in, backend.reserve = swap_in, reserve  # type: ignore[method-assign]
        streams = [Stream(engine, prompt=p, max_tokens=MAX_TOKENS, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        finals = [await s.result() for s in streams]
    for p, s, f in zip(PROMPTS, streams, finals):
        assert s.tokens(f) == expected(p, MAX_TOKENS)
