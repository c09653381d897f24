"""One driver instance's KV cache: device blocks, prefix cache, swap tier."""

from __future__ import annotations

from services.memory._free_queue import FreeBlockQueue
from services.memory._swap import SwapSpace
from services.memory._tenants import TenantLedger


class BlockPool:
    """Device blocks with ref counts, the prefix cache and the free queue.

    Block metadata lives in parallel lists sized once at registration, so
    the hot path only rewrites ints. A block is in exactly one state:
    *used* (ref > 0), *cached* (ref 0, still keyed in the prefix cache) or
    *free* (ref 0, holding nothing reusable). Cached blocks are evicted
    lazily, when a block is needed and no free one is left, least recently
    freed first.
    """

    def __init__(self, pool_id: str, num_blocks: int, block_size: int, swap_slots: int,
                 ledger: TenantLedger):
        self.pool_id = pool_id
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        # The tenant of a used or cached block; a cache hit must match it.
        self.owner = [""] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        # Slots holding a token; kept for cached blocks (always full) so a
        # hit restores them.
        self.fill = [0] * num_blocks
        self.queue = FreeBlockQueue(num_blocks)
        self.cached: dict[bytes, int] = {}
        self.swap = SwapSpace(swap_slots, ledger)
        self._ledger = ledger
        self.num_used = 0
        self.num_cached = 0  # cached blocks with ref 0
        self.total_fill = 0  # over used blocks
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0
        self.swapped_out = 0
        self.swapped_in = 0
        self.cow_copies = 0

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free ones, then cached ones."""
        return self.queue.size

    def allocate(self, tenant: str) -> int:
        block = self.queue.popleft()
        key = self.key[block]
        if key is not None:
            del self.cached[key]
            self.key[block] = None
            self.num_cached -= 1
            self.evictions += 1
        self.ref[block] = 1
        self.owner[block] = tenant
        self.fill[block] = 0
        self.num_used += 1
        self._ledger.add(tenant)
        return block

    def take(self, block: int, tenant: str) -> None:
        """Hold a block by id: a cache hit, a fork, or adoption in recovery."""
        if self.ref[block] == 0:
            self.queue.remove(block)
            if self.key[block] is None:
                self.fill[block] = 0
            else:
                self.num_cached -= 1
            self.owner[block] = tenant
            self.num_used += 1
            self.total_fill += self.fill[block]
            self._ledger.add(tenant)
        self.ref[block] += 1

    def free(self, block: int) -> bool:
        """Drop one reference; True when the block is no longer used."""
        r = self.ref[block] - 1
        self.ref[block] = r
        if r:
            return False
        self.num_used -= 1
        self.total_fill -= self.fill[block]
        self._ledger.sub(self.owner[block])
        if self.key[block] is None:
            self.owner[block] = ""
            self.queue.appendleft(block)
        else:
            self.queue.append(block)
            self.num_cached += 1
        return True

    def set_fill(self, block: int, fill: int) -> None:
        self.total_fill += fill - self.fill[block]
        self.fill[block] = fill

    def lookup(self, key: bytes, tenant: str) -> int:
        """The block cached under `key` for `tenant`, or -1."""
        block = self.cached.get(key, -1)
        # The key already separates tenants; the owner check keeps that true
        # even if two keys ever collided.
        if block >= 0 and self.owner[block] != tenant:
            return -1
        return block

    def register(self, block: int, key: bytes) -> None:
        """Offer a full, computed block to the prefix cache. A second block
        with the same content stays out: one copy is enough."""
        if self.key[block] is None and key not in self.cached:
            self.cached[key] = block
            self.key[block] = key

    def forget(self, block: int) -> None:
        """Take a block out of the prefix cache (its content is unknown)."""
        key = self.key[block]
        if key is None:
            return
        del self.cached[key]
        self.key[block] = None
        if self.ref[block] == 0:
            self.num_cached -= 1
            self.owner[block] = ""
            self.queue.remove(block)
            self.queue.appendleft(block)

    def evict(self, max_blocks: int) -> int:
        """Evict up to `max_blocks` cached blocks (all if negative), least
        recently used first; returns how many."""
        victims: list[int] = []
        for block in self.queue:
            if len(victims) == max_blocks:
                break
            if self.key[block] is not None:
                victims.append(block)
        for block in victims:
            self.forget(block)
        self.evictions += len(victims)
        return len(victims)

    def release_all(self) -> None:
        """Give back every tenant's blocks (the driver holding them died)."""
        for block, r in enumerate(self.ref):
            if r:
                self._ledger.sub(self.owner[block])
        self.swap.release_all()
