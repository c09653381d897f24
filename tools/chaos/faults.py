"""Fault injection on a seeded schedule: SIGKILL, and SIGSTOP/SIGCONT (a
paused process, or one hung long enough that the kernel declares it dead);
on the Ray launcher, the loss of a driver's node (tools/chaos/nodes.py).

The schedule is a pure function of (seed, duration, targets). Firing it
respects the system's own rules so the run measures recovery rather than
escalation: a fault waits until its target is READY again, and one instance
is never hit more often than its restart intensity allows.
"""

from __future__ import annotations

import math
import os
import random
import signal
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from ipc.errors import BadRequest, LlmosError
from ipc.heartbeat import HEARTBEAT_EXPIRY_S
from ipc.protocol import kernel as kp
from sdk.client import AsyncClient
from tools.chaos.history import Fault, FaultKind, History, ServiceEvent

if TYPE_CHECKING:
    from tools.chaos.nodes import SimNodes

# Per instance: at most one fault per MIN_GAP_S, so at most 4 restarts in the
# supervisor's default 10 s period (escalation needs more than 5).
MIN_GAP_S = 3.0
PAUSE_S = (0.3, 1.5)  # well inside the heartbeat expiry
HANG_S = HEARTBEAT_EXPIRY_S * 2  # well past it: the kernel kills the process first
KIND_WEIGHTS = {FaultKind.KILL: 0.6, FaultKind.PAUSE: 0.25, FaultKind.HANG: 0.15}
READY_WAIT_S = 60.0  # a target not READY by then: the fault is skipped (and says so)
MIN_UP_S = 1.0  # a target is hit again only after serving this long since its restart
# Around a node fault its target takes no other fault: a node is replaced in
# seconds (Ray notices, a node joins, the driver boots on it).
NODE_GAP_S = 10.0


def plan_faults(seed: int, duration_s: float, targets: dict[str, str], per_minute: float = 30.0,
                warmup_s: float = 3.0, tail_s: float = 3.0) -> list[Fault]:
    """`targets` maps instance → service. The first faults visit every
    target once (in a seeded order), so a short run covers every service type."""
    rng = random.Random(seed)
    order = sorted(targets)
    rng.shuffle(order)
    kinds = list(KIND_WEIGHTS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    last: dict[str, float] = {}
    faults: list[Fault] = []
    interval = 60.0 / per_minute
    # Evenly spaced with jitter (rather than Poisson) so a run's fault count is predictable.
    for k in range(int((duration_s - warmup_s - tail_s) / interval) + 1):
        t = warmup_s + (k + rng.uniform(0.1, 0.9)) * interval
        if t > duration_s - tail_s:
            break
        free = [i for i in order if t - last.get(i, -math.inf) >= MIN_GAP_S]
        if not free:
            continue
        unvisited = [i for i in free if i not in last]
        inst = unvisited[0] if unvisited else rng.choice(free)
        kind = rng.choices(kinds, weights)[0]
        stop_s = {FaultKind.KILL: 0.0, FaultKind.PAUSE: rng.uniform(*PAUSE_S), FaultKind.HANG: HANG_S}[kind]
        last[inst] = t + stop_s
        faults.append(Fault(round(t, 3), inst, targets[inst], kind, round(stop_s, 3)))
    return faults


def add_node_faults(plan: Sequence[Fault], seed: int, duration_s: float, targets: dict[str, str],
                    per_minute: float, warmup_s: float = 5.0, tail_s: float = 10.0) -> list[Fault]:
    """`plan` with node faults on the driver targets, evenly spaced (at least
    one when `per_minute` > 0 and the run has room), each driver in turn;
    a signal fault on a node fault's target within `NODE_GAP_S` of it is
    dropped. Sorted by planned time."""
    drivers = sorted(i for i, s in targets.items() if s == "driver")
    span = duration_s - warmup_s - tail_s
    if per_minute <= 0 or not drivers or span <= 0:
        return sorted(plan, key=lambda f: f.planned_s)
    rng = random.Random(f"node/{seed}")
    rng.shuffle(drivers)
    n = max(1, int(per_minute * span / 60))
    nodes = [Fault(round(warmup_s + (k + rng.uniform(0.3, 0.7)) * span / n, 3), drivers[k % len(drivers)], "driver",
                   FaultKind.NODE) for k in range(n)]
    kept = [f for f in plan if not any(f.instance == g.instance and g.planned_s - MIN_GAP_S <= f.planned_s
                                       <= g.planned_s + NODE_GAP_S for g in nodes)]
    return sorted([*kept, *nodes], key=lambda f: f.planned_s)


class Tracker:
    """Which instances are READY (with which pid), fed by `kernel.services`
    events; records them in the history and stamps faults with the moment a
    replacement registered."""

    def __init__(self, history: History, status: kp.StatusReply):
        self.history = history
        self.ready: dict[str, int] = {i.instance: i.pid for i in status.instances if i.state == kp.ChildState.READY}
        self.up_since: dict[str, float] = {i: history.now() - 3600 for i in self.ready}
        self.seen_pids: set[int] = {i.pid for i in status.instances if i.pid}
        self._changed = anyio.Event()

    async def follow(self, client: AsyncClient, *, task_status: TaskStatus[None]) -> None:
        try:
            await self._follow(client, task_status)
        except LlmosError as exc:
            # The kernel is gone (stopped by an abusive client?): recorded, and the run goes on to its report.
            self.history.services.append(ServiceEvent(self.history.now(), "down", "kernel", "kernel",
                                                      reason=f"{exc.code}: {exc.message}"))

    async def _follow(self, client: AsyncClient, task_status: TaskStatus[None]) -> None:
        events: AsyncIterator[object] = client.subscribe(kp.SERVICES_TOPIC)
        async for ev in events:
            if isinstance(ev, kp.Subscribed):
                task_status.started()
            elif isinstance(ev, kp.ServiceUp):
                self._up(ev)
            elif isinstance(ev, kp.ServiceDown):
                self.history.services.append(ServiceEvent(self.history.now(), "down", ev.service, ev.instance,
                                                          reason=ev.reason))
                self.ready.pop(ev.instance, None)
                self._notify()

    def _up(self, ev: kp.ServiceUp) -> None:
        now = self.history.now()
        self.history.services.append(ServiceEvent(now, "up", ev.service, ev.instance, ev.pid))
        self.ready[ev.instance] = ev.pid
        self.up_since[ev.instance] = now
        self.seen_pids.add(ev.pid)
        for f in reversed(self.history.faults):
            if f.instance == ev.instance and f.t >= 0:
                if f.ready_t < 0 and f.pid != ev.pid:
                    f.ready_t, f.new_pid = now, ev.pid
                break
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_ready(self, instance: str, timeout: float) -> int | None:
        with anyio.move_on_after(timeout):
            while instance not in self.ready:
                await self._changed.wait()
            return self.ready[instance]
        return None

    async def wait_up(self, instance: str, min_up_s: float, timeout: float) -> int | None:
        """The pid of `instance` once it has been READY for `min_up_s`, or None."""
        with anyio.move_on_after(timeout):
            while True:
                pid = await self.wait_ready(instance, math.inf)
                wait = self.up_since[instance] + min_up_s - self.history.now()
                if wait <= 0:
                    return pid
                await anyio.sleep(wait)
        return None


async def inject(plan: Sequence[Fault], tracker: Tracker, history: History, nodes: SimNodes | None = None) -> None:
    """Fire `plan` at its planned times (each recorded in the history). Each
    target has its own task, so one slow to recover delays no other; a
    fault fires only once its target has been READY for `MIN_UP_S`, and is
    skipped when that does not happen before the target's next planned fault.
    `nodes`: the simulated cluster node faults remove nodes from (none: a
    node fault in the plan is refused, BadRequest)."""
    if nodes is None and any(f.kind == FaultKind.NODE for f in plan):
        from tools.chaos.nodes import NODE_FAULT_NEEDS_RAY

        raise BadRequest(NODE_FAULT_NEEDS_RAY)
    history.faults.extend(plan)
    by_target: dict[str, list[Fault]] = {}
    for f in plan:
        by_target.setdefault(f.instance, []).append(f)
    async with anyio.create_task_group() as tg:
        for faults in by_target.values():
            tg.start_soon(_inject_target, faults, tracker, history, nodes)


async def _inject_target(faults: list[Fault], tracker: Tracker, history: History, nodes: SimNodes | None) -> None:
    for k, f in enumerate(faults):
        delay = f.planned_s - history.now()
        if delay > 0:
            await anyio.sleep(delay)  # the schedule itself, not a wait for a condition
        limit = faults[k + 1].planned_s - history.now() if k + 1 < len(faults) else READY_WAIT_S
        pid = await tracker.wait_up(f.instance, MIN_UP_S, max(limit, 0.0))
        if pid is None:
            f.note = "skipped: its target was still recovering from the previous fault"
            continue
        f.pid, f.t = pid, history.now()
        if f.kind == FaultKind.NODE:
            assert nodes is not None  # inject refused the plan otherwise
            try:
                f.node = await nodes.lose_node_of(pid)
            except BadRequest as exc:
                f.t, f.note = -1.0, f"skipped: {exc.message}"
            continue
        try:
            os.kill(pid, signal.SIGKILL if f.kind == FaultKind.KILL else signal.SIGSTOP)
        except ProcessLookupError:
            f.t, f.note = -1.0, "skipped: the process was already gone"
            continue
        if f.kind != FaultKind.KILL:
            await anyio.sleep(f.stop_s)
            f.cont_t = history.now()
            try:
                os.kill(f.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the kernel killed it as hung (a HANG, or a PAUSE the loaded machine made one)


def settle(faults: Sequence[Fault]) -> None:
    """A pause the kernel ended by killing the process was a hang in effect."""
    for f in faults:
        if f.kind == FaultKind.PAUSE and f.ready_t >= 0:
            f.kind, f.note = FaultKind.HANG, "paused past the heartbeat expiry: killed by the kernel"


def targets_of(status: kp.StatusReply, services: Sequence[str]) -> dict[str, str]:
    return {i.instance: i.service for i in status.instances if i.service in services}
