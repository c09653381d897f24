"""The swap tier: numbered slots in host memory (or a disk file) that each
hold one KV block's bytes.

The memory server decides which slot holds which swapped-out block; this
object only stores and returns bytes. With a `path` the slots live in a
disk-backed `np.memmap`, so the tier can be far larger than RAM (virtual
memory past device memory); without one they are plain host RAM.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drivers.model.errors import InvalidStep


class HostTier:
    def __init__(self, num_slots: int, slot_nbytes: int, path: str | Path | None = None):
        if num_slots < 1 or slot_nbytes < 1:
            raise InvalidStep(f"host tier: need num_slots >= 1 and slot_nbytes >= 1, "
                              f"got {num_slots} and {slot_nbytes}")
        self.num_slots = num_slots
        self.slot_nbytes = slot_nbytes
        self.path = Path(path) if path is not None else None
        self._slots: np.ndarray
        if self.path is None:
            self._slots = np.zeros((num_slots, slot_nbytes), dtype=np.uint8)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Swap contents do not survive a restart (the KV blocks they came
            # from are gone too), so the file is always created afresh.
            self._slots = np.memmap(self.path, dtype=np.uint8, mode="w+",
                                    shape=(num_slots, slot_nbytes))

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_nbytes

    def write(self, slots: Sequence[int], data: np.ndarray) -> None:
        """Store rows of `data` (uint8 [len(slots), slot_nbytes]) in `slots`."""
        idx = self._index(slots)
        if len(set(idx.tolist())) != len(idx):
            raise InvalidStep("host tier: a slot appears twice in one write")
        if data.dtype != np.uint8 or data.shape != (len(idx), self.slot_nbytes):
            raise InvalidStep(f"host tier: expected uint8 data of shape ({len(idx)}, "
                              f"{self.slot_nbytes}), got {data.dtype} {data.shape}")
        self._slots[idx] = data

    def read(self, slots: Sequence[int]) -> np.ndarray:
        """A copy of the bytes in `slots`: uint8 [len(slots), slot_nbytes]."""
        return np.asarray(self._slots[self._index(slots)])

    def close(self) -> None:
        """Release the memory and delete the backing file, if any."""
        # Dropping the last reference unmaps the file; unlinking an open
        # mapping is fine on POSIX.
        self._slots = np.zeros((0, self.slot_nbytes), dtype=np.uint8)
        self.num_slots = 0
        if self.path is not None and self.path.exists():
            os.unlink(self.path)

    def _index(self, slots: Sequence[int]) -> np.ndarray:
        try:
            idx = np.array([operator.index(s) for s in slots], dtype=np.int64)
        except TypeError:
            raise InvalidStep(f"host tier: slot ids must be integers, got {list(slots)!r}") from None
        bad = idx[(idx < 0) | (idx >= self.num_slots)]
        if bad.size:
            raise InvalidStep(f"host tier: slot {int(bad[0])} is not in [0, {self.num_slots})")
        return idx
