"""A finished session turn's epilogue (issue 18): the pin gets the KV of the
turn's final token (one position, no sample) after the answer went out, so
the next turn reuses the whole history; a next turn that arrives first waits
for it; a failed epilogue or a driver restart drops the pin and the next turn
recomputes (its cached_tokens shows it); one without a block under its
tenant's quota is skipped (the pin stays); a suspend before it defers it to
the resume. Over the real engine loop and memory manager with the fake
paged drivers, which derive each token from the KV they read back, so
unwritten or stale KV changes the answer."""

from __future__ import annotations

import anyio

from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from services.scheduler.engine import Engine
from tests.helpers.scheduler_fakes import (FakeDriver, InProcessBackend, Stream, TOK, executes, reference,
                                           running)

FIRST = TOK.encode("the first turn of a chat")
SECOND = TOK.encode(" and the second", add_special_tokens=False)


def item(ex: dp.Execute, seq_id: int) -> dp.StepSeq | dp.StepDelta | None:
    items: list[dp.StepSeq | dp.StepDelta] = [*ex.steps, *ex.deltas]
    return next((s for s in items if s.seq_id == seq_id), None)


async def until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(10):
        while not cond():
            await anyio.sleep(0)


async def finish_with_epilogue_held(backend: InProcessBackend, s: Stream) -> None:
    """Let the turn's steps through one by one until it finished and the
    next Execute (its epilogue) waits."""
    backend.hold_steps = anyio.Event()
    req = s.sink.request
    with anyio.fail_after(10):
        while not (req.done.is_set() and backend.held):
            if backend.held and not req.done.is_set() and backend.hold_steps is not None:
                backend.hold_steps.set()
                backend.hold_steps = anyio.Event()
            await anyio.sleep(0)


def settled(engine: Engine) -> bool:
    return not engine.sessions.epilogues and not engine.sessions.flying


async def test_the_epilogue_computes_exactly_the_final_token_without_sampling_after_the_answer() -> None:
    driver = FakeDriver(64)
    async with running(None, {"cpu": driver}) as (engine, backend):
        s = Stream(engine, prompt_ids=FIRST, max_tokens=7, session="chat")
        await finish_with_epilogue_held(backend, s)
        final = await s.result()  # answered while the epilogue's step waits on the driver
        seq = s.sink.request.seq
        assert s.tokens(final) == reference(FIRST, 7) and final.usage.completion_tokens == 7
        assert seq.epilogue and seq.num_computed == len(seq.tokens) - 1
        n = len(executes(backend))
        backend.let_go()
        await until(lambda: settled(engine), "the epilogue ran")
        epilogue = item(executes(backend)[n], seq.seq_id)
        assert epilogue is not None
        assert (list(epilogue.token_ids), epilogue.start_pos, epilogue.sample) == ([seq.tokens[-1]], len(seq.tokens) - 1,
                                                                                   False)
        p = len(seq.tokens) - 1
        assert driver.kv[seq.block_table[p // driver.block_size]][p % driver.block_size] == seq.tokens[-1]
        assert seq.num_computed == seq.mem_known == len(seq.tokens) == len(FIRST) + 7
        assert not seq.epilogue and engine.sessions.get("", "chat").pinned is seq
        assert engine.sessions.describe("", "chat").kv_tokens == len(seq.tokens)
        # no token was sampled for it: nothing more reached the client, nothing was appended
        assert len(s.sink.request.generated) == 7 and s.events == [e for e in s.events if e is not final]
        assert engine.sessions.describe("", "chat").history_tokens == len(FIRST) + 7
        second = Stream(engine, prompt_ids=SECOND, max_tokens=5, session="chat")
        f2 = await second.result()
    history = FIRST + s.tokens(final)
    assert second.tokens(f2) == reference(history + SECOND, 5)
    assert f2.usage.cached_tokens == len(history)  # the whole history, its last token too


async def test_a_next_turn_that_arrives_before_the_epilogue_ran_waits_for_it() -> None:
    async with running() as (engine, backend):
        s = Stream(engine, prompt_ids=FIRST, max_tokens=6, session="chat")
        await finish_with_epilogue_held(backend, s)
        f1 = await s.result()
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")  # while it is held
        session = engine.sessions.get("", "chat")
        assert session.active is None and list(session.queue) == [second.sink.request]
        assert second.sink.request.seq not in engine.state.waiting  # it starts once the pin is whole
        # and a third queues behind the second
        third = Stream(engine, prompt_ids=TOK.encode(" third", add_special_tokens=False), max_tokens=4,
                       session="chat")
        backend.let_go()
        f2, f3 = await second.result(), await third.result()
    history = FIRST + s.tokens(f1)
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens == len(history) and f2.finish_reason == FinishReason.LENGTH
    history += SECOND + second.tokens(f2)
    assert third.tokens(f3) == reference(history + TOK.encode(" third", add_special_tokens=False), 4)
    assert f3.usage.cached_tokens == len(history)


async def test_a_failed_epilogue_drops_the_pin_and_the_next_turn_recomputes() -> None:
    driver = FakeDriver(64)
    async with running(None, {"cpu": driver}) as (engine, backend):
        s = Stream(engine, prompt_ids=FIRST, max_tokens=6, session="chat")
        await finish_with_epilogue_held(backend, s)
        f1 = await s.result()
        seq = s.sink.request.seq
        real = driver.execute

        def execute(req: dp.Execute) -> dp.Executed:
            got = real(req)  # the fake wrote the slot; the driver says the sequence failed
            return dp.Executed([dp.SeqOutput(o.seq_id, error="injected") if o.seq_id == seq.seq_id else o
                                for o in got.outputs])

        driver.execute = execute  # type: ignore[method-assign]
        backend.let_go()
        await until(lambda: settled(engine), "the epilogue settled")
        driver.execute = real  # type: ignore[method-assign]
        assert engine.sessions.describe("", "chat").kv_tokens == 0  # the pin went with its KV
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")
        f2 = await second.result()
    history = FIRST + s.tokens(f1)
    assert f1.finish_reason == FinishReason.LENGTH and f2.turn == 2
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens < len(history) - 1  # recomputed: the discarded blocks were not cached


async def test_a_driver_restart_between_turns_drops_the_pin_and_the_next_turn_recomputes() -> None:
    driver = FakeDriver(64)
    async with running(None, {"cpu": driver}) as (engine, backend):
        s = Stream(engine, prompt_ids=FIRST, max_tokens=6, session="chat")
        f1 = await s.result()
        await until(lambda: settled(engine), "the epilogue ran")
        assert engine.sessions.describe("", "chat").kv_tokens == len(FIRST) + 6
        driver.restart()  # its KV is gone; the memory server forgets the pool
        backend.memory.register_pool(mp.RegisterPool("cpu", driver.num_blocks, driver.block_size))
        engine.driver_down("cpu")
        engine.driver_up("cpu", driver.meta)
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")
        f2 = await second.result()
        assert engine.sessions.describe("", "chat").turns == 2
    history = FIRST + s.tokens(f1)
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens == 0 and f2.usage.history_tokens == len(history)  # all recomputed


async def test_a_driver_restart_during_the_epilogue_drops_the_pin() -> None:
    driver = FakeDriver(64)
    async with running(None, {"cpu": driver}) as (engine, backend):
        s = Stream(engine, prompt_ids=FIRST, max_tokens=6, session="chat")
        await finish_with_epilogue_held(backend, s)
        f1 = await s.result()
        driver.restart()  # while the epilogue's Execute waits
        backend.memory.register_pool(mp.RegisterPool("cpu", driver.num_blocks, driver.block_size))
        engine.driver_up("cpu", driver.meta)  # a restart the engine did not see die
        backend.let_go()
        await until(lambda: settled(engine), "the epilogue settled")
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")
        f2 = await second.result()
    history = FIRST + s.tokens(f1)
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens == 0


async def test_an_epilogue_its_tenants_quota_has_no_block_for_is_skipped_and_the_pin_stays() -> None:
    prompt = TOK.encode("12345678")  # 9 ids: with 4 generated, 12 positions computed fill 3 blocks of 4
    async with running() as (engine, backend):
        engine.set_kv_quotas({"default": 3})  # the last token's position would need a 4th
        s = Stream(engine, prompt_ids=prompt, max_tokens=4, session="chat")
        f1 = await s.result()
        await until(lambda: settled(engine), "the epilogue skipped")
        seq = s.sink.request.seq
        assert len(seq.tokens) == 13 and len(seq.block_table) == 3 and not seq.epilogue
        assert engine.sessions.describe("", "chat").kv_tokens == 12  # pinned as it was
        assert all(item(ex, seq.seq_id) is None or item(ex, seq.seq_id).sample  # type: ignore[union-attr]
                   for ex in executes(backend))  # no step ran without sampling
        engine.set_kv_quotas({})
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")
        f2 = await second.result()
    history = prompt + s.tokens(f1)
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens == len(history) - 1  # the last token recomputed by this turn


async def test_a_session_suspended_before_its_epilogue_ran_runs_it_after_resume() -> None:
    async with running(None, {"cpu": FakeDriver(64, host_slots=64)}) as (engine, backend):
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt_ids=FIRST, max_tokens=6, session="chat")
        req = s.sink.request
        with anyio.fail_after(10):  # up to the step that samples the last token, held
            while not (len(req.generated) == 5 and backend.held):
                if backend.held and backend.hold_steps is not None:
                    backend.hold_steps.set()
                    backend.hold_steps = anyio.Event()
                await anyio.sleep(0)
        engine.sessions.suspend("", "chat")  # applied at the top of the next step, before its epilogue
        backend.let_go()
        f1 = await s.result()
        await until(lambda: engine.sessions.get("", "chat").info().kv_where == "swap", "swapped out")
        assert engine.sessions.describe("", "chat").kv_tokens == len(FIRST) + 5  # its last token has no KV yet
        engine.sessions.resume("", "chat")
        await until(lambda: engine.sessions.describe("", "chat").kv_tokens == len(FIRST) + 6, "its epilogue ran")
        second = Stream(engine, prompt_ids=SECOND, max_tokens=6, session="chat")
        f2 = await second.result()
    history = FIRST + s.tokens(f1)
    assert second.tokens(f2) == reference(history + SECOND, 6)
    assert f2.usage.cached_tokens == len(history)
