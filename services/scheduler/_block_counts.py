"""Distinct KV blocks per pool, counted incrementally: the block ledger's
count of what the live sequences hold, kept from one step to the next so
that only the block tables that changed are counted again."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from services.scheduler._request import Seq


class BlockCounts:
    """The distinct blocks per pool that a set of sequences holds, kept from
    one step to the next: `distinct` updates it from the sequences whose
    block table changed since (a C-level list compare tells; a decode that
    took no block is that compare alone, one that took a block or copied
    one on write adds and removes only its table's tail), so a ledger built
    every step does not hash every block of every context again."""

    def __init__(self) -> None:
        self._refs: dict[str, Counter[int]] = {}  # pool -> block -> holders
        # id(seq) -> (the sequence, its pool and block table as counted)
        self._counted: dict[int, tuple[Seq, str, list[int]]] = {}

    def distinct(self, seqs: Iterable[Seq]) -> dict[str, int]:
        """pool -> distinct blocks `seqs` hold (each sequence's table on its pool)."""
        counted = self._counted
        now: set[int] = set()
        for s in seqs:
            key, table, pool = id(s), s.block_table, s.pool or ""
            if key in now:
                continue
            now.add(key)
            old = counted.get(key)
            if old is not None and old[1] == pool and old[2] == table:
                continue
            refs = self._refs.setdefault(pool, Counter())
            prev = old[2] if old is not None and old[1] == pool else []
            n = len(prev)
            if n and table[:n - 1] == prev[:n - 1]:
                # Only the tail changed (a block taken, a copy on write).
                self._drop(pool, prev[n - 1:])
                refs.update(table[n - 1:])
            else:
                if old is not None:
                    self._drop(old[1], old[2])
                refs.update(table)
            counted[key] = (s, pool, list(table))
        for key in [k for k in counted if k not in now]:
            _, pool, table = counted.pop(key)
            self._drop(pool, table)
        return {p: len(refs) for p, refs in self._refs.items()}

    def _drop(self, pool: str, blocks: list[int]) -> None:
        refs = self._refs[pool]
        for b in blocks:
            n = refs[b] - 1
            if n:
                refs[b] = n
            else:
                del refs[b]
