"""The engine's state and its one owner: which sequences wait, run or are
parked, which drivers are up, which KV is to be released, and the handle
on the memory server and the drivers (`Backend`).

The engine, the recovery code (_recovery.py), sessions (_sessions.py) and
the swap tier (_swap.py) change this state only through `EngineState`'s
verbs, so the invariants live in one place: a sequence is in at most one
line, a request's `state` says which, and a sequence's KV is released
before its id is reserved again from token 0.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio

from common.logs import get_logger
from ipc.errors import LlmosError, Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from services.scheduler._request import Seq, State
from services.scheduler.planner import PoolShape
from services.scheduler.policies import Policy

if TYPE_CHECKING:
    from services.scheduler._overlap import Renewal

log = get_logger()

T = TypeVar("T")


class Backend(Protocol):
    """The engine's calls to the world: the memory server's and the
    drivers' (the service's is IPC; tests use an in-process one)."""

    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply: ...
    async def release(self, req: mp.Release) -> mp.ReleaseReply: ...
    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply: ...
    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed: ...
    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply: ...
    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply: ...
    async def fork(self, req: mp.Fork) -> mp.ForkReply: ...
    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped: ...


@dataclass
class DriverState:
    shape: PoolShape
    # Bumped each time a driver of this name comes up: a block table is only
    # good on the incarnation it was planned for.
    incarnation: int
    # Async steps are sent to it (_overlap.py `chain_step`): not to a driver
    # on the host's CPU cores under `async_steps = "auto"`.
    chains: bool = True
    # The steps in flight on it (two with async scheduling).
    scopes: set[anyio.CancelScope] = field(default_factory=set)


class EngineState:
    def __init__(self, backend: Backend, policy: Policy):
        self.backend = backend
        self.policy = policy
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self.drivers: dict[str, DriverState] = {}
        self.memory_down = False
        # Bumped when the memory server is lost or restarts: a step chained
        # before that (async scheduling) used slots the new one never gave.
        self.memory_generation = 0
        # The generation the memory server's view was last re-registered for
        # (_recovery.py): while it lags, the server (a restarted one) does not
        # know which blocks the drivers hold, and no slot is reserved from it.
        self.memory_synced = 0
        self.renewal: Renewal | None = None  # async steps: slots renewed across steps (_overlap.py)
        self.swapped_out = self.swapped_in = 0  # sequences moved to / from the swap tier
        # Round trips the loop awaited (concurrent ones count once) and the
        # encoded bytes of every Execute sent (SchedulerStatsReply).
        self.critical_rpcs = 0
        self.execute_bytes = 0
        self.steps_ahead = 0  # sent before the step before them came back (async scheduling)
        self._releases: list[int] = []  # their last reserved step ran
        self._discards: list[int] = []  # their last reserved step never ran
        # Per pool, sequences its driver is to forget (with its next Execute),
        # and this scheduler's epoch (a driver forgets all on a new one).
        self.driver_drops: dict[str, list[int]] = {}
        self.epoch = uuid.uuid4().hex[:12]
        self._memory_scopes: set[anyio.CancelScope] = set()  # the calls in flight
        self._wake = anyio.Event()

    def shapes(self) -> dict[str, PoolShape]:
        return {i: d.shape for i, d in self.drivers.items()}

    # The lines.

    def enqueue(self, seq: Seq) -> None:
        """A new arrival: to the back of the waiting line."""
        self.policy.on_arrival(seq, time.monotonic())
        self.waiting.append(seq)
        self.wake()

    def start(self, seq: Seq) -> None:
        """Waiting -> running (it got its blocks)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.running.append(seq)
            req = seq.request
            req.state = State.RUNNING
            req.waiting_on = ""
            req.first_scheduled = req.first_scheduled or time.monotonic()

    def requeue(self, seq: Seq) -> None:
        """Running -> waiting, its place in line kept (preempted, or its KV lost)."""
        if seq in self.running:
            self.running.remove(seq)
            self.waiting.append(seq)
            seq.request.state = State.WAITING

    def position(self, seq: Seq) -> int:
        """`seq`'s place in the waiting line in policy order (-1: not waiting)."""
        if seq not in self.waiting:
            return -1
        now = time.monotonic()
        return sorted(self.waiting, key=lambda s: self.policy.key(s, now)).index(seq)

    def remove(self, seq: Seq) -> None:
        """Out of both lines (its request ended)."""
        for line in (self.running, self.waiting):
            if seq in line:
                line.remove(seq)

    def park(self, seq: Seq) -> bool:
        """Out of the batch while its session is suspended; False when it
        was in neither line."""
        line = self.running if seq in self.running else self.waiting if seq in self.waiting else None
        if line is None:
            return False
        line.remove(seq)
        seq.request.state = State.SUSPENDED
        return True

    def unpark(self, seq: Seq) -> None:
        """Back from a suspend: running if its KV is on the device, else
        waiting (its place in line kept: arrival and ticket are unchanged)."""
        if seq.mem_known and not seq.swapped:
            self.running.append(seq)
            seq.request.state = State.RUNNING
        else:
            self.waiting.append(seq)
            seq.request.state = State.WAITING
        self.wake()

    # The KV to release.

    def release(self, seq: Seq, *, computed: bool = True) -> None:
        """Release `seq`'s KV with the next memory call: folded into the next
        `Reserve`, or a `Release` of its own when no step follows
        (releasing a swapped sequence frees its swap slots). `computed`:
        False when its last reserved step never ran (a failed step), so the
        blocks that step was to fill are not offered to the prefix cache."""
        if seq.ahead is not None and seq.num_computed < seq.mem_known:
            computed = False  # its slots run past its KV (a step sent back): cache nothing of it
        if seq.mem_known:
            (self._releases if computed else self._discards).append(seq.seq_id)
        self.forget_on_driver(seq)

    def forget_on_driver(self, seq: Seq) -> None:
        """Its driver's copy is stale (KV released, swapped, re-registered):
        dropped with the next Execute there, and sent in full if it runs again."""
        if seq.driver_key is not None:
            self.driver_drops.setdefault(seq.driver_key[0], []).append(seq.seq_id)
            seq.driver_key = None

    def drop_kv(self, seq: Seq, *, computed: bool = True) -> None:
        """Forget `seq`'s KV (released with the next memory call); it is
        recomputed from its tokens."""
        self.release(seq, computed=computed)
        seq.reset(keep_pool=True)

    @property
    def has_releases(self) -> bool:
        return bool(self._releases or self._discards)

    def take_releases(self) -> tuple[list[int], list[int]]:
        """The KV to release now, (computed, never computed); the caller
        sends them and hands them back (`untake_releases`) if that failed."""
        taken = self._releases, self._discards
        self._releases, self._discards = [], []
        return taken

    def untake_releases(self, release: list[int], discard: list[int]) -> None:
        """The call that carried them failed: still held there, so they go
        with the next one, unless the memory server died (it holds nothing)."""
        if not self.memory_down:
            self._releases[:0] = release
            self._discards[:0] = discard

    async def flush_releases(self) -> bool:
        """Send the KV to release in `Release` calls of their own (no
        `Reserve` follows now to carry them); False when a call failed."""
        release, discard = self.take_releases()
        for ids, computed in ((release, True), (discard, False)):
            if ids and await self.memory(self.backend.release(mp.Release(ids, computed))) is None:
                self.untake_releases(release if computed else [], discard)
                return False
        return True

    def forget_releases(self) -> None:
        """The memory server restarted empty: it holds nothing of ours."""
        self._releases.clear()
        self._discards.clear()

    # The memory server.

    async def memory(self, call: Awaitable[T], *, critical: bool = True) -> T | None:
        """Await a memory call; None when it failed (the step is abandoned and
        planned again; a dead memory server also pauses the loop until it is back).
        `critical`: counted in `critical_rpcs` (False: the caller counts it,
        the overlapped Reserve only when the drivers waited on it)."""
        self.critical_rpcs += critical
        with anyio.CancelScope() as scope:
            self._memory_scopes.add(scope)
            try:
                return await call
            except Unavailable as exc:
                log.warning("scheduler.memory_unavailable", error=exc.message)
                self.memory_down = True
            except LlmosError as exc:
                log.error("scheduler.memory_failed", error=str(exc))
            finally:
                self._memory_scopes.discard(scope)
        return None

    def memory_lost(self) -> None:
        """The memory server died: the calls in flight are abandoned."""
        self.memory_down = True
        self.memory_generation += 1
        for scope in self._memory_scopes:
            scope.cancel()

    # Waking the loop.

    def wake(self) -> None:
        self._wake.set()

    async def wait(self, timeout_s: float = float("inf")) -> None:
        """Until `wake()` (or the timeout)."""
        with anyio.move_on_after(timeout_s):
            await self._wake.wait()
        self._wake = anyio.Event()


__all__ = ["Backend", "DriverState", "EngineState"]
