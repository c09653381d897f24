"""The engine loop with the real MemoryManager and fake paged drivers, no sockets."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from ipc.errors import BadRequest, DeadlineExceeded, Overloaded
from ipc.protocol import memory as mp
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import Finished, FinishReason, Submit
from common.config.scheduler import SchedulerConfig, TunerConfig
from services.scheduler.engine import Engine, Model
from tests.helpers.scheduler_fakes import GREEDY, TOK, FakeDriver, InProcessBackend, Stream, expected, reference, running

# The tests whose point is what given limits do (chunk sizes, preemption at a
# batch of 8) keep them fixed: the tuner (on by default) may only lower them.
FIXED = TunerConfig(enabled=False)

async def wait_blocks_free(backend: InProcessBackend) -> None:
    with anyio.fail_after(10):
        while any(p.used for p in backend.memory.stats(mp.MemoryStats()).pools):
            await anyio.sleep(0)


async def test_greedy_generation_streams_contiguous_deltas_equal_to_the_reference() -> None:
    async with running() as (engine, backend):
        s = Stream(engine, prompt="hello there", max_tokens=20)
        final = await s.result()
        await wait_blocks_free(backend)
    assert final.finish_reason == FinishReason.LENGTH
    assert s.tokens(final) == expected("hello there", 20)
    assert s.text(final) == TOK.decode(expected("hello there", 20))
    assert len(s.events) == 19  # one delta per step; the 20th token rides on Finished
    assert final.usage.prompt_tokens == len(TOK.encode("hello there")) and final.usage.completion_tokens == 20


async def test_many_requests_with_few_blocks_preempt_and_still_match_the_reference() -> None:
    # 12 blocks of 4 slots: a handful of 30-token sequences cannot all fit.
    config = SchedulerConfig(token_budget=16, max_num_seqs=8, prefill_chunk=8, tuner=FIXED)
    async with running(config, {"cpu": FakeDriver(12)}) as (engine, backend):
        prompts = [f"prompt number {i}" for i in range(6)]
        streams = [Stream(engine, prompt=p, max_tokens=14, request_id=f"r{i}") for i, p in enumerate(prompts)]
        finals = [await s.result() for s in streams]
        assert engine.preemptions > 0
        driver = backend.drivers["cpu"]
        assert max(driver.tokens_per_step) <= 16 and max(driver.batch_sizes) <= 8
    for p, s, f in zip(prompts, streams, finals):
        assert s.tokens(f) == expected(p, 14)
    assert any(f.usage.preemptions for f in finals)


async def test_long_prompts_are_prefilled_in_chunks_within_the_budget() -> None:
    config = SchedulerConfig(token_budget=8, prefill_chunk=8, tuner=FIXED)
    async with running(config) as (engine, backend):
        prompt = "a long prompt that needs several prefill chunks"
        s = Stream(engine, prompt=prompt, max_tokens=3)
        final = await s.result()
        sizes = backend.drivers["cpu"].tokens_per_step
    assert s.tokens(final) == expected(prompt, 3)
    assert max(sizes) <= 8 and sizes[0] == 8 and len(sizes) >= len(TOK.encode(prompt)) // 8 + 2


async def test_stop_strings_cut_the_text_and_are_held_back_while_they_may_match() -> None:
    full = TOK.decode(expected("stop test", 30))
    stop = full[10:13]
    cut = full.index(stop)
    async with running() as (engine, _):
        s = Stream(engine, prompt="stop test", max_tokens=30, stop=[stop])
        final = await s.result()
    assert final.finish_reason == FinishReason.STOP
    assert s.text(final) == full[:cut]
    # no delta ever showed text past the cut
    assert all(stop not in ev.text for ev in s.events)  # type: ignore[attr-defined]


async def test_eos_and_stop_token_ids_end_the_request() -> None:
    ids = expected("eos", 10)
    async with running() as (engine, _):
        s = Stream(engine, prompt="eos", max_tokens=10, stop_token_ids=[ids[4]])
        final = await s.result()
    assert final.finish_reason == FinishReason.STOP
    got = s.tokens(final)
    assert got == ids[:ids.index(ids[4]) + 1]


async def test_cancel_ends_the_request_and_frees_its_blocks() -> None:
    async with running() as (engine, backend):
        s = Stream(engine, prompt="cancel me", max_tokens=200, request_id="c1")
        with anyio.fail_after(10):
            while not s.events:
                await anyio.sleep(0)
        assert engine.cancel("", "c1")
        final = await s.result()
        assert final.finish_reason == FinishReason.CANCELLED
        assert s.tokens(final) == expected("cancel me", len(s.tokens(final)))
        await wait_blocks_free(backend)
        assert not engine.cancel("", "c1")  # finished: nothing to cancel


async def test_deadline_before_the_first_token_is_an_error_and_after_it_a_finish_reason() -> None:
    import time

    import msgspec

    async with running() as (engine, _):
        past = Stream(engine, prompt="late", max_tokens=5, deadline_ns=time.time_ns() - 1)
        with pytest.raises(DeadlineExceeded):
            await past.result()
        soon = Stream(engine, prompt="soon", max_tokens=200, deadline_ns=time.time_ns() + 10**12)
        with anyio.fail_after(10):
            while not soon.events:
                await anyio.sleep(0)
        # The deadline passes once it has started (set, not waited for: no timing in tests).
        req = soon.sink.request
        req.submit = msgspec.structs.replace(req.submit, deadline_ns=time.time_ns())
        final = await soon.result()
    assert final.finish_reason == FinishReason.DEADLINE
    got = soon.tokens(final)
    assert 0 < len(got) < 200 and got == expected("soon", len(got))


async def test_a_full_queue_is_overloaded_with_retry_after_and_only_known_requests_reattach() -> None:
    config = SchedulerConfig(max_waiting=2)
    backend = InProcessBackend({"cpu": FakeDriver(64)})
    engine = Engine(config, backend)  # not running: nothing leaves the queue
    engine.driver_up("cpu", backend.drivers["cpu"].meta)
    engine.set_model(Model(TOK, frozenset(TOK.eos_token_ids), 256))
    for i in range(2):
        engine.submit(Submit(prompt=f"q{i}", request_id=f"q{i}"), "", lambda m: None)
    with pytest.raises(Overloaded) as info:
        engine.submit(Submit(prompt="one too many"), "", lambda m: None)
    assert info.value.detail["retry_after_s"] > 0
    # What the client claims (attempt, resume_ids) admits nothing: an id the
    # scheduler does not know is a new request.
    with pytest.raises(Overloaded):
        engine.submit(Submit(prompt="resubmitted", request_id="x", attempt=1), "", lambda m: None)
    with pytest.raises(Overloaded):
        engine.submit(Submit(prompt="resubmitted", request_id="x", attempt=1, resume_from=1, resume_ids=[97]),
                      "", lambda m: None)
    # A request it does know re-attaches, whatever the queue holds.
    sink = engine.submit(Submit(prompt="q0", request_id="q0", attempt=1), "", lambda m: None)
    assert sink.attached and len(engine.state.waiting) == 2


async def test_bad_submissions_name_the_field() -> None:
    async with running() as (engine, _):
        for kw, field in [({"prompt": ""}, "prompt"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                          ({"prompt": "x", "stop": [""]}, "stop"),
                          ({"prompt": "x", "params": SamplingParams(top_p=0)}, "top_p"),
                          ({"prompt": "x", "request_id": "r", "resume_from": 2, "resume_ids": [1]}, "resume_ids"),
                          ({"prompt": "x" * 300}, "prompt")]:
            with pytest.raises(BadRequest, match=field):
                engine.submit(Submit(**kw), "", lambda m: None)


async def test_a_request_is_held_to_what_the_largest_kv_pool_can_hold() -> None:
    # 8 blocks of 4 slots: 32 positions, fewer than the model's 256. A
    # request that could outgrow the pool ends at its size (`length`) rather
    # than preempting itself forever; a prompt that cannot fit is refused.
    async with running(None, {"cpu": FakeDriver(8)}) as (engine, _):
        s = Stream(engine, prompt="twelve bytes", max_tokens=100)
        final = await s.result()
        assert final.finish_reason == FinishReason.LENGTH
        assert s.tokens(final) == expected("twelve bytes", 32 - len(TOK.encode("twelve bytes")))
        with pytest.raises(BadRequest, match="KV cache holds at most 31"):
            engine.submit(Submit(prompt="y" * 40), "", lambda m: None)


async def test_resubmission_with_resume_ids_continues_without_repeating_a_token() -> None:
    ids = expected("resume", 16)
    async with running() as (engine, _):
        s = Stream(engine, prompt="resume", max_tokens=16, request_id="r", resume_from=6, resume_ids=ids[:6])
        final = await s.result()
    assert s.events and s.events[0].offset == 6  # type: ignore[attr-defined]
    assert s.tokens(final) == ids
    assert TOK.decode(ids[:6]) + s.text(final) == TOK.decode(ids)


async def test_resubmission_by_count_regenerates_silently_up_to_resume_from() -> None:
    ids = expected("by count", 12)
    async with running() as (engine, _):
        s = Stream(engine, prompt="by count", max_tokens=12, request_id="r2", resume_from=5)
        final = await s.result()
    got = list(ids[:5])
    for ev in [*s.events, final]:
        assert ev.offset == len(got)  # type: ignore[attr-defined]
        got.extend(ev.token_ids)  # type: ignore[attr-defined]
    assert got == ids


async def test_a_finished_request_resubmitted_gets_its_tail_again() -> None:
    async with running() as (engine, _):
        s = Stream(engine, prompt="once", max_tokens=8, request_id="once")
        first = await s.result()
        again = Stream(engine, prompt="once", max_tokens=8, request_id="once", resume_from=5, attempt=1)
        final = await again.result()
    assert final.offset == 5 and final.token_ids == s.tokens(first)[5:]
    assert engine.num_finished == 1  # it ran once


async def test_driver_death_requeues_its_sequences_for_recompute_on_another_driver() -> None:
    drivers = {"a": FakeDriver(64), "b": FakeDriver(64)}
    async with running(SchedulerConfig(), drivers) as (engine, backend):
        streams = [Stream(engine, prompt=f"seq {i}", max_tokens=30) for i in range(4)]
        with anyio.fail_after(10):
            while sum(len(s.events) for s in streams) < 20:
                await anyio.sleep(0)
        placed = {s.sink.request.seq.pool for s in streams}
        assert placed == {"a", "b"}  # spread by free blocks
        drivers["a"].alive = False
        backend.memory.drop_pool(mp.DropPool("a"))
        engine.driver_down("a")
        finals = [await s.result() for s in streams]
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert s.tokens(f) == expected(f"seq {i}", 30)
        assert s.sink.request.seq.pool == "b"


async def test_memory_restart_reregisters_live_sequences_without_recompute() -> None:
    # (each step planned after the last came back: with async steps, the step
    # sent ahead across the restart is recomputed, tests/unit/test_scheduler_async_steps.py)
    async with running(SchedulerConfig(async_steps=False)) as (engine, backend):
        streams = [Stream(engine, prompt=f"mem {i}", max_tokens=40) for i in range(3)]
        with anyio.fail_after(10):
            while sum(len(s.events) for s in streams) < 15:
                await anyio.sleep(0)
        engine.memory_down()
        backend.restart_memory()
        engine.memory_restarted()
        finals = [await s.result() for s in streams]
        computed = sum(backend.drivers["cpu"].tokens_per_step)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert s.tokens(f) == expected(f"mem {i}", 40)
    # every position's KV computed exactly once: the driver's blocks were adopted, not recomputed
    assert computed == sum(len(TOK.encode(f"mem {i}")) + 40 - 1 for i in range(3))


async def test_session_requests_run_one_at_a_time_in_arrival_order() -> None:
    order: list[str] = []
    async with running() as (engine, _):
        streams = []
        for i in range(3):
            s = Stream(engine, prompt=f"turn {i}", max_tokens=5, session="chat", request_id=f"t{i}")
            streams.append(s)
        with anyio.fail_after(10):
            for s in streams:
                await s.result()
                order.append(s.submit.request_id)
                # the others of the session have not started while it ran
        finals = [await s.result() for s in streams]
    starts = [s.sink.request.first_scheduled for s in streams]
    ends = [s.sink.request.finished_at for s in streams]
    assert starts[1] >= ends[0] and starts[2] >= ends[1]
    assert all(f.finish_reason == FinishReason.LENGTH for f in finals)


async def test_a_sequence_is_placed_only_on_a_pool_that_can_hold_it_whole() -> None:
    # "small" holds 24 positions, "big" 256. While big is busy, small has
    # more free blocks — but a 46-position request placed there could only
    # ever preempt itself (a sequence stays on its pool).
    config = SchedulerConfig(token_budget=64, max_num_seqs=8, prefill_chunk=64, tuner=FIXED)
    drivers = {"small": FakeDriver(6), "big": FakeDriver(64)}
    async with running(config, drivers) as (engine, _):
        busy = [Stream(engine, prompt=f"{i}" + "x" * 55, max_tokens=12, request_id=f"busy{i}") for i in range(4)]
        with anyio.fail_after(10):
            while not all(s.sink.request.seq in engine.state.running and s.sink.request.seq.block_table for s in busy):
                await anyio.sleep(0)
        long = Stream(engine, prompt="hello", max_tokens=40, request_id="long")
        later = Stream(engine, prompt="a later one", max_tokens=4, request_id="later")
        final, after = await long.result(), await later.result()
        for s in busy:
            await s.result()
    assert long.sink.request.seq.pool == "big"
    assert long.tokens(final) == expected("hello", 40) and later.tokens(after) == expected("a later one", 4)


# -- KV-block quotas (issue 13 #3): blocks of 4 slots, one pool of 64 ------------------


class TenantStream(Stream):
    def __init__(self, engine: Engine, principal: str, **kw: Any):
        self.events = []
        kw.setdefault("params", GREEDY)
        self.submit = Submit(**kw)
        self.sink = engine.submit(self.submit, principal, self.events.append)


async def until(cond: Any) -> None:
    with anyio.fail_after(10):
        while not cond():
            await anyio.sleep(0)


async def test_a_request_that_can_never_fit_its_kv_quota_is_refused_with_the_numbers() -> None:
    async with running() as (engine, _):
        engine.set_kv_quotas({"alice": 2})
        # 4 prompt tokens + 20 to generate: 23 positions = 6 blocks of 4, over a quota of 2
        with pytest.raises(BadRequest, match=r"kv_blocks\) of 2; this request needs 6 blocks of 4 tokens .*"
                                             r"prompt \(4 tokens\) and max_tokens \(20\).* max_tokens 5 or less") as ei:
            TenantStream(engine, "alice", prompt_ids=[1, 2, 3, 4], max_tokens=20)
        assert ei.value.detail == {"field": "max_tokens", "quota": "kv_blocks", "limit": 2, "needed": 6,
                                   "block_size": 4}
        # a prompt that alone is over it says so
        with pytest.raises(BadRequest, match="its prompt alone needs 3 blocks"):
            TenantStream(engine, "alice", prompt_ids=list(range(1, 10)), max_tokens=1)
        # the largest that fits is taken, and the others are not limited
        fits = TenantStream(engine, "alice", prompt_ids=[1, 2, 3, 4], max_tokens=5)
        bob = TenantStream(engine, "bob", prompt_ids=[1, 2, 3, 4], max_tokens=20)
        assert fits.tokens(await fits.result()) == reference([1, 2, 3, 4], 5)
        assert bob.tokens(await bob.result()) == reference([1, 2, 3, 4], 20)
        assert engine.stats().kv_quota_refused == 2


async def test_a_request_that_fits_later_waits_visibly_on_its_quota_and_others_go_on() -> None:
    async with running() as (engine, backend):
        engine.set_kv_quotas({"alice": 4})
        backend.hold_steps = anyio.Event()  # the first step stays in flight while we look
        with capture_logs() as logs:
            # a: 13 prompt tokens = all 4 of alice's blocks from its first step
            a = TenantStream(engine, "alice", prompt_ids=list(range(1, 14)), max_tokens=3, request_id="a")
            b = TenantStream(engine, "alice", prompt_ids=[5, 6, 7, 8], max_tokens=4, request_id="b")
            c = TenantStream(engine, "bob", prompt_ids=[5, 6, 7, 8], max_tokens=4, request_id="c")
            await until(lambda: backend.reserves > 0)
            info = engine.request_info("alice", "b")
            assert info.state == "waiting" and info.waiting_on == "kv_quota"
            assert engine.request_info("bob", "c").state == "running"  # bob's request was not held back
            assert engine.request_info("alice", "a").waiting_on == ""
            st = engine.stats()
            assert [(w.tenant, w.requests, w.held, w.limit) for w in st.quota_waits] == [("alice", 1, 4, 4)]
            backend.hold_steps.set()
            backend.hold_steps = None
            fa, fb, fc = await a.result(), await b.result(), await c.result()
        assert b.sink.request.first_scheduled >= a.sink.request.finished_at  # it ran once a had ended
        assert a.tokens(fa) == reference(list(range(1, 14)), 3)
        assert b.tokens(fb) == reference([5, 6, 7, 8], 4) and c.tokens(fc) == reference([5, 6, 7, 8], 4)
        waits = [e for e in logs if e["event"] == "scheduler.waiting_on_quota"]
        assert [(e["request_id"], e["held"], e["limit"]) for e in waits] == [("b", 4, 4)]  # once
        assert engine.request_info("alice", "b").waiting_on == "" and engine.stats().quota_waits == []


async def test_a_tenants_growing_requests_share_its_quota_without_deadlock() -> None:
    # Two requests of 4 blocks each under a quota of 6: both start with one
    # block, then grow into each other. The less important one is preempted
    # for the other (before, both held their blocks and waited forever).
    config = SchedulerConfig(token_budget=64, max_num_seqs=8, prefill_chunk=64, tuner=FIXED)
    async with running(config) as (engine, backend):
        engine.set_kv_quotas({"alice": 6})
        streams = [TenantStream(engine, "alice", prompt_ids=[i, 2, 3, 4], max_tokens=12, request_id=f"r{i}")
                   for i in (1, 2)]
        finals = [await s.result() for s in streams]
        await wait_blocks_free(backend)
    for i, s, f in zip((1, 2), streams, finals):
        assert f.finish_reason == FinishReason.LENGTH and s.tokens(f) == reference([i, 2, 3, 4], 12)
    assert sum(f.usage.preemptions for f in finals) >= 1


async def test_a_waiting_request_is_refused_when_its_quota_is_lowered_below_it() -> None:
    async with running() as (engine, backend):
        engine.set_kv_quotas({"alice": 4})
        backend.hold_steps = anyio.Event()
        a = TenantStream(engine, "alice", prompt_ids=list(range(1, 14)), max_tokens=3, request_id="a")
        b = TenantStream(engine, "alice", prompt_ids=[5, 6, 7, 8], max_tokens=4, request_id="b")
        await until(lambda: engine.request_info("alice", "b").waiting_on == "kv_quota")
        engine.set_kv_quotas({"alice": 1})  # b needs 2 blocks: it can never run now
        backend.hold_steps.set()
        backend.hold_steps = None
        with pytest.raises(BadRequest, match=r"kv_blocks\) of 1; this request needs 2 blocks"):
            await b.result()
        # a holds all the blocks it will ever need: it is not cut short
        fa = await a.result()
        assert fa.finish_reason == FinishReason.LENGTH and a.tokens(fa) == reference(list(range(1, 14)), 3)


async def test_a_quota_only_the_memory_server_knows_is_learned_and_refuses_what_cannot_fit() -> None:
    # The memory server's own limit (its config), not the policy's: the first
    # refusal teaches it; a request that outgrows it ends with the numbers
    # instead of waiting forever with the blocks it holds.
    async with running() as (engine, backend):
        backend.memory.set_block_quota(mp.SetBlockQuota("alice", 2))
        s = TenantStream(engine, "alice", prompt_ids=[1, 2, 3, 4], max_tokens=20)
        final = await s.result()
        assert final.finish_reason == FinishReason.ERROR
        assert "kv_blocks) of 2; this request needs 6 blocks" in final.error
        assert engine.kv_quotas == {"alice": 2}
        # from now on such a request is refused at once
        with pytest.raises(BadRequest, match="kv_blocks"):
            TenantStream(engine, "alice", prompt_ids=[1, 2, 3, 4], max_tokens=20)
        fits = TenantStream(engine, "alice", prompt_ids=[1, 2, 3, 4], max_tokens=5)
        assert fits.tokens(await fits.result()) == reference([1, 2, 3, 4], 5)
