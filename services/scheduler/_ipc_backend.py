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
        reply: mp.ReserveReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def release(self, req: mp.Release) -> mp.ReleaseReply:
        reply: mp.ReleaseReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply:
        reply: mp.ReregisterReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        # Addressed to the instance: the block tables describe its KV only.
        reply: dp.Executed = await self.service.call(instance, req, timeout=self.timeout_s)
        return reply

    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply:
        reply: mp.SwapOutReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply:
        reply: mp.SwapInReply = await self.service.call(MEMORY, req, timeout=self.timeout_s)
        return reply

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        reply: dp.Swapped = await self.service.call(instance, req, timeout=self.timeout_s)
        return reply


__all__ = ["MEMORY", "IpcBackend"]
