"""The security server: principals, API keys, capability tokens, revocation,
quota policy and the audit log (service ``"security"``).

It mints tokens with the root key it shares with the kernel; it does not sit
on the request path (the kernel verifies tokens itself), so while it restarts
existing tokens keep working and only Login / RefreshToken wait.
"""

from __future__ import annotations

import os
import time

import anyio
import msgspec
from anyio.abc import TaskGroup

from ipc import capability as cap
from ipc.errors import BadRequest, LlmosError, Unauthorized, Unavailable
from ipc.home import admin_key_path, revocations_path, root_key_path, security_dir
from ipc.keyfile import create_private, load_or_create_key, write_private
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from sdk.logs import get_logger
from sdk.service import Context, Service, handler
from services.security.audit import AuditLog, audit_path
from services.security.store import KeyRecord, Store

log = get_logger()

DEFAULT_TTL_S = 3600
MAX_TTL_S = 24 * 3600
ADMIN = "admin"


class SecurityService(Service):
    name = sp.SECURITY

    def __init__(self, instance: str | None = None, *, home: str | None = None, back: str | None = None,
                 secret: str | None = None):
        super().__init__(instance, home=home, back=back, secret=secret)
        self.dir = security_dir(self.home)
        self.store: Store | None = None
        self.audit = AuditLog(audit_path(self.home))
        self.root_key = b""
        self._write_lock = anyio.Lock()

    # -- start and stop ------------------------------------------------------------------

    async def on_start(self) -> None:
        self.root_key = await anyio.to_thread.run_sync(load_or_create_key, root_key_path(self.home))
        self.store = await anyio.to_thread.run_sync(Store.load, self.dir / "state.json", MAX_TTL_S)
        await anyio.to_thread.run_sync(self.audit.open)
        if self.audit.warning:
            log.error("security.audit_damaged", warning=self.audit.warning, path=str(self.audit.path))
            self.audit.append("security", "audit.open", str(self.audit.path), "warning",
                              {"warning": self.audit.warning})
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
        self.audit.append("security", "bootstrap", f"key {rec.key_id}", "ok",
                          {"tenant": ADMIN, "path": str(path)})
        log.warning("security.admin_key_written", path=str(path), key_id=rec.key_id,
                    msg=f"the admin API key is in {path} (mode 0600)")

    async def background(self, tg: TaskGroup) -> None:
        tg.start_soon(self._push_at_start)
        tg.start_soon(self._record_denials)
        tg.start_soon(self._prune_periodically)
        self.publish(sp.POLICY_TOPIC, self._policy())

    async def on_stop(self) -> None:
        self.audit.close()

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise Unavailable("the security server is starting")
        return self.store

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

    async def _record_denials(self) -> None:
        """The kernel publishes every refused client request; each becomes an audit record."""
        async for ev in self.subscribe(kp.DENIALS_TOPIC):
            if isinstance(ev, kp.AccessDenied):
                detail: dict[str, str | int | float | bool] = {"reason": ev.reason}
                if ev.token_id:
                    detail["token_id"] = ev.token_id
                if ev.dropped:
                    detail["dropped_before"] = ev.dropped
                # no dst: a frame for the kernel itself (READY, a control frame)
                self.audit.append(ev.principal, "access", f"{ev.dst or kp.KERNEL}:{ev.op}", ev.code, detail)

    async def _prune_periodically(self) -> None:
        while True:
            await anyio.sleep(3600)
            if self._store.prune():
                await self._persist()
                await self._push_revocations()

    def _policy(self) -> sp.QuotaPolicy:
        return sp.QuotaPolicy(self._store.state.policy_version, self._store.quotas())

    # -- tokens ----------------------------------------------------------------------------

    def _grant(self, rec: KeyRecord, ttl_s: int) -> sp.Granted:
        if ttl_s < 0:
            raise BadRequest(f"ttl_s must be >= 0, got {ttl_s}", detail={"field": "ttl_s"})
        ttl = min(ttl_s or DEFAULT_TTL_S, MAX_TTL_S)
        now = time.time()
        raw = cap.mint(self.root_key, rec.tenant, rec.key_id, rec.rights, ttl, now=now)
        c = cap.inspect(raw)
        return sp.Granted(raw, c.token_id, c.principal, sorted(c.rights), float(c.expires_at), float(c.issued_at))

    @handler
    async def login(self, msg: sp.Login, ctx: Context) -> sp.Granted:
        try:
            rec = self._store.authenticate(msg.api_key)
        except LlmosError as exc:
            self.audit.append(ctx.principal, "login", f"key {exc.detail.get('key_id', '?')}", exc.code,
                              {"cause": str(exc.detail.get("cause", exc.message))})
            exc.detail = {}
            raise
        granted = self._grant(rec, msg.ttl_s)
        self.audit.append(rec.tenant, "login", f"key {rec.key_id}", "ok",
                          {"token_id": granted.token_id, "expires_at": granted.expires_at})
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
        except LlmosError as exc:
            self.audit.append(ctx.principal, "refresh", "token", exc.code, {"reason": exc.message})
            raise
        granted = self._grant(rec, msg.ttl_s)
        self.audit.append(c.principal, "refresh", f"token {c.token_id}", "ok", {"token_id": granted.token_id})
        return granted

    # -- administration (the kernel lets only the `admin` right through) ---------------------

    @handler
    async def create_key(self, msg: sp.CreateKey, ctx: Context) -> sp.KeyCreated:
        store = self._store
        try:
            rec, api_key = store.create_key(msg.tenant, msg.rights, msg.note)
            if msg.quota is not None:
                store.set_quota(msg.tenant, msg.quota)
        except LlmosError as exc:
            self.audit.append(ctx.principal, "key.create", f"tenant {msg.tenant}", exc.code, {"reason": exc.message})
            raise
        await self._persist()
        self.audit.append(ctx.principal, "key.create", f"key {rec.key_id}", "ok",
                          {"tenant": rec.tenant, "rights": ",".join(rec.rights)})
        if msg.quota is not None:
            self.publish(sp.POLICY_TOPIC, self._policy())
        return sp.KeyCreated(rec.key_id, api_key, rec.tenant, rec.rights)

    @handler(idempotent=True)
    async def list_keys(self, msg: sp.ListKeys, ctx: Context) -> sp.KeyList:
        store = self._store
        return sp.KeyList(store.key_infos(), store.principal_infos(), sorted(store.state.revoked_tokens))

    @handler
    async def revoke(self, msg: sp.Revoke, ctx: Context) -> sp.Revoked:
        store = self._store
        target = f"{msg.kind} {msg.target}"
        try:
            if msg.kind == sp.RevokeKind.PRINCIPAL and msg.target == ctx.principal:
                raise BadRequest("refusing to revoke your own principal (you would lock yourself out)")
            changed = store.revoke(msg.kind, msg.target)
        except LlmosError as exc:
            self.audit.append(ctx.principal, "revoke", target, exc.code, {"reason": exc.message})
            raise
        # Persisted first: once it is on disk it survives restarts of both sides.
        await self._persist()
        try:
            await self._push_revocations()
        except LlmosError as exc:
            self.audit.append(ctx.principal, "revoke", target, "persisted", {"push": str(exc)})
            raise Unavailable(f"revocation persisted but not yet applied by the kernel ({exc.message}); "
                              f"it applies at the kernel's next boot or the next push") from None
        self.audit.append(ctx.principal, "revoke", target, "ok", {"changed": changed})
        return sp.Revoked(msg.kind, msg.target, changed)

    @handler
    async def set_quota(self, msg: sp.SetQuota, ctx: Context) -> sp.QuotaPolicy:
        try:
            self._store.set_quota(msg.tenant, msg.quota)
        except LlmosError as exc:
            self.audit.append(ctx.principal, "quota.set", f"tenant {msg.tenant}", exc.code, {"reason": exc.message})
            raise
        await self._persist()
        policy = self._policy()
        self.publish(sp.POLICY_TOPIC, policy)
        self.audit.append(ctx.principal, "quota.set", f"tenant {msg.tenant}", "ok",
                          msgspec.structs.asdict(msg.quota))
        return policy

    @handler(idempotent=True)
    async def get_quotas(self, msg: sp.GetQuotas, ctx: Context) -> sp.QuotaPolicy:
        return self._policy()


def _encode_revocations(rl: cap.RevocationList) -> bytes:
    return msgspec.json.encode(rl)


def main() -> None:
    os.umask(0o077)  # every file this process creates is owner-only
    SecurityService.main()
