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
public half an operator put in `authorized/`; a service the kernel does not
start one in `authorized-services/` (then restart the kernel: the ZAP
handler reads the directories at boot).

The kernel's own children need no files: `KeyRing` issues each incarnation
a keypair of its own (the supervisor hands it over in the child's
environment, with the kernel's public key), admits its public key on the
back socket while that incarnation lives and revokes it when the
incarnation is declared down or exits; the router then admits that
instance's READY only under the key issued to it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.certs import load_certificates


FRONT_DOMAIN = "front"
BACK_DOMAIN = "back"
# A child's issued keypair and the kernel's public key, Z85, in its environment.
CURVE_PUBLIC_ENV = "LLMOS_CURVE_PUBLIC"
CURVE_SECRET_ENV = "LLMOS_CURVE_SECRET"
CURVE_SERVER_ENV = "LLMOS_CURVE_SERVER"


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


REVOKED_KEPT = 4096  # revoked keys remembered, to say whose a refused key was
REFUSALS_KEPT = 1024  # refusals waiting for the kernel to audit them (the oldest go)


@dataclass(frozen=True)
class ZapRefusal:
    domain: str
    key: str  # Z85
    reason: str


class KeyRing:
    """Which CURVE keys each kernel socket admits: the key files read at boot
    (`authorized/` for the front, `authorized-services/` for the back) and,
    on the back, the keys issued to live incarnations. Thread-safe: the ZAP
    handler asks from its own thread (`callback`); the kernel issues and
    revokes from the event loop and takes the refusals (`take_refusals`) to
    audit them."""

    def __init__(self, keys: CurveServer):
        self.server_public = keys.public
        self._static = {FRONT_DOMAIN: frozenset(load_certificates(keys.authorized)),
                        BACK_DOMAIN: frozenset(load_certificates(keys.authorized_services))}
        self._lock = threading.Lock()
        self._issued: dict[bytes, str] = {}  # public key -> instance
        self._current: dict[str, bytes] = {}  # instance -> its live incarnation's public key
        self._revoked: OrderedDict[bytes, str] = OrderedDict()
        self._refusals: deque[ZapRefusal] = deque(maxlen=REFUSALS_KEPT)

    def issue(self, instance: str) -> tuple[bytes, bytes]:
        """A fresh keypair (Z85 public, secret) for a new incarnation of
        `instance`, admitted on the back socket from now on; the instance's
        previous key, if still admitted, no longer is."""
        public, secret = zmq.curve_keypair()
        with self._lock:
            old = self._current.get(instance)
            if old is not None:
                self._revoke(instance, old)
            self._issued[public] = instance
            self._current[instance] = public
        return public, secret

    def revoke(self, instance: str, public: bytes | str) -> bool:
        """Stop admitting `public` (an incarnation of `instance` is down).
        False when it was not an admitted key of that instance."""
        key = public.encode() if isinstance(public, str) else public
        with self._lock:
            if self._issued.get(key) != instance:
                return False
            self._revoke(instance, key)
            return True

    def _revoke(self, instance: str, key: bytes) -> None:
        del self._issued[key]
        if self._current.get(instance) == key:
            del self._current[instance]
        self._revoked[key] = instance
        while len(self._revoked) > REVOKED_KEPT:
            self._revoked.popitem(last=False)

    def manages(self, instance: str) -> bool:
        """Whether keys were ever issued to `instance` (it is the kernel's child)."""
        with self._lock:
            return instance in self._current or instance in self._revoked.values()

    def current(self, instance: str) -> str:
        """The Z85 key `instance`'s live incarnation was issued ("" if none)."""
        with self._lock:
            key = self._current.get(instance)
        return key.decode() if key is not None else ""

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP handler's question (`zmq.auth` credentials provider)."""
        with self._lock:
            if key in self._static.get(domain, ()) or (domain == BACK_DOMAIN and key in self._issued):
                return True
            whose = self._revoked.get(key) if domain == BACK_DOMAIN else None
            reason = (f"the CURVE key of a replaced incarnation of {whose} (revoked when it went down)"
                      if whose else f"a CURVE key not admitted on the {domain} socket")
            self._refusals.append(ZapRefusal(domain, key.decode(errors="replace"), reason))
        return False

    def take_refusals(self) -> list[ZapRefusal]:
        with self._lock:
            out = list(self._refusals)
            self._refusals.clear()
        return out


def start_zap(ctx: zmq.Context[zmq.Socket[bytes]], ring: KeyRing) -> "zmq.auth.thread.ThreadAuthenticator":
    """The ZAP handler (a thread on `ctx`): `ring` decides per socket domain
    (front: `authorized/`; back: `authorized-services/` and the keys issued
    to live incarnations); every other peer is refused (no "*" domain, so a
    socket without a domain admits nobody). Stop it with `.stop()`."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain=FRONT_DOMAIN, credentials_provider=ring)
    auth.configure_curve_callback(domain=BACK_DOMAIN, credentials_provider=ring)
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
