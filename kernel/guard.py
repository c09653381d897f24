"""The capability check on every client request (DESIGN §4).

Local and cheap: the HMAC chain is checked once per distinct token (verified
tokens are cached by their bytes); each request then costs a dict lookup, an
expiry compare, three set lookups for revocation and a memoised rights check.
The kernel never asks the security server anything, so verification goes on
while that server restarts.

Refusals are queued as `AccessDenied` events for the audit log, aggregated by
(source, code, reason, destination, op, principal): a flood from one client is one
event with a count, not one per frame; bounded: at most `BACKLOG` distinct
refusals wait for the security server, older ones are counted as dropped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import msgspec

from common.capability import PUBLIC_OPS, Capability, RevocationList, verify
from ipc.envelope import Header
from ipc.errors import BadRequest, Forbidden, LlmosError, Unauthorized
from common.home import revocations_path, root_key_path
from common.keyfile import load_or_create_key
from ipc.protocol import kernel as kp

CACHE_SIZE = 8192
BACKLOG = 1024


class Guard:
    def __init__(self, root_key: bytes, revoked: RevocationList, service_of: Callable[[str], str]):
        self._root = root_key
        self.revoked = revoked
        self._service_of = service_of
        self._cache: dict[bytes, Capability] = {}
        self.denials: dict[tuple[str, ...], kp.AccessDenied] = {}  # insertion order = oldest first
        self.dropped = 0

    @classmethod
    def load(cls, home: Path, service_of: Callable[[str], str]) -> "Guard":
        """At boot: the root key (created on first boot) and the persisted
        revocation list. A damaged list stops the boot: starting without it
        would honour revoked tokens."""
        root = load_or_create_key(root_key_path(home))
        path = revocations_path(home)
        revoked = RevocationList()
        if path.exists():
            try:
                revoked = msgspec.json.decode(path.read_bytes(), type=RevocationList)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BadRequest(f"revocation list {path} is damaged: {exc}") from None
        return cls(root, revoked, service_of)

    def admit(self, header: Header, source: str = "") -> Header:
        """The header to route, with what services trust stamped over what
        the client sent: the verified principal, the token's body-dependent
        restrictions, `src` = `source` (the requester as the kernel names it)
        and attempt 0 (only the kernel's re-send counts attempts) — in one
        copy, this being the hot path. Raises `Unauthorized` or `Forbidden`,
        after queueing an `AccessDenied`. Login passes whatever token it
        carries (an expired one is why a client logs in again)."""
        try:
            return self._check(header, source)
        except _Denied as denied:
            if (self._service_of(header.dst), header.op) in PUBLIC_OPS:
                return msgspec.structs.replace(header, principal="", restrictions=b"", src=source, attempt=0)
            self._queue(header, denied.error, denied.cap, source)
            raise denied.error from None

    def _check(self, header: Header, source: str) -> Header:
        raw = header.token
        if not raw:
            raise _Denied(Unauthorized(f"{header.op} to {header.dst!r} needs a capability token; "
                                       f"log in with an API key first"))
        now = time.time()
        c = self._cache.get(raw)
        if c is None:
            try:
                c = verify(self._root, raw, now)
            except LlmosError as exc:
                raise _Denied(exc) from None
            if len(self._cache) >= CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
            self._cache[raw] = c
        elif c.expires_at <= now:
            del self._cache[raw]
            raise _Denied(Unauthorized("capability token expired; log in again"), c)
        why = self.revoked.reason(c)
        if why is not None:
            raise _Denied(Unauthorized(why), c)
        # memoised per (dst, op) on the capability: the hot path skips service_of
        allowed = c.allowed.get((header.dst, header.op))
        if allowed is None:
            service = self._service_of(header.dst)
            allowed = c.covers(service, header.op) or (service, header.op) in PUBLIC_OPS
            if len(c.allowed) < 256:
                c.allowed[(header.dst, header.op)] = allowed
        if not allowed:
            raise _Denied(Forbidden(f"principal {c.principal!r} holds no right covering {header.op} on "
                                    f"{header.dst!r} (rights: {', '.join(sorted(c.rights)) or 'none'})"), c)
        return msgspec.structs.replace(header, principal=c.principal, restrictions=c.restrictions_raw,
                                       src=source, attempt=0)

    def set_revocations(self, revoked: RevocationList) -> None:
        self.revoked = revoked

    def note(self, header: Header, exc: LlmosError, source: str = "", principal: str = "") -> None:
        """Queue an `AccessDenied` for a refusal decided elsewhere in the kernel."""
        self._queue(header, exc, None, source, principal)

    def _queue(self, header: Header, exc: LlmosError, c: Capability | None, source: str,
               principal: str = "") -> None:
        principal = c.principal if c else principal
        key = (source, str(exc.code), exc.message, header.dst, header.op, principal)
        ev = self.denials.get(key)
        if ev is not None:
            ev.count += 1
            return
        if len(self.denials) >= BACKLOG:
            oldest = next(iter(self.denials))
            self.dropped += self.denials.pop(oldest).count
        self.denials[key] = kp.AccessDenied(str(exc.code), exc.message, header.dst, header.op, principal,
                                            c.token_id if c else "", time.time(), source=source)

    def take_denials(self) -> list[kp.AccessDenied]:
        """The queued refusals, oldest first (the first carries the count dropped)."""
        out = list(self.denials.values())
        self.denials.clear()
        if out and self.dropped:
            out[0].dropped, self.dropped = self.dropped, 0
        return out


class _Denied(Exception):
    """A refusal on its way out of `_check`, with the capability when one verified."""

    def __init__(self, error: LlmosError, cap: Capability | None = None):
        self.error = error
        self.cap = cap
