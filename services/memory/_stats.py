"""Metrics snapshots of pools and tenants."""

from __future__ import annotations

from collections.abc import Iterable

from ipc.protocol.memory import PoolStats, TenantBlocks
from services.memory._pool import BlockPool
from services.memory._sequence import Sequence
from services.memory._tenants import TenantLedger


def pool_stats(pool: BlockPool, seqs: Iterable[Sequence]) -> PoolStats:
    resident = swapped = 0
    for seq in seqs:
        if seq.pool is pool:
            if seq.swapped:
                swapped += 1
            else:
                resident += 1
    slots = pool.num_used * pool.block_size
    waste = slots - pool.total_fill
    return PoolStats(
        pool=pool.pool_id,
        num_blocks=pool.num_blocks,
        block_size=pool.block_size,
        swap_slots=pool.swap.num_slots,
        used=pool.num_used,
        free=pool.num_blocks - pool.num_used - pool.num_cached,
        cached=pool.num_cached,
        swap_used=pool.swap.num_used,
        num_seqs=resident,
        num_swapped_seqs=swapped,
        utilisation=pool.num_used / pool.num_blocks,
        waste_slots=waste,
        waste_pct=100.0 * waste / slots if slots else 0.0,
        prompt_tokens=pool.prompt_tokens,
        hit_tokens=pool.hit_tokens,
        hit_rate=pool.hit_tokens / pool.prompt_tokens if pool.prompt_tokens else 0.0,
        evictions=pool.evictions,
        swapped_out=pool.swapped_out,
        swapped_in=pool.swapped_in,
        cow_copies=pool.cow_copies,
    )


def tenant_blocks(ledger: TenantLedger, tenant: str) -> TenantBlocks:
    return TenantBlocks(tenant, ledger.held.get(tenant, 0), ledger.swapped.get(tenant, 0),
                        ledger.limit(tenant))


def all_tenants(ledger: TenantLedger) -> list[TenantBlocks]:
    return [tenant_blocks(ledger, t) for t in ledger.tenants()]
