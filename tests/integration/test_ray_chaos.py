"""`llmos chaos` on the Ray launcher: a short run on a simulated cluster of
two driver nodes (one driver each, the other services on the head) in
which drivers' nodes are removed mid-load without a graceful stop and new
nodes added, beside SIGKILLs and pauses of the drivers. The recorded
history must satisfy the recovery contract: nothing lost or duplicated,
greedy output equal to the fault-free reference, faulted or not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.chaos.history import FaultKind
from tools.chaos.nodes import SimNodes
from tools.chaos.run import ChaosConfig, run_chaos
from tools.raysim import driver_nodes, start_cluster

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    c = start_cluster(nodes=2)
    try:
        yield c
    finally:
        c.shutdown()


async def test_node_faults_lose_and_duplicate_nothing(home: Path, checkpoint: Path, cluster: Any,
                                                       tmp_path: Path) -> None:
    nodes = SimNodes(cluster, drivers=2)
    before = {n.node_id for n in driver_nodes(cluster)}
    cfg = ChaosConfig(duration_s=45, seed=5, model=str(checkpoint), clients=6, http_clients=0,
                      services=("driver",), kv_cache_mb=16, faults_per_minute=6, node_faults_per_minute=6)
    result = await run_chaos(home, cfg, tmp_path / "report", nodes)
    report, verdict = result.report, result.verdict
    assert verdict.holds, verdict.violations()
    assert report["lost"] == 0 and report["duplicated"] == 0
    fired = [f for f in result.history.faults if f.kind == FaultKind.NODE and f.t >= 0]
    assert len(fired) >= 2, [(f.planned_s, f.instance, f.note) for f in result.history.faults]
    # Each removed the node its driver ran on; the driver came back (on a node that
    # was not removed), and the cluster was given a node for each one lost.
    assert [f.node for f in fired] == nodes.removed and len(nodes.added) == len(fired)
    assert all(f.ready_t > f.t and f.new_pid not in (0, f.pid) for f in fired)
    assert {n.node_id for n in driver_nodes(cluster)} == (before | set(nodes.added)) - set(nodes.removed)
    assert report["recovery_ready_s"]["node"]["driver"]["n"] == len(fired)
    assert report["requests"]["ok"] >= 10
    assert verdict.greedy_unfaulted > 0 and verdict.greedy_unfaulted_equal == verdict.greedy_unfaulted
    assert verdict.greedy_faulted > 0 and verdict.greedy_faulted_equal == verdict.greedy_faulted
