"""The engine's step path (issue 15): one memory call per step with the
releases folded into it, and what the stats count of it."""

from __future__ import annotations

import anyio

from drivers.seq_table import SeqTable
from ipc import codec
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import FinishReason
from common.config.scheduler import SchedulerConfig
from tests.helpers.scheduler_fakes import FakeDriver, Stream, blocks_free, executes, expected, running


async def test_each_step_makes_one_memory_call_and_finished_blocks_go_with_the_next_one() -> None:
    # the plain step (no overlap): its Reserve on the critical path
    async with running(SchedulerConfig(overlap=False)) as (engine, backend):
        streams = [Stream(engine, prompt=f"prompt {i}", max_tokens=n, request_id=f"r{i}")
                   for i, n in enumerate((3, 7, 12))]
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
        st = engine.stats()
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert s.tokens(f) == expected(f"prompt {i}", (3, 7, 12)[i])
    kinds = [k for k, _ in backend.calls]
    # every step: one Reserve (carrying the releases), then its Execute; a
    # Release of its own only once nothing is left to run
    assert kinds[-1] == "release" and "release" not in kinds[:-1]
    body = kinds[:-1]
    assert body == ["reserve", "execute"] * (len(body) // 2)
    assert st.steps == len(body) // 2 and st.critical_rpcs == len(kinds)
    # a sequence that finished in step k is gone from the memory server at
    # step k + 1: its id rides on that step's Reserve
    ran: list[set[int]] = []
    for kind, msg in backend.calls:
        if isinstance(msg, dp.Execute):
            ran.append({s.seq_id for s in msg.steps} | {d.seq_id for d in msg.deltas})
        elif isinstance(msg, mp.Reserve) and ran:
            gone = ran[-1] - {item.seq_id for item in msg.seqs}
            assert set(msg.release) == gone, (msg.release, gone)
    assert st.execute_bytes > 0


async def test_an_idle_engine_frees_a_cancelled_requests_blocks_at_once() -> None:
    async with running() as (engine, backend):
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt="cancel me", max_tokens=50, request_id="c")
        with anyio.fail_after(10):
            while not backend.reserves:
                await anyio.sleep(0)
        assert engine.cancel("", "c")
        backend.hold_steps.set()
        backend.hold_steps = None
        final = await s.result()
        await blocks_free(backend)
    assert final.finish_reason == FinishReason.CANCELLED
    assert backend.calls[-1][0] == "release"


async def test_a_steady_decodes_execute_does_not_grow_with_its_context_even_with_a_penalty() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    async with running() as (engine, backend):
        s = Stream(engine, prompt="a prompt of some length", max_tokens=150, params=params)
        final = await s.result()
        st = engine.stats()
    assert s.tokens(final) == expected("a prompt of some length", 150)
    sizes = [len(codec.encode(m)) for m in executes(backend)]
    assert len(sizes) == 150 and executes(backend)[0].steps and not executes(backend)[0].deltas
    steady = sizes[1:]
    assert all(not m.steps and len(m.deltas) == 1 for m in executes(backend)[1:])
    # context 25 and context 170: the same few bytes (a block id now and then)
    assert max(steady) - min(steady) <= 4 and max(steady) < 60
    assert st.execute_bytes == sum(sizes)
    # what the old full-state wire would have sent at the end, for scale
    last = executes(backend)[-1].deltas[0]
    full = dp.StepSeq(last.seq_id, last.token_ids, last.start_pos, list(range(last.start_pos // 4 + 1)),
                      True, params, list(range(last.start_pos)))
    assert len(codec.encode(dp.Execute([full]))) > 5 * max(steady)


class ForgetfulDriver(FakeDriver):
    """Loses what it kept of every sequence (not its KV) before step `at`."""

    def __init__(self, at: int):
        super().__init__(64)
        self.at = at

    def execute(self, req: dp.Execute) -> dp.Executed:
        if self.steps == self.at:
            self.table = SeqTable()
        return super().execute(req)


async def test_a_driver_that_lost_a_sequences_state_gets_it_in_full_and_the_output_is_unchanged() -> None:
    async with running(SchedulerConfig(async_steps=False), drivers={"cpu": ForgetfulDriver(at=5)}) as (engine, backend):
        streams = [Stream(engine, prompt=f"forget {i}", max_tokens=12) for i in range(3)]
        finals = [await s.result() for s in streams]
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert f.finish_reason == FinishReason.LENGTH and s.tokens(f) == expected(f"forget {i}", 12)
    ex = executes(backend)
    assert ex[5].deltas and not ex[5].steps  # answered resend: nothing ran ...
    assert len(ex[6].steps) == 3 and not ex[6].deltas  # ... so each came again in full
    assert ex[7].deltas and not ex[7].steps


async def test_a_restarted_driver_gets_full_state_again_and_the_output_is_unchanged() -> None:
    drivers = {"cpu": FakeDriver(64)}
    async with running(drivers=drivers) as (engine, backend):
        backend.hold_steps = anyio.Event()
        s = Stream(engine, prompt="restart me", max_tokens=20)
        with anyio.fail_after(10):
            while len(executes(backend)) < 4:  # let steps through one by one
                backend.hold_steps.set()
                backend.hold_steps = anyio.Event()
                await anyio.sleep(0)
        # the driver restarts (its KV and what it kept are gone) between steps
        drivers["cpu"].restart()
        engine.driver_up("cpu", drivers["cpu"].meta)
        backend.memory.register_pool(mp.RegisterPool("cpu", 64, 4))
        engine.seqs_lost("cpu", [s.sink.request.seq.seq_id])
        n = len(executes(backend))
        backend.hold_steps.set()
        backend.hold_steps = None
        final = await s.result()
    assert s.tokens(final) == expected("restart me", 20)
    after = executes(backend)[n]
    assert after.steps and after.steps[0].start_pos == 0 and not after.deltas  # recomputed, sent in full
