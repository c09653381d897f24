"""The gateway's other side: a kernel client per API key.

Each API key gets its own connection holding that principal's capability
token (renewed before expiry), so the kernel checks every request as the
user's, never as the gateway's. Nothing goes to the kernel for a caller
without a key (unless the gateway is told to serve anonymous callers, for a
kernel run with auth off): no token, no request.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ipc.errors import LlmosError, NotFound, Unauthorized
from ipc.protocol import kernel as kp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from ipc.protocol.driver import DRIVER, DescribeModel, ModelDescription
from ipc.sockets import FRONT_MAX_MESSAGE_BYTES
from sdk.auth import Requester, TokenKeeper
from sdk.connection import Connection
from sdk.generate import GenerationStream, stream_generate

MAX_CONNECTIONS = 256


@dataclass
class Stats:
    status: kp.StatusReply
    scheduler: sp.SchedulerStatsReply | None
    memory: mp.MemoryStatsReply | None


class KernelBackend:
    """`system` is the gateway's own (service) connection: model facts and
    stats are asked as the gateway; generation always as the caller."""

    def __init__(self, endpoint: str, system: Callable[[str, Any], Awaitable[Any]], *,
                 allow_anonymous: bool = False):
        self.endpoint = endpoint
        self._system = system
        self._anonymous = allow_anonymous
        self._conns: OrderedDict[str, Requester] = OrderedDict()
        self._model: ModelDescription | None = None

    async def authenticate(self, api_key: str) -> None:
        """Resolve the key to a capability token (a Login, cached per key);
        `Unauthorized` for a key the security server refuses."""
        await self._principal(api_key)

    async def _principal(self, api_key: str | None) -> Requester:
        """The caller's request path (its own connection and token keeper); a
        request sent through it renews the token when due."""
        if api_key is None and not self._anonymous:
            raise Unauthorized("no API key: send 'Authorization: Bearer <api key>'")
        slot = hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""
        p = self._conns.get(slot)
        if p is None:
            conn = Connection(self.endpoint, src="gateway", max_message_bytes=FRONT_MAX_MESSAGE_BYTES)
            keeper = TokenKeeper(conn, api_key) if api_key else None
            p = Requester(conn, keeper)
            if keeper is not None:
                try:
                    await keeper.login()
                except LlmosError:
                    conn.close()
                    raise
            self._conns[slot] = p
            while len(self._conns) > MAX_CONNECTIONS:
                _, old = self._conns.popitem(last=False)
                old.conn.close()
        else:
            self._conns.move_to_end(slot)
        return p

    async def principal(self, api_key: str | None) -> str:
        """Who the key is ("" for an anonymous caller, auth off)."""
        keeper = (await self._principal(api_key)).keeper
        return keeper.granted.principal if keeper is not None and keeper.granted is not None else ""

    async def request_info(self, api_key: str | None, request_id: str) -> sp.RequestInfo | None:
        """The caller's request `request_id` as the scheduler knows it (None:
        it does not: never this caller's, or forgotten by a restart)."""
        try:
            return await (await self._principal(api_key)).call(sp.SCHEDULER, sp.RequestStatus(request_id),
                                                                timeout=10.0)
        except NotFound:
            return None

    async def status(self) -> kp.StatusReply:
        return await self._system(kp.KERNEL, kp.Status())

    async def stream(self, api_key: str | None, submit: sp.Submit) -> GenerationStream:
        """The generation as the caller; closing it early cancels the request."""
        return stream_generate(await self._principal(api_key), submit)

    async def call(self, api_key: str | None, service: str, msg: Any, timeout: float = 30.0) -> Any:
        """A request as the caller (the kernel checks the caller's rights: the
        Responses API's session ops need the `session` right)."""
        return await (await self._principal(api_key)).call(service, msg, timeout=timeout)

    async def model(self, api_key: str | None) -> ModelDescription:
        if api_key is not None:
            await self._principal(api_key)  # an unknown key is refused before anything else
        if self._model is None:
            self._model = await self._system(DRIVER, DescribeModel())
        return self._model

    async def stats(self, api_key: str | None = None) -> Stats:
        """With a key, the kernel's Status is asked as that caller, so the
        kernel's guard decides whether they may see the system's state (the
        `status` or `admin` right); the rest is then asked as the gateway."""
        if api_key is not None:
            p = await self._principal(api_key)
            status = await p.call(kp.KERNEL, kp.Status(), timeout=10.0)
        else:
            status = await self._system(kp.KERNEL, kp.Status())
        return Stats(status, await self._maybe(sp.SCHEDULER, sp.SchedulerStats()),
                     await self._maybe("memory", mp.MemoryStats()))

    async def _maybe(self, service: str, msg: Any) -> Any:
        try:
            return await self._system(service, msg)
        except LlmosError:
            return None  # a service that is restarting is simply absent from this scrape

    def close(self) -> None:
        for p in self._conns.values():
            p.conn.close()
        self._conns.clear()
