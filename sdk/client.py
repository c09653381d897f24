"""The client SDK: `AsyncClient` and its synchronous face `Client`.

    async with await AsyncClient.connect() as client:
        reply = await client.call("echo", Echo(b"hi"))     # an EchoReply: Echo declares it

Errors surface as exceptions from the `ipc.errors.LlmosError` tree, carrying
the wire code.

Authentication (when the kernel runs with `auth`): pass `api_key=` and the
client logs in, attaches the capability token to every request and renews it
before it expires (`sdk.auth`). Without one it uses `$LLMOS_HOME/admin.key`
if this process can read it (the local operator), else sends no token.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, AsyncGenerator, Sequence

import zmq
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ipc.errors import BadRequest, NotFound, Unavailable
from common.home import front_endpoint, llmos_home
from ipc.protocol import kernel as kp
from ipc.protocol import scheduler as sp
from ipc.protocol import security as secp
from ipc.protocol.base import Message, ReplyT, Request
from ipc.sockets import FRONT_MAX_MESSAGE_BYTES
from sdk.auth import Requester, TokenKeeper, read_admin_key, tcp_keys
from sdk import generate as gen
from sdk.blocking import Blocking
from sdk.connection import Connection
from sdk.generate import Chunk, Completion, GenerationStream
from sdk.jobs import Jobs
from sdk.sessions import Sessions


class AsyncClient:
    def __init__(self, conn: Connection):
        self._conn = conn
        # Every request of this client goes through it (and so through the token refresh).
        self._path = Requester(conn)
        self.jobs = Jobs(self)  # timed and periodic generations (sdk.jobs)
        self.sessions = Sessions(self)  # suspend / resume / close a conversation (sdk.sessions)

    @classmethod
    async def connect(cls, endpoint: str | None = None, *, home: str | os.PathLike[str] | None = None,
                      check: bool = True, timeout: float = 5.0, api_key: str | None = None,
                      token_ttl_s: int = 0) -> "AsyncClient":
        """Connect to the kernel (default: the one under `LLMOS_HOME`). With
        `check`, wait for the kernel to answer, so a missing kernel is an
        immediate `Unavailable` rather than a hang on the first call. With an
        API key (or a readable admin.key), log in first (that answer is the check)."""
        h = llmos_home(home)
        ep = endpoint or front_endpoint(h)
        if not ep.startswith(("ipc://", "tcp://")):
            raise BadRequest(f"endpoint {ep[:200]!r}: want tcp://HOST:PORT or ipc://PATH")
        if ep.startswith("ipc://") and not Path(ep[6:]).exists():
            raise Unavailable(f"no llmos kernel is running at {ep} (start one with `llmos up`)")
        try:
            conn = Connection(ep, src=f"client:{os.getpid()}", curve=tcp_keys(ep, h),
                              max_message_bytes=FRONT_MAX_MESSAGE_BYTES)
        except zmq.ZMQError as exc:
            raise BadRequest(f"endpoint {ep[:200]!r}: {exc} (want tcp://HOST:PORT or ipc://PATH)") from None
        client = cls(conn)
        key = api_key if api_key is not None else read_admin_key(h)
        try:
            if key:
                try:
                    await client.login(key, ttl_s=token_ttl_s, timeout=timeout)
                except NotFound:
                    if api_key is not None:
                        raise
                    # A leftover admin.key, and this kernel runs no security service (auth off).
                    key = None
            if check and not key:
                await client.status(timeout=timeout)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def login(self, api_key: str, *, ttl_s: int = 0, timeout: float | None = 10.0) -> secp.Granted:
        """Exchange `api_key` for a capability token used from now on (and renewed)."""
        keeper = TokenKeeper(self._conn, api_key, ttl_s)
        granted = await keeper.login(timeout)
        self._path.keeper = keeper
        return granted

    def use_token(self, token: bytes) -> None:
        """Send `token` (e.g. an attenuated one) with every request; no renewal."""
        self._path.keeper = None
        self._conn.token = token

    @property
    def connection(self) -> Connection:
        return self._conn

    async def call(self, service: str, msg: Request[ReplyT], *, timeout: float | None = None,
                   trace_id: str = "") -> ReplyT:
        """Send `msg` to `service` and return its reply, of the type `msg` declares."""
        return await self._path.call(service, msg, timeout=timeout, trace_id=trace_id)

    def stream(self, service: str, msg: Message, *, timeout: float | None = None) -> AsyncGenerator[Message, None]:
        """The events `msg` is answered with, then its reply."""
        return self._path.stream(service, msg, timeout=timeout)

    async def status(self, *, timeout: float | None = 10.0) -> kp.StatusReply:
        return await self.call(kp.KERNEL, kp.Status(), timeout=timeout)

    async def services(self) -> list[kp.InstanceInfo]:
        return (await self.status()).instances

    async def kill(self, target: str, signal: str = "SIGKILL") -> list[str]:
        return (await self.call(kp.KERNEL, kp.Kill(target, signal), timeout=10.0)).instances

    async def shutdown(self, reason: str = "requested") -> None:
        await self.call(kp.KERNEL, kp.Shutdown(reason), timeout=10.0)

    def subscribe(self, topic: str) -> AsyncGenerator[Message, None]:
        """Events published on `topic` (the first is `Subscribed`), until closed."""
        return self._path.stream(kp.KERNEL, kp.Subscribe(topic))

    async def generate(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        """Generate a completion (options: see `sdk.generate.build_submit`:
        max_tokens, temperature, top_p, top_k, seed, params, stop,
        stop_token_ids, priority, timeout, session, request_id, ignore_eos,
        logprobs).
        Survives a scheduler restart without a repeated or missing token."""
        return await gen.generate(self._path, gen.build_submit(prompt, **options))

    async def generate_n(self, prompt: str | Sequence[int], n: int, **options: Any) -> list[Completion]:
        """`n` completions of one prompt (options as `generate`; with a
        `seed`, choice i samples with seed + i). The prompt is computed once
        and the choices share its KV blocks (copy-on-write)."""
        return await gen.generate_n(self._path, gen.build_submit(prompt, **options), n)

    def stream_generate(self, prompt: str | Sequence[int], **options: Any) -> GenerationStream:
        """Like `generate`, as chunks while they are produced; the last one
        carries finish_reason and usage. Closing the stream early (`async
        with`, or `aclose()` after a `break`) cancels the request."""
        return gen.stream_generate(self._path, gen.build_submit(prompt, **options))

    async def cancel(self, request_id: str) -> bool:
        """Cancel a generation; False when it is not running (unknown or finished)."""
        return (await self.call(sp.SCHEDULER, sp.Cancel(request_id), timeout=10.0)).found

    async def request_status(self, request_id: str) -> sp.RequestInfo:
        return await self.call(sp.SCHEDULER, sp.RequestStatus(request_id), timeout=10.0)

    async def scheduler_stats(self) -> sp.SchedulerStatsReply:
        return await self.call(sp.SCHEDULER, sp.SchedulerStats(), timeout=10.0)

    async def aclose(self) -> None:
        self._conn.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Client(Blocking):
    """The synchronous client: an event loop in a helper thread runs an
    `AsyncClient`, and every method of it (and of `.jobs`, `.sessions`) is here
    as a blocking call with the same signature (`sdk.blocking`). A stream is
    an iterator; closing it early (a `break`, then `close()` or its end of
    life) closes the async one, so an unfinished generation is cancelled."""

    __slots__ = ("_aclient", "_stack")

    def __init__(self, portal: BlockingPortal, aclient: AsyncClient, stack: ExitStack):
        super().__init__(portal, aclient, lambda: self._stack is not None)
        self._aclient = aclient
        self._stack: ExitStack | None = stack

    @classmethod
    def connect(cls, endpoint: str | None = None, *, home: str | os.PathLike[str] | None = None,
                timeout: float = 5.0, api_key: str | None = None) -> "Client":
        stack = ExitStack()
        portal = stack.enter_context(start_blocking_portal("asyncio", {"use_uvloop": True}))
        try:
            aclient = portal.call(lambda: AsyncClient.connect(endpoint, home=home, timeout=timeout,
                                                              api_key=api_key))
        except BaseException:
            stack.close()
            raise
        return cls(portal, aclient, stack)

    def close(self) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        try:
            self._portal.call(self._aclient.aclose)
        finally:
            stack.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncClient", "Chunk", "Client", "Completion"]
