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

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


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
