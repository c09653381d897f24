"""Client credentials: exchange an API key for a capability token and keep it fresh.

The token rides in every request header (`Connection.token`); the kernel
checks it locally. Refresh is lazy — checked before each call, no background
task — and happens once 80% of the token's lifetime has passed. If the
security server is down at that moment the old token is kept (it is still
valid) and the refresh is retried a few seconds later; only an expired token
with no way to renew it is an error.

Local operator convenience: a client given no API key uses
``$LLMOS_HOME/admin.key`` when it can read it (mode 0600: only the owner of
the llmos home can), the way a unix socket trusts its owner.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import AsyncGenerator

import zmq
import zmq.utils.z85

import anyio

from common.curvekeys import client_keys
from ipc.curve import CURVE_PUBLIC_ENV, CURVE_SECRET_ENV, CURVE_SERVER_ENV, CurveClient
from ipc.errors import ConfigError, DeadlineExceeded, Unavailable
from common.home import admin_key_path
from ipc.protocol import security as sp
from ipc.protocol.base import Message, ReplyT, Request
from sdk.connection import Connection

REFRESH_FRACTION = 0.8
RETRY_S = 5.0


def tcp_keys(endpoint: str, home: Path, name: str = "local") -> CurveClient | None:
    """CURVE keys for a tcp:// endpoint (this host's, from `$LLMOS_HOME`); None
    for ipc://. `name`: "local" for a client (front), "service" for a service
    (back): the kernel admits each key only on its own socket."""
    if not endpoint.startswith("tcp://"):
        return None
    try:
        return client_keys(home, name)
    except (FileNotFoundError, OSError) as exc:
        raise Unavailable(f"{endpoint} needs CURVE keys, and {home} has none usable ({exc}); "
                          f"see ipc/curve.py") from None


def service_keys(endpoint: str, home: Path, env: Mapping[str, str] = os.environ) -> CurveClient | None:
    """A service's CURVE keys for the back socket: the keypair the kernel
    issued to this incarnation and the kernel's public key, from the
    environment it was started with (nothing on this host's disk); a
    service the kernel did not start uses `$LLMOS_HOME`'s `service` keypair.
    None for ipc://. ConfigError naming the variables when they are malformed."""
    if not endpoint.startswith("tcp://"):
        return None
    names = (CURVE_PUBLIC_ENV, CURVE_SECRET_ENV, CURVE_SERVER_ENV)
    handed = [env.get(n, "") for n in names]
    if not any(handed):
        return tcp_keys(endpoint, home, "service")
    try:
        if not all(len(k) == 40 and len(zmq.utils.z85.decode(k)) == 32 for k in handed):
            raise ValueError
        matched = zmq.curve_public(handed[1].encode()) == handed[0].encode()
    except (ValueError, KeyError, TypeError, zmq.ZMQError):
        matched = False
    if not matched:
        raise ConfigError(f"{', '.join(names)}: the CURVE keys handed to this service must each be 40 Z85 "
                          f"characters, the public key the secret key's")
    public, secret, server = (k.encode() for k in handed)
    return CurveClient(public, secret, server)


def read_admin_key(home: Path) -> str | None:
    """The local admin's API key, if this process may read it."""
    try:
        return admin_key_path(home).read_text().strip() or None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None


class TokenKeeper:
    def __init__(self, conn: Connection, api_key: str, ttl_s: int = 0):
        self._conn = conn
        self._api_key = api_key
        self._ttl_s = ttl_s
        self._lock = anyio.Lock()
        self.granted: sp.Granted | None = None
        self._refresh_at = 0.0

    async def login(self, timeout: float | None = 10.0) -> sp.Granted:
        g = await self._conn.call(sp.SECURITY, sp.Login(self._api_key, self._ttl_s), timeout=timeout)
        self.granted = g
        self._conn.token = g.token
        self._refresh_at = g.issued_at + REFRESH_FRACTION * (g.expires_at - g.issued_at)
        return g

    async def ensure_fresh(self) -> None:
        """Log in again when the token is due for renewal (cheap when it is not)."""
        if time.time() < self._refresh_at:
            return
        async with self._lock:
            now = time.time()
            if now < self._refresh_at:
                return
            g = self.granted
            try:
                await self.login(timeout=max(1.0, min(RETRY_S, (g.expires_at - now) if g else RETRY_S)))
            except (Unavailable, DeadlineExceeded):
                if g is None or time.time() >= g.expires_at - 1:
                    raise
                # The security server is restarting; the current token still works.
                self._refresh_at = time.time() + min(RETRY_S, (g.expires_at - time.time()) / 2)


class Requester:
    """The one request path of a client: every call and stream (a generation
    and each of its re-submissions included) goes through here, so the token
    is renewed before any request leaves, whatever the kind of request.
    `keeper` is None for a client with no API key or a fixed token."""

    def __init__(self, conn: Connection, keeper: TokenKeeper | None = None):
        self.conn = conn
        self.keeper = keeper

    @property
    def closed(self) -> bool:
        return self.conn.closed

    async def call(self, dst: str, msg: Request[ReplyT], *, timeout: float | None = None,
                   trace_id: str = "") -> ReplyT:
        if self.keeper is not None:
            await self.keeper.ensure_fresh()
        return await self.conn.call(dst, msg, timeout=timeout, trace_id=trace_id)

    def stream(self, dst: str, msg: Message, *, timeout: float | None = None,
               trace_id: str = "") -> AsyncGenerator[Message, None]:
        ready = self.keeper.ensure_fresh if self.keeper is not None else None
        return self.conn.stream(dst, msg, timeout=timeout, trace_id=trace_id, ready=ready)
