"""The books `test_memory_model` keeps beside the MemoryManager: what each
pool's driver holds, slot by slot, and each sequence's tokens and table as
the replies described them."""

from __future__ import annotations

from dataclasses import dataclass, field

TENANTS = ["a", "b"]


@dataclass
class PoolModel:
    num_blocks: int
    bs: int
    swap_slots: int
    # What the driver holds: the token written in each slot of each block.
    content: list[list[int | None]] = field(default_factory=list)
    writer: list[str | None] = field(default_factory=list)
    swap_content: list[list[int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.content = [[None] * self.bs for _ in range(self.num_blocks)]
        self.writer = [None] * self.num_blocks
        self.swap_content = [[None] * self.bs for _ in range(self.swap_slots)]


@dataclass
class SeqModel:
    tenant: str
    pool: str
    tokens: list[int]
    num_slots: int = 0
    table: list[int] = field(default_factory=list)
    swapped: bool = False


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceBooks:
    """The model's state and its views (mixed into the state machine)."""

    def init_books(self) -> None:
        self.pools: dict[str, PoolModel] = {}
        self.seqs: dict[int, SeqModel] = {}
        self.limits: dict[str, int] = {}
        self.next_id = 0
        self.dead: list[int] = []

    def holders(self, pool: str, swapped: bool = False) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for sid, s in self.seqs.items():
            if s.pool == pool and s.swapped == swapped:
                for b in s.table:
                    out.setdefault(b, []).append(sid)
        return out

    def held(self, tenant: str) -> int:
        return sum(1 for p in self.pools for hs in self.holders(p).values()
                   if self.seqs[hs[0]].tenant == tenant)

    def available(self, pool: str) -> int:
        return self.pools[pool].num_blocks - len(self.holders(pool))

    def quota_room(self, tenant: str) -> float:
        limit = self.limits.get(tenant, -1)
        return float("inf") if limit < 0 else limit - self.held(tenant)

    def forget_pool(self, pool: str, lost: list[int]) -> None:
        assert sorted(lost) == sorted(sid for sid, s in self.seqs.items() if s.pool == pool)
        for sid in lost:
            del self.seqs[sid]
            self.dead.append(sid)
        del self.pools[pool]

    @staticmethod
    def pick(ids: list[int], picks: list[int]) -> list[int]:
        return list(dict.fromkeys(ids[p % len(ids)] for p in picks))

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def check_quota(self, before: dict[str, int]) -> None:
        for t in TENANTS:
            limit = self.limits.get(t, -1)
            if limit >= 0:
                assert self.held(t) <= max(limit, before[t]), (t, self.held(t), limit)
