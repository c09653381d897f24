"""Sessions (`AsyncClient.sessions`, `Client.sessions`): conversations the
scheduler keeps. A request with `session=NAME` is one turn: send only the
new text; the scheduler holds the history (and its KV) and runs the turn on
system prompt + history + new text (see ipc/protocol/sessions.py).

    await client.sessions.open("chat-42", system="You are terse.")   # optional
    a = await client.generate("Hello.", session="chat-42")
    b = await client.generate("And then?", session="chat-42")        # sees "Hello." and a
    b.usage.cached_tokens, b.usage.evicted_turns                     # reused KV, what was paged out
    await client.sessions.show("chat-42")      # its turns, their tokens and text
    await client.sessions.fork("chat-42", "chat-43", turns=1)
    await client.sessions.suspend("chat-42")   # KV to the swap tier; its requests wait
    await client.sessions.resume("chat-42")    # back, continuing where it stopped
    await client.sessions.close("chat-42")     # the conversation is over: KV freed, history deleted
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, TypeVar

from ipc.protocol import scheduler as sp
from ipc.protocol import sessions as sessp
from ipc.protocol.base import Message, Request

if TYPE_CHECKING:
    from sdk.client import AsyncClient

ReplyT = TypeVar("ReplyT", bound=Message)


class Sessions:
    def __init__(self, client: "AsyncClient"):
        self._client = client

    async def _call(self, msg: Request[ReplyT]) -> ReplyT:
        return await self._client.call(sp.SCHEDULER, msg, timeout=30.0)

    async def open(self, session: str, *, system: str = "", system_ids: builtins.list[int] | None = None,
                   max_context: int = 0, replace: bool = False) -> sessp.SessionInfo:
        """Start a conversation with a system prompt (kept through eviction) and
        an optional token limit below the model's context. Optional: the
        first turn of an unknown session opens it with neither."""
        return await self._call(sessp.OpenSession(session, system, list(system_ids or []), max_context, replace))

    async def get(self, session: str) -> sessp.SessionInfo:
        return await self._call(sessp.GetSession(session))

    async def show(self, session: str) -> sessp.SessionHistory:
        """The session's turns: token counts and text."""
        return await self._call(sessp.ShowSession(session))

    async def fork(self, session: str, into: str, *, turns: int = -1) -> sessp.SessionInfo:
        """A new session `into` with `session`'s history (its first `turns` turns; -1: all)."""
        return await self._call(sessp.ForkSession(session, into, turns))

    async def list(self) -> builtins.list[sessp.SessionInfo]:
        return (await self._call(sessp.ListSessions())).sessions

    async def suspend(self, session: str) -> sessp.SessionInfo:
        """Switch the session out (its KV is swapped out at the next step)."""
        return await self._call(sessp.SuspendSession(session))

    async def resume(self, session: str) -> sessp.SessionInfo:
        return await self._call(sessp.ResumeSession(session))

    async def close(self, session: str, *, keep_history: bool = False) -> sessp.SessionInfo:
        """The conversation is over: its KV is freed and its history deleted
        (`keep_history`: free the KV only)."""
        return await self._call(sessp.CloseSession(session, keep_history))


__all__ = ["Sessions"]
