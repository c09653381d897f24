"""Block allocation for one sequence: reserve, release, fork.

Each operation checks everything it needs before it changes anything, so a
failure (raised as an `ipc.errors` exception) leaves the sequence and its
pool exactly as they were.
"""

from __future__ import annotations

from array import array

from ipc.errors import BadRequest, Overloaded
from ipc.protocol.memory import SeqBlocks
from services.memory._hashing import block_key
from services.memory._pool import BlockPool
from services.memory._sequence import Sequence
from services.memory._tenants import TenantLedger


def reserve(seq: Sequence, new_tokens: array, num_new: int, ledger: TenantLedger, ahead: int = 0,
            computed: int = -1) -> SeqBlocks:
    """Append `new_tokens` and reserve slots for the next `num_new` tokens
    whose KV the step computes, up to `ahead` of them not known yet; on the
    first allocation serve what the prefix cache holds first. `computed`
    (-1: all slots) bounds what is offered to the prefix cache."""
    if seq.swapped:
        raise BadRequest(f"sequence {seq.seq_id!r} is swapped out; swap it in first")
    pool = seq.pool
    bs = pool.block_size
    blocks = seq.blocks
    known = len(seq.tokens) + len(new_tokens)
    first = not blocks and seq.num_slots == 0
    if first:
        tokens = seq.tokens + new_tokens if seq.tokens else new_tokens
        hits, hit_keys = _lookup(seq, pool, tokens, known)
        held = len(hits)
        base = held * bs
        # Hits on blocks nobody holds come out of the same free queue.
        needed = sum(1 for b in hits if pool.ref[b] == 0)
        cow = False
    else:
        base = seq.num_slots
        held = len(blocks)
        needed = 0
    target = base + num_new
    if target > known + ahead:
        target = max(base, known + ahead)
    grow = -(-target // bs) - held
    if not first:
        cow = target > base and base % bs != 0 and pool.ref[blocks[-1]] > 1
    needed += grow + cow
    if needed:
        if needed > pool.num_available:
            raise Overloaded(
                f"pool {pool.pool_id!r} is out of KV blocks: sequence {seq.seq_id!r} needs "
                f"{needed}, {pool.num_available} available",
                detail={"pool": pool.pool_id, "needed": needed, "available": pool.num_available})
        ledger.check(seq.tenant, needed)

    if new_tokens:
        seq.tokens.extend(new_tokens)
    table_start = len(blocks)
    if first:
        for b in hits:
            pool.take(b, seq.tenant)
        blocks.extend(hits)
        seq.keys.extend(hit_keys)
        if target:
            pool.prompt_tokens += known
            pool.hit_tokens += base
    else:
        seq.commit(computed)
    cow_src = cow_dst = -1
    if cow:
        cow_src = blocks[-1]
        cow_dst = pool.allocate(seq.tenant)
        pool.free(cow_src)
        blocks[-1] = cow_dst
        table_start -= 1
        pool.cow_copies += 1
    for _ in range(grow):
        blocks.append(pool.allocate(seq.tenant))
    if target > base or cow:
        for i in range(base // bs, len(blocks)):
            pool.set_fill(blocks[i], min(bs, target - i * bs))
    seq.num_slots = target
    return SeqBlocks(seq.seq_id, table_start, blocks[table_start:], base if first else 0,
                     cow_src, cow_dst)


def _lookup(seq: Sequence, pool: BlockPool, tokens: array,
            known: int) -> tuple[list[int], list[bytes]]:
    """The leading blocks of `tokens` found in the prefix cache, and their keys."""
    hits: list[int] = []
    keys: list[bytes] = []
    if not pool.cached:
        return hits, keys
    # The last prompt token is never served from the cache: its logits are
    # needed to sample, so at least that token is computed.
    bs = pool.block_size
    parent = seq.root
    for i in range((known - 1) // bs):
        parent = block_key(parent, tokens[i * bs:(i + 1) * bs])
        block = pool.lookup(parent, seq.tenant)
        if block < 0:
            break
        hits.append(block)
        keys.append(parent)
    return hits, keys


def release(seq: Sequence, computed: bool = True) -> int:
    """Drop the sequence's blocks; returns how many are no longer used.
    Full blocks stay in the prefix cache (with `computed`, also those the
    last step filled)."""
    pool = seq.pool
    if seq.swapped:
        for slot in seq.blocks:
            pool.swap.free(slot)
        seq.blocks = []
        return 0
    if computed:
        seq.commit()
    freed = 0
    # Last blocks first: the tail of the free queue is evicted last, and a
    # prompt's first blocks are the ones most worth keeping.
    for b in reversed(seq.blocks):
        freed += pool.free(b)
    seq.blocks = []
    return freed


def fork(parent: Sequence, child_id: int) -> Sequence:
    """A child sharing all of `parent`'s blocks (copied on write)."""
    if parent.swapped:
        raise BadRequest(f"sequence {parent.seq_id!r} is swapped out; swap it in before forking")
    parent.commit()
    pool = parent.pool
    for b in parent.blocks:
        pool.take(b, parent.tenant)
    return Sequence(child_id, parent.tenant, pool, parent.root, array("q", parent.tokens),
                    parent.num_slots, list(parent.blocks), list(parent.keys))
