"""Capability enforcement with real processes: a kernel with auth on, the
security server and echo, over real ZeroMQ sockets."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import msgspec
import pytest
import zmq

from common import capability as cap
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import BadRequest, Error, ErrorCode, Forbidden, Unauthorized
from common.home import admin_key_path, front_endpoint, revocations_path, root_key_path, security_dir
from common.keyfile import load_or_create_key
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from ipc.protocol.echo import Echo, EchoReply, Identity, WhoAmI
from ipc.protocol.kernel import Ready
from kernel.config import SupervisorConfig
from sdk.client import AsyncClient
from tools.testing import running_llmos
from services.security.audit import audit_path
from services.security.verify import verify_home
from tests.helpers.audit import audit_records, new_key, wait_audit


def denied(target: str, code: str, reason: str = "") -> Callable[[dict[str, Any]], bool]:
    return lambda r: (r["action"] == "access" and r["target"] == target and r["result"] == code
                      and reason in r["detail"].get("reason", ""))


def append_caveat(raw: bytes, caveat: object) -> bytes:
    """Chain a caveat without the root key, as any holder can."""
    import hashlib
    import hmac

    tok = msgspec.msgpack.decode(raw, type=cap.Token)
    c = msgspec.msgpack.encode(caveat)
    return msgspec.msgpack.encode(cap.Token(tok.version, tok.id, tok.caveats + (c,),
                                            hmac.new(tok.sig, c, hashlib.sha256).digest()))


async def test_secure_by_default_files_are_private(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        for p in (admin_key_path(home), root_key_path(home), revocations_path(home), security_dir(home) / "state.json",
                  audit_path(home)):
            assert p.stat().st_mode & 0o777 == 0o600, p
        assert security_dir(home).stat().st_mode & 0o777 == 0o700
        admin_key = admin_key_path(home).read_text().strip()
        secret = admin_key.split(".", 2)[2]
        assert secret not in (security_dir(home) / "state.json").read_text()
        assert any(r["action"] == "bootstrap" for r in audit_records(home))
        assert str(admin_key_path(home)) in (home / "kernel.stderr").read_text()  # logged where it is
        # the admin client works; an anonymous one is refused everything but Login
        assert isinstance(await llmos.client.call("echo", Echo(b"hi")), EchoReply)
        anon = await AsyncClient.connect(home=home, api_key="", check=False)
        try:
            with pytest.raises(Unauthorized, match="needs a capability token"):
                await anon.call("echo", Echo(b"x"), timeout=10)
            with pytest.raises(Unauthorized, match="needs a capability token"):
                await anon.status(timeout=10)
            with pytest.raises(Unauthorized, match="invalid API key"):
                await anon.login("llmos.000000000000.nope", timeout=10)
        finally:
            await anon.aclose()
        await wait_audit(home, denied("echo:Echo", "unauthorized", "needs a capability token"), "no token")
        await wait_audit(home, lambda r: r["action"] == "login" and r["result"] == "unauthorized", "bad login")


async def test_refusals_have_the_right_code_and_are_audited(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        alice = await new_key(llmos, "alice", ["echo", "status"])
        c = await AsyncClient.connect(home=home, api_key=alice.api_key)
        try:
            good = c.connection.token
            assert (await c.call("echo", WhoAmI())) == Identity("alice")
            assert (await c.status()).pid > 0

            # wrong right: a valid token lacking the right
            with pytest.raises(Forbidden, match="no right covering Kill"):
                await c.kill("echo")
            with pytest.raises(Forbidden, match="CreateKey"):
                await c.call(sp.SECURITY, sp.CreateKey("alice", ["admin"]))
            await wait_audit(home, lambda r: denied("kernel:Kill", "forbidden")(r) and r["principal"] == "alice",
                             "wrong right")

            # expired: minted with the real root key, in the past
            root = load_or_create_key(root_key_path(home))
            c.use_token(cap.mint(root, "alice", alice.key_id, ["echo"], 10, now=time.time() - 100))
            with pytest.raises(Unauthorized, match="expired"):
                await c.call("echo", Echo(b"x"))
            await wait_audit(home, denied("echo:Echo", "unauthorized", "expired"), "expired")

            # minted under another root key
            c.use_token(cap.mint(b"x" * 32, "alice", alice.key_id, ["admin"], 600))
            with pytest.raises(Unauthorized, match="signature"):
                await c.call("echo", Echo(b"x"))

            # tampered: every byte flipped in turn
            for i in range(len(good)):
                c.use_token(good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:])
                with pytest.raises(Unauthorized):
                    await c.call("echo", Echo(b"x"))
            await wait_audit(home, denied("echo:Echo", "unauthorized", "signature"), "tampered")

            # widened attenuation: the library refuses; a hand-made caveat grants nothing
            narrow = cap.attenuate(good, rights=["echo"], max_tokens=16, session="s1")
            with pytest.raises(BadRequest, match="widen"):
                cap.attenuate(narrow, rights=["echo", "admin"])
            c.use_token(append_caveat(narrow, cap.OnlyRights(("admin", "echo", "status"))))
            assert (await c.call("echo", WhoAmI())) == Identity("alice", 16, "s1")  # restrictions reach the service
            with pytest.raises(Forbidden, match="rights: echo"):
                await c.status()
            await wait_audit(home, denied("kernel:Status", "forbidden", "rights: echo"), "widened")
            c.use_token(append_caveat(good, cap.Grant("admin", "k", ("admin",), int(time.time()) + 99, 0)))
            with pytest.raises(Unauthorized, match="grant"):
                await c.status()

            # revoked: the token by id (and with it every token attenuated from it)
            c.use_token(good)
            tid = cap.inspect(good).token_id
            done = await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.TOKEN, tid))
            assert done.changed
            for t in (good, narrow):
                c.use_token(t)
                with pytest.raises(Unauthorized, match=f"token {tid} is revoked"):
                    await c.call("echo", Echo(b"x"))
            await wait_audit(home, denied("echo:Echo", "unauthorized", "revoked"), "revoked token")
        finally:
            await c.aclose()
        # the whole log still verifies
        assert verify_home(home).ok


async def test_a_client_sent_principal_is_replaced_and_registration_refused(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        bob = await new_key(llmos, "bob", ["echo"])
        c = await AsyncClient.connect(home=home, api_key=bob.api_key)
        token = c.connection.token
        await c.aclose()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(front_endpoint(home))
        try:
            lie = Header(PROTOCOL_VERSION, Kind.REQUEST, 7, dst="echo", op="WhoAmI", principal="admin", token=token,
                         restrictions=cap.Restrictions(max_tokens=1).encode())
            sock.send_multipart([b"", encode_header(lie), msgspec.msgpack.encode(WhoAmI())])
            assert sock.poll(10_000)
            frames = sock.recv_multipart()
            assert decode_header(frames[1]).kind == Kind.REPLY
            assert msgspec.msgpack.decode(frames[2], type=Identity) == Identity("bob")

            ready = msgspec.msgpack.encode(Ready("echo", "echo-evil", 1, "guess"))
            sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready",
                                                           token=token)), ready])
            assert sock.poll(10_000)
            err = msgspec.msgpack.decode(sock.recv_multipart()[2], type=Error)
            assert err.code == ErrorCode.UNAUTHORIZED and "cannot register" in err.message
        finally:
            sock.close()
        await wait_audit(home, denied("kernel:Ready", "unauthorized", "cannot register"), "registration")
        assert "echo-evil" not in {i.instance for i in await llmos.client.services()}
        # only the security service may set the revocation list, not even an admin client
        with pytest.raises(Forbidden, match="only the security service"):
            await llmos.client.call(kp.KERNEL, kp.SetRevocations(tokens=[]))


async def test_security_server_killed_while_clients_call(home: Path) -> None:
    # A long first backoff keeps the security server down while the clients call.
    sup = SupervisorConfig(backoff_initial_s=5.0, backoff_max_s=5.0)
    async with running_llmos(home, auth=True, supervisor=sup) as llmos:
        carol = await new_key(llmos, "carol", ["echo"])
        mallory = await new_key(llmos, "mallory", ["echo"])
        m = await AsyncClient.connect(home=home, api_key=mallory.api_key)
        await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.KEY, mallory.key_id))
        clients = [await AsyncClient.connect(home=home, api_key=carol.api_key) for _ in range(3)]
        try:
            st = await llmos.status()
            sec = llmos.instance(st, "security")
            os.kill(sec.pid, signal.SIGKILL)
            down = await llmos.wait_for(lambda s: llmos.instance(s, "security").state != "ready",
                                        what="security down")
            assert llmos.instance(down, "security").restarts == 1
            calls = 0

            async def caller(c: AsyncClient, k: int) -> None:
                nonlocal calls
                for i in range(25):
                    reply = await c.call("echo", Echo(f"{k}-{i}".encode()), timeout=10)
                    assert reply.payload == f"{k}-{i}".encode()
                    calls += 1
            async with anyio.create_task_group() as tg:
                for k, c in enumerate(clients):
                    tg.start_soon(caller, c, k)
            assert calls == 75
            # those calls were verified while nobody could mint
            assert llmos.instance(await llmos.status(), "security").state != "ready"
            with pytest.raises(Unauthorized, match="API key .* is revoked"):
                await m.call("echo", Echo(b"x"))

            await llmos.wait_for(lambda s: llmos.instance(s, "security").state == "ready", what="security back")
            again = await AsyncClient.connect(home=home, api_key=carol.api_key)  # minting resumes
            assert (await again.call("echo", WhoAmI())) == Identity("carol")
            await again.aclose()
            with pytest.raises(Unauthorized, match="API key .* is revoked"):
                await m.call("echo", Echo(b"x"))
            with pytest.raises(Unauthorized, match=f"API key {mallory.key_id} was revoked"):
                await AsyncClient.connect(home=home, api_key=mallory.api_key)
        finally:
            for c in [*clients, m]:
                await c.aclose()


async def test_revocation_survives_a_kernel_restart(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        dave = await new_key(llmos, "dave", ["echo"])
        erin = await new_key(llmos, "erin", ["echo"])
        c = await AsyncClient.connect(home=home, api_key=dave.api_key)
        dave_token = c.connection.token
        await c.aclose()
        c = await AsyncClient.connect(home=home, api_key=erin.api_key)
        erin_token = c.connection.token
        await c.aclose()
        await llmos.client.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.PRINCIPAL, "dave"))
    async with running_llmos(home, auth=True) as llmos:
        c = await AsyncClient.connect(home=home, api_key="", check=False)
        try:
            c.use_token(dave_token)
            with pytest.raises(Unauthorized, match="principal 'dave' is revoked"):
                await c.call("echo", Echo(b"x"))
            c.use_token(erin_token)  # same root key, not revoked: still good after the restart
            assert (await c.call("echo", WhoAmI())) == Identity("erin")
        finally:
            await c.aclose()
        with pytest.raises(Unauthorized, match=f"API key {dave.key_id} belongs to a revoked tenant"):
            await AsyncClient.connect(home=home, api_key=dave.api_key)
        listing: sp.KeyList = await llmos.client.call(sp.SECURITY, sp.ListKeys())
        assert {p.name: p.revoked for p in listing.principals}["dave"] is True


async def test_tokens_are_refreshed_before_they_expire(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        frank = await new_key(llmos, "frank", ["echo"])
        c = await AsyncClient.connect(home=home, api_key=frank.api_key, token_ttl_s=2)
        try:
            first = cap.inspect(c.connection.token)
            end = time.monotonic() + 20
            # keep calling until well past the first token's expiry: refresh is lazy, before a call
            while time.time() < first.expires_at + 1.5:
                assert (await c.call("echo", WhoAmI())) == Identity("frank")
                assert time.monotonic() < end, "the calls did not get past the first token's expiry"
                await anyio.sleep(0.05)
            assert cap.inspect(c.connection.token).token_id != first.token_id
            # an idle client whose token has expired logs in again (its stale token does not block Login)
            idle = cap.inspect(c.connection.token)
            while time.time() <= idle.expires_at:
                assert time.monotonic() < end + 10, "the token never expired"
                await anyio.sleep(0.05)
            assert (await c.call("echo", WhoAmI())) == Identity("frank")
            assert cap.inspect(c.connection.token).token_id != idle.token_id
            # RefreshToken: same principal, new id; an attenuated token is not refreshable
            g: sp.Granted = await c.call(sp.SECURITY, sp.RefreshToken(c.connection.token, ttl_s=60))
            assert g.principal == "frank" and g.rights == ["echo"] and g.token_id != first.token_id
            with pytest.raises(BadRequest, match="attenuated"):
                await c.call(sp.SECURITY, sp.RefreshToken(cap.attenuate(g.token, max_tokens=5)))
        finally:
            await c.aclose()


async def test_quota_policy_is_stored_and_published(home: Path) -> None:
    async with running_llmos(home, auth=True) as llmos:
        events = llmos.client.subscribe(sp.POLICY_TOPIC)
        assert isinstance(await events.__anext__(), kp.Subscribed)
        made: sp.KeyCreated = await llmos.client.call(
            sp.SECURITY, sp.CreateKey("grace", ["generate"], sp.Quota(requests_per_min=60, kv_blocks=64)))
        ev = await events.__anext__()
        assert isinstance(ev, sp.QuotaPolicy) and ev.quotas["grace"] == sp.Quota(requests_per_min=60, kv_blocks=64)
        policy = await llmos.client.call(sp.SECURITY, sp.SetQuota("grace", sp.Quota(tokens_per_min=1000)))
        ev2 = await events.__anext__()
        assert ev2 == policy and ev2.version > ev.version and ev2.quotas == {"grace": sp.Quota(tokens_per_min=1000)}
        assert (await llmos.client.call(sp.SECURITY, sp.GetQuotas())) == policy
        with pytest.raises(BadRequest, match="concurrent_requests must be >= 0"):
            await llmos.client.call(sp.SECURITY, sp.SetQuota("grace", sp.Quota(concurrent_requests=-2)))
        assert made.tenant == "grace"
        await events.aclose()


async def test_hostile_tokens_are_all_unauthorized_and_the_kernel_keeps_serving(home: Path) -> None:
    import random

    rng = random.Random(6)
    async with running_llmos(home, auth=True) as llmos:
        good = llmos.client.connection.token
        c = await AsyncClient.connect(home=home, api_key="", check=False)
        try:
            hostile = [rng.randbytes(rng.randrange(1, 300)) for _ in range(100)]
            hostile += [good[:rng.randrange(len(good))] for _ in range(30)]
            hostile += [good + rng.randbytes(rng.randrange(1, 20)) for _ in range(30)]
            hostile += [append_caveat(good, rng.randbytes(rng.randrange(1, 40))) for _ in range(30)]  # unknown caveats
            hostile += [b"\x00" * 4096]  # the longest a header carries (ipc.envelope.MAX_TOKEN)
            for t in hostile:
                c.use_token(t)
                for dst, msg in (("echo", Echo(b"x")), (kp.KERNEL, kp.Status()), (sp.SECURITY, sp.ListKeys())):
                    with pytest.raises(Unauthorized):
                        await c.call(dst, msg, timeout=10)
        finally:
            await c.aclose()
        assert (await llmos.client.call("echo", Echo(b"fine"))).payload == b"fine"
        st = await llmos.status()
        assert st.counters.rejected == 0  # no message failed inside the kernel (refusals are answers)
