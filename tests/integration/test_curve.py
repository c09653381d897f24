"""tcp:// with CURVE: a client holding an authorised key gets through; one
without CURVE, with an unknown key or with the wrong server key cannot
complete the handshake (seen through zmq's socket monitor, not a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import zmq
import zmq.auth

from common.curvekeys import curve_dir
from ipc.errors import LlmosError
from ipc.protocol.echo import Echo, EchoReply
from kernel.config import ChildSpec, Config, KernelConfig
from sdk.client import AsyncClient
from tools.testing import REPO_ROOT, write_config
from tests.helpers.curve_probe import FAILED, handshake_events
from tests.helpers.net import free_port

# Raw CURVE sockets (blocking zmq, socket monitors) probe the kernel from the
# test's own thread, on purpose; the kernel runs in its own process.
pytestmark = pytest.mark.loop_block()

@pytest.fixture
def tcp_kernel(home: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(front=endpoint, auth=False),
                                                   children=[ChildSpec("echo", "services.echo")]))
    log = open(home / "kernel.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=log)
    try:
        yield endpoint, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        log.close()


async def connect_when_up(endpoint: str, home: Path, proc: subprocess.Popen[bytes]) -> AsyncClient:
    end = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (home / "kernel.stderr").read_text()[-2000:]
        if (curve_dir(home) / "local.key_secret").exists():
            try:
                c = await AsyncClient.connect(endpoint, home=home, timeout=2)
                if any(i.state == "ready" for i in await c.services()):
                    return c
                await c.aclose()
            except LlmosError:
                pass
        assert time.monotonic() < end, "the tcp:// kernel never served an authorised client"
        await anyio.sleep(0.1)


async def test_only_authorised_curve_clients_get_through(tcp_kernel, home: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint, proc = tcp_kernel
    c = await connect_when_up(endpoint, home, proc)
    try:
        reply = await c.call("echo", Echo(b"over curve"), timeout=10)
        assert isinstance(reply, EchoReply) and reply.payload == b"over curve"
        d = curve_dir(home)
        assert (d / "kernel.key_secret").stat().st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o777 == 0o700
        server_public, _ = zmq.auth.load_certificate(d / "kernel.key")

        # no CURVE at all
        assert handshake_events(endpoint) & FAILED
        # a well-formed CURVE client whose key nobody authorised: ZAP refuses it
        stranger_pub, stranger_sec = zmq.curve_keypair()

        def stranger(sock: zmq.Socket[bytes]) -> None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = stranger_pub, stranger_sec, server_public
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in handshake_events(endpoint, stranger)
        # the authorised key, but talking to the wrong server key
        local_pub, local_sec = zmq.auth.load_certificate(d / "local.key_secret")
        wrong_server, _ = zmq.curve_keypair()

        def confused(sock: zmq.Socket[bytes]) -> None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = local_pub, local_sec, wrong_server
        assert handshake_events(endpoint, confused) & FAILED
        # and the authorised key itself does complete the handshake
        assert local_sec is not None

        def local(sock: zmq.Socket[bytes]) -> None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = local_pub, local_sec, server_public
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in handshake_events(endpoint, local)
        # the kernel kept serving through all of it
        assert (await c.call("echo", Echo(b"still"), timeout=10)).payload == b"still"
        await c.shutdown("test done")
    finally:
        await c.aclose()
    assert await anyio.to_thread.run_sync(proc.wait, 30) == 0


@pytest.fixture
def tcp_both(home: Path):  # type: ignore[no-untyped-def]
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(front=front, back=back, auth=False),
                                                   children=[ChildSpec("echo", "services.echo")]))
    log = open(home / "kernel.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=log)
    try:
        yield front, back, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        log.close()


async def test_front_and_back_are_separate_trust_domains(tcp_both, home: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 12 #2: one ZAP domain for both sockets let any authorised client
    connect to the back socket and pose as a service. Now a client key is
    refused on the back socket and a service key on the front one; services
    (echo here) register over tcp:// with theirs."""
    front, back, proc = tcp_both
    c = await connect_when_up(front, home, proc)  # echo READY over tcp:// back, with the service key
    try:
        d = curve_dir(home)
        server_public, _ = zmq.auth.load_certificate(d / "kernel.key")

        def keyed(name: str) -> object:
            pub, sec = zmq.auth.load_certificate(d / f"{name}.key_secret")

            def setup(sock: zmq.Socket[bytes]) -> None:
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server_public
            return setup

        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in handshake_events(back, keyed("local"))
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in handshake_events(front, keyed("service"))
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in handshake_events(back, keyed("service"))
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in handshake_events(front, keyed("local"))
        assert (d / "authorized-services").stat().st_mode & 0o777 == 0o700
        assert (await c.call("echo", Echo(b"still"), timeout=10)).payload == b"still"
        await c.shutdown("test done")
    finally:
        await c.aclose()
    assert await anyio.to_thread.run_sync(proc.wait, 30) == 0
