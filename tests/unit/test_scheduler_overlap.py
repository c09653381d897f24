"""The overlap (issue 15): the next steps' decode slots are reserved while a
step runs (up to `MAX_AHEAD` at once, so a steady decode calls the memory
server once in that many steps), so a steady step awaits one round trip;
overlapped slots are thrown away when the step fails, the driver restarts
or the memory server does, and a sequence that ends in step N gets no extra
token. Each step here is planned after the last came back (async_steps off)."""

from __future__ import annotations

import anyio

from common.config.scheduler import SchedulerConfig
from ipc.errors import BadRequest
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from services.scheduler._overlap import take_covered
from tests.helpers.scheduler_fakes import (FakeDriver, InProcessBackend, Stream, blocks_free, executes,
                                           expected, running)

LENGTHS = (5, 17, 40)
# The overlap alone, each step planned after the last came back (async
# scheduling, which sends a step before that, has its own tests:
# tests/unit/test_scheduler_async_steps.py).
PLAIN = SchedulerConfig(async_steps=False)


def reserves(backend: InProcessBackend) -> list[mp.Reserve]:
    return [m for _, m in backend.calls if isinstance(m, mp.Reserve)]


def ran(ex: dp.Execute, seq_id: int) -> tuple[int, int] | None:
    """(first, end) positions `ex` computed for `seq_id` (None: not in it)."""
    items: list[dp.StepSeq | dp.StepDelta] = [*ex.steps, *ex.deltas]
    for s in items:
        if s.seq_id == seq_id:
            return s.start_pos, s.start_pos + len(s.token_ids)
    return None


async def wait_held(backend: InProcessBackend, steps: int) -> None:
    """Let Executes through one by one until `steps` ran and the next waits."""
    with anyio.fail_after(10):
        while len(executes(backend)) < steps or not backend.held:
            if backend.held and backend.hold_steps is not None:
                backend.hold_steps.set()
                backend.hold_steps = anyio.Event()
            await anyio.sleep(0)


async def test_greedy_output_is_unchanged_and_a_steady_step_awaits_one_round_trip() -> None:
    results = {}
    for overlap in (False, True):
        async with running(SchedulerConfig(overlap=overlap, async_steps=False)) as (engine, backend):
            backend.execute_turns = 8  # the device is busy while the Reserve runs
            streams = [Stream(engine, prompt=f"overlap {i}", max_tokens=n, request_id=f"r{i}")
                       for i, n in enumerate(LENGTHS)]
            finals = [await s.result() for s in streams]
            await blocks_free(backend)
            results[overlap] = ([s.tokens(f) for s, f in zip(streams, finals)], engine.stats(), backend)
    (plain, st0, _), (out, st, backend) = results[False], results[True]
    assert plain == out == [expected(f"overlap {i}", n) for i, n in enumerate(LENGTHS)]
    assert st.steps == st0.steps == max(LENGTHS)
    assert st0.critical_rpcs == 2 * st0.steps + 1  # Reserve + Execute each step, the last Release
    # the first step's Reserve, each step's Execute, the last Release: every
    # other Reserve ran while a step did
    assert st.critical_rpcs == st.steps + 2
    # a decode asks the memory server once in MAX_AHEAD steps, not each step
    later = reserves(backend)[1:]
    for s, n in zip(streams, LENGTHS):
        sid = s.sink.request.seq.seq_id
        assert sum(1 for r in reserves(backend) for i in r.seqs if i.seq_id == sid) <= n // mp.MAX_AHEAD + 2
    assert all(1 <= item.ahead <= mp.MAX_AHEAD for r in later for item in r.seqs)
    assert any(item.ahead == mp.MAX_AHEAD for r in later for item in r.seqs)
    # never a slot for a position past the last one a sequence computes
    last_pos = {s.sink.request.seq.seq_id: len(s.sink.request.prompt_ids) + n - 1 for s, n in zip(streams, LENGTHS)}
    assert all(i.start + len(i.tokens) + i.ahead <= last_pos[i.seq_id] for r in later for i in r.seqs)


async def test_a_sequence_that_ends_in_a_step_gets_no_extra_token_and_its_slot_is_freed() -> None:
    ref = expected("stop here", 30)
    k = next(i for i in range(5, 30) if ref[i] not in ref[:i])  # a token seen first at k
    async with running(PLAIN) as (engine, backend):
        backend.execute_turns = 4
        other = Stream(engine, prompt="keep going", max_tokens=30, request_id="o")
        s = Stream(engine, prompt="stop here", max_tokens=30, stop_token_ids=[ref[k]], request_id="s")
        final, other_final = await s.result(), await other.result()
        await blocks_free(backend)
    assert final.finish_reason == FinishReason.STOP and s.tokens(final) == ref[:k + 1]
    assert other.tokens(other_final) == expected("keep going", 30)
    sid, prompt = s.sink.request.seq.seq_id, len(s.sink.request.prompt_ids)
    spans = [r for r in (ran(ex, sid) for ex in executes(backend)) if r is not None]
    # the last step for it computed the input before the stop token; none after
    assert spans[-1][1] == prompt + k and len(spans) == k + 1
    # slots past that step were reserved ahead (for tokens that never came) ...
    last = [(i, item) for i, r in enumerate(reserves(backend)) for item in r.seqs if item.seq_id == sid][-1]
    assert last[1].start + len(last[1].tokens) <= prompt + k < last[1].start + len(last[1].tokens) + last[1].ahead
    # ... and went back with the next memory call, as a release (its KV was written)
    after = reserves(backend)[last[0] + 1:]
    assert any(sid in r.release for r in after) and not any(sid in r.discard for r in after)


class RefusingDriver(FakeDriver):
    """Refuses the whole step `at` (a live driver's error: nothing ran)."""

    def __init__(self, at: int):
        super().__init__(64)
        self.at = at

    def execute(self, req: dp.Execute) -> dp.Executed:
        self.steps += 1
        if self.steps == self.at + 1:
            raise BadRequest("this step is refused")
        self.steps -= 1
        return super().execute(req)


async def test_a_failed_steps_overlapped_reservation_is_discarded_and_recomputed() -> None:
    async with running(PLAIN, drivers={"cpu": RefusingDriver(at=6)}) as (engine, backend):
        backend.execute_turns = 4
        streams = [Stream(engine, prompt=f"fail {i}", max_tokens=12) for i in range(3)]
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert f.finish_reason == FinishReason.LENGTH and s.tokens(f) == expected(f"fail {i}", 12)
    ids = {s.sink.request.seq.seq_id for s in streams}
    rs = reserves(backend)
    # the refused step ran on slots reserved ahead ...
    failed_at = next(i for i, r in enumerate(rs) if set(r.discard) == ids)
    assert {item.seq_id for r in rs[:failed_at] for item in r.seqs if item.ahead} == ids
    # ... which were discarded with their KV (not offered to the prefix cache),
    # and they start over from token 0
    assert not any(set(r.release) & ids for r in rs[:failed_at + 1])
    assert {item.seq_id for item in rs[failed_at].seqs if item.start == 0} == ids
    assert all(item.ahead == 0 for item in rs[failed_at].seqs)


async def test_a_driver_restart_throws_the_overlapped_reservation_away() -> None:
    drivers = {"cpu": FakeDriver(64)}
    async with running(PLAIN, drivers=drivers) as (engine, backend):
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt="restart me", max_tokens=20)
        await wait_held(backend, 5)
        seq = s.sink.request.seq
        assert seq.ahead is not None  # the step waiting now runs on a slot reserved ahead
        inc = engine.state.drivers["cpu"].incarnation
        assert take_covered(engine.state, [(seq, 1)], {"cpu": inc + 1}) == ([], [(seq, 1)])
        # the driver restarts while that step is in flight
        drivers["cpu"].restart()
        engine.driver_up("cpu", drivers["cpu"].meta)
        backend.memory.register_pool(mp.RegisterPool("cpu", 64, 4))
        n, r = len(executes(backend)), len(reserves(backend))
        backend.let_go()
        final = await s.result()
    assert s.tokens(final) == expected("restart me", 20)
    # (the Reserve that overlapped the lost step was sent before the restart)
    again = reserves(backend)[r]
    assert [(i.seq_id, i.start, i.ahead) for i in again.seqs] == [(seq.seq_id, 0, 0)]
    # what it held, slots ahead included, goes back first (the restarted
    # pool's memory knows it no more: nothing of it can be cached)
    assert [*again.discard, *again.release] == [seq.seq_id]
    after = executes(backend)[n + 1]
    assert after.steps and after.steps[0].start_pos == 0 and not after.deltas  # recomputed in full


async def test_a_memory_restart_throws_the_overlapped_reservation_away() -> None:
    async with running(PLAIN) as (engine, backend):
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt="memory restarts", max_tokens=20)
        await wait_held(backend, 5)
        seq = s.sink.request.seq
        assert seq.ahead is not None
        # the Reserve for the next step went to the old server while this step runs
        backend.restart_memory()
        engine.memory_restarted()
        n, r = len(executes(backend)), len(reserves(backend))
        backend.let_go()
        final = await s.result()
        await blocks_free(backend)
    assert s.tokens(final) == expected("memory restarts", 20)
    # re-registered with the KV its driver holds: the next step reserves as
    # usual (no slot ahead in the new server) and nothing is recomputed
    nxt = reserves(backend)[r]
    assert [(i.seq_id, i.ahead) for i in nxt.seqs] == [(seq.seq_id, 0)] and nxt.seqs[0].start > 0
    span = ran(executes(backend)[n + 1], seq.seq_id)
    assert span is not None and span[0] > 0
