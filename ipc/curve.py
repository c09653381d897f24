"""CURVE encryption and authentication for tcp:// endpoints (pyzmq `zmq.auth`).

ipc:// sockets are protected by the file system (owner-only run directory);
tcp:// ones by CURVE: the kernel's ROUTERs are CURVE servers, and a ZAP
handler admits only peers whose public key is in the directory of that
socket's trust domain. Front (clients) and back (services) are separate
domains with separate keys: a client key is refused on the back socket, so
holding one never makes a peer a service (issue 12 #2).

    $LLMOS_HOME/security/curve/          0700
        kernel.key, kernel.key_secret    the kernel's keypair (both ROUTERs)
        local.key, local.key_secret      the keypair local clients use (front)
        service.key, service.key_secret  the keypair local services use (back)
        authorized/*.key                 front: client keys admitted (local.key is copied here)
        authorized-services/*.key        back: service keys admitted (service.key is copied here)

A remote client needs `kernel.key` (public) and a keypair of its own whose
public half an operator put in `authorized/`; a remote service one in
`authorized-services/` (then restart the kernel: the ZAP handler reads the
directories at boot).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from ipc.home import security_dir


FRONT_DOMAIN = "front"
BACK_DOMAIN = "back"


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized: Path  # front: client keys
    authorized_services: Path  # back: service keys


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes


def curve_dir(home: Path) -> Path:
    return security_dir(home) / "curve"


def _keypair(d: Path, name: str) -> None:
    if not (d / f"{name}.key_secret").exists():
        zmq.auth.create_certificates(d, name)
        for suffix in (".key", ".key_secret"):
            os.chmod(d / f"{name}{suffix}", 0o600)


def ensure_keys(home: Path) -> CurveServer:
    """The kernel's CURVE material, created on first use (the kernel calls this at boot)."""
    d = curve_dir(home)
    authorized = d / "authorized"
    services = d / "authorized-services"
    for sub in (authorized, services):
        sub.mkdir(parents=True, exist_ok=True)
    for p in (security_dir(home), d, authorized, services):
        os.chmod(p, 0o700)
    _keypair(d, "kernel")
    for name, where in (("local", authorized), ("service", services)):
        _keypair(d, name)
        if not (where / f"{name}.key").exists():
            shutil.copyfile(d / f"{name}.key", where / f"{name}.key")
    public, secret = zmq.auth.load_certificate(d / "kernel.key_secret")
    assert secret is not None
    return CurveServer(public, secret, authorized, services)


def client_keys(home: Path, name: str = "local") -> CurveClient:
    """A peer's keypair ("local" for clients, "service" for services) and the
    kernel's public key; `FileNotFoundError` naming the file when this host
    has not been given them."""
    d = curve_dir(home)
    public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(d / "kernel.key")
    assert secret is not None
    return CurveClient(public, secret, server_public)


def apply_server(sock: zmq.Socket[bytes], keys: CurveServer, domain: str) -> None:
    sock.zap_domain = domain.encode()
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def apply_client(sock: zmq.Socket[bytes], keys: CurveClient) -> None:
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.server_public


def start_zap(ctx: zmq.Context[zmq.Socket[bytes]], keys: CurveServer) -> "zmq.auth.thread.ThreadAuthenticator":
    """The ZAP handler (a thread on `ctx`): on the front socket's domain, CURVE
    peers whose public key is in `authorized/` are admitted; on the back
    socket's, those in `authorized-services/`; every other one is refused (no
    "*" domain, so a socket without a domain admits nobody). Stop it with
    `.stop()`."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain=FRONT_DOMAIN, location=str(keys.authorized))
    auth.configure_curve(domain=BACK_DOMAIN, location=str(keys.authorized_services))
    return auth


def peer_key(frame: object) -> str:
    """The CURVE public key (Z85) ZAP admitted the sender of `frame` under;
    "" on ipc:// (no ZAP) or for a frame that is not a received zmq.Frame."""
    if not isinstance(frame, zmq.Frame):
        return ""
    try:
        return str(frame.get("User-Id") or "")
    except zmq.ZMQError:
        return ""
