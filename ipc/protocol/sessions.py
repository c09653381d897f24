"""The scheduler's sessions (service ``"scheduler"``): a conversation's requests
run one at a time, its KV pinned between turns and switched out on demand."""

from __future__ import annotations

from enum import StrEnum

from ipc.protocol.base import Message, Request


class SessionState(StrEnum):
    IDLE = "idle"  # no request running; its KV may be pinned for the next one
    ACTIVE = "active"  # a request of it is running or waiting in line
    SUSPENDED = "suspended"  # switched out: its KV in the swap tier, its requests wait


class SuspendSession(Request["SessionInfo"]):
    """Context switch out: the session's running request (or its pinned KV)
    leaves the batch and its KV goes to the driver's swap tier; requests of
    the session wait (queued, not refused) until `ResumeSession`."""

    session: str


class ResumeSession(Request["SessionInfo"]):
    session: str


class CloseSession(Request["SessionInfo"]):
    """The conversation is over: release the KV pinned for it (its requests
    are not affected)."""

    session: str


class GetSession(Request["SessionInfo"]):
    session: str


class SessionInfo(Message):
    session: str
    state: SessionState
    queued: int = 0  # requests waiting behind the active one
    active_request: str = ""
    kv_tokens: int = 0  # positions whose KV the session holds
    kv_where: str = ""  # "device", "swap" or "" (none held)
