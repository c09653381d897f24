"""Keys handed to each incarnation by the kernel (tcp:// back socket with
CURVE): every child starts with a keypair of its own and the kernel's
public key in its environment (no key file needed on its host); a
replaced incarnation's key is refused at the handshake and the refusal
audited with that key; a live incarnation's key registers no other
instance; the replacement serves with its new key."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.auth

from common.curvekeys import curve_dir
from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind
from ipc.protocol import kernel as kp
from ipc.protocol.echo import Echo
from kernel.config import ChildSpec, KernelConfig
from tests.helpers.audit import wait_audit
from tests.helpers.curve_probe import handshake_events, keyed
from tests.helpers.net import free_port
from tests.helpers.raw_peer import RawPeer
from tools.testing import RunningLlmos, running_llmos

KEYS = ("LLMOS_CURVE_PUBLIC", "LLMOS_CURVE_SECRET", "LLMOS_CURVE_SERVER")


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return {k.decode(): v.decode() for k, _, v in (kv.partition(b"=") for kv in f.read().split(b"\0") if kv)}


def keys_of(pid: int) -> tuple[bytes, bytes, bytes]:
    env = environ(pid)
    pub, sec, server = (env[k].encode() for k in KEYS)
    return pub, sec, server


async def ready_pid(llmos: RunningLlmos, name: str, not_pid: int = 0) -> int:
    st = await llmos.wait_for(lambda s: llmos.instance(s, name).state == kp.ChildState.READY
                              and llmos.instance(s, name).pid not in (0, not_pid), 60, f"{name} READY")
    return llmos.instance(st, name).pid


def ready_as(back: str, curve: tuple[bytes, bytes, bytes], instance: str, secret: str) -> tuple[str, str]:
    """READY for `instance` with its boot secret, over a connection made with `curve`."""
    peer = RawPeer(back, curve=curve)
    try:
        peer.send(Header(PROTOCOL_VERSION, Kind.READY),
                  codec.encode(kp.Ready("echo", instance, os.getpid(), secret, ["Echo"])))
        _, err = peer.recv()
        return err.code, err.message
    finally:
        peer.close()


@pytest.mark.loop_block()  # raw CURVE probes from the test's thread, on purpose (the kernel is another process)
async def test_a_replaced_incarnations_key_is_refused_and_audited(home: Path) -> None:
    back = f"tcp://127.0.0.1:{free_port()}"
    children = [ChildSpec("security", "services.security"), ChildSpec("echo", "services.echo")]
    async with running_llmos(home, children, auth=True, kernel=KernelConfig(back=back)) as llmos:
        old = await ready_pid(llmos, "echo")
        echo_keys, security_keys = keys_of(old), keys_of(await ready_pid(llmos, "security"))
        server, _ = zmq.auth.load_certificate(curve_dir(home) / "kernel.key")
        shared, _ = zmq.auth.load_certificate(curve_dir(home) / "service.key")
        # Its own keypair, not the shared file's, and the kernel's public key: nothing to read from disk.
        assert echo_keys[2] == security_keys[2] == server
        assert len({echo_keys[0], security_keys[0], shared}) == 3 and echo_keys[1] != security_keys[1]
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in handshake_events(back, keyed(*echo_keys))
        # A live incarnation's key registers no other instance, even with that one's boot secret.
        code, msg = await anyio.to_thread.run_sync(ready_as, back, security_keys, "echo",
                                                   environ(old)["LLMOS_BOOT_SECRET"])
        assert code == "unauthorized" and "not the one issued to the live incarnation of echo" in msg, msg

        os.kill(old, signal.SIGKILL)
        new = await ready_pid(llmos, "echo", not_pid=old)
        new_keys = keys_of(new)
        assert new_keys[0] != echo_keys[0]
        # The dead incarnation's key no longer completes a handshake, and the refusal is audited with it.
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in handshake_events(back, keyed(*echo_keys))
        rec = await wait_audit(home, lambda r: r["action"] == "access" and r["result"] == "unauthorized"
                               and r["detail"].get("source") == f"back:curve:{echo_keys[0].decode()}",
                               "the replaced incarnation's key")
        assert "replaced incarnation of echo" in rec["detail"]["reason"]
        # The replacement serves under its own key.
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in handshake_events(back, keyed(*new_keys))
        assert (await llmos.client.call("echo", Echo(b"new key"), timeout=10)).payload == b"new key"
