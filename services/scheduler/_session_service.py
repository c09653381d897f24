"""The scheduler service's session handlers (issue 18): open, show, fork,
list, close, suspend and resume a conversation, and the session side of a
Submit (its stored history loaded first, written back before the answer).
A mixin of `SchedulerService`; the contract is ipc/protocol/sessions.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import msgspec

from ipc.errors import BadRequest, LlmosError, NotFound, Unavailable
from ipc.protocol import scheduler as sp
from ipc.protocol import sessions as sessp
from sdk.service import Context, handler
from services.scheduler._admission import check_ids
from services.scheduler._history import HistoryRec, Key, TurnRec, check_turn_fits

if TYPE_CHECKING:
    from services.scheduler.engine import Engine


class SessionHandlers:
    engine: Engine

    if TYPE_CHECKING:
        def _check_session(self, session: str, ctx: Context, op: str) -> None: ...
        async def _until_ready(self) -> None: ...

    async def session_turn(self, msg: sp.Submit, principal: str, known: sp.Submit | None) -> sp.Submit:
        """Before a session's turn is tokenized: its history is loaded, and its
        text gets special tokens (BOS) only if it opens the conversation."""
        key = (principal, msg.session)
        table = self.engine.sessions
        rec = await table.histories.ensure(key)
        if rec is None and key not in table.by_key:
            await table.histories.check_room(principal)
        if known is not None:
            special = known.add_special_tokens  # a re-submission: tokenized as it was
        else:
            opening = (rec is None or not (rec.system_ids or rec.turns)) and key not in table.by_key
            special = msg.add_special_tokens and opening
        return msg if special == msg.add_special_tokens else msgspec.structs.replace(msg, add_special_tokens=special)

    async def turn_done(self, msg: sp.Submit, principal: str) -> None:
        """The turn's history is on disk before its answer goes out."""
        histories = self.engine.sessions.histories
        await histories.persist((principal, msg.session))
        histories.trim(set(self.engine.sessions.by_key))

    def _info(self, key: Key) -> sessp.SessionInfo:
        return self.engine.sessions.describe(*key)

    @handler(idempotent=True)
    async def open_session(self, msg: sessp.OpenSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "OpenSession")
        await self._until_ready()
        key = (ctx.principal, msg.session)
        table = self.engine.sessions
        old = await table.histories.ensure(key)
        if old is not None and not msg.replace:
            raise BadRequest(f"session {msg.session!r} exists ({len(old.turns)} turns): replace=true starts it "
                             "over", detail={"field": "session"})
        live = table.by_key.get(key)
        if live is not None and (live.active is not None or live.queue):
            raise BadRequest(f"session {msg.session!r} has a turn in flight: it cannot be replaced now",
                             detail={"field": "session"})
        if old is None:
            await table.histories.check_room(ctx.principal)
        model = self.engine.model
        if model is None:
            raise Unavailable("the scheduler has no model yet (no driver is up)")
        if msg.system and msg.system_ids:
            raise BadRequest("give at most one of system (text) and system_ids", detail={"field": "system"})
        if len(msg.system) > model.max_prompt_chars:
            raise BadRequest(f"the system prompt has {len(msg.system)} characters; at most "
                             f"{model.max_prompt_chars}", detail={"field": "system"})
        system = (await anyio.to_thread.run_sync(model.tokenizer.encode, msg.system) if msg.system
                  else list(msg.system_ids))
        check_ids(model, system, "system_ids")
        rec = HistoryRec(principal=ctx.principal, name=msg.session, system_ids=system, max_context=msg.max_context)
        check_turn_fits(rec, [], table.room())
        table.histories.drop(key)
        table.histories.by_key[key] = rec
        table.histories.changed(key)
        await table.histories.persist(key)
        return self._info(key)

    @handler(idempotent=True)
    async def get_session(self, msg: sessp.GetSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "GetSession")
        await self.engine.sessions.histories.ensure((ctx.principal, msg.session))
        return self._info((ctx.principal, msg.session))

    @handler(idempotent=True)
    async def show_session(self, msg: sessp.ShowSession, ctx: Context) -> sessp.SessionHistory:
        self._check_session(msg.session, ctx, "ShowSession")
        key = (ctx.principal, msg.session)
        rec = await self.engine.sessions.histories.ensure(key)
        info = self._info(key)
        if rec is not None and self.engine.model is None:
            await self._until_ready()  # just restarted: the turns are decoded with the model's tokenizer
        model = self.engine.model
        if rec is None or model is None:
            return sessp.SessionHistory(info)
        tok, system, turns = model.tokenizer, list(rec.system_ids), list(rec.turns)

        def decode() -> sessp.SessionHistory:
            return sessp.SessionHistory(info, tok.decode(system, skip_special_tokens=False), [
                sessp.TurnInfo(t.turn, t.request_id, len(t.prompt_ids), len(t.output_ids),
                               tok.decode(t.prompt_ids, skip_special_tokens=False), tok.decode(t.output_ids))
                for t in turns])
        return await anyio.to_thread.run_sync(decode)

    @handler(idempotent=True)
    async def fork_session(self, msg: sessp.ForkSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "ForkSession")
        self._check_session(msg.into, ctx, "ForkSession")
        histories = self.engine.sessions.histories
        src = await histories.ensure((ctx.principal, msg.session))
        if src is None:
            raise NotFound(f"no session {msg.session!r} with a history", detail={"session": msg.session})
        into = (ctx.principal, msg.into)
        if await histories.ensure(into) is not None or into in self.engine.sessions.by_key:
            raise BadRequest(f"session {msg.into!r} exists: fork into a new name", detail={"field": "into"})
        if msg.turns > len(src.turns):
            raise BadRequest(f"session {msg.session!r} has {len(src.turns)} turns, not {msg.turns}",
                             detail={"field": "turns"})
        await histories.check_room(ctx.principal)
        kept = src.turns if msg.turns < 0 else src.turns[:msg.turns]
        histories.by_key[into] = HistoryRec(
            principal=ctx.principal, name=msg.into, system_ids=list(src.system_ids), max_context=src.max_context,
            turns=[TurnRec(t.turn, t.request_id, t.prompt_ids, t.output_ids) for t in kept],
            next_turn=kept[-1].turn + 1 if kept else 1)
        histories.changed(into)
        await histories.persist(into)
        return self._info(into)

    @handler(idempotent=True)
    async def list_sessions(self, msg: sessp.ListSessions, ctx: Context) -> sessp.SessionList:
        table = self.engine.sessions
        confined = ctx.restrictions.session
        names = set(await anyio.to_thread.run_sync(table.histories.store.names, ctx.principal)
                    if table.histories.store is not None else [])
        names |= {k[1] for k in (*table.by_key, *table.histories.by_key) if k[0] == ctx.principal}
        out = []
        for name in sorted(names):
            if confined and name != confined:
                continue
            await table.histories.ensure((ctx.principal, name))
            try:
                out.append(self._info((ctx.principal, name)))
            except LlmosError:
                continue
        return sessp.SessionList(out)

    @handler(idempotent=True)
    async def close_session(self, msg: sessp.CloseSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "CloseSession")
        key = (ctx.principal, msg.session)
        table = self.engine.sessions
        await table.histories.ensure(key)
        info = self._info(key)  # NotFound: neither a live session nor a history
        if key in table.by_key:
            info = table.close(*key)  # the KV released (the counts without the history)
        if msg.keep_history:
            return self._info(key)
        await table.histories.delete(key)
        return msgspec.structs.replace(info, turns=0, history_tokens=0, system_tokens=0, max_context=0)

    @handler(idempotent=True)
    async def suspend_session(self, msg: sessp.SuspendSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "SuspendSession")
        return self.engine.sessions.suspend(ctx.principal, msg.session)

    @handler(idempotent=True)
    async def resume_session(self, msg: sessp.ResumeSession, ctx: Context) -> sessp.SessionInfo:
        self._check_session(msg.session, ctx, "ResumeSession")
        return self.engine.sessions.resume(ctx.principal, msg.session)


__all__ = ["SessionHandlers"]
