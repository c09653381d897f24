"""A sequence as the scheduler sees it: tokens, KV progress, placement and
the bookkeeping its policy keeps on it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

_tickets = itertools.count()


def next_ticket() -> int:
    """A place at the back of a line (monotonic over the process)."""
    return next(_tickets)


@dataclass(eq=False)
class Seq:
    seq_no: int  # the driver's seq id (unique in this scheduler)
    tokens: list[int]  # prompt, then generated ids
    num_prompt: int
    tenant: str = ""
    priority: int = 0
    arrival: float = 0.0  # monotonic seconds
    owner: Any = None  # the request this sequence serves (opaque here)
    max_len: int = 0  # positions it may reach (prompt + max tokens; 0: unknown)
    # KV state. `mem_known`: tokens the memory server holds for `mem_id`;
    # `num_computed`: positions whose KV the driver has written. While
    # `swapped`, the KV is in its pool's host swap tier and `block_table`
    # names swap slots, not device blocks.
    generation: int = 0
    num_computed: int = 0
    mem_known: int = 0
    block_table: list[int] = field(default_factory=list)
    pool: str | None = None
    swapped: bool = False
    # Policy state.
    ticket: int = field(default_factory=next_ticket)
    quantum_used: int = 0
    level: int = 0
    boost_epoch: int = 0
    served: int = 0  # tokens computed for this sequence, recompute included
    high_water: int = 0  # most positions ever computed (recompute stays below it)
    preemptions: int = 0

    @property
    def mem_id(self) -> str:
        # A new id per incarnation: after a reset the memory server may still
        # hold the old one (until its pool is dropped), and the two must not mix.
        return f"{self.seq_no}.{self.generation}"

    @property
    def remaining(self) -> int:
        """Tokens whose KV must still be computed (1 for a decoding sequence)."""
        return len(self.tokens) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    def reset(self, *, keep_pool: bool) -> None:
        """Forget the KV (preemption by recompute, or the KV was lost): the
        sequence starts over from its tokens under a fresh memory id."""
        self.generation += 1
        self.num_computed = 0
        self.mem_known = 0
        self.block_table = []
        self.swapped = False
        if not keep_pool:
            self.pool = None
