"""The security server: principals, API keys, capability tokens, revocation,
quota policy and the audit log (service ``"security"``).

It mints tokens with the root key it shares with the kernel; it does not sit
on the request path (the kernel verifies tokens itself), so while it restarts
existing tokens keep working and only Login / RefreshToken wait.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import msgspec
from anyio.abc import TaskGroup

from common import capability as cap
from ipc.errors import BadRequest, LlmosError, Overloaded, Unauthorized, Unavailable
from common.home import admin_key_path, revocations_path, root_key_path, security_dir
from common.keyfile import create_private, load_or_create_key, write_private
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from common.logs import get_logger
from sdk.service import Context, Service, handler
from services.security.audit import (CHECKPOINT_S, AuditLog, AuditRecord, audit_key, audit_path, head_path,
                                     append_kernel_event, retire_unkeyed_head)
from common.config.security import load_security_config
from services.security.limits import Aggregator, LoginLimiter, Summary
from services.security.store import KeyRecord, Store

log = get_logger()

MAX_TTL_S = 24 * 3600
# A refresh family (a Login and every RefreshToken chained from it) ends this
# long after the Login, however often it is refreshed: past it the holder
# needs the API key again, so a revoked key stops a family within this bound
# even if nobody revokes its tokens. Equal to MAX_TTL_S, which also lets a
# revoked token id be forgotten MAX_TTL_S after its revocation.
FAMILY_MAX_S = MAX_TTL_S
ADMIN = "admin"
# Store.authenticate's causes that follow a matching secret, and what the key's holder is told.
REVOKED_CAUSES = {"key revoked": "was revoked", "principal revoked": "belongs to a revoked tenant"}
TICK_S = 1.0


class SecurityService(Service):
    name = sp.SECURITY

    def __init__(self, instance: str | None = None, *, home: str | None = None, back: str | None = None,
                 secret: str | None = None):
        super().__init__(instance, home=home, back=back, secret=secret)
        self.config = load_security_config()
        self.dir = security_dir(self.home)
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        self.root_key = b""
        self._write_lock = anyio.Lock()
        self._limiter = LoginLimiter()
        self._failures = Aggregator()

    # -- start and stop ------------------------------------------------------------------

    async def on_start(self) -> None:
        self.root_key = await anyio.to_thread.run_sync(load_or_create_key, root_key_path(self.home))
        self.store = await anyio.to_thread.run_sync(Store.load, self.dir / "state.json", MAX_TTL_S)
        await anyio.to_thread.run_sync(retire_unkeyed_head, self.home)
        audit = AuditLog(audit_path(self.home), audit_key(self.root_key), head_path(self.home))
        audit.on_checkpoint = _log_checkpoint
        await anyio.to_thread.run_sync(audit.open)
        self.audit = audit
        detail: dict[str, str | int | float | bool] = {"pid": os.getpid()}
        legacy = self.dir / "audit.jsonl"
        if legacy.exists():
            detail["unkeyed_log"] = str(legacy)  # the log before it was keyed; kept, no longer written
        if audit.warning:
            log.error("security.audit_damaged", warning=audit.warning, path=str(audit.path))
            audit.append("security", "audit.open", str(audit.path), "warning", {**detail, "warning": audit.warning})
        else:
            audit.append("security", "audit.open", str(audit.path), "ok", detail)
        audit.checkpoint()
        await self._bootstrap_admin()
        self.store.prune()
        await self._persist()

    async def _bootstrap_admin(self) -> None:
        """First boot (or admin.key deleted): an admin key, written 0600 to
        $LLMOS_HOME/admin.key for the local operator."""
        store = self._store
        path = admin_key_path(self.home)
        if path.exists():
            return
        admin = store.state.principals.get(ADMIN)
        if admin is not None and admin.revoked:
            log.error("security.admin_revoked", msg="admin.key is missing and principal 'admin' is revoked; "
                      "no admin key was created")
            return
        rec, api_key = store.create_key(ADMIN, [ADMIN], note="bootstrap (admin.key)")
        await self._persist()  # the key's hash is stored before the key is handed out
        created = await anyio.to_thread.run_sync(create_private, path, (api_key + "\n").encode())
        if not created:  # someone wrote admin.key meanwhile; this key was never shown
            rec.revoked = True
            await self._persist()
            return
        self._audit.append("security", "bootstrap", f"key {rec.key_id}", "ok",
                           {"tenant": ADMIN, "path": str(path)})
        log.warning("security.admin_key_written", path=str(path), key_id=rec.key_id,
                    msg=f"the admin API key is in {path} (mode 0600)")

    async def background(self, tg: TaskGroup) -> None:
        tg.start_soon(self._push_at_start)
        tg.start_soon(self._follow, kp.DENIALS_TOPIC, self._on_kernel_event)
        tg.start_soon(self._follow, sp.AUDIT_TOPIC, self._on_note)
        tg.start_soon(self._prune_periodically)
        tg.start_soon(self._audit_timers)
        self.publish(sp.POLICY_TOPIC, self._policy())

    async def on_stop(self) -> None:
        if self.audit is not None:
            self._write_failures(self._failures.flush(everything=True))
            self.audit.checkpoint()  # a clean stop ends on a signed checkpoint
            self.audit.close()

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise Unavailable("the security server is starting")
        return self.store

    @property
    def _audit(self) -> AuditLog:
        if self.audit is None:
            raise Unavailable("the security server is starting")
        return self.audit

    # -- persistence and the kernel ------------------------------------------------------

    async def _persist(self) -> None:
        """State, then the kernel's revocation file; serialised so an older
        snapshot never lands after a newer one."""
        async with self._write_lock:
            store = self._store
            state = store.snapshot()
            revoked = _encode_revocations(store.revocations())
            await anyio.to_thread.run_sync(write_private, self.dir / "state.json", state)
            await anyio.to_thread.run_sync(write_private, revocations_path(self.home), revoked)

    async def _push_revocations(self) -> None:
        rl = self._store.revocations()
        await self.call(kp.KERNEL, kp.SetRevocations(sorted(rl.tokens), sorted(rl.keys), sorted(rl.principals)),
                        timeout=5.0)

    async def _push_at_start(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._push_revocations()
                return
            except LlmosError as exc:
                log.warning("security.push_failed", error=str(exc))
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _follow(self, topic: str, on_event: Callable[[Any], None]) -> None:
        """Every event on `topic`, subscribing again if the stream ends (a
        kernel restart): the audit must not go deaf."""
        delay = 0.05
        while True:
            try:
                async for ev in self.subscribe(topic):
                    delay = 0.05
                    on_event(ev)
            except LlmosError as exc:
                log.warning("security.subscribe_failed", topic=topic, error=str(exc))
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _on_kernel_event(self, ev: Any) -> None:
        append_kernel_event(self._audit, ev)

    def _on_note(self, ev: Any) -> None:
        """A refusal or privileged action decided by another service."""
        if isinstance(ev, sp.AuditNote):
            self._audit.append(ev.principal, ev.action, ev.target, ev.outcome,
                               {**ev.detail, "origin": ev.origin or "?"})

    async def _audit_timers(self) -> None:
        """Aggregated login failures written when their interval ends; a signed
        checkpoint every CHECKPOINT_S while records are being written."""
        while True:
            await anyio.sleep(TICK_S)
            self._write_failures(self._failures.flush())
            audit = self._audit
            if audit.checkpoint_due(time.monotonic(), CHECKPOINT_S):
                audit.checkpoint()

    def _write_failures(self, summaries: list[Summary]) -> None:
        for s in summaries:
            detail: dict[str, str | int | float | bool] = {
                "cause": s.cause, "source": s.source, "count": s.count, "since": s.first_at}
            if s.key_ids:
                detail["key_ids"] = ",".join(s.key_ids)
                detail["distinct_key_ids"] = s.distinct_key_ids
            self._audit.append("-", s.action, f"{s.count} more failures", s.code, detail)

    async def _prune_periodically(self) -> None:
        while True:
            await anyio.sleep(3600)
            if self._store.prune():
                await self._persist()
                await self._push_revocations()

    def _policy(self) -> sp.QuotaPolicy:
        store = self._store
        return sp.QuotaPolicy(store.state.policy_version, store.quotas(), revoked=store.revoked_principals())

    # -- tokens ----------------------------------------------------------------------------

    def _grant(self, rec: KeyRecord, ttl_s: int, family: cap.Capability | None = None) -> sp.Granted:
        """A token for `rec`: a new family for a Login, or the next member of
        `family` for a refresh (same token id, same login time, never past
        the family's end)."""
        if ttl_s < 0:
            raise BadRequest(f"ttl_s must be >= 0, got {ttl_s}", detail={"field": "ttl_s"})
        now = time.time()
        ttl = float(min(ttl_s or self.config.token_ttl_s, MAX_TTL_S))
        token_id, login_at = None, 0
        if family is not None:
            left = family.login_at + FAMILY_MAX_S - now
            if left < 1:
                raise Unauthorized(f"token family {family.token_id} reached its {FAMILY_MAX_S // 3600} h limit "
                                   f"from the login; log in again with the API key")
            ttl = min(ttl, left)
            token_id, login_at = bytes.fromhex(family.token_id), family.login_at
        raw = cap.mint(self.root_key, rec.tenant, rec.key_id, rec.rights, ttl, now=now, token_id=token_id,
                       login_at=login_at)
        c = cap.inspect(raw)
        return sp.Granted(raw, c.token_id, c.principal, sorted(c.rights), float(c.expires_at), float(c.issued_at))

    def _refused(self, action: str, exc: LlmosError, ctx: Context, cause: str, key_id: str = "",
                 detail: dict[str, str | int | float | bool] | None = None) -> None:
        """Audit a refused Login/RefreshToken: the first of its kind in an
        interval at once, the rest as one counted record (`_write_failures`)."""
        src = origin(ctx)
        if self._failures.add(action, str(exc.code), src, cause, key_id):
            self._audit.append(ctx.principal, action, f"key {key_id}" if key_id else "token", exc.code,
                               {"cause": cause, "source": src, **(detail or {})})

    @handler
    async def login(self, msg: sp.Login, ctx: Context) -> sp.Granted:
        # The check runs first and whole for every attempt, so a valid key is
        # never refused by the failure budgets below.
        try:
            rec = self._store.authenticate(msg.api_key)
        except Unauthorized as exc:
            cause = str(exc.detail.get("cause", exc.message))
            key_id = str(exc.detail.get("key_id", "?"))
            exc.detail = {}  # the client learns nothing about which keys exist
            if cause in REVOKED_CAUSES:
                # Only a caller holding this key's secret gets this far (the
                # secret is checked before revocation), so saying why tells
                # them nothing they could not know; anyone else still reads
                # "invalid API key".
                exc = Unauthorized(f"API key {key_id} {REVOKED_CAUSES[cause]}; ask the operator for a new key")
            over, wait = self._limiter.failed(origin(ctx), key_id)
            self._refused("login", exc, ctx, cause, key_id, {"limited": over} if over else None)
            if over:
                retry = max(0.1, math.ceil(wait * 10) / 10)
                raise Overloaded(f"too many failed logins ({over} budget spent); retry in {retry:.1f}s "
                                 f"(a valid API key is always accepted)",
                                 detail={"retry_after_s": retry}) from None
            raise exc from None
        granted = self._grant(rec, msg.ttl_s)
        self._audit.append(rec.tenant, "login", f"key {rec.key_id}", "ok",
                           {"token_id": granted.token_id, "expires_at": granted.expires_at, "source": origin(ctx)})
        return granted

    @handler
    async def refresh(self, msg: sp.RefreshToken, ctx: Context) -> sp.Granted:
        try:
            c = cap.verify(self.root_key, msg.token)
            why = self._store.revocations().reason(c)
            if why:
                raise Unauthorized(why)
            if c.attenuated:
                raise BadRequest("an attenuated token cannot be refreshed; refresh the token it came from")
            if ctx.principal and ctx.principal != c.principal:
                raise BadRequest("a token can be refreshed only by its own principal")
            rec = self._store.key(c.key_id)
            if rec.revoked:
                raise Unauthorized(f"API key {rec.key_id} is revoked")
            granted = self._grant(rec, msg.ttl_s, family=c)
        except LlmosError as exc:
            self._refused("refresh", exc, ctx, exc.message)
            raise
        self._audit.append(c.principal, "refresh", f"token {c.token_id}", "ok",
                           {"token_id": granted.token_id, "expires_at": granted.expires_at,
                            "family_ends_at": float(c.login_at + FAMILY_MAX_S)})
        return granted

    # -- administration (the kernel lets only the `admin` right through) ---------------------
    # Every record names its origin: the registered instance for a request
    # from the back socket, "client" for one from the front.

    @handler
    async def create_key(self, msg: sp.CreateKey, ctx: Context) -> sp.KeyCreated:
        store = self._store
        try:
            rec, api_key = store.create_key(msg.tenant, msg.rights, msg.note)
            if msg.quota is not None:
                store.set_quota(msg.tenant, msg.quota)
        except LlmosError as exc:
            self._admin(ctx, "key.create", f"tenant {msg.tenant}", exc.code, {"reason": exc.message})
            raise
        await self._persist()
        self._admin(ctx, "key.create", f"key {rec.key_id}", "ok", {"tenant": rec.tenant, "rights": ",".join(rec.rights)})
        if msg.quota is not None:
            self.publish(sp.POLICY_TOPIC, self._policy())
        return sp.KeyCreated(rec.key_id, api_key, rec.tenant, rec.rights)

    def _admin(self, ctx: Context, action: str, target: str, result: str,
               detail: dict[str, str | int | float | bool] | None = None) -> AuditRecord:
        return self._audit.append(ctx.principal, action, target, result, {**(detail or {}), "origin": origin(ctx)})

    @handler(idempotent=True)
    async def list_keys(self, msg: sp.ListKeys, ctx: Context) -> sp.KeyList:
        store = self._store
        listing = sp.KeyList(store.key_infos(), store.principal_infos(), sorted(store.state.revoked_tokens))
        self._admin(ctx, "keys.list", "all keys", "ok", {"keys": len(listing.keys)})
        return listing

    @handler
    async def revoke(self, msg: sp.Revoke, ctx: Context) -> sp.Revoked:
        store = self._store
        target = f"{msg.kind} {msg.target}"
        try:
            if msg.kind == sp.RevokeKind.PRINCIPAL and msg.target == ctx.principal:
                raise BadRequest("refusing to revoke your own principal (you would lock yourself out)")
            changed = store.revoke(msg.kind, msg.target)
        except LlmosError as exc:
            self._admin(ctx, "revoke", target, exc.code, {"reason": exc.message})
            raise
        # Persisted first: once it is on disk it survives restarts of both sides.
        await self._persist()
        # The policy carries the revoked principals: the scheduler cancels their jobs.
        self.publish(sp.POLICY_TOPIC, self._policy())
        try:
            await self._push_revocations()
        except LlmosError as exc:
            self._admin(ctx, "revoke", target, "persisted", {"push": str(exc)})
            raise Unavailable(f"revocation persisted but not yet applied by the kernel ({exc.message}); "
                              f"it applies at the kernel's next boot or the next push") from None
        self._admin(ctx, "revoke", target, "ok", {"changed": changed})
        return sp.Revoked(msg.kind, msg.target, changed)

    @handler
    async def set_quota(self, msg: sp.SetQuota, ctx: Context) -> sp.QuotaPolicy:
        try:
            self._store.set_quota(msg.tenant, msg.quota)
        except LlmosError as exc:
            self._admin(ctx, "quota.set", f"tenant {msg.tenant}", exc.code, {"reason": exc.message})
            raise
        await self._persist()
        policy = self._policy()
        self.publish(sp.POLICY_TOPIC, policy)
        self._admin(ctx, "quota.set", f"tenant {msg.tenant}", "ok", msgspec.structs.asdict(msg.quota))
        return policy

    @handler(idempotent=True)
    async def get_quotas(self, msg: sp.GetQuotas, ctx: Context) -> sp.QuotaPolicy:
        policy = self._policy()
        self._admin(ctx, "quota.get", "all quotas", "ok", {"version": policy.version})
        return policy


def origin(ctx: Context) -> str:
    """Where a request came from: the registered instance the kernel stamped
    into `src` for the back socket, "client" for the front."""
    return ctx.header.src or "client"


def _log_checkpoint(rec: AuditRecord) -> None:
    # A second copy, outside the audit directory: in the logs (and whatever
    # ships them off the host). `llmos audit verify` cross-checks these.
    log.info("audit.checkpoint", seq=rec.seq, head=rec.detail["head"], sig=rec.detail["sig"])


def _encode_revocations(rl: cap.RevocationList) -> bytes:
    return msgspec.json.encode(rl)


def main() -> None:
    os.umask(0o077)  # every file this process creates is owner-only
    SecurityService.main()
