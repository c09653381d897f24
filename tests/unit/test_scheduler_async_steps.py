"""Async scheduling (issue 15): while step N runs, step N+1 (the same
decodes, one position on) is already at the driver, which feeds each the
token it sampled in N (`StepDelta.chain`). What a user sees must not change:
the same greedy tokens, nothing past an end streamed, no token lost or sent
twice through a driver kill, a memory-server restart or a cancel that
arrives while N+1 is in flight, and every block freed."""

from __future__ import annotations

import anyio
import pytest

from common.config.scheduler import SchedulerConfig
from ipc.errors import BadRequest
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.scheduler import FinishReason
from services.scheduler._request import State
from tests.helpers.scheduler_fakes import (FakeDriver, InProcessBackend, Stream, TOK, blocks_free, executes,
                                           expected, running)

ASYNC = SchedulerConfig(async_steps=True)
PLAIN = SchedulerConfig(async_steps=False)


def chained(backend: InProcessBackend, seq_id: int | None = None) -> list[dp.StepDelta]:
    return [d for ex in executes(backend) for d in ex.deltas if d.chain and seq_id in (None, d.seq_id)]


def last_position(backend: InProcessBackend, seq_id: int) -> int:
    """The last position any Execute computed for `seq_id`."""
    spans: list[dp.StepSeq | dp.StepDelta] = []
    for ex in executes(backend):
        spans += ex.steps
        spans += ex.deltas
    return max(s.start_pos + max(len(s.token_ids), 1) - 1 for s in spans if s.seq_id == seq_id)


async def two_in_flight(backend: InProcessBackend, after: int) -> None:
    """Let Executes through one by one until `after` ran and two wait (N and N+1)."""
    with anyio.fail_after(10):
        while len(executes(backend)) < after or backend.held < 2:
            if backend.held and backend.hold_steps is not None and len(executes(backend)) < after:
                backend.hold_steps.set()
                backend.hold_steps = anyio.Event()
            await anyio.sleep(0)


async def test_pipelined_greedy_output_equals_the_output_planned_step_by_step() -> None:
    lengths = (5, 17, 40)
    results = {}
    for config in (PLAIN, ASYNC):
        async with running(config) as (engine, backend):
            backend.execute_turns = 8  # the device is busy while the loop plans
            streams = [Stream(engine, prompt=f"async {i}", max_tokens=n, request_id=f"r{i}")
                       for i, n in enumerate(lengths)]
            finals = [await s.result() for s in streams]
            await blocks_free(backend)
            results[config.async_steps] = ([s.tokens(f) for s, f in zip(streams, finals)], engine.stats(), backend)
    (plain, st0, b0), (out, st, b1) = results[False], results[True]
    assert plain == out == [expected(f"async {i}", n) for i, n in enumerate(lengths)]
    assert not chained(b0)
    # most steps were sent before the step that samples their input came back
    assert len({id(ex) for ex in executes(b1) if any(d.chain for d in ex.deltas)}) >= st.steps // 2
    assert st.critical_rpcs <= st0.critical_rpcs


async def test_with_instant_steps_the_loop_waits_on_no_memory_call_once_decodes_run() -> None:
    """The slot renewal runs across steps (`Renewal`): a decode renews while
    half its slots are left, so even a 0 ms step never waits for it."""
    async with running(ASYNC) as (engine, backend):
        backend.execute_turns = 0  # the device answers at once: a Reserve takes longer than a step
        streams = [Stream(engine, prompt=f"instant {i}", max_tokens=40, request_id=f"i{i}") for i in range(3)]
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
        st = engine.stats()
    assert [s.tokens(f) for s, f in zip(streams, finals)] == [expected(f"instant {i}", 40) for i in range(3)]
    # the first step's Reserve, one Execute per step, the last Release
    assert st.critical_rpcs == st.steps + 2
    renewals = [r for _, r in backend.calls if isinstance(r, mp.Reserve) and any(i.ahead for i in r.seqs)]
    assert len(renewals) >= 40 // mp.MAX_AHEAD


@pytest.mark.parametrize("how", ["stop_id", "max_tokens", "stop_string"])
async def test_a_sequence_that_ends_in_step_n_never_streams_its_n_plus_1_token(how: str) -> None:
    ref = expected("stop here", 40)
    k = next(i for i in range(12, 40) if ref[i] not in ref[:i])  # a token seen first at k
    kw: dict[str, object] = {"max_tokens": 40}
    stop = TOK.decode(ref[k - 1:k + 1])
    if how == "stop_id":
        kw["stop_token_ids"] = [ref[k]]
    elif how == "max_tokens":
        kw["max_tokens"] = k + 1
    else:
        kw["stop"] = [stop]
        k = next(i for i in range(1, 40) if stop in TOK.decode(ref[:i + 1]))  # its first match ends at k
    async with running(ASYNC) as (engine, backend):
        backend.execute_turns = 4
        other = Stream(engine, prompt="keep going", max_tokens=40, request_id="o")
        s = Stream(engine, prompt="stop here", request_id="s", **kw)
        final, other_final = await s.result(), await other.result()
        await blocks_free(backend)  # its blocks, the speculative slot's included, went back
    sid, prompt = s.sink.request.seq.seq_id, len(s.sink.request.prompt_ids)
    assert other.tokens(other_final) == expected("keep going", 40)
    if how == "stop_string":
        assert final.finish_reason == FinishReason.STOP
        assert s.text(final) == TOK.decode(ref[:k + 1]).split(stop)[0]  # the text ends before the match
    else:
        assert final.finish_reason == (FinishReason.LENGTH if how == "max_tokens" else FinishReason.STOP)
    assert s.tokens(final) == ref[:k + 1]  # nothing past the end, not a token twice
    assert s.sink.request.usage().completion_tokens == k + 1
    if how == "max_tokens":
        # its last token is known to be last: no step is sent past it
        assert last_position(backend, sid) == prompt + k - 1
    else:
        # the step after the end was computed (sent before the end was known) and dropped
        assert last_position(backend, sid) == prompt + k
        assert chained(backend, sid)[-1].start_pos == prompt + k


async def test_a_driver_killed_with_n_and_n_plus_1_in_flight_loses_and_repeats_nothing() -> None:
    drivers = {"cpu": FakeDriver(64)}
    async with running(ASYNC, drivers) as (engine, backend):
        backend.hold_steps = anyio.Event()
        streams = [Stream(engine, prompt=f"kill {i}", max_tokens=24, request_id=f"k{i}") for i in range(3)]
        await two_in_flight(backend, after=8)
        assert [ex for ex in executes(backend)] and engine._flying is not None  # N+1 is out
        # the driver dies with both steps at it; a new one comes up empty
        drivers["cpu"].alive = False
        backend.memory.drop_pool(mp.DropPool("cpu"))
        engine.driver_down("cpu")
        drivers["cpu"].restart()
        backend.memory.register_pool(mp.RegisterPool("cpu", 64, 4))
        engine.driver_up("cpu", drivers["cpu"].meta)
        backend.let_go()
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert f.finish_reason == FinishReason.LENGTH
        assert s.tokens(f) == expected(f"kill {i}", 24)  # contiguous offsets: nothing lost or sent twice


async def test_a_memory_restart_mid_pipeline_drops_the_step_sent_ahead() -> None:
    async with running(ASYNC) as (engine, backend):
        backend.hold_steps = anyio.Event()
        streams = [Stream(engine, prompt=f"mem {i}", max_tokens=30, request_id=f"m{i}") for i in range(3)]
        await two_in_flight(backend, after=8)
        flying = engine._flying
        assert flying is not None
        engine.memory_down()
        backend.restart_memory()
        engine.memory_restarted()
        backend.let_go()
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
        computed = sum(backend.drivers["cpu"].tokens_per_step)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert s.tokens(f) == expected(f"mem {i}", 30)
    # the live sequences were re-registered with their KV, not recomputed:
    # at most the positions of the dropped steps (two per sequence) ran twice
    exact = sum(len(TOK.encode(f"mem {i}")) + 30 - 1 for i in range(3))
    assert exact <= computed <= exact + 2 * len(streams)


async def test_a_cancel_while_n_plus_1_is_in_flight_ends_the_request_with_what_was_streamed() -> None:
    async with running(ASYNC) as (engine, backend):
        backend.hold_steps = anyio.Event()
        a = Stream(engine, prompt="cancel me", max_tokens=30, request_id="a")
        b = Stream(engine, prompt="not me", max_tokens=30, request_id="b")
        await two_in_flight(backend, after=8)
        assert engine._flying is not None
        assert engine.cancel("", "a")
        backend.let_go()
        fa, fb = await a.result(), await b.result()
        await blocks_free(backend)
    assert fa.finish_reason == FinishReason.CANCELLED
    got = a.tokens(fa)
    assert 0 < len(got) < 30 and got == expected("cancel me", 30)[:len(got)]
    assert fb.finish_reason == FinishReason.LENGTH and b.tokens(fb) == expected("not me", 30)
    # the step in flight when the cancel came ran for it; its token was not streamed
    sid, prompt = a.sink.request.seq.seq_id, len(a.sink.request.prompt_ids)
    assert last_position(backend, sid) >= prompt + len(got) - 1


async def test_a_step_waits_for_a_new_arrival_to_be_planned() -> None:
    """A request that arrives while decodes run joins at the next planned
    step: async steps go on only while nothing waits."""
    async with running(ASYNC) as (engine, backend):
        backend.execute_turns = 4
        first = Stream(engine, prompt="first", max_tokens=30, request_id="f")
        with anyio.fail_after(10):
            while len(first.events) < 5:
                await anyio.sleep(0)
        late = Stream(engine, prompt="late", max_tokens=10, request_id="l")
        f1, f2 = await first.result(), await late.result()
    assert first.tokens(f1) == expected("first", 30) and late.tokens(f2) == expected("late", 10)
    assert chained(backend, first.sink.request.seq.seq_id)


class RefusingDriver(FakeDriver):
    """Refuses the whole step `at` (a live driver's error: nothing ran)."""

    def __init__(self, at: int):
        super().__init__(64)
        self.at = at
        self.seen = 0

    def execute(self, req: dp.Execute) -> dp.Executed:
        self.seen += 1
        if self.seen == self.at:
            raise BadRequest("this step is refused")
        return super().execute(req)


async def test_a_refused_step_n_drops_the_step_sent_behind_it_and_outputs_are_unchanged() -> None:
    refusing = RefusingDriver(at=9)
    drivers: dict[str, FakeDriver] = {"cpu": refusing}
    async with running(ASYNC, drivers) as (engine, backend):
        backend.execute_turns = 4
        streams = [Stream(engine, prompt=f"refuse {i}", max_tokens=20, request_id=f"x{i}") for i in range(3)]
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert f.finish_reason == FinishReason.LENGTH and s.tokens(f) == expected(f"refuse {i}", 20)
    ex = executes(backend)
    refused = ex[refusing.at - 1]
    # the step behind the refused one had been sent before the refusal came back ...
    behind = ex[refusing.at]
    assert refused.deltas and behind.deltas and all(d.chain for d in behind.deltas)
    # ... and was dropped with it: each sequence starts over (from what the prefix cache kept), sent in full
    ids = {d.seq_id for d in refused.deltas}
    assert ids <= {st.seq_id for e in ex[refusing.at + 1:] for st in e.steps}


class TokenlessDriver(FakeDriver):
    """Keeps its sequences but not the tokens it sampled: every chain delta
    is answered resend."""

    def execute(self, req: dp.Execute) -> dp.Executed:
        record = self.table.record
        self.table.record = lambda steps, errors, tokens=(): record(steps, errors)  # type: ignore[method-assign]
        try:
            return super().execute(req)
        finally:
            self.table.record = record  # type: ignore[method-assign]


async def test_a_driver_that_cannot_chain_is_answered_in_full_and_outputs_are_unchanged() -> None:
    async with running(ASYNC, {"cpu": TokenlessDriver(64)}) as (engine, backend):
        streams = [Stream(engine, prompt=f"tokenless {i}", max_tokens=16, request_id=f"t{i}") for i in range(2)]
        finals = [await s.result() for s in streams]
        await blocks_free(backend)
    for i, (s, f) in enumerate(zip(streams, finals)):
        assert f.finish_reason == FinishReason.LENGTH and s.tokens(f) == expected(f"tokenless {i}", 16)
    assert chained(backend)  # tried, answered resend, sent in full


@pytest.mark.parametrize("setting, device, ahead", [
    ("auto", "cpu", False),  # the forward pass uses the host's cores: steps are planned one by one
    ("auto", "cuda:0", True),
    ("auto", "null", True),
    (True, "cpu", True),  # asked for on every driver
    (False, "cuda:0", False),
])
async def test_auto_sends_steps_ahead_except_to_a_driver_on_the_host_cpu(setting: bool | str, device: str,
                                                                         ahead: bool) -> None:
    config = SchedulerConfig(async_steps=setting)  # type: ignore[arg-type]
    async with running(config, drivers={"d": FakeDriver(64, device=device)}) as (engine, backend):
        backend.execute_turns = 8  # the device is busy while the loop plans
        stream = Stream(engine, prompt="auto", max_tokens=24, request_id="r")
        final = await stream.result()
        assert stream.tokens(final) == expected("auto", 24)  # the same tokens either way
        assert bool(chained(backend)) is ahead
        assert (engine.stats().steps_ahead > 0) is ahead


def test_the_default_is_auto_and_the_setting_is_checked() -> None:
    assert SchedulerConfig().async_steps == "auto"
    import msgspec
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"async_steps": "sometimes"}, SchedulerConfig)


async def test_a_request_state_says_whether_its_sequence_runs_through_preemption_and_cancels() -> None:
    """Steps sent ahead, and the renewals, read a request's `state` to know
    whether its sequence still runs (not a scan of the running line): the
    two must agree at every step boundary, through preemption and a cancel,
    and the output not change."""
    seen: list[bool] = []
    async with running(ASYNC, {"cpu": FakeDriver(14)}) as (engine, backend):
        step = engine.step

        async def checked() -> bool:
            ran = await step()
            st = engine.state
            live = [*engine.requests.values()]
            seen.append(all((r.state is State.RUNNING) == any(s is r.seq for s in st.running) for r in live))
            return ran

        engine.step = checked  # type: ignore[method-assign]
        backend.execute_turns = 2
        streams = [Stream(engine, prompt=f"line {i}", max_tokens=30, request_id=f"q{i}") for i in range(3)]
        gone = Stream(engine, prompt="cancelled", max_tokens=30, request_id="c")
        with anyio.fail_after(10):
            while len(gone.events) < 3:
                await anyio.sleep(0)
        assert engine.cancel("", "c")
        finals = [await s.result() for s in streams]
        await gone.result()
        await blocks_free(backend)
        assert engine.stats().preemptions > 0
    assert [s.tokens(f) for s, f in zip(streams, finals)] == [expected(f"line {i}", 30) for i in range(3)]
    assert len(seen) > 30 and all(seen)
