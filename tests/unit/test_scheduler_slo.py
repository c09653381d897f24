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
from tests.helpers.modelled_device import modelled
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


async def test_the_engine_obeys_the_limits_it_tuned_on_a_modelled_device() -> None:
    # 10 ms + 0.5 ms per token computed; 50 ms per token planned at 85%: a
    # step of about 65 tokens, where the configured budget is 256.
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256,
                             tuner=TunerConfig(enabled=True, objective=Objective(ttft_ms=60_000, tpot_ms=50),
                                               min_token_budget=16))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        prompts = [f"{i} " + "long prompt text " * 8 for i in range(12)]
        streams = [Stream(engine, prompt=p, max_tokens=60) for p in prompts]
        finals = [await s.result() for s in streams]
        tuned = engine.stats()
        sizes = backend.drivers["cpu"].tokens_per_step
        seen = len(sizes)
        late = [Stream(engine, prompt=f"late {i} " + "long prompt text " * 8, max_tokens=5) for i in range(4)]
        for s in late:
            await s.result()
        late_sizes = sizes[seen:]
    assert [s.tokens(f) for s, f in zip(streams, finals)] == [expected(p, 60) for p in prompts]
    assert max(sizes[:3]) == 256  # it started at the configured budget
    assert tuned.tuner == "tuned" and tuned.tuner_changes >= 1 and 50 <= tuned.token_budget <= 80
    assert tuned.tpot_target_ms == 50 and tuned.step_ms > 0 and tuned.prefill_chunk <= tuned.token_budget
    # Long prompts after it had tuned are prefilled in chunks that keep a
    # step within the objective: 10 ms + 0.5 ms x 80 tokens = 50 ms.
    assert max(late_sizes) <= 80 and sum(late_sizes) >= 4 * 136


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
    # On a device of 10 ms + 0.5 ms per token, the default (60 s per token)
    # keeps the configured limits; a tenant that wants 40 ms per token
    # arrives and the steps are planned for it (34 ms: about 50 tokens);
    # when its requests are done, the limits go back up.
    tuner = TunerConfig(enabled=True, objective=LOOSE, tenants={"fast": Objective(ttft_ms=60_000, tpot_ms=40)},
                        min_token_budget=16)
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256, tuner=tuner)
    with capture_logs() as logs:
        async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
            modelled(engine, backend, 0.010, 0.0005)
            first = [Stream(engine, prompt=f"{i} " + "long prompt text " * 8, max_tokens=40) for i in range(8)]
            for s in first:
                await s.result()
            before = engine.stats()
            events: list[object] = []
            sinks = [engine.submit(Submit(prompt=f"fast {i} " + "long prompt text " * 8, max_tokens=60,
                                          params=GREEDY), "fast", events.append) for i in range(8)]
            with anyio.fail_after(10):
                for sink in sinks:
                    await sink.wait()
    assert before.token_budget == 256 and before.tuner_changes == 0
    changes = [e for e in logs if e["event"] == "scheduler.tuner_changed"]
    for_fast = [e for e in changes if "a 40 ms per-token objective" in e["why"]]
    assert for_fast and min(e["token_budget"][1] for e in for_fast) <= 64
    assert changes[-1]["token_budget"][1] > 64 and "60000 ms per-token" in changes[-1]["why"]


async def test_by_default_the_budget_is_never_lowered_past_min_token_budget() -> None:
    # The model wants about 65 tokens a step; the default floor (128) keeps
    # a long prompt's prefill from crawling.
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256,
                             tuner=TunerConfig(enabled=True, objective=Objective(ttft_ms=60_000, tpot_ms=50)))
    async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
        modelled(engine, backend, 0.010, 0.0005)
        streams = [Stream(engine, prompt=f"{i} " + "long prompt text " * 8, max_tokens=60) for i in range(16)]
        for s in streams:
            await s.result()
        stats = engine.stats()
    assert config.tuner.min_token_budget == 128
    assert stats.tuner == "tuned" and stats.tuner_changes >= 1 and 128 <= stats.token_budget <= 140
