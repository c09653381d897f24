"""The CURVE keys issued to each incarnation (ipc/curve.py KeyRing) and a
service's reading of the ones handed to it (sdk/auth.py service_keys): no
sockets, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from common.curvekeys import client_keys, ensure_keys
from ipc.curve import BACK_DOMAIN, FRONT_DOMAIN, KeyRing
from ipc.errors import ConfigError
from kernel.keys import key_refusal
from sdk.auth import service_keys


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(ensure_keys(tmp_path))


def test_an_issued_key_is_admitted_on_the_back_socket_only_while_its_incarnation_lives(
        ring: KeyRing, tmp_path: Path) -> None:
    first, _ = ring.issue("cuda-0")
    assert ring.callback(BACK_DOMAIN, first) and not ring.callback(FRONT_DOMAIN, first)
    assert ring.current("cuda-0") == first.decode() and ring.manages("cuda-0") and not ring.manages("cuda-1")
    second, _ = ring.issue("cuda-0")  # the next incarnation: the first key stops working
    assert not ring.callback(BACK_DOMAIN, first) and ring.callback(BACK_DOMAIN, second)
    assert not ring.revoke("cuda-1", second)  # another instance's key is not this one's to revoke
    assert ring.revoke("cuda-0", second.decode()) and not ring.revoke("cuda-0", second)
    assert not ring.callback(BACK_DOMAIN, second) and ring.current("cuda-0") == "" and ring.manages("cuda-0")
    stranger, _ = zmq.curve_keypair()
    assert not ring.callback(BACK_DOMAIN, stranger)
    refusals = ring.take_refusals()
    assert [r.domain for r in refusals] == [FRONT_DOMAIN, BACK_DOMAIN, BACK_DOMAIN, BACK_DOMAIN]
    assert [r.key for r in refusals[1:]] == [first.decode(), second.decode(), stranger.decode()]
    assert "replaced incarnation of cuda-0" in refusals[1].reason and "not admitted" in refusals[3].reason
    assert ring.take_refusals() == []
    # The key files read at boot still admit their own domain.
    assert ring.callback(FRONT_DOMAIN, client_keys(tmp_path, "local").public)
    assert ring.callback(BACK_DOMAIN, client_keys(tmp_path, "service").public)


def test_an_instance_registers_only_under_the_key_issued_to_it(ring: KeyRing) -> None:
    mine, _ = ring.issue("echo")
    other, _ = ring.issue("security")
    assert key_refusal(ring, "echo", mine.decode()) is None
    refused = key_refusal(ring, "echo", other.decode())
    assert refused is not None and "not the one issued to the live incarnation of echo" in refused.message
    assert key_refusal(ring, "helper", other.decode()) is None  # a name the kernel does not run
    assert key_refusal(ring, "echo", "") is None and key_refusal(None, "echo", other.decode()) is None  # ipc://
    ring.revoke("echo", mine)
    assert key_refusal(ring, "echo", mine.decode()) is not None


def test_a_service_uses_the_keys_handed_to_it(ring: KeyRing, tmp_path: Path) -> None:
    pub, sec = ring.issue("echo")
    env = {"LLMOS_CURVE_PUBLIC": pub.decode(), "LLMOS_CURVE_SECRET": sec.decode(),
           "LLMOS_CURVE_SERVER": ring.server_public.decode()}
    keys = service_keys("tcp://10.0.0.1:5555", tmp_path / "elsewhere", env)
    assert keys is not None and (keys.public, keys.secret, keys.server_public) == (pub, sec, ring.server_public)
    assert service_keys("ipc:///tmp/x.sock", tmp_path, env) is None
    # None handed: this host's files (a service the kernel did not start).
    files = service_keys("tcp://10.0.0.1:5555", tmp_path, {})
    assert files is not None and files.public == client_keys(tmp_path, "service").public


@pytest.mark.parametrize("bad", [
    {"LLMOS_CURVE_PUBLIC": "x" * 40},                                      # not the secret's public key
    {"LLMOS_CURVE_SECRET": ""},                                            # one missing
    {"LLMOS_CURVE_PUBLIC": "a" * 39},                                      # not a multiple of 5
    {"LLMOS_CURVE_SECRET": "\"" * 40},                                     # not Z85
    {"LLMOS_CURVE_SERVER": "é" * 40},                                      # not ASCII
    {"LLMOS_CURVE_SERVER": "a" * 45},                                      # too long
])
def test_malformed_handed_keys_are_refused_by_name(ring: KeyRing, tmp_path: Path, bad: dict[str, str]) -> None:
    pub, sec = ring.issue("echo")
    env = {"LLMOS_CURVE_PUBLIC": pub.decode(), "LLMOS_CURVE_SECRET": sec.decode(),
           "LLMOS_CURVE_SERVER": ring.server_public.decode(), **bad}
    with pytest.raises(ConfigError, match="LLMOS_CURVE_PUBLIC, LLMOS_CURVE_SECRET, LLMOS_CURVE_SERVER"):
        service_keys("tcp://10.0.0.1:5555", tmp_path, env)
