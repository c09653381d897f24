"""A scheduler killed between a step's Reserve and its Execute (the session
history defect): the memory server had reserved that step's slots and knew
their tokens, but the driver never wrote their KV. The next scheduler's
boot releases the dead one's sequences (`Reregister([], replace=True)`);
their blocks must not reach the prefix cache as computed, or the next
request on the same tokens is served KV that was never written (a real
driver then reads a zeroed or stale slot: in the integration test of a
session through a scheduler SIGKILL, the turns after the restart reused the
history's block whose last slot turn 2's epilogue never wrote, and the
second of them took a runner-up token about once in 14 runs under load).

Over the real engine loop and memory manager with the fake paged driver,
which derives each token from the KV it reads back (an unwritten slot is an
error), so serving a slot that was never computed changes the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from common.config.scheduler import SchedulerConfig
from ipc.protocol import memory as mp
from services.scheduler._history import Histories, HistoryStore
from services.scheduler.engine import Engine, Model
from tests.helpers.scheduler_fakes import TOK, FakeDriver, InProcessBackend, Stream, expected, reference, running

BS = 4  # the fake driver's block size


@asynccontextmanager
async def scheduler(backend: InProcessBackend, home: Path,
                    config: SchedulerConfig | None = None) -> AsyncIterator[Engine]:
    """One scheduler instance over `backend` (the memory server and driver
    outlive it), booting as the service does; leaving the block kills it:
    whatever it had in flight is abandoned."""
    await backend.reregister(mp.Reregister([], replace=True))  # service._boot's clean slate
    engine = Engine(config or SchedulerConfig(), backend)
    engine.sessions.histories = Histories(HistoryStore(home / "sessions"))
    for name, d in backend.drivers.items():
        engine.driver_up(name, d.meta)
    engine.set_model(Model(TOK, frozenset(TOK.eos_token_ids), 256))
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        try:
            yield engine
        finally:
            tg.cancel_scope.cancel()


async def until_held(backend: InProcessBackend, cond) -> None:  # type: ignore[no-untyped-def]
    """Let Executes through one by one until `cond()` holds and the next one waits."""
    with anyio.fail_after(10):
        while not (cond() and backend.held):
            if backend.held and not cond() and backend.hold_steps is not None:
                backend.hold_steps.set()
                backend.hold_steps = anyio.Event()
            await anyio.sleep(0)


async def test_a_restored_sessions_turn_after_a_kill_before_the_epilogue_ran_answers_from_its_history(
        tmp_path: Path) -> None:
    driver = FakeDriver(64, BS)
    backend = InProcessBackend({"cpu": driver})
    first = TOK.encode("the first turn")  # BOS + 14 tokens, 5 generated: the history fills 5 blocks
    second = TOK.encode(" and the next", add_special_tokens=False)
    async with scheduler(backend, tmp_path) as engine:
        s = Stream(engine, prompt_ids=first, max_tokens=5, session="chat")
        backend.hold_steps = anyio.Event()
        await until_held(backend, s.sink.request.done.is_set)
        final = await s.result()
        await engine.sessions.histories.persist(("", "chat"))  # before the answer goes out, as the service does
        history = first + s.tokens(final)
        assert len(history) % BS == 0
        # The epilogue's Reserve (the final token's slot, completing the last
        # block) reached the memory server; its Execute waits on the driver.
        seq = s.sink.request.seq
        assert seq.epilogue and backend.memory.sequence(seq.seq_id).num_slots == len(history)
    backend.hold_steps = None  # the scheduler is gone: its epilogue never runs
    p = len(history) - 1
    assert driver.kv[seq.block_table[p // BS]][p % BS] is None

    async with scheduler(backend, tmp_path) as engine:
        assert await engine.sessions.histories.ensure(("", "chat")) is not None  # from disk, as the service does
        turn = Stream(engine, prompt_ids=second, max_tokens=8, session="chat")
        got = await turn.result()
    assert got.error == "", got.error
    assert got.usage.history_tokens == len(history)
    assert turn.tokens(got) == reference(history + second, 8)
    assert got.usage.cached_tokens < len(history)  # the last block is recomputed


async def test_a_prompt_resubmitted_after_a_kill_before_its_prefill_chunk_ran_is_answered_from_its_tokens(
        tmp_path: Path) -> None:
    # The tuner's cut budget chunks a prefill the same way: each chunk's
    # Reserve comes first, with every prompt token it knows.
    driver = FakeDriver(64, BS)
    backend = InProcessBackend({"cpu": driver})
    prompt = TOK.encode("a prompt long enough for three chunks")
    config = SchedulerConfig(prefill_chunk=8, token_budget=8)
    async with scheduler(backend, tmp_path, config) as engine:
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt_ids=prompt, max_tokens=4, request_id="r")
        await until_held(backend, lambda: True)  # the first chunk's Execute waits
        seq = s.sink.request.seq
        assert 0 < backend.memory.sequence(seq.seq_id).num_slots < len(prompt)
    backend.hold_steps = None
    assert not driver.kv  # nothing was ever written

    async with scheduler(backend, tmp_path, config) as engine:
        again = Stream(engine, prompt_ids=prompt, max_tokens=4, request_id="r")
        got = await again.result()
    assert got.error == "", got.error
    assert again.tokens(got) == reference(prompt, 4)


async def test_a_scheduler_restart_mid_decode_keeps_the_prefix_cache_but_for_the_last_steps(
        tmp_path: Path) -> None:
    """Released as not computed, a dead scheduler's sequences still leave in
    the prefix cache every block an earlier Reserve reported computed: the
    re-submitted request recomputes only the last steps' blocks, not all."""
    driver = FakeDriver(64, BS)
    backend = InProcessBackend({"cpu": driver})
    prompt = TOK.encode("a prompt that fills several blocks")
    async with scheduler(backend, tmp_path) as engine:
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt_ids=prompt, max_tokens=40, request_id="r")
        await until_held(backend, lambda: len(s.sink.request.seq.tokens) >= len(prompt) + 15)
        seq = s.sink.request.seq
        computed, tokens = seq.num_computed, list(seq.tokens)
    backend.hold_steps = None

    async with scheduler(backend, tmp_path) as engine:
        again = Stream(engine, prompt_ids=tokens, max_tokens=4)
        got = await again.result()
    assert got.error == "", got.error
    assert again.tokens(got) == reference(tokens, 4)
    # The block the last executed step filled was never reported computed: only it is recomputed.
    assert got.usage.cached_tokens >= (computed // BS - 1) * BS, (got.usage.cached_tokens, computed)


async def test_a_reserve_the_restarted_memory_server_answered_before_the_reregistration_runs_nothing() -> None:
    """The chaos run's wrong token: the memory server restarted while the
    scheduler was stopped, and a new request's first Reserve reached the new,
    empty server before the scheduler re-registered its live sequences. That
    server handed out the blocks the driver still held for a decoding
    sequence; the new prompt's prefill wrote over their KV, and the decoding
    sequence's next token was read from it. The restart's notice reaches the
    scheduler before that reply (one connection, in order): the reply must
    start nothing."""
    drivers = {"cpu": FakeDriver(64, BS)}
    async with running(SchedulerConfig(), drivers) as (engine, backend):
        live = Stream(engine, prompt="The kernel routes messages", max_tokens=16, ignore_eos=True)
        with anyio.fail_after(10):
            while len(live.events) < 4:
                await anyio.sleep(0)
        reserve = backend.reserve
        restarted = False

        async def restart_under(req: mp.Reserve) -> mp.ReserveReply:
            nonlocal restarted
            if not restarted and any(i.start == 0 and i.tokens for i in req.seqs):
                restarted = True
                backend.restart_memory()
                engine.memory_restarted()  # its notice, read before the reply
            return await reserve(req)

        backend.reserve = restart_under  # type: ignore[method-assign]
        late = Stream(engine, prompt="another prompt, other tokens", max_tokens=8, ignore_eos=True)
        finals = [await live.result(), await late.result()]
    assert restarted
    assert [f.error for f in finals] == ["", ""]
    assert live.tokens(finals[0]) == expected("The kernel routes messages", 16)
    assert late.tokens(finals[1]) == expected("another prompt, other tokens", 8)


async def test_a_memory_server_restarted_again_while_being_reregistered_is_reregistered_too() -> None:
    """A second restart while the re-registration was out: the one that
    answered it is gone, and its successor knows nothing of the live
    sequences; it is told too before anything is reserved from it, so the
    decoding sequence keeps its KV and a new prompt gets blocks of its own.
    (Before: the flag was cleared though the server was new; the live
    sequence's next Reserve was refused as unknown and it was recomputed.)"""
    drivers = {"cpu": FakeDriver(64, BS)}
    async with running(SchedulerConfig(async_steps=False), drivers) as (engine, backend):
        live = Stream(engine, prompt="The kernel routes messages", max_tokens=16, ignore_eos=True)
        with anyio.fail_after(10):
            while len(live.events) < 4:
                await anyio.sleep(0)
        reregister = backend.reregister
        calls = 0

        async def restart_under(req: mp.Reregister) -> mp.ReregisterReply:
            nonlocal calls
            calls += 1
            first = backend.memory
            if calls == 1:
                backend.restart_memory()
                engine.memory_restarted()
                return first.reregister(req)  # answered by the one now gone
            return await reregister(req)

        backend.reregister = restart_under  # type: ignore[method-assign]
        engine.memory_down()
        backend.restart_memory()
        engine.memory_restarted()
        late = Stream(engine, prompt="another prompt, other tokens", max_tokens=8, ignore_eos=True)
        finals = [await live.result(), await late.result()]
        computed = sum(drivers["cpu"].tokens_per_step)
    assert [f.error for f in finals] == ["", ""]
    assert live.tokens(finals[0]) == expected("The kernel routes messages", 16)
    assert late.tokens(finals[1]) == expected("another prompt, other tokens", 8)
    # every position's KV computed once: the live sequence's blocks were adopted by the last server
    prompts = len(TOK.encode("The kernel routes messages")) + len(TOK.encode("another prompt, other tokens"))
    assert computed == prompts + 15 + 7
    assert calls == 2
