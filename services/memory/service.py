"""The memory server as a service: `MemoryManager` behind the wire.

Pools follow the drivers: a driver instance's READY (seen as `ServiceUp` on
`kernel.services`, or in the kernel's status at start) creates its pool from
the `num_blocks` / `block_size` / `host_slots` it reported; its death drops
the pool and the sequences that lost blocks are announced on `memory.events`.
A restarted memory server comes back empty and says so (`MemoryRestarted`),
so the scheduler re-registers its live sequences.
"""

from __future__ import annotations

import os
from typing import Any

from anyio.abc import TaskGroup

from ipc.protocol import kernel as kp
from ipc.protocol import memory as mp
from ipc.protocol.driver import DRIVER
from ipc.protocol.security import QuotaPolicy
from common.logs import get_logger
from sdk.policy import follow_quotas
from sdk.service import Context, Service, handler
from common.config.memory import load_memory_config
from services.memory.manager import MemoryManager

log = get_logger()


class MemoryService(Service):
    name = "memory"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.manager = MemoryManager(load_memory_config())
        self._pool_pids: dict[str, int] = {}
        self._limited: set[str] = set()  # tenants with a KV-block quota from the policy

    async def background(self, tg: TaskGroup) -> None:
        events = self.subscribe(kp.SERVICES_TOPIC)
        await events.__anext__()  # Subscribed: from here on no ServiceUp is missed
        st: kp.StatusReply = await self.call(kp.KERNEL, kp.Status())
        for info in st.instances:
            if info.service == DRIVER and info.state == "ready" and "num_blocks" in info.meta:
                self._pool_up(info.instance, info.pid, info.meta)
        self.publish(mp.MEMORY_TOPIC, mp.MemoryRestarted(os.getpid(), sorted(self._pool_pids)))
        tg.start_soon(self._follow_drivers, events)
        tg.start_soon(follow_quotas, self, self._apply_quotas)

    def _apply_quotas(self, policy: QuotaPolicy) -> None:
        """KV-block quotas from the security server's policy (0 = unlimited)."""
        limits = {tenant: q.kv_blocks for tenant, q in policy.quotas.items() if q.kv_blocks > 0}
        for tenant in self._limited - limits.keys():
            self.manager.set_block_quota(mp.SetBlockQuota(tenant, mp.NO_LIMIT))
        for tenant, blocks in limits.items():
            self.manager.set_block_quota(mp.SetBlockQuota(tenant, blocks))
        self._limited = set(limits)
        log.info("memory.quotas", version=policy.version, limited=len(limits))

    async def _follow_drivers(self, events: Any) -> None:
        async for ev in events:
            if isinstance(ev, kp.ServiceUp) and ev.service == DRIVER:
                self._pool_up(ev.instance, ev.pid, ev.meta)
            elif isinstance(ev, kp.ServiceDown) and ev.service == DRIVER:
                self._pool_down(ev.instance, ev.reason)

    def _pool_up(self, pool: str, pid: int, meta: dict[str, Any]) -> None:
        if self._pool_pids.get(pool) == pid:
            return  # seen both in the status and as an event
        self._pool_pids[pool] = pid
        reply = self.manager.register_pool(mp.RegisterPool(
            pool, int(meta["num_blocks"]), int(meta["block_size"]), int(meta.get("host_slots", 0))))
        log.info("memory.pool_up", pool=pool, num_blocks=meta["num_blocks"], lost=len(reply.lost))
        if reply.lost:
            self.publish(mp.MEMORY_TOPIC, mp.PoolLost(pool, reply.lost, "driver restarted"))

    def _pool_down(self, pool: str, reason: str) -> None:
        if self._pool_pids.pop(pool, None) is None:
            return
        reply = self.manager.drop_pool(mp.DropPool(pool))
        log.warning("memory.pool_down", pool=pool, reason=reason, lost=len(reply.lost))
        self.publish(mp.MEMORY_TOPIC, mp.PoolLost(pool, reply.lost, reason))

    @handler
    async def reserve(self, msg: mp.Reserve, ctx: Context) -> mp.ReserveReply:
        return self.manager.reserve(msg)

    @handler
    async def release(self, msg: mp.Release, ctx: Context) -> mp.ReleaseReply:
        return self.manager.release(msg)

    @handler
    async def fork(self, msg: mp.Fork, ctx: Context) -> mp.ForkReply:
        return self.manager.fork(msg)

    @handler
    async def swap_out(self, msg: mp.SwapOut, ctx: Context) -> mp.SwapOutReply:
        return self.manager.swap_out(msg)

    @handler
    async def swap_in(self, msg: mp.SwapIn, ctx: Context) -> mp.SwapInReply:
        return self.manager.swap_in(msg)

    @handler
    async def reregister(self, msg: mp.Reregister, ctx: Context) -> mp.ReregisterReply:
        return self.manager.reregister(msg)

    @handler
    async def set_block_quota(self, msg: mp.SetBlockQuota, ctx: Context) -> mp.TenantBlocks:
        return self.manager.set_block_quota(msg)

    @handler
    async def evict_cached(self, msg: mp.EvictCached, ctx: Context) -> mp.EvictReply:
        return self.manager.evict_cached(msg)

    @handler(idempotent=True)
    async def stats(self, msg: mp.MemoryStats, ctx: Context) -> mp.MemoryStatsReply:
        return self.manager.stats(msg)

    @handler(idempotent=True)
    async def pools(self, msg: mp.ListPools, ctx: Context) -> mp.PoolList:
        return mp.PoolList(sorted(self._pool_pids))


__all__ = ["MemoryService"]
