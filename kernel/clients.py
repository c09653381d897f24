"""What each client (front identity) has in flight, and the caps on it.

The kernel answers for every request it accepted until it is answered,
failed or cancelled; without a per-client bound one client without any key
kept tens of thousands of Logins in flight, and each of its DISCONNECTs then
scanned them all (kernel stalls of seconds, issue 12 review). Here each
client's routing ids are kept by identity, so a departed client costs what it
owned, and three caps hold:

* requests in flight per client (`limit`), and their bytes (`limit_bytes`,
  and `total_bytes` for all clients): the kernel holds a request's frames
  until it is answered (to re-send it if its instance dies), so a tenant's
  near-limit frames would otherwise add up to gigabytes;
* public (unauthenticated) requests in flight per client (`public_limit`):
  a Login flood from one socket waits at most that deep in front of other
  clients' logins at the security server;
* public requests in flight in all (`public_total`).

Plain data; the router decides what a refusal is answered with.
"""

from __future__ import annotations


class ClientBook:
    def __init__(self, limit: int, public_limit: int, public_total: int, limit_bytes: int = 0,
                 total_bytes: int = 0):
        self.limit = limit
        self.public_limit = public_limit
        self.public_total = public_total
        self.limit_bytes = limit_bytes  # 0: no such bound
        self.total_bytes = total_bytes
        self._rids: dict[bytes, set[int]] = {}
        self._public: dict[bytes, int] = {}
        self._public_count = 0
        self._bytes: dict[bytes, int] = {}
        self._bytes_count = 0

    def refusal(self, ident: bytes, public: bool, size: int = 0) -> str:
        """Why `ident` may not have one more request (of `size` bytes) in
        flight ("" if it may)."""
        rids = self._rids.get(ident)
        if rids is not None and len(rids) >= self.limit:
            return f"this client has {self.limit} requests in flight"
        if self.limit_bytes and rids and self._bytes.get(ident, 0) + size > self.limit_bytes:
            return f"this client's requests in flight would exceed {self.limit_bytes} bytes"
        if self.total_bytes and self._bytes_count and self._bytes_count + size > self.total_bytes:
            return f"requests in flight would exceed {self.total_bytes} bytes in all"
        if public:
            if self._public.get(ident, 0) >= self.public_limit:
                return f"this client has {self.public_limit} unauthenticated requests in flight"
            if self._public_count >= self.public_total:
                return f"the kernel holds {self.public_total} unauthenticated requests"
        return ""

    def add(self, ident: bytes, rid: int, public: bool, size: int = 0) -> None:
        self._rids.setdefault(ident, set()).add(rid)
        if size:
            self._bytes[ident] = self._bytes.get(ident, 0) + size
            self._bytes_count += size
        if public:
            self._public[ident] = self._public.get(ident, 0) + 1
            self._public_count += 1

    def remove(self, ident: bytes, rid: int, public: bool, size: int = 0) -> None:
        rids = self._rids.get(ident)
        if rids is None or rid not in rids:
            return
        rids.discard(rid)
        if not rids:
            del self._rids[ident]
        if size:
            left = self._bytes.get(ident, 0) - size
            if left > 0:
                self._bytes[ident] = left
            else:
                self._bytes.pop(ident, None)
            self._bytes_count -= size
        if public:
            left = self._public.get(ident, 0) - 1
            if left > 0:
                self._public[ident] = left
            else:
                self._public.pop(ident, None)
            self._public_count -= 1

    def take(self, ident: bytes) -> set[int]:
        """Forget `ident`: the routing ids it had in flight (the caller ends them)."""
        rids = self._rids.pop(ident, set())
        self._public_count -= self._public.pop(ident, 0)
        self._bytes_count -= self._bytes.pop(ident, 0)
        return rids

    def in_flight(self, ident: bytes) -> int:
        return len(self._rids.get(ident, ()))

    def __len__(self) -> int:
        return sum(len(r) for r in self._rids.values())


__all__ = ["ClientBook"]
