"""Sessions over the real engine loop and memory manager with fake paged
drivers (which read each sequence's history back from its blocks, so a
wrong swap or a stale block changes the output): pinned KV between
requests, suspend / resume by swapping, pins giving way under pressure."""

from __future__ import annotations

import anyio
import pytest

from ipc.errors import Error, ErrorCode, NotFound
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from ipc.protocol.sessions import SessionState
from common.config.scheduler import SchedulerConfig
from tests.helpers.scheduler_fakes import TOK, FakeDriver, InProcessBackend, Stream, expected, reference, running


async def until(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0)


def pool(backend: InProcessBackend) -> mp.PoolStats:
    return backend.memory.stats(mp.MemoryStats()).pools[0]


async def second_turn_cached_tokens(config: SchedulerConfig) -> tuple[int, list[int], list[int]]:
    """Two turns of one conversation with the prefix cache emptied between
    them: the second turn's cached prompt tokens, its output and the reference."""
    async with running(config, {"cpu": FakeDriver(64)}) as (engine, backend):
        first = Stream(engine, prompt_ids=TOK.encode("turn one of a chat"), max_tokens=12, session="chat")
        f1 = await first.result()
        pinning = config.session_pin_fraction > 0
        await until(lambda: pool(backend).num_seqs == int(pinning), "the first turn released or pinned")
        backend.memory.evict_cached(mp.EvictCached())  # only what is held survives
        prompt2 = TOK.encode("turn one of a chat") + first.tokens(f1) + TOK.encode(" and more")
        second = Stream(engine, prompt_ids=TOK.encode(" and more"), max_tokens=8, session="chat")
        f2 = await second.result()
        return f2.usage.cached_tokens, second.tokens(f2), reference(prompt2, 8)


async def test_a_session_keeps_its_kv_pinned_for_its_next_request() -> None:
    cached, got, want = await second_turn_cached_tokens(SchedulerConfig())
    assert got == want
    # 19 prompt + 12 generated tokens, held through the eviction: the second
    # turn forks the pin (its partial last block too), so every position of
    # the history is reused, the last generated token's too (its epilogue): 31.
    assert cached == 31
    cached, got, want = await second_turn_cached_tokens(SchedulerConfig(session_pin_fraction=0.0))
    assert got == want and cached == 0  # without pinning, the eviction took them


async def test_suspend_swaps_a_running_request_out_and_resume_continues_it_exactly() -> None:
    # 16 blocks of 4: the request run while the session is out (15 blocks)
    # must take blocks the session left, so its KV can only come back from
    # the swap tier.
    driver = FakeDriver(16, host_slots=16)
    async with running(None, {"cpu": driver}) as (engine, backend):
        s = Stream(engine, prompt="a long story", max_tokens=40, session="s", request_id="story")
        await until(lambda: len(s.events) >= 5, "some tokens")
        info = engine.sessions.suspend("", "s")
        assert info.state == SessionState.SUSPENDED
        await until(lambda: engine.sessions.get("", "s").info().kv_where == "swap", "swapped out")
        held = engine.request_info("", "story")
        assert held.state == "suspended" and driver.swapped_out > 0
        assert pool(backend).used == 0 and pool(backend).swap_used > 0
        # The engine keeps serving others while the session is out; their
        # blocks may be the ones the session left.
        other = Stream(engine, prompt="meanwhile", max_tokens=50)
        assert other.tokens(await other.result()) == expected("meanwhile", 50)
        assert pool(backend).evictions > 0
        assert engine.request_info("", "story").generated == held.generated
        # A new request of the suspended session waits behind it.
        later = Stream(engine, prompt_ids=TOK.encode("next turn"), max_tokens=5, session="s")
        assert engine.sessions.get("", "s").info().queued == 1
        engine.sessions.resume("", "s")
        final = await s.result()
        assert s.tokens(final) == expected("a long story", 40)
        assert final.usage.preemptions == 0 and driver.swapped_in > 0  # swapped back, not recomputed
        # The pool holds 64 positions: the 53 of the first turn do not fit beside
        # this one (10 + 5), so the first turn is evicted.
        f_later = await later.result()
        assert later.tokens(f_later) == expected("next turn", 5)
        assert (f_later.usage.evicted_turns, f_later.usage.evicted_tokens) == (1, 53)


async def test_without_a_swap_tier_suspend_drops_the_kv_and_resume_recomputes_it() -> None:
    async with running(None, {"cpu": FakeDriver(64)}) as (engine, backend):
        s = Stream(engine, prompt="no swap here", max_tokens=30, session="s")
        await until(lambda: len(s.events) >= 3, "some tokens")
        engine.sessions.suspend("", "s")
        await until(lambda: engine.request_info("", s.sink.request.request_id).state == "suspended", "suspended")
        await until(lambda: pool(backend).used == 0, "its blocks released")
        assert engine.sessions.get("", "s").info().kv_where == ""
        engine.sessions.resume("", "s")
        final = await s.result()
    assert s.tokens(final) == expected("no swap here", 30)


async def test_an_idle_sessions_pinned_kv_is_swapped_by_suspend_and_reused_after_resume() -> None:
    driver = FakeDriver(64, host_slots=64)
    async with running(None, {"cpu": driver}) as (engine, backend):
        first = Stream(engine, prompt_ids=TOK.encode("remember this text"), max_tokens=10, session="idle")
        f1 = await first.result()
        assert engine.sessions.get("", "idle").info().state == SessionState.IDLE
        assert engine.sessions.get("", "idle").info().kv_where == "device"
        engine.sessions.suspend("", "idle")
        await until(lambda: engine.sessions.get("", "idle").info().kv_where == "swap", "swapped out")
        engine.sessions.resume("", "idle")
        await until(lambda: engine.sessions.get("", "idle").info().kv_where == "device", "swapped in")
        backend.memory.evict_cached(mp.EvictCached())
        prompt2 = TOK.encode("remember this text") + first.tokens(f1) + TOK.encode("!")
        second = Stream(engine, prompt_ids=TOK.encode("!"), max_tokens=6, session="idle")
        f2 = await second.result()
    assert second.tokens(f2) == reference(prompt2, 6)
    assert f2.usage.cached_tokens == 29 and driver.swapped_out > 0  # the whole history, its last token too


@pytest.mark.parametrize("resumed", [False, True])
async def test_closing_a_suspended_idle_session_frees_its_swapped_kv(resumed: bool) -> None:
    async with running(None, {"cpu": FakeDriver(64, host_slots=64)}) as (engine, backend):
        first = Stream(engine, prompt_ids=TOK.encode("remember this text"), max_tokens=10, session="idle")
        await first.result()
        engine.sessions.suspend("", "idle")
        await until(lambda: engine.sessions.get("", "idle").info().kv_where == "swap", "swapped out")
        if resumed:
            engine.sessions.resume("", "idle")  # and closed before the next step brings it back
        engine.sessions.close("", "idle")
        await until(lambda: pool(backend).swap_used == 0 and pool(backend).used == 0, "slots and blocks freed")
        with pytest.raises(NotFound):
            engine.sessions.get("", "idle")


async def test_pins_give_way_when_blocks_run_short() -> None:
    # 16 blocks of 4: a pinned conversation of 8 blocks, then a request that needs 12.
    async with running(SchedulerConfig(session_pin_fraction=1.0), {"cpu": FakeDriver(16)}) as (engine, backend):
        chat = Stream(engine, prompt_ids=list(range(60, 80)), max_tokens=12, session="chat")
        await chat.result()
        assert engine.stats().pinned_blocks == 8
        big = Stream(engine, prompt_ids=list(range(100, 140)), max_tokens=8)
        final = await big.result()
        assert big.tokens(final) == reference(list(range(100, 140)), 8)
        assert engine.stats().pinned_blocks == 0 and final.usage.preemptions == 0
        with pytest.raises(NotFound):
            engine.sessions.get("", "chat")  # nothing left to remember


async def test_close_releases_the_pin_and_unknown_sessions_are_not_found() -> None:
    async with running() as (engine, backend):
        s = Stream(engine, prompt="bye", max_tokens=4, session="done")
        await s.result()
        assert pool(backend).used > 0
        assert engine.sessions.close("", "done").kv_where == ""
        await until(lambda: pool(backend).used == 0, "released")
        for call in (engine.sessions.suspend, engine.sessions.resume, engine.sessions.get):
            with pytest.raises(NotFound):
                call("", "never")


async def test_a_cancelled_suspended_request_frees_its_swap_slots() -> None:
    async with running(None, {"cpu": FakeDriver(64, host_slots=64)}) as (engine, backend):
        s = Stream(engine, prompt="to be cancelled", max_tokens=60, session="x", request_id="gone")
        await until(lambda: len(s.events) >= 3, "some tokens")
        engine.sessions.suspend("", "x")
        await until(lambda: engine.sessions.get("", "x").info().kv_where == "swap", "swapped")
        assert engine.cancel("", "gone")
        final = await s.result()
        assert final.finish_reason == FinishReason.CANCELLED
        await until(lambda: pool(backend).swap_used == 0 and pool(backend).used == 0, "slots freed")
        assert engine.sessions.get("", "x").info().state == SessionState.SUSPENDED  # until resumed


async def test_a_pinned_session_kv_survives_a_memory_server_restart() -> None:
    async with running(SchedulerConfig(), {"cpu": FakeDriver(64)}) as (engine, backend):
        first = Stream(engine, prompt_ids=TOK.encode("turn one of a chat"), max_tokens=12, session="chat")
        f1 = await first.result()
        await until(lambda: pool(backend).num_seqs == 1, "the first turn pinned")
        engine.memory_down()
        backend.restart_memory()  # a new, empty memory server: no prefix cache, nothing held
        engine.memory_restarted()
        await until(lambda: pool(backend).num_seqs == 1, "the pin re-registered")
        assert engine.sessions.get("", "chat").info().kv_where == "device"
        prompt2 = TOK.encode("turn one of a chat") + first.tokens(f1) + TOK.encode(" and more")
        second = Stream(engine, prompt_ids=TOK.encode(" and more"), max_tokens=8, session="chat")
        f2 = await second.result()
    assert second.tokens(f2) == reference(prompt2, 8)
    assert f2.usage.cached_tokens == 31  # the whole history's positions, adopted from the driver


async def test_a_pin_gives_way_when_the_memory_server_refuses_a_waiting_request_blocks() -> None:
    """The planner's estimate says the next request fits beside an idle
    session's pin; the memory server (which also counts idle cached blocks a
    prompt would reuse) refuses it. Refused while the pin stays, it would
    wait forever; the pin on that pool gives way instead."""
    async with running(SchedulerConfig(), {"cpu": FakeDriver(64)}) as (engine, backend):
        first = Stream(engine, prompt_ids=TOK.encode("a conversation"), max_tokens=8, session="chat")
        await first.result()
        await until(lambda: engine.sessions.get("", "chat").info().kv_where == "device", "pinned")
        real_reserve = backend.reserve
        refused = 0

        async def reserve(req: mp.Reserve) -> mp.ReserveReply:
            nonlocal refused
            if not engine.sessions.pinned():
                return await real_reserve(req)
            refused += 1  # "out of blocks" for every new sequence while a pin is held
            rest = [i for i in req.seqs if i.start > 0]
            granted = iter((await real_reserve(mp.Reserve(rest))).seqs if rest else [])
            return mp.ReserveReply([next(granted) if i.start > 0 else
                                    mp.SeqBlocks(i.seq_id, error=Error(ErrorCode.OVERLOADED, "out of blocks"))
                                    for i in req.seqs])

        backend.reserve = reserve  # type: ignore[method-assign]
        other = Stream(engine, prompt="another tenant's request", max_tokens=6)
        final = await other.result()
    assert refused >= 1 and other.tokens(final) == expected("another tenant's request", 6)
