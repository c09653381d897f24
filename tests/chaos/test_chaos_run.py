"""A real chaos run: about 60 s of streaming clients (SDK and HTTP, three
tenants, three priorities) while every service type is SIGKILLed, paused and
hung on a seeded schedule; the recorded history must satisfy the recovery
contract. A tiny checkpoint keeps the driver's restarts and steps short."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.chaos.history import FaultKind
from tools.chaos.run import FAULT_SERVICES, ChaosConfig, run_chaos


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_minute_of_faults_loses_and_duplicates_nothing(home: Path, checkpoint: Path,
                                                               tmp_path: Path) -> None:
    cfg = ChaosConfig(duration_s=60, seed=1, model=str(checkpoint), clients=8, http_clients=2,
                      kv_cache_mb=16, faults_per_minute=36)
    result = await run_chaos(home, cfg, tmp_path / "report")
    report, verdict = result.report, result.verdict
    assert verdict.holds, verdict.violations()
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["faults"]["total"] >= 20
    assert set(report["faults"]["by_service"]) == set(FAULT_SERVICES)
    # Every kind but the node fault (the Ray launcher's: tests/integration/test_ray_chaos.py).
    assert {f.kind for f in result.history.faults if f.t >= 0} == set(FaultKind) - {FaultKind.NODE}
    # Every killed service came back (a READY time per service type), and clients kept being served.
    assert set(report["recovery_ready_p99_s"]) == set(FAULT_SERVICES)
    assert report["requests"]["ok"] >= 10
    # HTTP clients that follow the reconnect rule see no gateway fault (issue 20)
    assert report["http"]["refused_at_connect"] == 0 and report["http"]["incomplete_streams"] == 0
    assert verdict.greedy_unfaulted > 0 and verdict.greedy_unfaulted_equal == verdict.greedy_unfaulted
    assert (tmp_path / "report" / "report.json").is_file() and (tmp_path / "report" / "throughput.svg").is_file()
