"""Moving a sequence between a pool's device blocks and its swap tier.

A batch shares one `moves` map per pool (device block -> swap slot on the
way out, swap slot -> device block on the way in), so forks that travel
together keep sharing their blocks and each block is copied once.
"""

from __future__ import annotations

from ipc.errors import BadRequest, Overloaded
from ipc.protocol.memory import SeqSwap
from services.memory._sequence import Sequence
from services.memory._tenants import TenantLedger


def swap_out(seq: Sequence, moves: dict[int, int]) -> SeqSwap:
    if seq.swapped:
        raise BadRequest(f"sequence {seq.seq_id!r} is already swapped out")
    pool = seq.pool
    swap = pool.swap
    needed = sum(1 for b in seq.blocks if b not in moves)
    if needed > swap.num_free:
        raise Overloaded(
            f"pool {pool.pool_id!r} swap tier is full: sequence {seq.seq_id!r} needs "
            f"{needed} slots, {swap.num_free} free",
            detail={"pool": pool.pool_id, "needed": needed, "available": swap.num_free})
    seq.commit()
    slots: list[int] = []
    device: list[int] = []
    host: list[int] = []
    for b in seq.blocks:
        slot = moves.get(b, -1)
        if slot < 0:
            slot = swap.allocate(seq.tenant)
            moves[b] = slot
            device.append(b)
            host.append(slot)
        else:
            swap.share(slot)
        slots.append(slot)
    for b in reversed(seq.blocks):
        # A block still keyed stays cached on the device: if nothing evicts
        # it, swap_in takes it back without a copy.
        pool.free(b)
    pool.swapped_out += len(device)
    seq.blocks = slots
    seq.swapped = True
    return SeqSwap(seq.seq_id, list(slots), device, host)


def swap_in(seq: Sequence, moves: dict[int, int], ledger: TenantLedger) -> SeqSwap:
    if not seq.swapped:
        raise BadRequest(f"sequence {seq.seq_id!r} is not swapped out")
    pool = seq.pool
    bs = pool.block_size
    # Plan: each slot goes back to a block this batch already restored, to
    # the block still caching its content, or to a new block (a copy).
    plan: list[int] = []
    idle_hits = copies = 0
    for i, slot in enumerate(seq.blocks):
        block = moves.get(slot, -1)
        if block < 0 and i < len(seq.keys):
            block = pool.lookup(seq.keys[i], seq.tenant)
            if block >= 0 and pool.ref[block] == 0:
                idle_hits += 1
        copies += block < 0
        plan.append(block)
    needed = copies + idle_hits
    if needed > pool.num_available:
        raise Overloaded(
            f"pool {pool.pool_id!r} is out of KV blocks: swapping in {seq.seq_id!r} needs "
            f"{needed}, {pool.num_available} available",
            detail={"pool": pool.pool_id, "needed": needed, "available": pool.num_available})
    ledger.check(seq.tenant, needed)

    # Hold the planned blocks before allocating, so allocation cannot evict them.
    for slot, block in zip(seq.blocks, plan):
        if block >= 0:
            pool.take(block, seq.tenant)
            moves[slot] = block
    device: list[int] = []
    host: list[int] = []
    for i, slot in enumerate(seq.blocks):
        if plan[i] >= 0:
            continue
        block = pool.allocate(seq.tenant)
        pool.set_fill(block, min(bs, seq.num_slots - i * bs))
        if i < len(seq.keys):
            pool.register(block, seq.keys[i])
        plan[i] = block
        moves[slot] = block
        device.append(block)
        host.append(slot)
    for slot in seq.blocks:
        pool.swap.free(slot)
    pool.swapped_in += len(device)
    seq.blocks = plan
    seq.swapped = False
    return SeqSwap(seq.seq_id, list(plan), device, host)
