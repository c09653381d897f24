"""Conversations the OS keeps (issue 18), over real processes: each turn
sends only its new text and answers as the whole history re-sent would
(greedy); the KV of the history is reused; a session past the model's
context evicts its oldest turns and says so; the history survives a SIGKILL
of the scheduler; concurrent turns queue; names are never paths; sessions
are the principal's own."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from ipc.errors import BadRequest, NotFound
from ipc.protocol import security as sec
from sdk.client import AsyncClient
from tools.testing import running_llmos
from tests.helpers.model_fixtures import local_greedy
from tests.helpers.stacks import children, secured_children

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONTEXT = 256  # the tiny checkpoint's max_position_embeddings


def ids(start: int, n: int) -> list[int]:
    return [(start + 7 * i) % 250 + 3 for i in range(n)]


async def test_three_turns_send_only_the_new_text_and_reuse_the_historys_kv(home: Path, checkpoint: Path) -> None:
    turns = [ids(1, 9), ids(50, 5), ids(90, 7)]
    n = 12
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        history: list[int] = []
        for k, new in enumerate(turns, 1):
            got = await c.generate(new, max_tokens=n, session="chat", **GREEDY)
            full = history + new
            assert got.token_ids == await local_greedy(checkpoint, full, n)
            u = got.usage
            assert (u.prompt_tokens, u.history_tokens, u.evicted_turns) == (len(full), len(history), 0)
            # The history's KV, pinned between turns (its last token's too, by
            # the turn's epilogue) and forked into this one, is reused whole.
            assert u.cached_tokens == len(history)
            history = full + got.token_ids
        # The same answer as re-sending the whole history, through the scheduler.
        plain = await c.generate(history[:-n], max_tokens=n, **GREEDY)
        assert plain.token_ids == history[-n:]
        shown = await c.sessions.show("chat")
        assert [(t.turn, t.prompt_tokens, t.output_tokens) for t in shown.turns] == \
            [(k, len(new), n) for k, new in enumerate(turns, 1)]
        assert shown.info.history_tokens == len(history) and shown.info.turns == 3

        # Concurrent turns on one session queue: the second sees the first's answer.
        firsts = {}

        async def turn(name: str, new: list[int]) -> None:
            firsts[name] = await c.generate(new, max_tokens=6, session="twin", request_id=name, **GREEDY)

        async with anyio.create_task_group() as tg:
            tg.start_soon(turn, "a", ids(3, 4))
            tg.start_soon(turn, "b", ids(4, 4))
        first, second = sorted(firsts.values(), key=lambda f: f.usage.history_tokens)
        assert first.usage.history_tokens == 0 and second.usage.history_tokens == 10
        assert (await c.sessions.get("twin")).turns == 2

        closed = await c.sessions.close("chat")
        assert closed.turns == 0 and closed.kv_where == ""
        with pytest.raises(NotFound, match="no session 'chat'"):
            await c.sessions.show("chat")


async def test_a_session_past_the_context_evicts_its_oldest_turns_and_keeps_answering(
        home: Path, checkpoint: Path) -> None:
    n = 60
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        await c.sessions.open("long", system_ids=ids(200, 8))
        system = ids(200, 8)
        kept: list[list[int]] = []  # the turns (prompt + answer) still in the history
        for k in range(4):
            new = ids(10 * k, 50)
            got = await c.generate(new, max_tokens=n, session="long", **GREEDY)
            evicted = []
            while len(system) + sum(map(len, kept)) + len(new) + n > CONTEXT:
                evicted.append(kept.pop(0))
            assert (got.usage.evicted_turns, got.usage.evicted_tokens) == (len(evicted), sum(map(len, evicted)))
            prompt = system + [t for turn in kept for t in turn] + new
            assert got.usage.prompt_tokens == len(prompt)
            # The answer of a fresh request on what is left of the history.
            assert got.token_ids == await local_greedy(checkpoint, prompt, n)
            kept.append(new + got.token_ids)
        info = await c.sessions.get("long")
        assert info.evicted_turns >= 2 and info.system_tokens == 8 and info.history_tokens <= CONTEXT

        # A turn that cannot fit even alone is refused, naming the field; the session is unharmed.
        with pytest.raises(BadRequest) as exc:
            await c.generate(ids(0, CONTEXT - 4), max_tokens=4, session="long", **GREEDY)
        assert exc.value.detail["field"] == "prompt" and "never truncated" in exc.value.message
        assert (await c.sessions.get("long")).turns == info.turns
        # A per-session limit works the same way.
        await c.sessions.open("small", max_context=40)
        with pytest.raises(BadRequest, match="its context holds 40"):
            await c.generate(ids(0, 40), max_tokens=4, session="small", **GREEDY)
        for _ in range(3):
            got = await c.generate(ids(5, 10), max_tokens=10, session="small", **GREEDY)
        assert got.usage.prompt_tokens <= 30 and got.usage.evicted_turns == 1


async def test_the_history_survives_a_scheduler_sigkill_and_names_are_never_paths(
        home: Path, checkpoint: Path) -> None:
    hostile = "../../../../tmp/llmos-evil/x"
    n = 10
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        history: list[int] = []
        for k in range(2):
            new = ids(k, 6)
            got = await c.generate(new, max_tokens=n, session=hostile, **GREEDY)
            history += new + got.token_ids
        pid = llmos.instance(await llmos.status(), "scheduler").pid
        assert await c.kill("scheduler") == ["scheduler"]
        await llmos.wait_for(lambda st: llmos.instance(st, "scheduler").pid != pid
                             and llmos.instance(st, "scheduler").state == "ready", 60, "scheduler restarted")
        new = ids(7, 6)
        got = await c.generate(new, max_tokens=n, session=hostile, **GREEDY)
        assert got.usage.history_tokens == len(history)  # the whole history, from disk
        assert got.token_ids == await local_greedy(checkpoint, history + new, n)
        assert got.usage.cached_tokens <= len(history)  # what was recomputed shows
        assert (await c.sessions.get(hostile)).turns == 3
        history += new + got.token_ids

        # Killed in the middle of a turn: the SDK re-submits it with the ids it
        # holds; the turn is bound to the same history and appended once.
        new, long = ids(11, 5), 120
        held: list[int] = []
        pid = llmos.instance(await llmos.status(), "scheduler").pid
        async for chunk in c.stream_generate(new, max_tokens=long, session=hostile, request_id="mid", **GREEDY):
            held += chunk.token_ids
            if len(held) >= 8 and llmos.instance(await llmos.status(), "scheduler").pid == pid:
                assert await c.kill("scheduler") == ["scheduler"]
            if chunk.finish_reason is not None:
                assert chunk.usage is not None and chunk.usage.history_tokens == len(history)
        assert llmos.instance(await llmos.status(), "scheduler").pid != pid
        assert held == await local_greedy(checkpoint, history + new, long)
        history += new + held
        last = await c.generate(ids(13, 3), max_tokens=4, session=hostile, **GREEDY)
        assert last.usage.history_tokens == len(history) and (await c.sessions.get(hostile)).turns == 5
        assert [s.session for s in await c.sessions.list()] == [hostile]
    files = [p for p in (home / "sessions").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parent.parent == home / "sessions"
    assert all(len(p.stem) == 64 and int(p.stem, 16) >= 0 for p in files)  # a hash, not the name
    assert not Path("/tmp/llmos-evil").exists()


async def test_another_tenant_cannot_read_continue_or_close_a_session(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, secured_children(checkpoint), auth=True) as llmos:
        keys = {}
        for tenant in ("alice", "bob"):
            created: sec.KeyCreated = await llmos.client.call(
                sec.SECURITY, sec.CreateKey(tenant, ["generate", "session"]))
            keys[tenant] = created.api_key
        async with await AsyncClient.connect(home=home, api_key=keys["alice"]) as alice, \
                await AsyncClient.connect(home=home, api_key=keys["bob"]) as bob:
            a1 = await alice.generate(ids(1, 8), max_tokens=6, session="chat", **GREEDY)
            for call in (bob.sessions.get, bob.sessions.show, bob.sessions.close):
                with pytest.raises(NotFound):
                    await call("chat")
            assert await bob.sessions.list() == []
            # bob's "chat" is his own conversation: alice's history is not in it.
            b1 = await bob.generate(ids(2, 8), max_tokens=6, session="chat", **GREEDY)
            assert b1.usage.history_tokens == 0
            await bob.sessions.close("chat")
            a2 = await alice.generate(ids(3, 4), max_tokens=6, session="chat", **GREEDY)
            assert a2.usage.history_tokens == 8 + len(a1.token_ids)
            assert (await alice.sessions.get("chat")).turns == 2


async def test_open_fork_list_and_close(home: Path, checkpoint: Path) -> None:
    system = ids(100, 6)
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        assert (await c.sessions.open("text", system="You are terse.")).system_tokens > 0
        opened = await c.sessions.open("base", system_ids=system)
        assert (opened.turns, opened.system_tokens, opened.history_tokens) == (0, 6, 6)
        with pytest.raises(BadRequest, match="exists") as exc:
            await c.sessions.open("base")
        assert exc.value.detail["field"] == "session"
        with pytest.raises(BadRequest, match="outside this model's vocabulary"):
            await c.sessions.open("bad", system_ids=[10**6])
        history = list(system)
        for k in range(2):
            new = ids(k, 5)
            got = await c.generate(new, max_tokens=6, session="base", **GREEDY)
            assert got.token_ids == await local_greedy(checkpoint, history + new, 6)
            history += new + got.token_ids
        turn1 = history[:6 + 5 + 6]
        forked = await c.sessions.fork("base", "branch", turns=1)
        assert (forked.turns, forked.history_tokens) == (1, len(turn1))
        new = ids(50, 4)
        got = await c.generate(new, max_tokens=6, session="branch", **GREEDY)
        assert got.token_ids == await local_greedy(checkpoint, turn1 + new, 6)
        assert got.usage.history_tokens == len(turn1)
        assert [t.turn for t in (await c.sessions.show("branch")).turns] == [1, 2]
        with pytest.raises(BadRequest, match="exists"):
            await c.sessions.fork("base", "branch")
        with pytest.raises(BadRequest, match="has 2 turns, not 5"):
            await c.sessions.fork("base", "other", turns=5)
        with pytest.raises(NotFound):
            await c.sessions.fork("ghost", "other")
        assert [s.session for s in await c.sessions.list()] == ["base", "branch", "text"]
        kept = await c.sessions.close("base", keep_history=True)
        assert kept.turns == 2 and kept.kv_where == ""
        assert (await c.sessions.get("base")).history_tokens == len(history)
        await c.sessions.close("base")
        assert [s.session for s in await c.sessions.list()] == ["branch", "text"]
        # replace starts a session over
        again = await c.sessions.open("branch", replace=True)
        assert (again.turns, again.history_tokens) == (0, 0)
