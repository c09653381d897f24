"""Sessions (`AsyncClient.sessions`, `Client.sessions`): a conversation's
requests carry `session=NAME` (see `generate`); they run one at a time and
the scheduler keeps the conversation's KV between them.

    await client.generate(history, session="chat-42")
    await client.sessions.suspend("chat-42")   # KV to the swap tier; its requests wait
    await client.sessions.resume("chat-42")    # back, continuing where it stopped
    await client.sessions.close("chat-42")     # the conversation is over: free its KV
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.protocol import scheduler as sp
from ipc.protocol import sessions as sessp
from ipc.protocol.base import Request

if TYPE_CHECKING:
    from sdk.client import AsyncClient


class Sessions:
    def __init__(self, client: "AsyncClient"):
        self._client = client

    async def _call(self, msg: Request[sessp.SessionInfo]) -> sessp.SessionInfo:
        return await self._client.call(sp.SCHEDULER, msg, timeout=30.0)

    async def suspend(self, session: str) -> sessp.SessionInfo:
        """Switch the session out (its KV is swapped out at the next step)."""
        return await self._call(sessp.SuspendSession(session))

    async def resume(self, session: str) -> sessp.SessionInfo:
        return await self._call(sessp.ResumeSession(session))

    async def close(self, session: str) -> sessp.SessionInfo:
        return await self._call(sessp.CloseSession(session))

    async def get(self, session: str) -> sessp.SessionInfo:
        return await self._call(sessp.GetSession(session))


__all__ = ["Sessions"]
