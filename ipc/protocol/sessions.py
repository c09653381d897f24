"""The scheduler's sessions (service ``"scheduler"``): conversations the OS keeps.

Wire contract (issue 18; the gateway's Responses API is built on it).

**A turn.** A `Submit` with ``session=NAME`` is one turn of the principal's
conversation NAME (sessions are scoped to the principal: another tenant's
NAME is another session; a name is any string of at most 128 characters,
never used as a path). Its ``prompt`` / ``prompt_ids`` is the NEW text only.
The scheduler keeps the session's token history and runs the turn on

    system_ids + history (turn 1 prompt + turn 1 output + ... ) + this prompt

so a client never re-sends history. The KV of that prefix is the session's
pinned KV, forked into the new turn (copy-on-write), or else prefix-cache
hits (full blocks only): ``Usage.cached_tokens`` shows how much of it was
not recomputed — with the pin, the whole history (the last turn's final
token was sampled, never fed: the pin computes its KV in one more step
after the answer, and the next turn starts once it is done). A turn's text
is tokenized with special tokens (BOS) only when it opens the conversation
(no system prompt, empty history, no turn in flight); later turns are
tokenized without them.
Turns of one session run one at a time in arrival order: a concurrent
Submit queues behind the running turn and sees its output in its history.

**What is appended.** When a turn ends with reason ``stop`` or ``length``,
its prompt ids and its generated ids (a generated EOS / stop id included)
are appended to the history as one turn, persisted, and only then is
`Finished` sent: ``Finished.turn`` is its 1-based number (0: not
appended — cancelled, deadline, error, or no session). History is
token-level: re-sending the whole history as ``prompt_ids`` of a plain
Submit gives the same answer (greedy).

**Chat format.** The scheduler keeps token ids; it applies no chat
template. A caller speaking messages (the gateway) renders each turn's
increment itself (user message + the assistant prefix) and sends it as the
turn's text; the system prompt is `OpenSession.system` (kept through eviction).

**Usage** (ipc.protocol.scheduler.Usage, fields at the end):
``prompt_tokens`` counts the whole prompt (system + kept history + new
text); ``history_tokens`` how many of those came from the session (system
included); ``evicted_turns`` / ``evicted_tokens`` what this turn evicted.

**Virtual context (eviction).** The turn's limit L is the least of the
model's context, the largest driver's KV pool, and the session's
``max_context`` (0: none). If system + history + new + max_tokens > L, the
OLDEST whole turns are evicted (the system prompt and the newest turns are
kept) until it fits or no history is left; then, if system + new still
leaves no room for one generated token the Submit is refused (BadRequest,
field "prompt": never truncation inside a turn); otherwise generation is
capped by L (finish ``length``). Evicted turns are gone from the history
(counted in SessionInfo). The kept prefix moved, so it is recomputed
(``cached_tokens`` shows it); the answer equals a fresh request with the
same remaining history. A summary of what was dropped is the caller's to
fold in: `OpenSession(replace=True, system=summary + ...)` or a new turn.

**Durability.** History (system, settings, turns) is stored under
``$LLMOS_HOME/sessions`` in a file named by a hash of (principal, name); it
survives a scheduler restart. The KV does not: the first turn after a
restart recomputes what the prefix cache lost (``cached_tokens`` shows it).

**Messages** (all answer `SessionInfo` unless said otherwise; a session
that neither holds history nor has a turn in flight is `not_found`):
- `OpenSession`: create, with an optional system prompt (text, tokenized
  with special tokens, or ids) and ``max_context``; a Submit to an unknown
  session opens it with none. An existing session is a BadRequest unless
  ``replace`` (its history is then dropped; its turns in flight are not
  touched).
- `GetSession`: counts. `ShowSession` -> `SessionHistory`: the turns
  (token counts and decoded text).
- `ForkSession`: copy the history (all turns, or the first ``turns``) and
  settings of ``session`` into the new session ``into`` (which must not
  exist); its first turn finds the shared prefix in the prefix cache.
- `CloseSession`: the conversation is over: its pinned KV is released and
  its history deleted (``keep_history``: release the KV only).
- `SuspendSession` / `ResumeSession`: context switch (KV to swap tier).
- `ListSessions` -> `SessionList`: the caller's sessions.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from ipc.protocol.base import Message, Request

MAX_SESSION_NAME = 128
MAX_SYSTEM_IDS = 1 << 20
# Sessions one principal may keep stored (an OpenSession / first turn past it is refused).
MAX_SESSIONS_PER_PRINCIPAL = 4096

SessionName = Annotated[str, msgspec.Meta(max_length=MAX_SESSION_NAME)]


class SessionState(StrEnum):
    IDLE = "idle"  # no request running; its KV may be pinned for the next one
    ACTIVE = "active"  # a request of it is running or waiting in line
    SUSPENDED = "suspended"  # switched out: its KV in the swap tier, its requests wait


class OpenSession(Request["SessionInfo"]):
    session: SessionName
    system: str = ""  # system prompt text, tokenized with special tokens
    system_ids: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]],
                          msgspec.Meta(max_length=MAX_SYSTEM_IDS)] = []
    max_context: Annotated[int, msgspec.Meta(ge=0, le=1 << 24)] = 0  # 0: the model's context
    replace: bool = False


class SuspendSession(Request["SessionInfo"]):
    """Context switch out: the session's running request (or its pinned KV)
    leaves the batch and its KV goes to the driver's swap tier; requests of
    the session wait (queued, not refused) until `ResumeSession`."""

    session: SessionName


class ResumeSession(Request["SessionInfo"]):
    session: SessionName


class CloseSession(Request["SessionInfo"]):
    """The conversation is over: release the KV pinned for it and delete its
    history (`keep_history`: the KV only). Its requests in flight are not affected."""

    session: SessionName
    keep_history: bool = False


class GetSession(Request["SessionInfo"]):
    session: SessionName


class ShowSession(Request["SessionHistory"]):
    session: SessionName


class ForkSession(Request["SessionInfo"]):
    session: SessionName
    into: SessionName
    turns: Annotated[int, msgspec.Meta(ge=-1)] = -1  # the first `turns` turns; -1: all


class ListSessions(Request["SessionList"]):
    pass


class SessionInfo(Message):
    session: str
    state: SessionState
    queued: int = 0  # requests waiting behind the active one
    active_request: str = ""
    kv_tokens: int = 0  # positions whose KV the session holds
    kv_where: str = ""  # "device", "swap" or "" (none held)
    # The conversation (issue 18).
    turns: int = 0  # turns in the history (evicted ones not counted)
    history_tokens: int = 0  # system + turns
    system_tokens: int = 0
    evicted_turns: int = 0  # over the session's life
    evicted_tokens: int = 0
    max_context: int = 0


class TurnInfo(msgspec.Struct, omit_defaults=True, gc=False):
    turn: int  # 1-based, as Finished.turn
    request_id: str
    prompt_tokens: int  # this turn's new text
    output_tokens: int
    prompt_text: str = ""
    output_text: str = ""


class SessionHistory(Message):
    info: SessionInfo
    system_text: str = ""
    turns: list[TurnInfo] = []


class SessionList(Message):
    sessions: list[SessionInfo] = []
