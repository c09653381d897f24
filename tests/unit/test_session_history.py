"""A session's history (issue 18): the store under LLMOS_HOME (hashed paths,
whatever the name; foreign or torn files not used), eviction of the oldest
turns, and turns over the real engine loop with fake paged drivers (only
the new text is sent; cancelled turns are not appended; a re-submitted turn
re-attaches; a turn too big for the session is refused)."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from ipc.errors import BadRequest
from ipc.protocol.scheduler import FinishReason
from services.scheduler._history import HistoryRec, Histories, HistoryStore, TurnRec, build_turn
from tests.helpers.scheduler_fakes import TOK, FakeDriver, Stream, reference, running

HOSTILE = ["../../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "", "x\x00y", "名前" * 40]  # (a lone surrogate cannot arrive: msgpack strings are UTF-8)


def rec_with(turns: list[tuple[int, int]], system: int = 0) -> HistoryRec:
    return HistoryRec(principal="p", name="n", system_ids=list(range(system)),
                      turns=[TurnRec(i + 1, f"r{i}", [1] * a, [2] * b) for i, (a, b) in enumerate(turns)])


def test_hostile_names_are_hashed_inside_the_principals_directory(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "sessions")
    for principal in ("alice", "../bob"):
        for name in HOSTILE:
            key = (principal, name)
            path = store.path(key)
            assert path.resolve().parent.parent == (tmp_path / "sessions").resolve()
            store.save(key, msgspec.json.encode(HistoryRec(principal=principal, name=name, system_ids=[len(name)])))
            loaded = store.load(key)
            assert loaded is not None and loaded.name == name and loaded.system_ids == [len(name)]
    assert sorted(store.names("alice")) == sorted(HOSTILE)
    assert store.count("../bob") == len(HOSTILE) and store.names("carol") == []
    assert {p.parent.parent for p in (tmp_path / "sessions").rglob("*.json")} == {tmp_path / "sessions"}
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "sessions").rglob("*"))


def test_a_foreign_or_torn_record_is_not_used(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    # alice's file copied over bob's path: the record names alice, so bob does not get it
    store.save(("bob", "chat"), msgspec.json.encode(HistoryRec(principal="alice", name="chat", system_ids=[1])))
    assert store.load(("bob", "chat")) is None
    store.path(("bob", "torn")).write_bytes(b'{"principal": "bob", "na')
    assert store.load(("bob", "torn")) is None and store.load(("bob", "never")) is None


def test_eviction_drops_the_oldest_whole_turns_and_keeps_the_system_prompt() -> None:
    r = rec_with([(10, 10), (5, 5), (3, 3)], system=4)
    prompt, turns, tokens = build_turn(r, [9] * 6, max_tokens=10, limit=50)
    # 4 + 20 + 10 + 6 + 6 + 10 = 56 > 50: the first turn goes; 36 fits.
    assert (turns, tokens) == (1, 20) and [t.turn for t in r.turns] == [2, 3]
    assert prompt == list(range(4)) + [1] * 5 + [2] * 5 + [1] * 3 + [2] * 3 + [9] * 6
    assert (r.evicted_turns, r.evicted_tokens) == (1, 20)
    prompt, turns, _ = build_turn(r, [9] * 32, max_tokens=10, limit=50)  # 4 + 6 + 32 + 10 > 50
    assert turns == 2 and prompt == list(range(4)) + [9] * 32 and r.turns == []


async def test_histories_persist_and_delete(tmp_path: Path) -> None:
    h = Histories(HistoryStore(tmp_path))
    key = ("p", "../x")
    assert await h.ensure(key) is None
    assert h.append(key, "r1", [1, 2], [3]) == 1 and h.append(key, "r2", [4], [5]) == 2
    await h.persist(key)
    again = Histories(HistoryStore(tmp_path))
    rec = await again.ensure(key)
    assert rec is not None and rec.ids() == [1, 2, 3, 4, 5] and rec.next_turn == 3
    assert await again.delete(key) and await again.ensure(key) is None
    assert not await again.delete(key)


async def test_turns_send_only_the_new_text_over_the_engine() -> None:
    async with running(None, {"cpu": FakeDriver(64)}) as (engine, _):
        history: list[int] = []
        for k, text in enumerate(["first turn", " second", " third one"], 1):
            new = TOK.encode(text, add_special_tokens=k == 1)
            s = Stream(engine, prompt_ids=new, max_tokens=6, session="chat", request_id=f"t{k}")
            f = await s.result()
            assert s.tokens(f) == reference(history + new, 6)
            assert f.turn == k and f.usage.history_tokens == len(history)
            history += new + s.tokens(f)
        # A re-submission of a finished turn re-attaches to it: no new turn.
        again = Stream(engine, prompt_ids=TOK.encode(" third one", add_special_tokens=False), max_tokens=6,
                       session="chat", request_id="t3")
        assert again.sink.attached and (await again.result()).turn == 3
        # A cancelled turn is not appended.
        cut = Stream(engine, prompt_ids=[65] * 4, max_tokens=200, session="chat", request_id="cut",
                     ignore_eos=True)
        assert engine.cancel("", "cut")
        done = await cut.result()
        assert done.finish_reason == FinishReason.CANCELLED and done.turn == 0
        assert engine.sessions.describe("", "chat").history_tokens == len(history)
        # A turn that cannot fit the context even alone is refused, naming the field.
        rec = engine.sessions.histories.get(("", "chat"))
        assert rec is not None
        rec.max_context = 100
        with pytest.raises(BadRequest) as exc:
            Stream(engine, prompt_ids=[65] * 100, max_tokens=4, session="chat")
        assert exc.value.detail == {"field": "prompt"}
        assert engine.sessions.describe("", "chat").turns == 3
        # Another principal's "chat" is another conversation.
        assert engine.sessions.histories.get(("bob", "chat")) is None


async def test_changes_outside_a_clients_turn_reach_the_disk(tmp_path: Path) -> None:
    h = Histories(HistoryStore(tmp_path))
    async with anyio.create_task_group() as tg:
        tg.start_soon(h.flush_forever)
        await anyio.sleep(0)  # waiting for a change
        h.append(("p", "job-chat"), "run-1", [1], [2, 3])  # a job's turn: no client awaits its write
        with anyio.fail_after(10):
            while (rec := HistoryStore(tmp_path).load(("p", "job-chat"))) is None:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert rec.ids() == [1, 2, 3]
