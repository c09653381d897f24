"""Sessions (`AsyncClient.sessions`, `Client.sessions`): a conversation's
requests carry `session=NAME` (see `generate`); they run one at a time and
the scheduler keeps the conversation's KV between them.

    await client.generate(history, session="chat-42")
    await client.sessions.suspend("chat-42")   # KV to the swap tier; its requests wait
    await client.sessions.resume("chat-42")    # back, continuing where it stopped
    await client.sessions.close("chat-42")     # the conversation is over: free its KV
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from anyio.from_thread import BlockingPortal

from ipc.protocol import scheduler as sp
from ipc.protocol.base import Message

if TYPE_CHECKING:
    from sdk.client import AsyncClient


class Sessions:
    def __init__(self, client: "AsyncClient"):
        self._client = client

    async def _call(self, msg: Message) -> sp.SessionInfo:
        reply: sp.SessionInfo = await self._client.call(sp.SCHEDULER, msg, timeout=30.0)
        return reply

    async def suspend(self, session: str) -> sp.SessionInfo:
        """Switch the session out (its KV is swapped out at the next step)."""
        return await self._call(sp.SuspendSession(session))

    async def resume(self, session: str) -> sp.SessionInfo:
        return await self._call(sp.ResumeSession(session))

    async def close(self, session: str) -> sp.SessionInfo:
        return await self._call(sp.CloseSession(session))

    async def get(self, session: str) -> sp.SessionInfo:
        return await self._call(sp.GetSession(session))


class SyncSessions:
    """`Sessions` for the sync `Client`."""

    def __init__(self, portal: BlockingPortal, sessions: Sessions):
        self._portal = portal
        self._sessions = sessions

    def _run(self, fn: Callable[[], Any]) -> sp.SessionInfo:
        return self._portal.call(fn)  # type: ignore[no-any-return]

    def suspend(self, session: str) -> sp.SessionInfo:
        return self._run(lambda: self._sessions.suspend(session))

    def resume(self, session: str) -> sp.SessionInfo:
        return self._run(lambda: self._sessions.resume(session))

    def close(self, session: str) -> sp.SessionInfo:
        return self._run(lambda: self._sessions.close(session))

    def get(self, session: str) -> sp.SessionInfo:
        return self._run(lambda: self._sessions.get(session))


__all__ = ["Sessions", "SyncSessions"]
