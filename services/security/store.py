"""The security server's state: principals, API keys (salted hashes only),
quotas and revocations, persisted as owner-only JSON under
``$LLMOS_HOME/security``.

Mutations are synchronous and happen on the event loop (no await between
reading and changing the state); `snapshot()` encodes the state there too, and
the caller writes the bytes in a worker thread. `revoked.json` is the file the
kernel loads at boot.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

import msgspec

from common.capability import RevocationList, check_rights
from ipc.errors import BadRequest, NotFound, Unauthorized
from ipc.protocol.security import KeyInfo, PrincipalInfo, Quota, RevokeKind

KEY_PREFIX = "llmos"
MAX_API_KEY = 128  # a real key is 62 characters
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{32}$")


class KeyRecord(msgspec.Struct):
    key_id: str
    tenant: str
    rights: list[str]
    salt: str  # hex
    digest: str  # hex HMAC-SHA256(salt, secret)
    created_at: float
    revoked: bool = False
    note: str = ""


class PrincipalRecord(msgspec.Struct):
    name: str
    created_at: float
    quota: Quota = Quota()
    revoked: bool = False


class State(msgspec.Struct):
    format: int = 1
    principals: dict[str, PrincipalRecord] = {}
    keys: dict[str, KeyRecord] = {}
    # token id → when it may be forgotten (after every token with that id has expired)
    revoked_tokens: dict[str, float] = {}
    policy_version: int = 0


def _digest(salt: bytes, secret: str) -> str:
    # API keys carry 256 random bits, so a fast keyed hash is enough: slow
    # password hashes (scrypt, argon2) exist to protect low-entropy secrets,
    # and Login runs on the event loop.
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadRequest(f"bad tenant name {name!r}: 1-64 of letters, digits, '_', '.', '@', '-'",
                         detail={"field": "tenant"})
    return name


def split_api_key(api_key: str) -> tuple[str, str]:
    """(key id, secret) of ``llmos.<key id>.<secret>``; `Unauthorized` when
    malformed. Checked before any hashing, so a huge key costs no more than a
    length compare."""
    if len(api_key) > MAX_API_KEY:
        raise Unauthorized("invalid API key", detail={"cause": f"longer than {MAX_API_KEY} characters",
                                                      "key_id": "?"})
    parts = api_key.strip().split(".", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not _KEY_ID.match(parts[1]) or not parts[2]:
        raise Unauthorized("invalid API key", detail={"cause": "malformed", "key_id": "?"})
    return parts[1], parts[2]


class Store:
    def __init__(self, state: State, max_token_ttl_s: float):
        self.state = state
        self.max_token_ttl_s = max_token_ttl_s

    @classmethod
    def load(cls, path: Path, max_token_ttl_s: float) -> "Store":
        """Read the state file (a missing file is a first boot). A corrupt file is
        an error naming it: starting empty would silently drop revocations."""
        if not path.exists():
            return cls(State(), max_token_ttl_s)
        try:
            return cls(msgspec.json.decode(path.read_bytes(), type=State), max_token_ttl_s)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadRequest(f"security state file {path} is corrupt: {exc}") from None

    def snapshot(self) -> bytes:
        return msgspec.json.encode(self.state)

    def revocations(self) -> RevocationList:
        s = self.state
        return RevocationList(tokens=frozenset(s.revoked_tokens),
                              keys=frozenset(k.key_id for k in s.keys.values() if k.revoked),
                              principals=frozenset(p.name for p in s.principals.values() if p.revoked))

    # -- principals and keys --------------------------------------------------------

    def ensure_principal(self, name: str) -> PrincipalRecord:
        check_name(name)
        p = self.state.principals.get(name)
        if p is None:
            p = self.state.principals[name] = PrincipalRecord(name, time.time())
        elif p.revoked:
            raise BadRequest(f"principal {name!r} is revoked; choose another tenant name")
        return p

    def create_key(self, tenant: str, rights: list[str], note: str = "") -> tuple[KeyRecord, str]:
        """A new key; returns (record, the API key text — shown once, never stored)."""
        ok_rights = list(check_rights(rights))
        self.ensure_principal(tenant)
        key_id = secrets.token_hex(6)
        while key_id in self.state.keys:
            key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        rec = KeyRecord(key_id, tenant, ok_rights, salt.hex(), _digest(salt, secret), time.time(), note=note)
        self.state.keys[key_id] = rec
        return rec, f"{KEY_PREFIX}.{key_id}.{secret}"

    def authenticate(self, api_key: str) -> KeyRecord:
        """The key record for a presented API key; `Unauthorized` (one message for
        every cause, so a caller learns nothing about which keys exist), with
        the cause in `detail` for the audit log."""
        key_id, secret = split_api_key(api_key)
        rec = self.state.keys.get(key_id)
        cause = ""
        if rec is None:
            cause = "unknown key id"
        elif not hmac.compare_digest(_digest(bytes.fromhex(rec.salt), secret), rec.digest):
            cause = "wrong secret"
        elif rec.revoked:
            cause = "key revoked"
        elif self.state.principals.get(rec.tenant, PrincipalRecord("", 0, revoked=True)).revoked:
            cause = "principal revoked"
        if rec is None or cause:
            raise Unauthorized("invalid API key", detail={"cause": cause, "key_id": key_id})
        return rec

    def key(self, key_id: str) -> KeyRecord:
        rec = self.state.keys.get(key_id)
        if rec is None:
            raise NotFound(f"no API key with id {key_id!r}")
        return rec

    def key_infos(self) -> list[KeyInfo]:
        return [KeyInfo(k.key_id, k.tenant, k.rights, k.created_at, k.revoked, k.note)
                for k in sorted(self.state.keys.values(), key=lambda k: k.created_at)]

    def principal_infos(self) -> list[PrincipalInfo]:
        return [PrincipalInfo(p.name, p.created_at, p.quota, p.revoked)
                for p in sorted(self.state.principals.values(), key=lambda p: p.created_at)]

    # -- revocation and quotas ----------------------------------------------------------

    def revoke(self, kind: RevokeKind, target: str) -> bool:
        """Revoke; False when it already was. Unknown keys/principals are `NotFound`."""
        if kind == RevokeKind.KEY:
            rec = self.key(target)
            changed, rec.revoked = not rec.revoked, True
            return changed
        if kind == RevokeKind.PRINCIPAL:
            p = self.state.principals.get(target)
            if p is None:
                raise NotFound(f"no principal named {target!r}")
            changed, p.revoked = not p.revoked, True
            if changed:
                self.state.policy_version += 1  # the policy lists revoked principals
            return changed
        if not _TOKEN_ID.match(target):
            raise BadRequest(f"bad token id {target!r}: 32 hex digits expected", detail={"field": "target"})
        changed = target not in self.state.revoked_tokens
        # A token id names a refresh family; no member outlives the family's
        # cap (= the maximum TTL from the login), so the entry can go after it.
        self.state.revoked_tokens[target] = time.time() + self.max_token_ttl_s
        return changed

    def prune(self, now: float | None = None) -> bool:
        """Forget revoked token ids whose tokens have all expired."""
        t = now if now is not None else time.time()
        dead = [tid for tid, until in self.state.revoked_tokens.items() if until < t]
        for tid in dead:
            del self.state.revoked_tokens[tid]
        return bool(dead)

    def set_quota(self, tenant: str, quota: Quota) -> None:
        for field, value in msgspec.structs.asdict(quota).items():
            if value < 0:
                raise BadRequest(f"quota {field} must be >= 0 (0 = unlimited), got {value}",
                                 detail={"field": field})
        p = self.state.principals.get(tenant)
        if p is None:
            raise NotFound(f"no principal named {tenant!r}")
        p.quota = quota
        self.state.policy_version += 1

    def revoked_principals(self) -> list[str]:
        return sorted(p.name for p in self.state.principals.values() if p.revoked)

    def quotas(self) -> dict[str, Quota]:
        return {p.name: p.quota for p in self.state.principals.values()
                if p.quota != Quota() and not p.revoked}
