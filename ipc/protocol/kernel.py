"""Messages to and from the kernel itself (dst ``"kernel"``).

READY / HEARTBEAT / DISCONNECT are header kinds; READY carries `Ready` as its
body. Everything else here is an ordinary request, reply or event.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from msgspec import Meta

from ipc.envelope import MAX_NAME, Name
from ipc.protocol.base import Message, Request

KERNEL = "kernel"
SERVICES_TOPIC = "kernel.services"


class Ready(Request["Registered"]):
    """A service instance registering. `secret` is the per-boot secret the
    supervisor gave it at spawn; a client without it cannot register."""

    service: str
    instance: str
    pid: int
    secret: str
    ops: list[str] = []
    idempotent_ops: list[str] = []
    # Service-specific facts other services need at registration (e.g. a
    # driver's num_blocks / block_size), as plain scalars.
    meta: dict[str, str | int | float | bool] = {}


class Registered(Message):
    """The kernel's answer to READY."""

    instance: str


class ServiceUp(Message):
    service: str
    instance: str
    pid: int
    meta: dict[str, str | int | float | bool] = {}


class ServiceDown(Message):
    service: str
    instance: str
    reason: str


class Subscribe(Message):
    """Stream the events published on `topic` until the subscriber goes away."""

    topic: Name


class Subscribed(Message):
    topic: str


class Status(Request["StatusReply"]):
    pass


class ChildState(StrEnum):
    """A supervised instance's state, as `llmos ps` shows it. "dead" took
    the system down with it (escalated); "failed" was given up alone."""

    STOPPED = "stopped"  # also where every child starts
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # waiting to be restarted
    DEAD = "dead"
    FAILED = "failed"


class InstanceInfo(Message):
    service: str
    instance: str
    pid: int
    state: ChildState
    restarts: int = 0
    uptime_s: float = 0.0
    last_exit: str = ""
    outstanding: int = 0
    meta: dict[str, str | int | float | bool] = {}


class KernelCounters(Message):
    routed: int = 0
    replies: int = 0
    rejected: int = 0
    dropped: int = 0
    resent: int = 0
    queued: int = 0
    cancelled: int = 0  # requests whose client went away


class StatusReply(Message):
    pid: int
    uptime_s: float
    instances: list[InstanceInfo]
    counters: KernelCounters


class Kill(Request["Killed"]):
    """Kill a service's instances with a signal (operator action; the
    supervisor restarts them according to their restart type)."""

    target: Name  # service name or instance
    signal: Annotated[str, Meta(max_length=16)] = "SIGKILL"  # one of ops.KILL_SIGNALS


class Killed(Message):
    instances: list[str]


class Shutdown(Request["ShuttingDown"]):
    reason: Annotated[str, Meta(max_length=4 * MAX_NAME)] = "requested"


class ShuttingDown(Message):
    pass


# The kernel's audit topic: every refused client request (`AccessDenied`) and
# every kernel op that acted or read privileged state (`KernelOpDone`). The
# security server subscribes and writes each event to the audit log.
DENIALS_TOPIC = "kernel.denials"


class SetRevocations(Request["RevocationsSet"]):
    """The security server pushing its whole revocation list (it also persists
    it; the kernel reloads that file at boot). Accepted only from a registered
    `security` instance on the back socket."""

    tokens: list[str] = []  # token ids (hex)
    keys: list[str] = []  # API key ids
    principals: list[str] = []


class RevocationsSet(Message):
    count: int


class AccessDenied(Message):
    """Published on `kernel.denials` for the client requests the kernel
    refuses (`unauthorized`, `forbidden`, a disguised kernel op), for the audit
    log. Refusals alike in (source, code, reason, dst, op, principal) between two
    publications are one event with a `count`. Held in a bounded backlog while
    nobody subscribes; `dropped` counts what the backlog lost before this event."""

    code: str
    reason: str
    dst: str
    op: str
    principal: str = ""  # from the token when it verified (forbidden), else ""
    token_id: str = ""
    at: float = 0.0  # unix seconds (the first of `count`)
    dropped: int = 0
    count: int = 1
    source: str = ""  # the requester: "front:<routing id hex>" or "back:<instance>"


class KernelOpDone(Message):
    """Published on `kernel.denials` for every kernel op that acted (Kill,
    Shutdown, SetRevocations) or subscribed to a topic, with who asked and
    from where. `origin` is "front:<routing id hex>" for a client,
    "back:<instance>" for a registered service. Strings are the kernel's own (bounded) copies."""

    op: str
    principal: str
    origin: str
    target: str = ""  # Kill's target, Subscribe's topic, Shutdown's reason
    outcome: str = "ok"
    at: float = 0.0
