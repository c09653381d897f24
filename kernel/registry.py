"""Who is registered: service name → live instances, by identity and by name."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ipc.protocol import kernel as kp


@dataclass(slots=True, eq=False)
class Instance:
    service: str
    name: str
    identity: bytes
    pid: int
    ops: frozenset[str]
    idempotent_ops: frozenset[str]
    meta: dict[str, str | int | float | bool]
    last_seen: float = field(default_factory=time.monotonic)
    last_ping: float = 0.0
    registered_at: float = field(default_factory=time.monotonic)
    # routing ids of requests this instance holds and has not answered
    outstanding: set[int] = field(default_factory=set)
    # The CURVE key its READY came with (tcp://); every later frame must too.
    peer_key: str = ""


class Registry:
    def __init__(self) -> None:
        self.by_identity: dict[bytes, Instance] = {}
        self.by_name: dict[str, Instance] = {}
        self.services: dict[str, list[Instance]] = {}
        # Names that may register later: requests for them wait instead of failing.
        self.known: set[str] = set()
        # Instance names ever supervised or registered. A request addressed to
        # one that is down fails at once: a restarted instance is a new
        # incarnation (a driver's KV is gone), so it must not get old work.
        self.instance_names: set[str] = set()

    def add(self, inst: Instance) -> None:
        self.by_identity[inst.identity] = inst
        self.by_name[inst.name] = inst
        self.services.setdefault(inst.service, []).append(inst)
        self.known.add(inst.service)
        self.instance_names.add(inst.name)

    def remove(self, inst: Instance) -> None:
        if self.by_identity.get(inst.identity) is inst:
            del self.by_identity[inst.identity]
        if self.by_name.get(inst.name) is inst:
            del self.by_name[inst.name]
        live = self.services.get(inst.service)
        if live and inst in live:
            live.remove(inst)

    def pick(self, dst: str) -> Instance | None:
        """The live instance for `dst`: the named instance itself, or the
        service's instance with the fewest outstanding requests."""
        inst = self.by_name.get(dst)
        if inst is not None:
            return inst
        live = self.services.get(dst)
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        return min(live, key=lambda i: len(i.outstanding))

    def describe(self, supervised: list[kp.InstanceInfo], now: float) -> list[kp.InstanceInfo]:
        """The supervisor's view of its children (`supervised`), with the
        instances registered outside it added and each live one's load."""
        infos = list(supervised)
        names = {i.instance for i in infos}
        for inst in self.by_identity.values():
            if inst.name not in names:
                infos.append(kp.InstanceInfo(inst.service, inst.name, inst.pid, kp.ChildState.READY,
                                             uptime_s=now - inst.registered_at))
        for info in infos:
            live = self.by_name.get(info.instance)
            if live is not None:
                info.outstanding = len(live.outstanding)
                info.meta = live.meta
        return infos

    def names_an_instance(self, dst: str) -> bool:
        """True when `dst` addresses one instance rather than a service."""
        return dst in self.instance_names and dst not in self.known

    def service_of(self, dst: str) -> str | None:
        """The service a destination belongs to, if it could ever be served."""
        inst = self.by_name.get(dst)
        if inst is not None:
            return inst.service
        if dst in self.known:
            return dst
        # An instance that is supervised or was registered (restarting now).
        # Any other instance-like name ("security-7") is not found: parked
        # under made-up names, requests without a token grew the kernel by
        # gigabytes (issue 12 #5).
        if dst in self.instance_names:
            return self.service_of_instance(dst)
        return None

    def service_of_instance(self, dst: str) -> str:
        """The service a destination names (itself when it is a service name):
        rights name services, while a client may address one instance."""
        inst = self.by_name.get(dst)
        if inst is not None:
            return inst.service
        base, _, idx = dst.rpartition("-")
        return base if idx.isdigit() and base in self.known else dst
