"""The kernel's mechanism: two ROUTER sockets around a routing state machine.

Clients talk to the front socket, services to the back socket. `Kernel`
binds them and runs three parts, each in its own module: the pump
(kernel/pump.py) drains the sockets into the inbox (kernel/inbox.py), which
parses each message and hands it to the router (kernel/routing.py), which
sends through the sockets; the liveness ticker (kernel/liveness.py) keeps
time for it.
"""

from __future__ import annotations

import anyio
import zmq
from anyio.abc import TaskStatus

from common.logs import get_logger
from ipc.curve import BACK_DOMAIN, FRONT_DOMAIN, CurveServer, KeyRing, start_zap
from ipc.sockets import bind_router, ipc_path_id, remove_ipc_path
from kernel.config import KernelConfig
from kernel.guard import Guard
from kernel.inbox import Inbox
from kernel.liveness import Liveness
from kernel.pump import Pump
from kernel.routing import Router

log = get_logger()


class Kernel:
    def __init__(self, config: KernelConfig, front: str, back: str, secret: str, guard: Guard | None = None):
        self.config = config
        self.front_endpoint = front
        self.back_endpoint = back
        self.curve: CurveServer | None = None  # keys for tcp:// endpoints (CURVE + ZAP)
        self.router = Router(config, secret, guard=guard, on_shutdown=self.request_shutdown)
        self.pump: Pump | None = None  # while serving
        self.shutdown_requested = anyio.Event()
        self.shutdown_reason = ""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        if self.curve is not None and self.router.keyring is None:
            self.router.keyring = KeyRing(self.curve)
        zap = start_zap(ctx, self.router.keyring) if self.router.keyring is not None else None
        pump = Pump(Inbox(self.router),
                    bind_router(ctx, self.front_endpoint, self.config.front_limits, self.curve, FRONT_DOMAIN),
                    bind_router(ctx, self.back_endpoint, self.config.limits, self.curve, BACK_DOMAIN))
        # The files this kernel made: only they are removed on the way out.
        made = {ep: ipc_path_id(ep) for ep in (self.front_endpoint, self.back_endpoint)}
        self.pump = pump
        self.router.attach(pump.front, pump.back)
        log.info("kernel.listening", front=self.front_endpoint, back=self.back_endpoint)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(Liveness(self.router).run)
                task_status.started()
                pump.run()  # anything that arrived before the reader was armed
                await anyio.sleep_forever()
        finally:
            self.router.detach()
            self.pump = None
            pump.close()
            if zap is not None:
                zap.stop()
            ctx.term()
            for ep, ident in made.items():
                remove_ipc_path(ep, ident)

    def request_shutdown(self, reason: str) -> None:
        self.shutdown_reason = self.shutdown_reason or reason
        self.shutdown_requested.set()


__all__ = ["Kernel"]
