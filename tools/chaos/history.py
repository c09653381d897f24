"""The recorded history of a chaos run (Jepsen style): every client operation
and every injected fault, as plain structs, checked only afterwards.

Times are seconds on the monotonic clock since the run began, taken by the
process that observed the event (the chaos driver), never by the system
under test.
"""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path

import msgspec


class OpKind(StrEnum):
    INVOKE = "invoke"
    CHUNK = "chunk"  # tokens [offset, offset + n) arrived
    OK = "ok"  # the final chunk (finish_reason) arrived
    FAIL = "fail"  # the system answered an error with a code: the request did not run to an end
    UNKNOWN = "unknown"  # the client lost sight of it (an HTTP stream cut): ran or not, nobody knows
    RETRY = "retry"  # an HTTP client sent it again (code: why; offset: the tokens it held, resumed from)


class Via(StrEnum):
    SDK = "sdk"
    HTTP = "http"


class Op(msgspec.Struct, omit_defaults=True):
    t: float
    kind: OpKind
    req: str  # the request id (the idempotency key the client chose)
    client: str
    # invoke
    via: Via = Via.SDK
    tenant: str = ""
    prompt: int = -1  # index into the workload's prompts
    max_tokens: int = 0
    greedy: bool = False
    priority: int = 0
    # chunk / ok
    offset: int = 0
    token_ids: list[int] = []
    text: str = ""
    finish_reason: str = ""
    completion_tokens: int = -1  # usage, on ok
    # fail / unknown
    code: str = ""
    message: str = ""


class FaultKind(StrEnum):
    KILL = "kill"  # SIGKILL
    PAUSE = "pause"  # SIGSTOP, SIGCONT before the kernel's heartbeat expiry
    HANG = "hang"  # SIGSTOP past the expiry: the kernel declares it dead and kills it
    NODE = "node"  # the Ray node the target runs on removed (a host lost), another one added


class Fault(msgspec.Struct, omit_defaults=True):
    planned_s: float
    instance: str
    service: str
    kind: FaultKind
    stop_s: float = 0.0  # pause / hang: how long SIGSTOP lasts before SIGCONT
    t: float = -1.0  # when the signal was sent (-1: never fired)
    pid: int = 0
    cont_t: float = -1.0  # when SIGCONT was sent
    ready_t: float = -1.0  # when a new instance registered (ServiceUp), if one did
    new_pid: int = 0
    node: str = ""  # a node fault: the Ray node id removed
    note: str = ""


class ServiceEvent(msgspec.Struct, omit_defaults=True):
    t: float
    kind: str  # up | down
    service: str
    instance: str
    pid: int = 0
    reason: str = ""


class History:
    """Append-only, in memory; `write` puts it on disk as JSON lines."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ops: list[Op] = []
        self.faults: list[Fault] = []
        self.services: list[ServiceEvent] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, op: Op) -> None:
        self.ops.append(op)

    def write(self, directory: Path) -> None:
        enc = msgspec.json.Encoder()
        for name, items in (("history.jsonl", self.ops), ("faults.jsonl", self.faults),
                            ("services.jsonl", self.services)):
            with open(directory / name, "wb") as f:
                for item in items:
                    f.write(enc.encode(item) + b"\n")

    @classmethod
    def read(cls, directory: Path) -> "History":
        h = cls()
        h.ops = [msgspec.json.decode(line, type=Op) for line in (directory / "history.jsonl").read_bytes().splitlines()]
        h.faults = [msgspec.json.decode(line, type=Fault)
                    for line in (directory / "faults.jsonl").read_bytes().splitlines()]
        h.services = [msgspec.json.decode(line, type=ServiceEvent)
                      for line in (directory / "services.jsonl").read_bytes().splitlines()]
        return h
