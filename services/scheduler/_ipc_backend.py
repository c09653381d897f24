"""The engine's `Backend` over the kernel: memory calls to the memory
server, step and swap calls to the driver instance that owns the pool."""

from __future__ import annotations

from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from sdk.service import Service

MEMORY = "memory"


class IpcBackend:
    """The engine's memory and driver calls, over the kernel."""

    def __init__(self, service: Service, timeout_s: float):
        self.service = service
        self.timeout_s = timeout_s

    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def release(self, req: mp.Release) -> mp.ReleaseReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        # Addressed to the instance: the block tables describe its KV only.
        return await self.service.call(instance, req, timeout=self.timeout_s)

    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def fork(self, req: mp.Fork) -> mp.ForkReply:
        return await self.service.call(MEMORY, req, timeout=self.timeout_s)

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        return await self.service.call(instance, req, timeout=self.timeout_s)


__all__ = ["MEMORY", "IpcBackend"]
