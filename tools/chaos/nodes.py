"""The `node` fault: chaos on the Ray launcher, over a simulated cluster
(tools/raysim.py) whose nodes can be lost.

A node fault removes the Ray node its target (a driver) runs on, at once
and without a graceful stop (`remove_node(allow_graceful=False)`: a host
lost), then adds a fresh driver node, as an operator would replace the
host. Everything on the node dies with it; the supervisor restarts the
driver wherever Ray finds room (the spare node, or the new one). Only
drivers run on driver nodes (the other services on the head), so the
fault's target is the one instance it takes down.

Ray is imported only through tools/raysim.py, and only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec

from ipc.errors import BadRequest
from kernel.config import ChildSpec
from tools import raysim

NODE_FAULT_NEEDS_RAY = ("the node fault needs the Ray launcher (llmos chaos --launcher ray): it removes a "
                        "simulated Ray node, and the local launcher has no nodes")


def on_nodes(children: list[ChildSpec], drivers: int) -> list[ChildSpec]:
    """The chaos children placed on a simulated cluster: `drivers` driver
    instances, one a driver node; every other service on the head, a
    listening one (the gateway) as one instance: the kernel hands its
    listening socket only to local children, so on Ray each instance binds
    the port itself and a second one on the same host could not."""
    return [msgspec.structs.replace(c, instances=drivers, resources=dict(raysim.DRIVER)) if c.service == "driver"
            else msgspec.structs.replace(c, resources=dict(raysim.HEAD_SHARE),
                                         instances=1 if c.listen else c.instances) for c in children]


class SimNodes:
    """The simulated cluster a chaos run boots llmos on, and its node fault.
    `home` is the llmos home (the kernel's log says which pid runs where)."""

    def __init__(self, cluster: Any, drivers: int):
        if drivers < 1:
            raise BadRequest(f"a Ray chaos run needs at least one driver node, not {drivers}")
        self.cluster = cluster
        self.drivers = drivers
        self.home: Path | None = None
        self.removed: list[str] = []
        self.added: list[str] = []

    def launcher(self) -> Any:
        return raysim.launcher(self.cluster)

    async def lose_node_of(self, pid: int) -> str:
        """Remove the node `pid` runs on (no graceful stop), then add a new
        driver node. The removed node's id; BadRequest when `pid` was not
        placed by Ray or its node is gone already."""
        assert self.home is not None, "SimNodes.home is set when llmos boots"
        where = await anyio.to_thread.run_sync(raysim.placements, self.home)
        node_id = where.get(pid)
        node = next((n for n in raysim.driver_nodes(self.cluster) if n.node_id == node_id), None)
        if node is None:
            raise BadRequest(f"pid {pid} runs on no live driver node (placed on {node_id or 'none known'})")
        await anyio.to_thread.run_sync(lambda: self.cluster.remove_node(node, allow_graceful=False))
        self.removed.append(node.node_id)
        new = await anyio.to_thread.run_sync(lambda: raysim.add_driver_node(self.cluster))
        self.added.append(new.node_id)
        return str(node.node_id)
