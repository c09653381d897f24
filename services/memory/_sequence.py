"""A sequence as the memory server sees it."""

from __future__ import annotations

from array import array

from services.memory._hashing import block_key
from services.memory._pool import BlockPool


class Sequence:
    """Tokens, slots and block table of one sequence.

    `blocks` holds device block ids while resident and swap slot ids while
    swapped out. `keys[i]` is the prefix-cache key of logical block i, known
    for the leading blocks that are full and computed (`commit`).
    """

    __slots__ = ("seq_id", "tenant", "pool", "root", "tokens", "num_slots", "blocks", "keys",
                 "swapped")

    def __init__(self, seq_id: int, tenant: str, pool: BlockPool, root: bytes,
                 tokens: array, num_slots: int = 0, blocks: list[int] | None = None,
                 keys: list[bytes] | None = None, swapped: bool = False):
        self.seq_id = seq_id
        self.tenant = tenant
        self.pool = pool
        self.root = root
        self.tokens = tokens
        self.num_slots = num_slots
        self.blocks: list[int] = blocks if blocks is not None else []
        self.keys: list[bytes] = keys if keys is not None else []
        self.swapped = swapped

    def commit(self, computed: int = -1) -> None:
        """Key the blocks that became full and computed since the last call
        and offer them to the prefix cache. Only for a resident sequence.
        `computed` (-1: every slot): positions known to hold their KV."""
        bs = self.pool.block_size
        keys = self.keys
        done = len(keys)
        if self.num_slots < (done + 1) * bs:
            return  # the usual case: no block filled up since the last call
        limit = min(self.num_slots, len(self.tokens), self.num_slots if computed < 0 else computed) // bs
        if done >= limit:
            return
        parent = keys[-1] if keys else self.root
        tokens, blocks, pool = self.tokens, self.blocks, self.pool
        for i in range(done, limit):
            parent = block_key(parent, tokens[i * bs:(i + 1) * bs])
            keys.append(parent)
            pool.register(blocks[i], parent)
