"""What an operator sees of the tuner: a log event for each change with the
old and new limits and why, the knobs and goodput in /metrics, and the
objectives table of `llmos top`."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from structlog.testing import capture_logs

from common.config.scheduler import Objective, SchedulerConfig, TunerConfig
from ipc.protocol import kernel as kp
from services.gateway.backend import Stats
from services.gateway.metrics import GatewayMetrics
from tests.helpers.modelled_device import modelled, prompts_into_streams
from tests.helpers.scheduler_fakes import FakeDriver, running
from tools.top import tuner_view


async def test_each_change_is_logged_with_why_and_shows_in_metrics_and_top() -> None:
    config = SchedulerConfig(token_budget=256, max_num_seqs=32, prefill_chunk=256,
                             tuner=TunerConfig(objective=Objective(ttft_ms=60_000, tpot_ms=50), every=1))
    with capture_logs() as logs:
        async with running(config, {"cpu": FakeDriver(1024)}) as (engine, backend):
            modelled(engine, backend, 0.010, 0.0005)
            _, ok = await prompts_into_streams(engine, backend, streams=4)
            stats = engine.stats()
    assert ok
    changes = [e for e in logs if e["event"] == "scheduler.tuner_changed"]
    assert len(changes) == stats.tuner_changes >= 2
    cut = next(e for e in changes if e["token_budget"][1] < 256)
    assert cut["token_budget"][0] == 256 and cut["state"] == "tuned"
    assert "predicted" in cut["why"] and "50 ms per-token objective" in cut["why"]
    last = changes[-1]
    assert [last["token_budget"][1], last["max_num_seqs"][1], last["prefill_chunk"][1]] == \
        [stats.token_budget, stats.max_num_seqs, stats.prefill_chunk]

    status = kp.StatusReply(1, 1.0, [], kp.KernelCounters())
    text = GatewayMetrics().render(Stats(status, stats, None)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {name: families[f"llmos_scheduler_{name}"].samples[0].value
             for name in ("token_budget", "max_num_seqs", "prefill_chunk", "goodput", "tpot_objective_seconds")}
    assert value == {"token_budget": stats.token_budget, "max_num_seqs": stats.max_num_seqs,
                     "prefill_chunk": stats.prefill_chunk, "goodput": stats.goodput_rps,
                     "tpot_objective_seconds": 0.05}
    verdicts = {s.labels["verdict"]: s.value for s in families["llmos_scheduler_slo_requests"].samples
                if s.name.endswith("_total")}
    assert verdicts == {"met": stats.slo_met, "missed": stats.slo_missed, "rejected": 0}
    assert verdicts["met"] + verdicts["missed"] == 12
    assert stats.tuner == changes[-1]["state"] == "configured"  # the prompts done: nothing at risk
    assert [s.labels for s in families["llmos_scheduler_tuner_state"].samples] == [{"state": "configured"}]
    assert families["llmos_scheduler_tuner_changes"].samples[0].value == stats.tuner_changes
    assert families["llmos_scheduler_tuner_held_steps"].samples[0].value == stats.tuner_held_steps

    console = Console(width=200, record=True)
    console.print(tuner_view(stats))
    shown = console.export_text()
    assert "GOODPUT/S" in shown and "60000/50 ms" in shown and "configured" in shown
    assert f" {stats.prefill_chunk} " in shown
