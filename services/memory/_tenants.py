"""Per-tenant block accounting and quotas, over every pool."""

from __future__ import annotations

import sys

from ipc.errors import Overloaded
from ipc.protocol.memory import KV_BLOCKS, NO_LIMIT


class TenantLedger:
    """Device blocks and swap slots each tenant holds, and its quota.

    A block counts once however many of the tenant's sequences share it
    (forks share physically). Cached blocks nobody holds count for no one:
    they are evictable.
    """

    __slots__ = ("held", "swapped", "limits", "default_limit")

    def __init__(self, default_limit: int = NO_LIMIT, limits: dict[str, int] | None = None):
        self.held: dict[str, int] = {}
        self.swapped: dict[str, int] = {}
        self.limits: dict[str, int] = dict(limits or {})
        self.default_limit = default_limit

    def limit(self, tenant: str) -> int:
        return self.limits.get(tenant, self.default_limit)

    def room(self, tenant: str) -> int:
        limit = self.limits.get(tenant, self.default_limit)
        return sys.maxsize if limit < 0 else limit - self.held.get(tenant, 0)

    def check(self, tenant: str, blocks: int) -> None:
        """Refuse `blocks` more for `tenant` beyond its quota: `overloaded`, as
        the tenant's own blocks free up when its other sequences end. The
        detail names the quota and its numbers, so the scheduler can tell a
        quota wait from a full pool and learn a limit it was not told of."""
        if blocks > 0 and blocks > self.room(tenant):
            held = self.held.get(tenant, 0)
            raise Overloaded(
                f"tenant {tenant!r} would exceed its KV block quota (kv_blocks): holds "
                f"{held}, needs {blocks} more, limit {self.limit(tenant)}",
                detail={"tenant": tenant, "quota": KV_BLOCKS, "limit": self.limit(tenant), "held": held,
                        "needed": blocks})

    def add(self, tenant: str, n: int = 1) -> None:
        self.held[tenant] = self.held.get(tenant, 0) + n

    def sub(self, tenant: str, n: int = 1) -> None:
        left = self.held[tenant] - n
        if left:
            self.held[tenant] = left
        else:
            del self.held[tenant]

    def add_swapped(self, tenant: str, n: int = 1) -> None:
        self.swapped[tenant] = self.swapped.get(tenant, 0) + n

    def sub_swapped(self, tenant: str, n: int = 1) -> None:
        left = self.swapped[tenant] - n
        if left:
            self.swapped[tenant] = left
        else:
            del self.swapped[tenant]

    def tenants(self) -> list[str]:
        return sorted(self.held.keys() | self.swapped.keys() | self.limits.keys())
