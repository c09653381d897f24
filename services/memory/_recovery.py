"""Adopting KV a driver still holds after the memory server restarted."""

from __future__ import annotations

from ipc.errors import BadRequest
from services.memory._hashing import block_key
from services.memory._sequence import Sequence
from services.memory._tenants import TenantLedger


def adopt(seq: Sequence, blocks: list[int], num_computed: int, ledger: TenantLedger) -> None:
    """Give a fresh `seq` the block table the caller says its driver holds.

    Everything checkable is checked first (block ids in the pool, the table
    long enough for `num_computed` slots, blocks already held by someone
    else compatible with this claim); any mismatch is a BadRequest naming
    the block, and nothing changes.
    """
    pool = seq.pool
    bs = pool.block_size
    sid = seq.seq_id
    if not 0 <= num_computed <= len(seq.tokens):
        raise BadRequest(f"sequence {sid!r}: {num_computed} computed slots for "
                         f"{len(seq.tokens)} tokens")
    if len(blocks) != -(-num_computed // bs):
        raise BadRequest(f"sequence {sid!r}: {len(blocks)} blocks cannot hold exactly "
                         f"{num_computed} slots of {bs}")
    seen: set[int] = set()
    for b in blocks:
        if not 0 <= b < pool.num_blocks:
            raise BadRequest(f"block {b} is not in pool {pool.pool_id!r} "
                             f"({pool.num_blocks} blocks)", detail={"block": b})
        if b in seen:
            raise BadRequest(f"block {b} appears twice in sequence {sid!r}", detail={"block": b})
        seen.add(b)
    keys: list[bytes] = []
    parent = seq.root
    for i in range(num_computed // bs):
        parent = block_key(parent, seq.tokens[i * bs:(i + 1) * bs])
        keys.append(parent)
    idle = 0
    for i, b in enumerate(blocks):
        fill = min(bs, num_computed - i * bs)
        if pool.ref[b] == 0:
            idle += 1
            continue
        if pool.owner[b] != seq.tenant:
            raise BadRequest(f"block {b} is held by another tenant", detail={"block": b})
        key = pool.key[b]
        if pool.fill[b] != fill or (key is not None and (i >= len(keys) or key != keys[i])):
            raise BadRequest(f"block {b} is held with other contents than sequence {sid!r} "
                             "claims", detail={"block": b})
    ledger.check(seq.tenant, idle)

    for i, b in enumerate(blocks):
        if pool.ref[b] == 0 and pool.key[b] is not None and (i >= len(keys)
                                                             or pool.key[b] != keys[i]):
            # The driver overwrote what the cache thought this block held.
            pool.forget(b)
        pool.take(b, seq.tenant)
        pool.set_fill(b, min(bs, num_computed - i * bs))
        if i < len(keys):
            pool.register(b, keys[i])
    seq.blocks = list(blocks)
    seq.keys = keys
    seq.num_slots = num_computed
