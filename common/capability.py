"""Capability tokens: macaroon-style HMAC chains (Birgisson et al., NDSS 2014).

    token  = msgpack [version, id, caveats, sig]      (`Token`, ~150 bytes)
    sig_0  = HMAC-SHA256(root_key, DOMAIN || id)
    sig_i  = HMAC-SHA256(sig_{i-1}, caveat_i)          caveat_i: its exact encoded bytes
    sig    = sig_n

The security server mints a token whose first caveat is the `Grant`
(principal, key id, rights, expiry). A holder attenuates it without the root
key by appending a caveat and replacing `sig` with HMAC(sig, caveat): every
caveat is a further restriction (rights are intersected, expiries take the
minimum), so appending can only narrow, and removing or editing a caveat
breaks the chain. Unknown caveat kinds make a token invalid (fail closed).

The kernel verifies locally with the root key (`verify`), then checks the
revocation list and that the rights cover (service, op) via `RIGHTS` — the one
table saying what each right is for. Restrictions the kernel cannot check
(they depend on a request's body: max_tokens, session) reach the service in
the header's `restrictions` field (`Restrictions`), stamped by the kernel.

No I/O here: key files live in `common.keyfile`, the revocation list's file in
the security server and the kernel.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Union

import msgspec

from ipc.errors import BadRequest, Unauthorized

VERSION = 1
ID_BYTES = 16
MAX_CAVEATS = 16
MAX_TOKEN_BYTES = 4096
TEXT_PREFIX = "llmos-t1."
_DOMAIN = b"llmos capability v1\x00"

# What each right covers: (service, op) patterns (fnmatch; "*" = any). Policy as
# data, in one place: the scheduler's session/job ops are matched by name so the
# table need not change when that protocol grows.
RIGHTS: dict[str, tuple[tuple[str, str], ...]] = {
    "admin": (("*", "*"),),
    "status": (("kernel", "Status"), ("scheduler", "SchedulerStats")),
    "generate": (("scheduler", "Submit"), ("scheduler", "Cancel"), ("scheduler", "RequestStatus")),
    "session": (("scheduler", "*Session*"),),
    "jobs": (("scheduler", "*Job*"),),
    "priority": (("scheduler", "PrioritySubmit"),),  # run ahead of the default priority (< 0)
    "echo": (("echo", "*"),),  # the test/benchmark service
}

# Ops served without a token (to get one) and ops any valid token may call.
PUBLIC_OPS: frozenset[tuple[str, str]] = frozenset({("security", "Login")})
ANY_TOKEN_OPS: frozenset[tuple[str, str]] = frozenset({("security", "RefreshToken")})


def check_rights(rights: Iterable[str]) -> tuple[str, ...]:
    """Validate right names against `RIGHTS`; raises `BadRequest` naming the unknown ones."""
    out = tuple(sorted(set(rights)))
    unknown = [r for r in out if r not in RIGHTS]
    if unknown:
        raise BadRequest(f"unknown rights {unknown}; known: {sorted(RIGHTS)}", detail={"field": "rights"})
    if not out:
        raise BadRequest("at least one right is needed", detail={"field": "rights"})
    return out


def rights_cover(rights: Iterable[str], service: str, op: str) -> bool:
    if (service, op) in ANY_TOKEN_OPS:
        return True
    for right in rights:
        for svc, op_pat in RIGHTS.get(right, ()):
            if fnmatchcase(service, svc) and fnmatchcase(op, op_pat):
                return True
    return False


# -- caveats: the first is the minter's Grant, the rest only narrow ---------------

class Grant(msgspec.Struct, tag="g", array_like=True, frozen=True):
    principal: str
    key_id: str
    rights: tuple[str, ...]
    expires_at: int  # unix seconds
    issued_at: int
    # When the token's family began: the Login that minted its first member.
    # A refreshed token keeps the family's token id and this time, so revoking
    # the id revokes every refresh, and no refresh outlives the family's cap.
    login_at: int = 0  # 0 (tokens minted before families): issued_at


class OnlyRights(msgspec.Struct, tag="r", array_like=True, frozen=True):
    rights: tuple[str, ...]


class ExpiresBy(msgspec.Struct, tag="e", array_like=True, frozen=True):
    at: int


class MaxTokens(msgspec.Struct, tag="t", array_like=True, frozen=True):
    n: int


class InSession(msgspec.Struct, tag="s", array_like=True, frozen=True):
    session: str


Caveat = Union[Grant, OnlyRights, ExpiresBy, MaxTokens, InSession]


class Token(msgspec.Struct, array_like=True, frozen=True):
    version: int
    id: bytes
    caveats: tuple[bytes, ...]
    sig: bytes


class Restrictions(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Caveats that depend on a request's body, for the service to enforce
    (the kernel stamps them into `Header.restrictions`)."""

    max_tokens: int = 0  # 0: no limit from the token
    session: str = ""  # "": any session

    @classmethod
    def decode(cls, raw: bytes) -> "Restrictions":
        return _restrictions_decoder.decode(raw) if raw else _NONE

    def encode(self) -> bytes:
        return b"" if self == _NONE else _encode(self)


class RevocationList(msgspec.Struct, frozen=True):
    """Revoked token ids (hex), API key ids and principals. Persisted by the
    security server; loaded by the kernel at boot and replaced when pushed."""

    tokens: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()
    principals: frozenset[str] = frozenset()

    def reason(self, cap: "Capability") -> str | None:
        """Why `cap` is revoked, or None. A token id names a whole family:
        every refresh of a login keeps its id."""
        if cap.token_id in self.tokens:
            return f"token {cap.token_id} is revoked"
        if cap.key_id in self.keys:
            return f"API key {cap.key_id} is revoked"
        if cap.principal in self.principals:
            return f"principal {cap.principal!r} is revoked"
        return None


_encode = msgspec.msgpack.Encoder().encode
_token_decoder = msgspec.msgpack.Decoder(Token)
_caveat_decoder = msgspec.msgpack.Decoder(Caveat)
_restrictions_decoder = msgspec.msgpack.Decoder(Restrictions)
_NONE = Restrictions()


# -- the verified form --------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Capability:
    """What a verified token grants (after folding every caveat)."""

    token_id: str  # hex
    principal: str
    key_id: str
    rights: frozenset[str]
    expires_at: int
    issued_at: int
    restrictions: Restrictions
    attenuated: bool
    restrictions_raw: bytes = b""
    login_at: int = 0  # the family's start (see `Grant.login_at`)
    # (dst, op) → allowed: the verifier's memo (the kernel asks per request)
    allowed: dict[tuple[str, str], bool] = field(default_factory=dict)

    def covers(self, service: str, op: str) -> bool:
        """Whether the rights cover (service, op)."""
        return rights_cover(self.rights, service, op)


def _chain(root_key: bytes, token_id: bytes, caveats: Iterable[bytes]) -> bytes:
    sig = hmac.new(root_key, _DOMAIN + token_id, hashlib.sha256).digest()
    for c in caveats:
        sig = hmac.new(sig, c, hashlib.sha256).digest()
    return sig


def mint(root_key: bytes, principal: str, key_id: str, rights: Iterable[str], ttl_s: float,
         *, now: float | None = None, token_id: bytes | None = None, login_at: int = 0) -> bytes:
    """A fresh token (the security server's job: it holds the root key).
    A refresh passes the family's `token_id` and `login_at`; a Login neither."""
    if not principal:
        raise BadRequest("a token needs a principal")
    issued = int(now if now is not None else time.time())
    grant = Grant(principal, key_id, check_rights(rights), issued + max(1, int(ttl_s)), issued, login_at or issued)
    tid = token_id if token_id is not None else os.urandom(ID_BYTES)
    caveats = (_encode(grant),)
    return _encode(Token(VERSION, tid, caveats, _chain(root_key, tid, caveats)))


def _decode_token(raw: bytes | memoryview) -> Token:
    if len(raw) > MAX_TOKEN_BYTES:
        raise Unauthorized(f"capability token too long ({len(raw)} bytes)")
    try:
        tok = _token_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise Unauthorized("malformed capability token") from None
    if tok.version != VERSION:
        raise Unauthorized(f"unsupported capability token version {tok.version}")
    if len(tok.id) != ID_BYTES or not tok.caveats or len(tok.caveats) > MAX_CAVEATS:
        raise Unauthorized("malformed capability token")
    return tok


def _fold(tok: Token) -> Capability:
    """Every caveat applied in order. Raises `Unauthorized` on a malformed chain."""
    try:
        cavs = [_caveat_decoder.decode(c) for c in tok.caveats]
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise Unauthorized("capability token has an unknown or malformed caveat") from None
    grant = cavs[0]
    if not isinstance(grant, Grant):
        raise Unauthorized("capability token does not start with a grant")
    rights = frozenset(grant.rights)
    expires = grant.expires_at
    max_tokens, session = 0, ""
    for c in cavs[1:]:
        match c:
            case OnlyRights(rights=r):
                rights &= frozenset(r)
            case ExpiresBy(at=at):
                expires = min(expires, at)
            case MaxTokens(n=n):
                max_tokens = n if max_tokens == 0 else min(max_tokens, n)
                if max_tokens <= 0:
                    raise Unauthorized("capability token has a non-positive max_tokens caveat")
            case InSession(session=s):
                if session and s != session:
                    raise Unauthorized("capability token is confined to two different sessions")
                session = s
            case _:
                raise Unauthorized("only the minter may grant: a second grant caveat is invalid")
    restr = Restrictions(max_tokens, session)
    return Capability(tok.id.hex(), grant.principal, grant.key_id, rights, expires, grant.issued_at, restr,
                      len(cavs) > 1, restr.encode(), grant.login_at or grant.issued_at)


def verify(root_key: bytes, raw: bytes | memoryview, now: float | None = None) -> Capability:
    """Check signature and expiry; raises `Unauthorized` saying what was wrong.
    Revocation and rights are the caller's checks (`RevocationList.reason`,
    `Capability.covers`)."""
    tok = _decode_token(raw)
    if not hmac.compare_digest(_chain(root_key, tok.id, tok.caveats), tok.sig):
        raise Unauthorized("capability token signature is invalid (tampered, or minted under another root key)")
    cap = _fold(tok)
    t = now if now is not None else time.time()
    if cap.expires_at <= t:
        raise Unauthorized(f"capability token expired {t - cap.expires_at:.0f}s ago; log in again")
    return cap


def inspect(raw: bytes | memoryview) -> Capability:
    """What a token claims, without checking its signature (holders use this to
    attenuate and to know when to refresh; never to authorise)."""
    return _fold(_decode_token(raw))


def attenuate(raw: bytes, *, rights: Iterable[str] | None = None, expires_at: float | None = None,
              max_tokens: int | None = None, session: str | None = None) -> bytes:
    """Narrow a token without the root key. Asking for more than it holds is a
    `BadRequest` (and a hand-made widening caveat would be a no-op anyway:
    caveats only intersect)."""
    tok = _decode_token(raw)
    cur = _fold(tok)
    added: list[bytes] = []
    if rights is not None:
        want = frozenset(rights)
        extra = sorted(want - cur.rights)
        if extra:
            raise BadRequest(f"cannot widen a token: it does not hold {extra} (holds {sorted(cur.rights)})")
        added.append(_encode(OnlyRights(tuple(sorted(want)))))
    if expires_at is not None:
        if expires_at > cur.expires_at:
            raise BadRequest(f"cannot extend a token: it expires at {cur.expires_at}, asked {expires_at:.0f}")
        added.append(_encode(ExpiresBy(int(expires_at))))
    if max_tokens is not None:
        if max_tokens <= 0:
            raise BadRequest("max_tokens must be positive")
        if cur.restrictions.max_tokens and max_tokens > cur.restrictions.max_tokens:
            raise BadRequest(f"cannot widen max_tokens beyond {cur.restrictions.max_tokens}")
        added.append(_encode(MaxTokens(max_tokens)))
    if session is not None:
        if not session:
            raise BadRequest("session must be non-empty")
        if cur.restrictions.session and session != cur.restrictions.session:
            raise BadRequest(f"token is already confined to session {cur.restrictions.session!r}")
        added.append(_encode(InSession(session)))
    if len(tok.caveats) + len(added) > MAX_CAVEATS:
        raise BadRequest(f"a token holds at most {MAX_CAVEATS} caveats")
    sig = tok.sig
    for c in added:
        sig = hmac.new(sig, c, hashlib.sha256).digest()
    return _encode(Token(tok.version, tok.id, tok.caveats + tuple(added), sig))


def to_text(raw: bytes) -> str:
    return TEXT_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def from_text(text: str) -> bytes:
    """Parse `to_text` output; raises `Unauthorized` when it is not a token."""
    if not text.startswith(TEXT_PREFIX):
        raise Unauthorized(f"not an llmos capability token (expected the prefix {TEXT_PREFIX!r})")
    body = text[len(TEXT_PREFIX):]
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise Unauthorized("capability token text is not valid base64url") from None
