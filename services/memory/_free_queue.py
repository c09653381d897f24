"""The free block queue: free device blocks in the order they are reused."""

from __future__ import annotations

from collections.abc import Iterator


class FreeBlockQueue:
    """A doubly linked list threaded through two preallocated int lists.

    A cache hit pulls a block out of the middle, so removal must be O(1); a
    deque cannot do that and a node object per block would be churn (this is
    vLLM v1's FreeKVCacheBlockQueue with ints instead of objects). The head is
    reused first. Callers keep blocks holding nothing reusable at the head
    and cached blocks at the tail, so the queue reads
    ``[empty..., cached from least to most recently freed]``.
    """

    __slots__ = ("_prev", "_next", "_head", "_tail", "size")

    def __init__(self, num_blocks: int):
        n = num_blocks
        # Nodes 0..n-1 are blocks; n and n+1 are the head and tail sentinels.
        self._head = n
        self._tail = n + 1
        self._next = [i + 1 for i in range(n)] + [0 if n else n + 1, -1]
        self._prev = [i - 1 for i in range(n)] + [-1, n - 1 if n else n]
        if n:
            self._next[n - 1] = self._tail
            self._prev[0] = self._head
        self.size = n

    def __len__(self) -> int:
        return self.size

    def __contains__(self, block: int) -> bool:
        return self._prev[block] != -1

    def __iter__(self) -> Iterator[int]:
        b = self._next[self._head]
        while b != self._tail:
            yield b
            b = self._next[b]

    def popleft(self) -> int:
        b = self._next[self._head]
        if b == self._tail:
            raise IndexError("pop from an empty free block queue")
        self.remove(b)
        return b

    def remove(self, block: int) -> None:
        prv, nxt = self._prev[block], self._next[block]
        self._next[prv] = nxt
        self._prev[nxt] = prv
        self._prev[block] = self._next[block] = -1
        self.size -= 1

    def append(self, block: int) -> None:
        last = self._prev[self._tail]
        self._next[last] = block
        self._prev[block] = last
        self._next[block] = self._tail
        self._prev[self._tail] = block
        self.size += 1

    def appendleft(self, block: int) -> None:
        first = self._next[self._head]
        self._prev[first] = block
        self._next[block] = first
        self._prev[block] = self._head
        self._next[self._head] = block
        self.size += 1
