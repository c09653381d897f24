"""CURVE encryption and authentication for tcp:// endpoints (pyzmq `zmq.auth`).

ipc:// sockets are protected by the file system (owner-only run directory);
tcp:// ones by CURVE: the kernel's ROUTERs are CURVE servers, and a ZAP
handler admits only clients whose public key is in the authorised directory.

    $LLMOS_HOME/security/curve/          0700
        kernel.key, kernel.key_secret    the kernel's keypair
        local.key, local.key_secret      the keypair local clients and services use
        authorized/*.key                 public keys admitted (local.key is copied here)

A remote client needs `kernel.key` (public) and a keypair of its own whose
public half an operator put in `authorized/` (then restart the kernel: the
ZAP handler reads the directory at boot).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from ipc.home import security_dir


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized: Path


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
    authorized.mkdir(parents=True, exist_ok=True)
    for p in (security_dir(home), d, authorized):
        os.chmod(p, 0o700)
    _keypair(d, "kernel")
    _keypair(d, "local")
    if not (authorized / "local.key").exists():
        shutil.copyfile(d / "local.key", authorized / "local.key")
    public, secret = zmq.auth.load_certificate(d / "kernel.key_secret")
    assert secret is not None
    return CurveServer(public, secret, authorized)


def client_keys(home: Path, name: str = "local") -> CurveClient:
    """A client's keypair and the kernel's public key; `FileNotFoundError`
    naming the file when this host has not been given them."""
    d = curve_dir(home)
    public, secret = zmq.auth.load_certificate(d / f"{name}.key_secret")
    server_public, _ = zmq.auth.load_certificate(d / "kernel.key")
    assert secret is not None
    return CurveClient(public, secret, server_public)


def apply_server(sock: zmq.Socket[bytes], keys: CurveServer) -> None:
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def apply_client(sock: zmq.Socket[bytes], keys: CurveClient) -> None:
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.server_public


def start_zap(ctx: zmq.Context[zmq.Socket[bytes]], keys: CurveServer) -> "zmq.auth.thread.ThreadAuthenticator":
    """The ZAP handler (a thread on `ctx`): CURVE clients whose public key is in
    `authorized/` are admitted, every other one refused. Stop it with `.stop()`."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    return auth
