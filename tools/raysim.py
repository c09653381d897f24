"""A simulated Ray cluster on this one host (ray.cluster_utils.Cluster): a
head that runs llmos's core services (resource `llmos_head`) and "nodes"
that take drivers (`llmos_driver`), to be added and removed as hosts would
join and be lost. What the Ray launcher's tests, `tools/bench/scaleout.py`
and `llmos chaos --launcher ray` boot on. Imports Ray (only where called)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.config.launcher import LauncherConfig, LauncherKind
from common.home import logs_dir
from kernel.config import ChildSpec

HEAD = {"llmos_head": 100.0}
HEAD_SHARE = {"llmos_head": 1.0}
DRIVER = {"llmos_driver": 1.0}


def start_cluster(nodes: int, drivers_per_node: int = 1) -> Any:
    """A head and `nodes` driver nodes, each with room for `drivers_per_node`
    drivers. The caller stays out of Ray (no ray.init): the kernel it boots
    is the cluster's only Ray driver. Call it on the main thread; nodes may
    then be added and removed from any thread (no node registers exit or
    signal hooks, which only the main thread may: the caller must
    `shutdown()` the cluster, in a `finally`)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 2, "resources": HEAD, "include_dashboard": False,
                                      # a lost node is declared dead in ~2 s, not Ray's default ~15 s
                                      "_system_config": {"health_check_period_ms": 500,
                                                         "health_check_failure_threshold": 4}})
    for _ in range(nodes):
        add_driver_node(cluster, drivers_per_node)
    return cluster


def add_driver_node(cluster: Any, drivers: int = 1) -> Any:
    return cluster.add_node(num_cpus=1, resources={"llmos_driver": float(drivers)})


def driver_nodes(cluster: Any) -> list[Any]:
    """The live nodes that are not the head."""
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


def launcher(cluster: Any, placement_timeout_s: float = 120.0) -> LauncherConfig:
    return LauncherConfig(kind=LauncherKind.RAY, address=cluster.address, placement_timeout_s=placement_timeout_s)


def null_children_on_nodes(drivers: int, *driver_args: str, scheduler_args: tuple[str, ...] = ()) -> list[ChildSpec]:
    """Memory and scheduler on the head, `drivers` null drivers on the driver nodes."""
    return [ChildSpec("memory", "services.memory", resources=HEAD_SHARE),
            ChildSpec("null", "drivers", service="driver", instances=drivers, args=["null", *driver_args],
                      resources=DRIVER),
            ChildSpec("scheduler", "services.scheduler", args=list(scheduler_args), resources=HEAD_SHARE)]


def placements(home: Path) -> dict[int, str]:
    """pid → Ray node id of every incarnation the kernel placed (its log)."""
    out: dict[int, str] = {}
    for path in sorted(logs_dir(home).glob("kernel.log*")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == "ray_launcher.spawned":
                out[int(rec["pid"])] = str(rec["node"])
    return out
