"""CURVE key files under LLMOS_HOME: the kernel's keypair, the local client
and service keypairs, and the directories of admitted keys per trust domain
(ipc/curve.py has the layout and the socket side)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth

from common.home import security_dir
from ipc.curve import CurveClient, CurveServer


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
