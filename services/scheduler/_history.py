"""A session's conversation (issue 18): its system prompt and turns, as
token ids, kept in memory and in ``$LLMOS_HOME/sessions``.

Files. ``sessions/<h(principal)>/<h(principal, name)>.json``, h = SHA-256
hex: no client-chosen string is ever part of a path (a name like
``../../x`` is just bytes to hash), and one principal's directory holds only
its own sessions. A file is replaced atomically (tmp + rename); the record
repeats its principal and name, and one that does not match what it was
opened for (a collision, a hand-copied file) is not used.

Eviction (`build_turn`): the oldest whole turns go until system + kept
turns + the new text + max_tokens fit the limit (the system prompt and the
newest turns stay). See ipc/protocol/sessions.py for the contract.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import msgspec

from common.logs import get_logger
from ipc.errors import BadRequest, Overloaded
from ipc.protocol import sessions as sessp
from ipc.protocol.sessions import MAX_SESSIONS_PER_PRINCIPAL
from services.scheduler._request import Request

log = get_logger()

Key = tuple[str, str]  # (principal, session name)
# Histories kept in memory beyond the live sessions' (least recently used go; they stay on disk).
MAX_CACHED = 1024


class TurnRec(msgspec.Struct, array_like=True, gc=False):
    turn: int  # 1-based over the session's life (evicted turns keep their numbers)
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]

    @property
    def size(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class HistoryRec(msgspec.Struct, kw_only=True, omit_defaults=True):
    principal: str
    name: str
    system_ids: list[int] = []
    max_context: int = 0
    turns: list[TurnRec] = []
    next_turn: int = 1
    evicted_turns: int = 0
    evicted_tokens: int = 0

    @property
    def key(self) -> Key:
        return (self.principal, self.name)

    def history_tokens(self) -> int:
        return len(self.system_ids) + sum(t.size for t in self.turns)

    def ids(self) -> list[int]:
        out = list(self.system_ids)
        for t in self.turns:
            out += t.prompt_ids
            out += t.output_ids
        return out


def _h(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


class HistoryStore:
    """The files. Blocking: called from a worker thread."""

    def __init__(self, root: Path):
        self.root = root
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder(HistoryRec)

    def path(self, key: Key) -> Path:
        return self.root / _h(key[0])[:32] / f"{_h(*key)}.json"

    def load(self, key: Key) -> HistoryRec | None:
        path = self.path(key)
        try:
            rec = self._dec.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("sessions.unreadable", path=str(path), error=str(exc))
            return None
        if rec.key != key:
            log.warning("sessions.foreign_record", path=str(path))
            return None
        return rec

    def save(self, key: Key, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self, key: Key) -> None:
        self.path(key).unlink(missing_ok=True)

    def names(self, principal: str) -> list[str]:
        """`principal`'s stored session names."""
        d = self.root / _h(principal)[:32]
        if not d.is_dir():
            return []
        out = []
        for f in sorted(d.glob("*.json")):
            try:
                rec = self._dec.decode(f.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue
            if rec.principal == principal:
                out.append(rec.name)
        return out

    def count(self, principal: str) -> int:
        d = self.root / _h(principal)[:32]
        return sum(1 for _ in d.glob("*.json")) if d.is_dir() else 0


class Histories:
    """The histories in memory (loaded on a session's first use), written
    back by `persist` (the service awaits it before a turn's answer)."""

    def __init__(self, store: HistoryStore | None = None):
        self.store = store
        self.by_key: dict[Key, HistoryRec] = {}
        self.version: dict[Key, int] = {}  # bumped on each change
        self.saved: dict[Key, int] = {}  # the version on disk
        self._lock = anyio.Lock()
        self._wake: anyio.Event | None = None  # set on a change, for `flush_forever`

    async def ensure(self, key: Key) -> HistoryRec | None:
        """Load the stored history of `key` (off the loop), if not in memory."""
        if key not in self.by_key and self.store is not None:
            rec = await anyio.to_thread.run_sync(self.store.load, key)
            if rec is not None and key not in self.by_key:
                self.by_key[key] = rec
                self.saved[key] = self.version[key] = 0
        return self.by_key.get(key)

    def get(self, key: Key) -> HistoryRec | None:
        return self.by_key.get(key)

    def get_or_new(self, key: Key) -> HistoryRec:
        rec = self.by_key.get(key)
        if rec is None and self.store is not None:
            # Not loaded by the service (a job's turn): a small blocking read.
            rec = self.store.load(key)
            if rec is not None:
                self.by_key[key] = rec
                self.saved[key] = self.version[key] = 0
        if rec is None:
            rec = self.by_key[key] = HistoryRec(principal=key[0], name=key[1])
            self.changed(key)
        return rec

    def changed(self, key: Key) -> None:
        self.version[key] = self.version.get(key, 0) + 1
        if self._wake is not None:
            self._wake.set()

    async def flush_forever(self) -> None:
        """Write what changed outside a client's turn (a job's turn, an
        eviction by a turn that then failed) soon after it changed."""
        while True:
            self._wake = anyio.Event()
            await self.persist_all()
            await self._wake.wait()

    def append(self, key: Key, request_id: str, prompt_ids: list[int], output_ids: list[int]) -> int:
        rec = self.get_or_new(key)
        n = rec.next_turn
        rec.turns.append(TurnRec(n, request_id, list(prompt_ids), list(output_ids)))
        rec.next_turn += 1
        self.changed(key)
        return n

    def drop(self, key: Key) -> HistoryRec | None:
        rec = self.by_key.pop(key, None)
        self.version.pop(key, None)
        self.saved.pop(key, None)
        return rec

    async def check_room(self, principal: str) -> None:
        """Refuse a new session past the principal's bound."""
        if self.store is not None:
            n = await anyio.to_thread.run_sync(self.store.count, principal)
            if n >= MAX_SESSIONS_PER_PRINCIPAL:
                raise Overloaded(f"{principal or 'this principal'!r} keeps {n} sessions, the most allowed "
                                 f"({MAX_SESSIONS_PER_PRINCIPAL}); close some", detail={"field": "session"})

    async def persist(self, key: Key) -> None:
        """Write `key`'s history if it changed since it was last written."""
        if self.store is None:
            return
        async with self._lock:
            rec = self.by_key.get(key)
            v = self.version.get(key, 0)
            if rec is None or self.saved.get(key) == v:
                return
            snap = HistoryRec(principal=rec.principal, name=rec.name, system_ids=rec.system_ids,
                              max_context=rec.max_context, turns=list(rec.turns), next_turn=rec.next_turn,
                              evicted_turns=rec.evicted_turns, evicted_tokens=rec.evicted_tokens)
            store = self.store
            await anyio.to_thread.run_sync(lambda: store.save(key, msgspec.json.encode(snap)))
            self.saved[key] = v

    async def delete(self, key: Key) -> bool:
        """Forget `key`'s history in memory and on disk; False: there was none."""
        had = self.drop(key) is not None
        if self.store is not None:
            async with self._lock:
                path = self.store.path(key)
                existed = await anyio.to_thread.run_sync(path.exists)
                await anyio.to_thread.run_sync(self.store.delete, key)
                had = had or existed
        return had

    async def persist_all(self) -> None:
        for key in [k for k, v in self.version.items() if self.saved.get(k) != v]:
            await self.persist(key)

    def trim(self, live: set[Key]) -> None:
        """Forget in-memory histories beyond MAX_CACHED that are saved and not live."""
        extra = len(self.by_key) - MAX_CACHED
        for key in list(self.by_key):
            if extra <= 0:
                break
            if key not in live and self.saved.get(key) == self.version.get(key):
                self.drop(key)
                extra -= 1


def build_turn(rec: HistoryRec, new_ids: list[int], max_tokens: int, limit: int) -> tuple[list[int], int, int]:
    """The turn's whole prompt (system + kept turns + new text), evicting the
    oldest turns of `rec` until it leaves room for `max_tokens` within
    `limit` (or no history is left). Returns (prompt, evicted turns, evicted tokens)."""
    hist = sum(t.size for t in rec.turns)
    turns = evicted = 0
    while rec.turns and len(rec.system_ids) + hist + len(new_ids) + max_tokens > limit:
        t = rec.turns.pop(0)
        hist -= t.size
        turns += 1
        evicted += t.size
    rec.evicted_turns += turns
    rec.evicted_tokens += evicted
    return rec.ids() + list(new_ids), turns, evicted


def bind_turn(histories: Histories, req: Request, room: int) -> None:
    """The turn starts: its prompt becomes system + kept history + its new
    text (the oldest turns evicted past the session's context)."""
    assert req.session is not None
    rec = histories.get_or_new(req.session)
    limit = min(room, rec.max_context) if rec.max_context else room
    before = rec.history_tokens()
    full, turns, tokens = build_turn(rec, req.prompt_ids, req.submit.max_tokens, limit)
    if turns:
        histories.changed(req.session)
        log.info("scheduler.session_evicted", session=req.session[1], turns=turns, tokens=tokens,
                 kept=before - tokens)
    seq = req.seq
    req.history_len = len(full) - len(req.prompt_ids)
    req.evicted = (turns, tokens)
    seq.tokens = full + req.generated
    seq.num_prompt = len(full)
    seq.max_len = req.max_total = min(len(full) + req.submit.max_tokens, limit)


def with_history(info: sessp.SessionInfo, rec: HistoryRec | None) -> sessp.SessionInfo:
    """`info` with the counts of the session's history."""
    if rec is None:
        return info
    return msgspec.structs.replace(info, turns=len(rec.turns), history_tokens=rec.history_tokens(),
                                   system_tokens=len(rec.system_ids), evicted_turns=rec.evicted_turns,
                                   evicted_tokens=rec.evicted_tokens, max_context=rec.max_context)


def check_turn_fits(rec: HistoryRec | None, new_ids: list[int], room: int) -> None:
    """The new text and the system prompt alone must leave room for one generated token."""
    system = len(rec.system_ids) if rec is not None else 0
    limit = min(room, rec.max_context) if rec is not None and rec.max_context else room
    if system + len(new_ids) + 1 > limit:
        raise BadRequest(f"this turn has {len(new_ids)} tokens and the session's system prompt {system}; "
                         f"its context holds {limit} (one must be left to generate): evicting older turns "
                         "cannot make room, and a turn is never truncated", detail={"field": "prompt"})


__all__ = ["HistoryRec", "HistoryStore", "Histories", "TurnRec", "bind_turn", "build_turn", "check_turn_fits",
           "with_history"]
