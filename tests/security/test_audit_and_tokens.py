"""Attacks on the security server, the audit log and token refresh (issue 12
#6-#10), sent to a real system over real sockets: each is refused with a
clear error, honest tenants keep working, and the audit log records it."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from common import capability as cap
from ipc.errors import BadRequest, Overloaded, Unauthorized
from common.home import logs_dir, root_key_path
from common.keyfile import load_or_create_key
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from ipc.protocol.echo import Echo, Identity, WhoAmI
from kernel.config import ChildSpec
from sdk.client import AsyncClient
from tools.testing import running_llmos
from services.security.audit import MAX_FIELD, audit_path, head_path
from services.security.verify import verify_home
from services.security.service import FAMILY_MAX_S
from tests.helpers.audit import audit_records, new_key, wait_audit


def failed_logins(home: Path) -> list[dict[str, Any]]:
    return [r for r in audit_records(home) if r["action"] == "login" and r["result"] != "ok"]


async def test_a_login_flood_is_budgeted_aggregated_and_never_locks_out_a_valid_key(home: Path) -> None:
    """#6: failed logins against a real tenant's key id (and random ones) from
    many tasks. Past the budget they are answered `overloaded` with a retry
    time; the tenant's own key logs in throughout; the audit holds a few
    counted records, not one per attempt."""
    floods, per_flood = 8, 40
    async with running_llmos(home, auth=True) as llmos:
        alice = await new_key(llmos, "alice", ["echo"])
        anon = await AsyncClient.connect(home=home, api_key="", check=False)
        codes: Counter[str] = Counter()
        honest = 0

        async def flood(k: int) -> None:
            for i in range(per_flood):
                key = f"llmos.{alice.key_id}.guess{k}-{i}" if i % 2 else f"llmos.{os.urandom(6).hex()}.x"
                try:
                    await anon.login(key, timeout=10)
                except Overloaded as exc:
                    assert "too many failed logins" in exc.message and exc.detail["retry_after_s"] > 0
                    codes["overloaded"] += 1
                except Unauthorized as exc:
                    assert exc.message == "invalid API key" and not exc.detail  # nothing about which keys exist
                    codes["unauthorized"] += 1

        async def tenant() -> None:
            nonlocal honest
            for _ in range(5):
                c = await AsyncClient.connect(home=home, api_key=alice.api_key)
                assert (await c.call("echo", WhoAmI())) == Identity("alice")
                await c.aclose()
                honest += 1

        try:
            async with anyio.create_task_group() as tg:
                for k in range(floods):
                    tg.start_soon(flood, k)
                tg.start_soon(tenant)
            # a key far past any real length is refused before hashing, like the rest
            with pytest.raises((Unauthorized, Overloaded)):
                await anon.login("llmos." + "a" * 100_000, timeout=10)
        finally:
            await anon.aclose()
        assert honest == 5
        assert sum(codes.values()) == floods * per_flood and codes["overloaded"] > 0, codes
        # the attacked key still logs in once the flood is over, and its tenant works
        c = await AsyncClient.connect(home=home, api_key=alice.api_key)
        assert (await c.call("echo", Echo(b"ok"))).payload == b"ok"
        await c.aclose()
        await wait_audit(home, lambda r: r["action"] == "login" and r["detail"].get("cause") == "wrong secret",
                         "the first wrong secret, recorded at once")
    # at a clean stop the counted remainder is written
    recs = failed_logins(home)
    assert len(recs) <= 4 * 3, [r["detail"] for r in recs]  # (cause) x (first + summary) x at most 2 intervals
    assert sum(int(r["detail"].get("count", 1)) for r in recs) == floods * per_flood + 1
    summary = next(r for r in recs if r["detail"].get("count", 1) > 1 and r["detail"]["cause"] == "wrong secret")
    assert alice.key_id in summary["detail"]["key_ids"] and summary["detail"]["source"].startswith("front:")
    assert verify_home(home).ok


async def test_attacker_sized_strings_are_capped_in_the_audit_and_the_logs(home: Path) -> None:
    """#6 (defence in depth behind the kernel's header bounds): a 100 KB body
    string that the security server copies into its records is cut."""
    huge = "t" * 100_000
    async with running_llmos(home, auth=True) as llmos:
        size0 = audit_path(home).stat().st_size
        for _ in range(20):
            with pytest.raises(BadRequest, match="bad token id"):
                await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.TOKEN, huge))
            with pytest.raises(BadRequest, match="bad tenant name"):
                await llmos.client.call(sp.SECURITY, sp.CreateKey(huge, ["echo"]))
        rec = await wait_audit(home, lambda r: r["action"] == "revoke" and r["result"] == "bad_request", "revoke")
        assert len(rec["target"]) < MAX_FIELD + 40 and rec["target"].endswith("chars]")
        assert len(rec["detail"]["reason"]) < MAX_FIELD + 40
        assert (await llmos.client.call("echo", Echo(b"still"))).payload == b"still"
        # 40 refusals of 100 KB each: a few KB of audit, not 8 MB
        assert audit_path(home).stat().st_size - size0 < 40 * 2048
    for f in logs_dir(home).glob("security*.log*"):
        assert max((len(line) for line in f.read_bytes().splitlines()), default=0) < 4096, f


async def test_kernel_ops_notes_admin_reads_and_back_socket_actions_are_audited(home: Path) -> None:
    """#8: a Kill and a Subscribe by the admin (kernel ops), admin reads, a
    back-socket service creating a key and listing keys (origin = its
    instance, not "-"), and a caveat refusal another service publishes."""
    children = [ChildSpec("security", "services.security"), ChildSpec("echo", "services.echo"),
                ChildSpec("auditpeer", "tests.security.audit_peer")]
    async with running_llmos(home, auth=True, children=children) as llmos:
        await llmos.client.kill("echo", "SIGTERM")
        await wait_audit(home, lambda r: r["action"] == "kernel.op" and r["target"] == "kernel:Kill"
                         and r["principal"] == "admin" and r["detail"]["target"].startswith("echo"), "Kill")
        events = llmos.client.subscribe(sp.POLICY_TOPIC)
        assert isinstance(await events.__anext__(), kp.Subscribed)
        await events.aclose()
        await wait_audit(home, lambda r: r["action"] == "kernel.op" and r["target"] == "kernel:Subscribe"
                         and r["detail"]["target"] == sp.POLICY_TOPIC, "Subscribe")

        await llmos.client.call(sp.SECURITY, sp.ListKeys())
        await llmos.client.call(sp.SECURITY, sp.GetQuotas())
        await wait_audit(home, lambda r: r["action"] == "keys.list" and r["principal"] == "admin"
                         and r["detail"]["origin"].startswith("front:"), "admin ListKeys")
        await wait_audit(home, lambda r: r["action"] == "quota.get" and r["principal"] == "admin", "admin GetQuotas")

        made = await llmos.client.call("auditpeer", Echo(b"admin"), timeout=20)
        key_id = made.payload.decode()
        rec = await wait_audit(home, lambda r: r["action"] == "key.create" and r["target"] == f"key {key_id}",
                               "back-socket CreateKey")
        assert rec["detail"]["origin"].startswith("auditpeer") and rec["principal"] == "-"
        await wait_audit(home, lambda r: r["action"] == "keys.list" and r["detail"]["origin"].startswith("auditpeer"),
                         "back-socket ListKeys")

        await llmos.client.call("auditpeer", Echo(b"note"), timeout=20)
        note = await wait_audit(home, lambda r: r["action"] == "caveat", "the published caveat refusal")
        assert (note["principal"], note["target"], note["result"]) == ("bob", "scheduler:Submit", "forbidden")
        assert note["detail"]["origin"].startswith("auditpeer") and len(note["detail"]["reason"]) < MAX_FIELD + 40
        await llmos.wait_for(lambda s: llmos.instance(s, "echo").state == "ready", what="echo back")
        assert (await llmos.client.call("echo", Echo(b"after"))).payload == b"after"
    assert verify_home(home).ok


async def test_refreshed_tokens_are_one_family_revoked_together_and_bounded(home: Path) -> None:
    """#9: a chain of refreshes keeps the login's token id; revoking it (or the
    id of any refresh, which is the same) stops every member at the kernel and
    refuses further refreshes. No refresh outlives the family's 24 h."""
    async with running_llmos(home, auth=True) as llmos:
        mallory = await new_key(llmos, "mallory", ["echo"])
        honest = await new_key(llmos, "heidi", ["echo"])
        m = await AsyncClient.connect(home=home, api_key=mallory.api_key)
        h = await AsyncClient.connect(home=home, api_key=honest.api_key)
        try:
            t1 = m.connection.token
            g2: sp.Granted = await m.call(sp.SECURITY, sp.RefreshToken(t1, ttl_s=600))
            m.use_token(g2.token)
            g3: sp.Granted = await m.call(sp.SECURITY, sp.RefreshToken(g2.token, ttl_s=600))
            family = cap.inspect(t1).token_id
            assert g2.token_id == g3.token_id == family
            assert cap.inspect(g3.token).login_at == cap.inspect(t1).issued_at

            # the admin revokes the id it saw for the *last* refresh: the whole family goes
            await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.TOKEN, g3.token_id))
            for t in (t1, g2.token, g3.token, cap.attenuate(g3.token, max_tokens=5)):
                m.use_token(t)
                with pytest.raises(Unauthorized, match=f"token {family} is revoked"):
                    await m.call("echo", WhoAmI())
            m.use_token(h.connection.token)  # any valid token may call RefreshToken; the body is what is refused
            with pytest.raises(Unauthorized, match="revoked"):
                await m.call(sp.SECURITY, sp.RefreshToken(g3.token))
            await wait_audit(home, lambda r: r["action"] == "refresh" and r["result"] == "unauthorized", "refusal")
            await wait_audit(home, lambda r: r["action"] == "access" and family in r["detail"].get("reason", ""),
                             "the kernel's refusal of a family member")

            # family cap: a login 24 h ago (minted with the real root key) can no longer be refreshed,
            # and one 23.5 h ago is refreshed only up to the family's end
            root = load_or_create_key(root_key_path(home))
            now = time.time()
            old = cap.mint(root, "heidi", honest.key_id, ["echo"], 600, now=now - 60, login_at=int(now - FAMILY_MAX_S))
            with pytest.raises(Unauthorized, match="24 h limit"):
                await h.call(sp.SECURITY, sp.RefreshToken(old, ttl_s=3600))
            late_login = int(now - FAMILY_MAX_S + 1800)
            late = cap.mint(root, "heidi", honest.key_id, ["echo"], 600, now=now - 60, login_at=late_login)
            g: sp.Granted = await h.call(sp.SECURITY, sp.RefreshToken(late, ttl_s=3600))
            assert g.expires_at <= late_login + FAMILY_MAX_S
            # the honest tenant is untouched
            assert (await h.call("echo", WhoAmI())) == Identity("heidi")
        finally:
            await m.aclose()
            await h.aclose()


async def test_revoking_a_principal_publishes_it_in_the_policy(home: Path) -> None:
    """#10: the scheduler learns of a revoked principal from security.policy
    (to cancel its jobs); GetQuotas carries the same list."""
    async with running_llmos(home, auth=True) as llmos:
        await new_key(llmos, "ivan", ["echo"])
        events = llmos.client.subscribe(sp.POLICY_TOPIC)
        assert isinstance(await events.__anext__(), kp.Subscribed)
        await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.PRINCIPAL, "ivan"))
        ev = await events.__anext__()
        assert isinstance(ev, sp.QuotaPolicy) and ev.revoked == ["ivan"]
        policy: sp.QuotaPolicy = await llmos.client.call(sp.SECURITY, sp.GetQuotas())
        assert policy.revoked == ["ivan"] and policy.version == ev.version
        # revoking a key publishes too (the policy is re-sent on every revocation)
        other = await new_key(llmos, "judy", ["echo"])
        await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.KEY, other.key_id))
        ev2 = await events.__anext__()
        assert isinstance(ev2, sp.QuotaPolicy) and ev2.revoked == ["ivan"]
        await events.aclose()


async def test_the_audit_log_lives_apart_from_its_key_and_checkpoints_reach_the_logs(home: Path) -> None:
    """#7 end to end: the log is under audit/, the head and the key under
    security/; each start and clean stop writes a signed checkpoint, also as
    a log line that `verify` cross-checks."""
    async with running_llmos(home, auth=True) as llmos:
        assert (await llmos.client.call("echo", Echo(b"x"))).payload == b"x"
    assert audit_path(home).parent.name == "audit" and head_path(home).parent == root_key_path(home).parent
    lines = [json.loads(x) for f in logs_dir(home).glob("security*.log*") for x in f.read_text().splitlines()
             if '"audit.checkpoint"' in x]
    assert len(lines) >= 2  # start and stop
    v = verify_home(home)
    assert v.ok and v.checkpoints >= 2, v.message
    # cut the log back to before the stop's checkpoint and forge nothing else: named
    recs = audit_path(home).read_text().splitlines(keepends=True)
    audit_path(home).write_text("".join(recs[:-1]))
    v = verify_home(home)
    assert not v.ok and v.check == "head"
