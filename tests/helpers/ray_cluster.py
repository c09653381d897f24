"""A one-host Ray cluster for the Ray launcher's tests (ray.cluster_utils.Cluster):
a head that runs llmos's core services (resource `llmos_head`) and nodes
that each take one driver (`llmos_driver: 1`), plus what the kernel's log
says about where it placed each incarnation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from common.config.launcher import LauncherConfig, LauncherKind
from common.home import logs_dir
from kernel.config import ChildSpec

HEAD = {"llmos_head": 100.0}
DRIVER_NODE = {"llmos_driver": 1.0}


def start_cluster(nodes: int) -> Any:
    """A head and `nodes` driver nodes; the test process stays out of Ray
    (it never calls ray.init: the kernel is the cluster's only driver)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "resources": HEAD, "include_dashboard": False,
                                      # a lost node is declared dead in ~2 s, not Ray's default ~15 s
                                      "_system_config": {"health_check_period_ms": 500,
                                                         "health_check_failure_threshold": 4}})
    for _ in range(nodes):
        add_driver_node(cluster)
    return cluster


def add_driver_node(cluster: Any) -> Any:
    return cluster.add_node(num_cpus=1, resources=DRIVER_NODE)


def launcher(cluster: Any) -> LauncherConfig:
    return LauncherConfig(kind=LauncherKind.RAY, address=cluster.address, placement_timeout_s=120.0)


def null_children_on_nodes(drivers: int, *driver_args: str) -> list[ChildSpec]:
    """Memory and scheduler on the head, `drivers` null drivers, one per driver node."""
    return [ChildSpec("memory", "services.memory", resources=HEAD_SHARE),
            ChildSpec("null", "drivers", service="driver", instances=drivers, args=["null", *driver_args],
                      resources=DRIVER_NODE),
            ChildSpec("scheduler", "services.scheduler", resources=HEAD_SHARE)]


HEAD_SHARE = {"llmos_head": 1.0}


def placements(home: Path) -> dict[int, str]:
    """pid → Ray node id of every incarnation the kernel placed (its log)."""
    out: dict[int, str] = {}
    for path in sorted(logs_dir(home).glob("kernel.log*")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "ray_launcher.spawned":
                out[int(rec["pid"])] = str(rec["node"])
    return out


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether `pid` is gone within `timeout` (polled)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
