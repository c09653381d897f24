"""The security server's protocol (service ``"security"``).

`Login` is the one op served without a token; `RefreshToken` needs any valid
token; everything else needs the `admin` right (see `common.capability.RIGHTS`).
Tokens travel as raw bytes (`common.capability` format); API keys as text,
``llmos.<key id>.<secret>``, shown once by `CreateKey`.

Quota policy is published on `POLICY_TOPIC` as `QuotaPolicy` (the whole table)
whenever it changes and when the server starts; a service that enforces quotas
(scheduler, memory) subscribes and also asks `GetQuotas` once at start, since
a subscription does not replay what was published before it.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from ipc.protocol.base import Message, Request

SECURITY = "security"
POLICY_TOPIC = "security.policy"


class Quota(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True, forbid_unknown_fields=True):
    """Per-principal limits; 0 means unlimited. Enforced where the resource is
    spent: requests, tokens and concurrency by the scheduler, KV blocks by
    memory. Exceeding one is `overloaded` with `retry_after_s`."""

    requests_per_min: int = 0
    tokens_per_min: int = 0
    concurrent_requests: int = 0
    kv_blocks: int = 0


class Login(Request["Granted"]):
    """Exchange an API key for a capability token (`ttl_s` 0: the server's default)."""

    api_key: str
    ttl_s: int = 0


class RefreshToken(Request["Granted"]):
    """A fresh token for the same grant (unattenuated tokens only: an attenuated
    token is someone's delegation and expires as delegated)."""

    token: bytes
    ttl_s: int = 0


class Granted(Message):
    token: bytes
    token_id: str
    principal: str
    rights: list[str]
    expires_at: float  # unix seconds
    issued_at: float


class CreateKey(Request["KeyCreated"]):
    """A new API key for `tenant` (created if new). `quota`, when given,
    replaces the tenant's quota."""

    tenant: str
    rights: list[str]
    quota: Quota | None = None
    note: str = ""


class KeyCreated(Message):
    key_id: str
    api_key: str  # shown once; only its salted hash is stored
    tenant: str
    rights: list[str]


class ListKeys(Request["KeyList"]):
    pass


class KeyInfo(Message):
    key_id: str
    tenant: str
    rights: list[str]
    created_at: float
    revoked: bool = False
    note: str = ""


class PrincipalInfo(Message):
    name: str
    created_at: float
    quota: Quota = Quota()
    revoked: bool = False


class KeyList(Message):
    keys: list[KeyInfo]
    principals: list[PrincipalInfo]
    revoked_tokens: list[str] = []


class RevokeKind(StrEnum):
    KEY = "key"
    TOKEN = "token"
    PRINCIPAL = "principal"


class Revoke(Request["Revoked"]):
    """Revoke an API key (by id), a token (by id: also every token attenuated
    from it) or a whole principal (its keys and tokens). Permanent."""

    kind: RevokeKind
    target: str


class Revoked(Message):
    kind: RevokeKind
    target: str
    # False: it was already revoked (revoking is idempotent).
    changed: bool


class SetQuota(Request["QuotaPolicy"]):
    tenant: str
    quota: Quota


class GetQuotas(Request["QuotaPolicy"]):
    pass


class QuotaPolicy(Message):
    """The whole quota table (reply to SetQuota / GetQuotas, and the event on
    POLICY_TOPIC). `version` grows with every change; tenants absent from
    `quotas` are unlimited."""

    version: int
    quotas: dict[str, Quota] = {}
    # Revoked principals: the scheduler cancels their jobs and live requests.
    revoked: list[str] = []


AUDIT_TOPIC = "security.audit"


class AuditNote(Message):
    """A refusal or privileged action decided by a service other than the
    kernel (a token caveat refused by the scheduler, an admin listing every
    principal's jobs), published on `AUDIT_TOPIC`; the security server writes
    each to the audit log. Only registered services can publish (clients
    cannot send EVENTs), so the fields are the service's word. `origin` is the
    publishing instance; strings are bounded by the publisher."""

    principal: str
    action: str  # e.g. "caveat", "jobs.list_all"
    target: str  # e.g. "scheduler:Submit"
    outcome: str  # an error code, or "ok"
    origin: str = ""
    detail: dict[str, str | int | float | bool] = {}
