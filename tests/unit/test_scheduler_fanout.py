"""n > 1 by copy-on-write (services/scheduler/_fanout.py): the choices of a
prompt fork its KV, computed once; the real MemoryManager and fake paged
drivers (a wrong block table or a stale block changes the output)."""

from __future__ import annotations

import anyio
import pytest

from ipc.errors import BadRequest
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason, Submit
from services.scheduler._fanout import FORK_WAIT_S
from services.scheduler.engine import Engine
from tests.helpers.scheduler_fakes import TOK, FakeDriver, Stream, expected, running

PROMPT = "a prompt of some length to share!"  # BOS + 33 bytes: a 33-token prefix ends in a partial 4-slot block
N, MAX_TOKENS = 4, 6


def group(engine: Engine, n: int = N, arrive: int = N) -> list[Stream]:
    """`arrive` of a group of `n` choices."""
    return [Stream(engine, prompt=PROMPT, max_tokens=MAX_TOKENS, request_id=f"c{i}", fork_group="g", fork_size=n)
            for i in range(arrive)]


def computed(driver: FakeDriver) -> int:
    return sum(driver.tokens_per_step)


async def test_n_choices_compute_the_prompt_once_and_each_equals_a_lone_request() -> None:
    p = len(TOK.encode(PROMPT))
    async with running() as (engine, backend):
        streams = group(engine)
        finals = [await s.result() for s in streams]
        driver = backend.drivers["cpu"]
        # The prompt's first p - 1 positions once, then each choice its last
        # prompt position and its generated tokens (the last one is never fed back).
        assert computed(driver) == (p - 1) + N * MAX_TOKENS
        stats = backend.memory.stats(mp.MemoryStats()).pools[0]
        assert stats.cow_copies >= N - 1  # the shared partial block was copied on the choices' first writes
        assert engine.fanout.forked == N
        lone_before = computed(driver)
        lone = Stream(engine, prompt=PROMPT[::-1], max_tokens=MAX_TOKENS)  # as long; no prefix-cache hit
        await lone.result()
        assert computed(driver) - lone_before == p + MAX_TOKENS - 1  # so N alone would compute N * p
    for s, f in zip(streams, finals):
        assert f.finish_reason == FinishReason.LENGTH
        assert s.tokens(f) == expected(PROMPT, MAX_TOKENS)
        assert f.usage.prompt_tokens == p and f.usage.forked_tokens == p - 1 and f.usage.cached_tokens == 0


async def test_a_choice_that_arrives_after_the_fork_runs_alone_and_still_answers() -> None:
    async with running() as (engine, backend):
        first = group(engine, arrive=1)  # a group of 4 of which only one arrives in time
        f0 = await first[0].result()  # forked after FORK_WAIT_S, alone
        late = Stream(engine, prompt=PROMPT, max_tokens=MAX_TOKENS, request_id="late", fork_group="g", fork_size=4)
        f1 = await late.result()
    assert first[0].tokens(f0) == expected(PROMPT, MAX_TOKENS) == late.tokens(f1)
    assert engine.fanout.forked == 1 and FORK_WAIT_S < 10  # within Stream.result's bound
    assert late.sink.request.cached_tokens == len(TOK.encode(PROMPT)) // 4 * 4  # alone: the prefix cache's full blocks


async def test_a_cancelled_choice_leaves_the_others_running() -> None:
    async with running() as (engine, backend):
        streams = group(engine)
        assert engine.cancel("", "c1")
        finals = [await s.result() for s in streams]
        await _blocks_free(backend)
    assert finals[1].finish_reason == FinishReason.CANCELLED
    for i in (0, 2, 3):
        assert streams[i].tokens(finals[i]) == expected(PROMPT, MAX_TOKENS)


async def test_a_driver_restart_before_the_fork_recomputes_each_choice() -> None:
    p = len(TOK.encode(PROMPT))
    async with running() as (engine, backend):
        streams = group(engine, arrive=N - 1)  # the 4th never comes: the prefix waits FORK_WAIT_S for it
        with anyio.fail_after(10):
            while not engine.fanout.pending:
                await anyio.sleep(0)
        driver = backend.drivers["cpu"]  # the prefix's KV is lost with its driver
        driver.restart()
        backend.memory.register_pool(mp.RegisterPool("cpu", driver.num_blocks, driver.block_size))
        engine.driver_down("cpu")
        engine.driver_up("cpu", driver.meta)
        finals = [await s.result() for s in streams]
        assert engine.fanout.forked == 0
        # the prefix, then each choice from token 0 on the new driver
        assert computed(driver) == (p - 1) + (N - 1) * (p + MAX_TOKENS - 1)
    for s, f in zip(streams, finals):
        assert s.tokens(f) == expected(PROMPT, MAX_TOKENS)


async def _blocks_free(backend: object) -> None:
    with anyio.fail_after(10):
        while any(p.used for p in backend.memory.stats(mp.MemoryStats()).pools):  # type: ignore[attr-defined]
            await anyio.sleep(0)


@pytest.mark.parametrize("size", [0, 1, 257])
def test_a_fork_group_of_a_bad_size_is_refused_naming_the_field(size: int) -> None:
    with pytest.raises(BadRequest) as err:
        Submit(prompt="x", fork_group="g", fork_size=size).validate()
    assert err.value.detail["field"] == "fork_size"


def test_a_fork_group_in_a_session_is_refused() -> None:
    with pytest.raises(BadRequest) as err:
        Submit(prompt="x", fork_group="g", fork_size=2, session="s").validate()
    assert err.value.detail["field"] == "fork_group"
