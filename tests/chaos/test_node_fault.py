"""The node fault's schedule and its refusals (no Ray, no processes): node
faults go to drivers only, clear of the target's other faults; a plan or a
run with node faults is refused without a simulated Ray cluster, naming
the launcher it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipc.errors import BadRequest
from tools.chaos import faults as fx
from tools.chaos.history import FaultKind, History
from tools.chaos.run import ChaosConfig, run_chaos
from tools.cli import main as llmos_main

TARGETS = {"null-0": "driver", "null-1": "driver", "scheduler": "scheduler", "memory": "memory"}


def test_node_faults_hit_drivers_only_and_clear_of_their_targets_other_faults() -> None:
    signals = fx.plan_faults(3, 120, TARGETS, per_minute=40)
    plan = fx.add_node_faults(signals, 3, 120, TARGETS, per_minute=3)
    nodes = [f for f in plan if f.kind == FaultKind.NODE]
    assert len(nodes) == 5  # 3 a minute over the 105 s between warm-up and tail
    assert {f.instance for f in nodes} == {"null-0", "null-1"} and {f.service for f in nodes} == {"driver"}
    assert [f.planned_s for f in plan] == sorted(f.planned_s for f in plan)
    for g in nodes:
        near = [f for f in plan if f is not g and f.instance == g.instance
                and g.planned_s - fx.MIN_GAP_S <= f.planned_s <= g.planned_s + fx.NODE_GAP_S]
        assert near == []
    # Other targets keep every signal fault; the plan is a function of its inputs.
    assert [f for f in plan if f.service != "driver"] == [f for f in signals if f.service != "driver"]
    assert plan == fx.add_node_faults(signals, 3, 120, TARGETS, per_minute=3)
    assert fx.add_node_faults(signals, 3, 120, TARGETS, per_minute=0) == signals
    assert fx.add_node_faults(signals, 3, 120, {"scheduler": "scheduler"}, per_minute=3) == signals


async def test_a_node_fault_without_a_ray_cluster_is_refused(tmp_path: Path) -> None:
    plan = fx.add_node_faults([], 0, 60, TARGETS, per_minute=2)
    status = type("S", (), {"instances": []})()
    with pytest.raises(BadRequest, match="needs the Ray launcher"):
        await fx.inject(plan, fx.Tracker(History(), status), History())  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="needs the Ray launcher"):
        await run_chaos(tmp_path / "home", ChaosConfig(node_faults_per_minute=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    (["--node-faults-per-minute", "2"], "needs the Ray launcher (llmos chaos --launcher ray)"),
    (["--launcher", "ray", "--nodes", "0"], "--nodes must be in [1, 16], not 0"),
    (["--launcher", "ray", "--node-faults-per-minute", "-1"], "--node-faults-per-minute must be in [0, 60], not -1"),
    (["--launcher", "ray", "--attach"], "cannot --attach"),
])
def test_the_cli_refuses_node_faults_it_cannot_run(argv: list[str], says: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        llmos_main(["--home", str(tmp_path), "chaos", *argv, "--duration", "5", "--out", str(tmp_path / "o")])
    assert says in str(exc.value.code)
