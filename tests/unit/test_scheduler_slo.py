"""Objectives through the engine: each request judged met or missed (its
tenant's or priority's objective), goodput in the stats, the tuned limits
obeyed on a modelled device, and early rejection when the model predicts a
first token far past its objective."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from common.config.scheduler import Objective, SchedulerConfig, TunerConfig, load_scheduler_config
from ipc.errors import BadRequest, ConfigError, Overloaded
from ipc.protocol.scheduler import Submit
from tests.helpers.modelled_device import modelled, prompts_into_streams
from tests.helpers.scheduler_fakes import GREEDY, FakeDriver, Stream, expected, running

LOOSE = Objective(ttft_ms=60_000, tpot_ms=60_000)
STRICT = Objective(ttft_ms=1e-6, tpot_ms=1e-6)  # no request can meet it


async def until(cond: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not cond():
            await anyio.sleep(0.001)


async def test_each_request_is_judged_by_its_tenants_or_prioritys_objective() -> None:
    tuner = TunerConfig(enabled=True, objective=LOOSE, tenants={"strict": STRICT}, priorities={"3": STRICT})
    async with running(SchedulerConfig(tuner=tuner)) as (engine, _):
        loose = [Stream(engine, prompt=f"chat {i}", max_tokens=5) for i in range(3)]
        by_priority = Stream(engine, prompt="urgent", max_tokens=5, priority=3)
        events: list[object] = []
        strict = engine.submit(Submit(prompt="strict tenant", max_tokens=5, params=GREEDY), "strict", events.append)
        finals = [await s.result() for s in loose]
        urgent = await by_priority.result()
        with anyio.fail_after(10):
            tenant = await strict.wait()
        stats = engine.stats()
    assert [f.usage.slo for f in finals] == ["met"] * 3
    assert urgent.usage.slo == "missed" and tenant.usage.slo == "missed"
    assert (stats.slo_met, stats.slo_missed, stats.slo_rejected) == (3, 2, 0)
    assert stats.goodput_rps > 0 and stats.ttft_objective_ms == 60_000 and stats.tuner in ("learning", "tuned")


async def test_a_cancelled_request_is_not_judged() -> None:
    async with running(SchedulerConfig(tuner=TunerConfig(enabled=True, objective=STRICT))) as (engine, _):
        s = Stream(engine, prompt="going away", max_tokens=200, ignore_eos=True, request_id="gone")
        assert engine.cancel("", "gone")
        final = await s.result()
        stats = engine.stats()
    assert final.usage.slo == "" and (stats.slo_met, stats.slo_missed) == (0, 0)


async def test_prompts_landing_among_streams_are_prefilled_in_steps_the_streams_can_afford() -> None:
    # 10 ms + 0.5 ms per token computed; 50 ms per token, 85% planned. The
    # configured step (256 tokens: 138 ms) would cost eight streams their
    # objective; the tuner cuts the prefill beside them to what fits (about
    # 70 tokens with their slack), and goes back to the configured limits
    # when the prompts are done.
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256,
                             tuner=TunerConfig(objective=Objective(ttft_ms=60_000, tpot_ms=50), every=1))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        during, ok = await prompts_into_streams(engine, backend)
        stats = engine.stats()
    assert ok
    # At most one configured step before the cut (the prompts arrived after
    # the step before was planned); then every step within the objective.
    assert sum(1 for n in during if n > 100) <= 1 and max(during) > 100, during
    assert sum(during) >= 8 * 130  # the prompts were prefilled all the same
    assert stats.tuner == "configured" and stats.token_budget == 256 and stats.tuner_changes >= 2
    assert stats.slo_met == 16


async def test_a_request_predicted_to_miss_its_first_token_objective_is_refused_early() -> None:
    # Two slots, both taken by long replies: a third request would wait
    # about 200 steps of ~11 ms; its objective is 100 ms (refused past 200).
    config = SchedulerConfig(max_num_seqs=2, tuner=TunerConfig(enabled=True,
                                                               objective=Objective(ttft_ms=100, tpot_ms=1000),
                                                               reject_factor=2.0))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        long = [Stream(engine, prompt=f"long reply {i}", max_tokens=240, ignore_eos=True) for i in range(2)]
        await until(lambda: engine.steps >= 24)
        assert engine.tuning.tuner is not None and engine.tuning.tuner.model.sure
        with pytest.raises(Overloaded) as refused:
            Stream(engine, prompt="one more", max_tokens=5)
        for s in long:
            await s.result()
        # The line is empty and the batch has room again: admitted whatever the load was.
        after = await Stream(engine, prompt="later", max_tokens=5).result()
        stats = engine.stats()
    detail = refused.value.detail
    assert float(detail["estimated_ttft_s"]) > 0.2 and float(detail["retry_after_s"]) >= 0.5
    assert detail["ttft_objective_s"] == 0.1 and "predicted" in refused.value.message
    assert stats.slo_rejected == 1 and after.usage.slo == "met"


async def test_by_default_a_late_request_is_queued_and_its_status_carries_the_estimate() -> None:
    # As above, but with the default reject_factor (0): the third request
    # waits its turn, its status predicts the wait, and it finishes.
    config = SchedulerConfig(max_num_seqs=2,
                             tuner=TunerConfig(enabled=True, objective=Objective(ttft_ms=100, tpot_ms=1000)))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        long = [Stream(engine, prompt=f"long reply {i}", max_tokens=240, ignore_eos=True) for i in range(2)]
        await until(lambda: engine.steps >= 24)
        assert engine.tuning.tuner is not None and engine.tuning.tuner.model.sure
        late = Stream(engine, prompt="one more", max_tokens=5, request_id="late")
        info = engine.request_info("", "late")
        assert info.state == "waiting" and info.estimated_ttft_s > 0.2, info
        for s in long:
            await s.result()
        done = await late.result()
        finished = engine.request_info("", "late")
        stats = engine.stats()
    assert done.usage.slo == "missed" and stats.slo_rejected == 0
    assert finished.estimated_ttft_s == -1.0


async def test_on_overload_a_request_still_in_time_starts_before_one_past_its_first_token_objective() -> None:
    # Two slots, both taken; "old" waits past its 100 ms first-token
    # objective (on the engine's modelled clock); "new" arrives just before
    # a slot frees. The tuner starts "new" first (it can still meet its
    # objective; "old" cannot), then "old" when the next slot frees. In line
    # order "old" (30 tokens, ~330 ms) would have kept "new" past its
    # objective too.
    config = SchedulerConfig(max_num_seqs=2,
                             tuner=TunerConfig(enabled=True, objective=Objective(ttft_ms=100, tpot_ms=1000)))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        long = Stream(engine, prompt="long reply", max_tokens=240, ignore_eos=True)
        short = Stream(engine, prompt="shorter reply", max_tokens=60, ignore_eos=True)
        await until(lambda: engine.steps >= 24)
        assert engine.tuning.tuner is not None and engine.tuning.tuner.model.sure
        old = Stream(engine, prompt="old", max_tokens=30, ignore_eos=True)
        await until(lambda: len(short.events) >= 56)
        new = Stream(engine, prompt="new", max_tokens=30, ignore_eos=True)
        finals = [await s.result() for s in (new, old, short, long)]
    first_new, first_old = new.sink.request.first_token, old.sink.request.first_token
    assert 0 < first_new < first_old, (first_new, first_old)
    assert [len(s.tokens(f)) for s, f in zip((new, old), finals)] == [30, 30]  # both served in full


async def test_with_the_tuner_off_the_limits_stay_and_nothing_is_refused_early() -> None:
    config = SchedulerConfig(token_budget=256, max_num_seqs=2,
                             tuner=TunerConfig(enabled=False, objective=Objective(ttft_ms=100, tpot_ms=50)))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        streams = [Stream(engine, prompt=f"{i} " + "long prompt text " * 8, max_tokens=40) for i in range(6)]
        for s in streams:
            await s.result()
        stats = engine.stats()
    assert stats.tuner == "off" and stats.token_budget == 256 and stats.slo_rejected == 0
    assert stats.tpot_target_ms == 0 and stats.slo_met + stats.slo_missed == 6


@pytest.mark.parametrize("tuner, field", [
    (TunerConfig(enabled=True, objective=Objective(ttft_ms=0)), "tuner.objective"),
    (TunerConfig(enabled=True, tenants={"t": Objective(tpot_ms=-1)}), "tuner.tenants.t"),
    (TunerConfig(enabled=True, priorities={"high": Objective()}), "tuner.priorities"),
    (TunerConfig(enabled=True, reject_factor=-1), "tuner.reject_factor"),
    (TunerConfig(enabled=True, headroom=0), "tuner.headroom"),
    (TunerConfig(enabled=True, window=2), "tuner.window"),
])
def test_bad_objectives_and_tuner_settings_are_refused_by_name(tuner: TunerConfig, field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
        SchedulerConfig(tuner=tuner).validate()


def test_objectives_load_from_toml_and_a_bad_one_names_its_table(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[scheduler.tuner]\nenabled = false\n[scheduler.tuner.objective]\nttft_ms = 500\n'
                    '[scheduler.tuner.tenants.batch]\nttft_ms = 30000\ntpot_ms = 1000\n')
    cfg = load_scheduler_config(good)
    assert not cfg.tuner.enabled and cfg.tuner.objective_for("batch", 0).ttft_ms == 30000
    assert cfg.tuner.objective_for("chat", 0) == Objective(ttft_ms=500)
    bad = tmp_path / "bad.toml"
    bad.write_text('[scheduler.tuner.objective]\nttft_ms = "fast"\n')
    with pytest.raises(ConfigError, match=r"tuner\.objective\.ttft_ms"):
        load_scheduler_config(bad)
    assert load_scheduler_config(None, tpot_target_ms=40.0).objectives.objective.tpot_ms == 40.0


async def test_a_tenant_with_a_tighter_objective_makes_the_tuner_plan_for_it() -> None:
    # Everyone else's objective (60 s per token) is met by any step: the
    # configured limits. The "fast" tenant's streams want 40 ms per token:
    # with them running, prompts are prefilled in steps they can afford;
    # when they are done, the limits go back.
    tuner = TunerConfig(objective=LOOSE, tenants={"fast": Objective(ttft_ms=60_000, tpot_ms=40)}, every=1)
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256, tuner=tuner)
    with capture_logs() as logs:
        async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
            modelled(engine, backend, 0.010, 0.0005)
            loose, ok_loose = await prompts_into_streams(engine, backend)
            fast, ok_fast = await prompts_into_streams(engine, backend, stream_principal="fast")
            stats = engine.stats()
    assert ok_loose and ok_fast
    assert min(loose) >= 128 or max(loose) > 200  # nobody's objective at risk: the configured chunks
    assert max(fast[1:]) <= 80, fast
    changes = [e for e in logs if e["event"] == "scheduler.tuner_changed"]
    for_fast = [e for e in changes if e["state"] == "tuned" and "a 40 ms per-token objective" in e["why"]]
    assert for_fast and min(e["token_budget"][1] for e in for_fast) <= 64
    assert changes[-1]["state"] == "configured" and changes[-1]["token_budget"][1] == 256
    assert stats.token_budget == 256


async def test_by_default_the_budget_is_never_lowered_past_min_token_budget() -> None:
    # 16 streams want 45 ms per token: a step of their decodes alone takes
    # 18 ms, so the objective (85% planned) leaves about 40 prefill tokens a
    # step; the default floor (64 tokens a step) keeps the prompts' prefill
    # moving, in 42 ms steps the streams still afford.
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256,
                             tuner=TunerConfig(objective=Objective(ttft_ms=60_000, tpot_ms=45), every=1))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        during, ok = await prompts_into_streams(engine, backend, streams=16, prompts=4)
    assert ok and config.tuner.min_token_budget == 64
    cut = [n for n in during if 20 < n < 256]  # steps cut, carrying prefill beside the 16 decodes
    # (Under 64 only where a prompt's last chunk was shorter.)
    assert cut.count(64) >= 2 and max(cut) <= 70, during
