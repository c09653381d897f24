"""The swap tier of one pool: slots in the driver's host memory."""

from __future__ import annotations

from services.memory._tenants import TenantLedger


class SwapSpace:
    """Swap slots with ref counts (forks swapped out together share slots)."""

    __slots__ = ("num_slots", "ref", "owner", "_free", "_ledger")

    def __init__(self, num_slots: int, ledger: TenantLedger):
        self.num_slots = num_slots
        self.ref = [0] * num_slots
        self.owner = [""] * num_slots
        # Popped from the end: lowest slot first keeps the host tier compact.
        self._free = list(range(num_slots - 1, -1, -1))
        self._ledger = ledger

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, tenant: str) -> int:
        slot = self._free.pop()
        self.ref[slot] = 1
        self.owner[slot] = tenant
        self._ledger.add_swapped(tenant)
        return slot

    def share(self, slot: int) -> None:
        self.ref[slot] += 1

    def free(self, slot: int) -> None:
        self.ref[slot] -= 1
        if not self.ref[slot]:
            self._ledger.sub_swapped(self.owner[slot])
            self.owner[slot] = ""
            self._free.append(slot)

    def release_all(self) -> None:
        """Forget every slot (the driver holding them died)."""
        for slot, r in enumerate(self.ref):
            if r:
                self._ledger.sub_swapped(self.owner[slot])
                self.ref[slot] = 0
                self.owner[slot] = ""
        self._free = list(range(self.num_slots - 1, -1, -1))
