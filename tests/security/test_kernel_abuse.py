"""Attacks on the kernel itself (issue 12 #1, #2, #5, #6, #8, lows), each sent
over real sockets to a real kernel: the attack is refused with an error that
names what was wrong, honest clients keep being served, and the kernel's
memory stays bounded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import zmq

from ipc import codec
from ipc.envelope import MAX_NAME, PROTOCOL_VERSION, Header, Kind, encode_header
from ipc.errors import BadRequest, Error, Forbidden
from common.home import back_endpoint, front_endpoint
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from ipc.protocol.echo import Echo, EchoReply
from ipc.protocol.kernel import KERNEL
from kernel.config import ChildSpec, KernelConfig, Restart
from sdk.client import AsyncClient
from tools.testing import RunningLlmos, running_llmos
from tests.helpers.audit import audit_records, wait_audit
from tests.helpers.raw_peer import RawPeer

# A raw peer (a blocking zmq socket) probes the kernel from the test's own
# thread, on purpose; the kernel runs in its own process, so only this
# test's client waits meanwhile.
pytestmark = pytest.mark.loop_block()


def request(dst: str, op: str, token: bytes = b"", **kw: Any) -> Header:
    return Header(PROTOCOL_VERSION, Kind.REQUEST, **{"dst": dst, "op": op, "token": token, **kw})


def kernel_rss_mb(llmos: RunningLlmos) -> float:
    with open(f"/proc/{llmos.kernel.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def tenant(llmos: RunningLlmos, name: str, rights: list[str]) -> AsyncClient:
    made: sp.KeyCreated = await llmos.client.call(sp.SECURITY, sp.CreateKey(name, rights))
    return await AsyncClient.connect(home=llmos.home, api_key=made.api_key)


async def assert_all_alive(llmos: RunningLlmos, pids: dict[str, int]) -> None:
    """Every service is the same process as before: nothing killed, nothing restarted."""
    st = await llmos.status()
    now = {i.instance: (i.pid, i.state, i.restarts) for i in st.instances}
    for name, pid in pids.items():
        assert now[name] == (pid, "ready", 0), f"{name}: {now[name]} (was pid {pid})"


async def test_a_disguised_kernel_op_is_refused_and_audited(home: Path) -> None:
    """#1: a tenant holding only `status` sends op="Status" with a Shutdown,
    Kill or Subscribe body. Before, the kernel ran the body's op."""
    async with running_llmos(home, auth=True) as llmos:
        pids = {i.instance: i.pid for i in (await llmos.status()).instances}
        mallory = await tenant(llmos, "mallory", ["status"])
        peer = RawPeer(front_endpoint(home))
        try:
            token = mallory.connection.token
            for body in (kp.Shutdown("pwned"), kp.Kill("security", "SIGSTOP"), kp.Kill("echo"),
                         kp.Subscribe(kp.DENIALS_TOPIC), kp.Subscribe(sp.POLICY_TOPIC)):
                peer.send(request(KERNEL, "Status", token), codec.encode(body))
                header, err = peer.recv()
                assert header.kind == Kind.ERROR and isinstance(err, Error), (body, err)
                assert err.code == "bad_request" and f"body is {type(body).__name__}" in err.message
            # the honest op still works for her, and nothing was shut down, killed or subscribed
            assert (await mallory.status()).pid == llmos.kernel.pid
            assert not peer.sock.poll(200), "a disguised Subscribe delivered events"
            assert llmos.kernel.poll() is None
            await assert_all_alive(llmos, pids)
            # the undisguised ops are refused by her rights, as before
            with pytest.raises(Forbidden, match="no right covering Shutdown"):
                await mallory.shutdown("again")
            rec = await wait_audit(home, lambda r: (r["target"] == "kernel:Status" and r["result"] == "bad_request"
                                                    and r["principal"] == "mallory"), "a disguised op")
            assert "body is Shutdown" in str(rec["detail"])
        finally:
            peer.close()
            await mallory.aclose()


async def test_kill_sends_only_signals_that_end_a_process_and_kernel_ops_are_audited(home: Path) -> None:
    """An admin's Kill with SIGSTOP would freeze a service until its heartbeat
    expires; it is refused. Kill, Subscribe and Shutdown that do run leave an
    audit record naming who asked (#8)."""
    async with running_llmos(home, auth=True) as llmos:
        pids = {i.instance: i.pid for i in (await llmos.status()).instances}
        for sig in ("SIGSTOP", "SIGUSR1", "SIGCONT", "9"):
            with pytest.raises(Exception, match="Kill sends one of") as exc:
                await llmos.client.kill("echo", sig)
            assert getattr(exc.value, "code", "") == "bad_request"
        await assert_all_alive(llmos, pids)
        assert await llmos.client.kill("echo", "SIGTERM") == ["echo"]
        await llmos.wait_for(lambda st: llmos.instance(st, "echo").restarts == 1
                             and llmos.instance(st, "echo").state == "ready", what="echo restarted")
        await wait_audit(home, lambda r: "Kill" in r["action"] + r["target"] and "echo SIGTERM" in str(r)
                         and r["principal"] == "admin" and r["result"] == "ok", "the Kill")
        await wait_audit(home, lambda r: "Kill" in r["action"] + r["target"] and "SIGSTOP" in str(r)
                         and r["result"] == "bad_request", "the refused Kill")


async def test_made_up_instance_names_are_not_found_and_nothing_is_parked(home: Path) -> None:
    """#5: Login needs no token, and requests to instance-like names
    (`security-7`) were parked per name: 2.4 GB of kernel memory. Now a name
    that no instance ever had is `not_found` at once."""
    async with running_llmos(home, auth=True) as llmos:
        queued_before = (await llmos.status()).counters.queued
        peer = RawPeer(front_endpoint(home))
        try:
            body = codec.encode(sp.Login("llmos.x.y"))
            for i in range(200):
                peer.send(request(f"security-{i + 7}", "Login"), body)
            codes = set()
            for _ in range(200):
                header, err = peer.recv()
                codes.add((header.kind, err.code))
            assert codes == {(Kind.ERROR, "not_found")}
            assert (await llmos.status()).counters.queued == queued_before
        finally:
            peer.close()


async def test_oversized_header_strings_are_refused_naming_the_field(home: Path) -> None:
    """#5/#6: a 1 MB `dst` was echoed in every error reply, log line and audit
    record. Header strings are bounded at decode; the refusal names the field,
    and the audit gains no megabytes."""
    async with running_llmos(home, auth=True) as llmos:
        audit_before = sum(len(str(r)) for r in audit_records(home))
        peer = RawPeer(front_endpoint(home))
        try:
            for field, value in (("dst", "x" * 1_000_000), ("op", "O" * 100_000), ("trace_id", "t" * 100_000),
                                 ("src", "s" * 100_000), ("principal", "admin" * 1000)):
                hdr = msgspec.structs.replace(request("echo", "Echo"), **{field: value})
                peer.send(hdr, codec.encode(Echo(b"x")))
                header, err = peer.recv()
                assert header.kind == Kind.ERROR and err.code == "bad_request"
                assert f"at `{field}`" in err.message and len(err.message) < 500
            huge_token = request("echo", "Echo", token=b"t" * 100_000)
            peer.send(huge_token, codec.encode(Echo(b"x")))
            assert "at `token`" in peer.recv()[1].message
            # a name at the bound is an ordinary name: it passes decoding, and the guard refuses it
            peer.send(request("n" * MAX_NAME, "Login"), codec.encode(sp.Login("llmos.x.y")))
            assert "needs a capability token" in peer.recv()[1].message
        finally:
            peer.close()
        assert isinstance(await llmos.client.call("echo", Echo(b"still")), EchoReply)
        # the refusal of a header that fails its checks reaches the call that sent it
        sdk = await AsyncClient.connect(home=home, api_key="", check=False)
        try:
            sdk.use_token(b"t" * 5000)
            with pytest.raises(BadRequest, match="at `token`"):
                await sdk.call("echo", Echo(b"x"), timeout=30)
        finally:
            await sdk.aclose()
        await anyio.sleep(0.6)  # two audit ticks: any record of the above has been written
        assert sum(len(str(r)) for r in audit_records(home)) - audit_before < 20_000


async def test_a_client_cannot_claim_an_attempt_or_a_source(home: Path) -> None:
    """#3: only the kernel's own re-send counts attempts; a client-set attempt
    used to buy re-admission without quota. The source is the kernel's word too."""
    async with running_llmos(home, auth=True) as llmos:
        peer = RawPeer(front_endpoint(home))
        try:
            token = llmos.client.connection.token
            peer.send(request("echo", "Echo", token, attempt=2, src="scheduler"), codec.encode(Echo(b"a")))
            header, reply = peer.recv()
            assert isinstance(reply, EchoReply) and reply.attempt == 0
        finally:
            peer.close()


async def test_frames_past_the_front_size_limit_cost_the_sender_its_connection(home: Path) -> None:
    """A client message is at most 8 MiB (swap images travel on the back
    socket only): a bigger one is dropped by ZeroMQ with the connection, before
    the kernel buffers it; the kernel and every other client go on."""
    async with running_llmos(home, auth=True) as llmos:
        rss_before = kernel_rss_mb(llmos)
        peer = RawPeer(front_endpoint(home))
        try:
            big = b"p" * (40 * 1024 * 1024)
            for _ in range(3):
                peer.send(request("security", "Login"), big)
            assert not peer.sock.poll(1000), "an oversized message was answered"
        finally:
            peer.close()
        assert isinstance(await llmos.client.call("echo", Echo(b"ok")), EchoReply)
        assert kernel_rss_mb(llmos) - rss_before < 100
        # the SDK knows the limit: it refuses such a request itself instead of losing its connection
        with pytest.raises(BadRequest, match="the kernel takes at most 8388608"):
            await llmos.client.call("echo", Echo(b"e" * (9 * 1024 * 1024)), timeout=30)
        assert isinstance(await llmos.client.call("echo", Echo(b"still")), EchoReply)


async def test_wait_queues_are_bounded_in_bytes_and_refusals_say_which_bound(home: Path) -> None:
    """#5: requests for a service that is down wait, but in bounded memory: past
    the byte bound they are refused `overloaded` naming it, and what waited is
    answered when the wait times out."""
    kernel = KernelConfig(wait_total_bytes=4 * 1024 * 1024, wait_timeout_s=3.0)
    children = [ChildSpec("security", "services.security"), ChildSpec("echo", "services.echo"),
                ChildSpec("ghost", "services.ghost_that_is_not_there", restart=Restart.TEMPORARY)]
    async with running_llmos(home, children=children, kernel=kernel, auth=True, expect_exit=True) as llmos:
        await llmos.wait_for(lambda st: llmos.instance(st, "echo").state == "ready"
                             and llmos.instance(st, "ghost").state not in ("starting", "ready"), what="ghost down")
        peer = RawPeer(front_endpoint(home))
        try:
            token = llmos.client.connection.token
            chunk = b"g" * (512 * 1024)
            for _ in range(16):  # 8 MiB for a 4 MiB bound
                peer.send(request("ghost", "Anything", token), chunk)
            answers = [peer.recv(timeout_s=30)[1] for _ in range(16)]
            overloaded = [e for e in answers if e.code == "overloaded"]
            assert 7 <= len(overloaded) <= 9 and "would exceed 4194304 bytes" in overloaded[0].message
            assert {e.code for e in answers} == {"overloaded", "unavailable"}  # the rest timed out waiting
        finally:
            peer.close()
        assert (await llmos.status()).pid == llmos.kernel.pid


async def test_a_client_that_never_reads_cannot_grow_the_kernel_without_bound(home: Path) -> None:
    """#5: replies a client never reads queue in the kernel. Header strings are
    bounded (so each error reply is small) and the front socket holds at most
    10,000 per client, so 30,000 refused requests cost the kernel megabytes,
    not the gigabyte of before; honest clients are served meanwhile."""
    async with running_llmos(home, auth=True) as llmos:
        rss_before = kernel_rss_mb(llmos)
        peer = RawPeer(front_endpoint(home), rcvhwm=1)
        try:
            for i in range(30_000):
                peer.send(request("n" * MAX_NAME, "Login", trace_id="t" * 128), b"")
            # the kernel has answered (or dropped) them all once it answers the next honest call
            for _ in range(3):
                assert isinstance(await llmos.client.call("echo", Echo(b"ok"), timeout=30), EchoReply)
            grown = kernel_rss_mb(llmos) - rss_before
            assert grown < 64, f"kernel grew {grown:.0f} MB"
        finally:
            peer.close()


def test_a_connected_identity_cannot_be_taken_over(tmp_path: Path) -> None:
    """#2 / low: with ROUTER_HANDOVER a second peer choosing a connected
    peer's identity got its replies. Now the first keeps them."""
    from ipc.sockets import bind_router

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/r.sock"
    router = bind_router(ctx, endpoint)
    first, second = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s in (first, second):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, b"echo")
        first.connect(endpoint)
        first.send(b"hello")
        assert router.poll(5000) and router.recv_multipart() == [b"echo", b"hello"]
        second.connect(endpoint)
        second.send(b"takeover")
        assert not router.poll(500) or router.recv_multipart()[0] != b"echo"
        router.send_multipart([b"echo", b"for the first"])
        assert first.poll(5000) and first.recv() == b"for the first"
        assert not second.poll(200)
    finally:
        for s in (first, second, router):
            s.close(0)
        ctx.term()


async def test_back_socket_refuses_unregistered_peers_whatever_identity_they_pick(home: Path) -> None:
    """A peer on the back socket that has not registered with the boot secret
    gets nothing routed, whatever name it takes; services register under a
    fresh identity per incarnation, so there is none to guess."""
    async with running_llmos(home, auth=True) as llmos:
        for ident in (b"echo", b"security", b"security-0", b"echo.00000000"):
            peer = RawPeer(back_endpoint(home), identity=ident)
            try:
                peer.send(request(sp.SECURITY, "CreateKey"), codec.encode(sp.CreateKey("evil", ["admin"])))
                header, err = peer.recv()
                assert header.kind == Kind.ERROR and err.code == "unauthorized" and "not registered" in err.message
                peer.send(Header(PROTOCOL_VERSION, Kind.READY),
                          codec.encode(kp.Ready("security", "security", os.getpid(), "wrong secret")))
                header, err = peer.recv()
                assert err.code == "unauthorized" and "boot secret" in err.message
            finally:
                peer.close()
        made = await llmos.client.call(sp.SECURITY, sp.ListKeys())
        assert all(k.tenant != "evil" for k in made.keys)


async def test_kernel_ops_from_the_back_socket_are_audited_with_their_origin(home: Path) -> None:
    """#8: an op a service sends is recorded with the instance it came from."""
    async with running_llmos(home, auth=True) as llmos:
        # the security server's own revocation push at start is a kernel op from the back socket
        rec = await wait_audit(home, lambda r: "SetRevocations" in r["action"] + r["target"], "SetRevocations")
        assert "back:security" in str(rec) and rec["result"] == "ok"


async def test_one_client_cannot_queue_logins_in_front_of_everyone_elses(home: Path) -> None:
    """Review finding: Login needs no token, and one socket kept tens of
    thousands of bogus Logins in flight; a valid login waited behind them all
    (3.3 s after 7 s of flood, then failed). Now a client has at most 8
    unauthenticated requests in flight; the rest are `overloaded` at once by
    the kernel, and other clients log in as usual."""
    async with running_llmos(home, auth=True) as llmos:
        made: sp.KeyCreated = await llmos.client.call(sp.SECURITY, sp.CreateKey("alice", ["echo"]))
        peer = RawPeer(front_endpoint(home), rcvhwm=100_000)
        try:
            body = codec.encode(sp.Login("llmos.000000000000.bogus"))
            for _ in range(20_000):
                peer.send(request(sp.SECURITY, "Login"), body)
            for _ in range(5):  # each within the SDK's default 5 s
                c = await AsyncClient.connect(home=home, api_key=made.api_key)
                assert isinstance(await c.call("echo", Echo(b"in")), EchoReply)
                await c.aclose()
            codes: dict[str, int] = {}
            for _ in range(20_000):
                code = peer.recv(timeout_s=60)[1].code
                codes[code] = codes.get(code, 0) + 1
            assert codes.get("overloaded", 0) > 10_000, codes
            assert set(codes) <= {"overloaded", "unauthorized"}, codes
        finally:
            peer.close()


async def test_disconnects_cost_what_the_client_owned(home: Path) -> None:
    """Review finding: each client DISCONNECT scanned every pending request
    and wait queue; a Login flood plus a stream of bare DISCONNECTs stalled the
    kernel for seconds, services concluded it was dead and exited. Now a
    client's requests are found by its identity, and a client with nothing in
    flight costs nothing to forget: every service is still the same process."""
    async with running_llmos(home, auth=True) as llmos:
        pids = {i.instance: i.pid for i in (await llmos.status()).instances}
        flooders = [RawPeer(front_endpoint(home), rcvhwm=100_000) for _ in range(4)]
        leaver = RawPeer(front_endpoint(home))
        try:
            body = codec.encode(sp.Login("llmos.000000000000.bogus"))
            for f in flooders:
                for _ in range(5_000):
                    f.send(request(sp.SECURITY, "Login"), body)
            for _ in range(20_000):
                leaver.sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.DISCONNECT))])
            for f in flooders:
                for _ in range(5_000):
                    f.recv(timeout_s=60)
            assert isinstance(await llmos.client.call("echo", Echo(b"ok"), timeout=30), EchoReply)
            await assert_all_alive(llmos, pids)
        finally:
            for f in (*flooders, leaver):
                f.close()
