"""The kernel's clock: every quarter heartbeat interval, heartbeats go out,
instances silent past the expiry are declared hung, clients silent past it
while they have work in flight are gone, expired waiters are answered, the
refusals and kernel ops queued for the audit are flushed, and after a flood
freed heap goes back to the OS. `tick` is plain code over the router (unit
tests call it with their own `now`); `run` is the task that calls it.

Silence is not always a hang. Two cases get bounded grace (departure 30 in
docs/architecture.md):
- The kernel itself did not run: after its own clock fell behind, the
  heartbeats that arrived meanwhile still wait unread in its sockets (the
  timer runs before the socket pump), so the stall is not counted as anyone's
  silence (`ipc.heartbeat.Stalls`: only the stall, so a kernel late on every
  tick still finds a hung instance after 3 s of its own running time).
- The host did not run the instance: a local instance whose process is
  runnable (state R) and used under a tenth of a core while its heartbeats
  were overdue is starved of CPU, not hung. It is logged
  (`kernel.instance_starved`) and kept up to STARVED_LIMIT_S of silence. A
  stopped, blocked or spinning process is hung at the expiry as before.
"""

from __future__ import annotations

import time
from typing import Callable

import anyio

from common.logs import get_logger
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S, Stalls
from kernel.keys import audit_refusals
from kernel.procstat import ProcSample
from kernel.registry import Instance
from kernel.routing import Router

log = get_logger()

TICK_S = HEARTBEAT_INTERVAL_S / 4
# A heartbeat this late makes an instance overdue: the kernel notes its
# process's CPU time, to judge at the expiry whether it ran since.
OVERDUE_S = HEARTBEAT_INTERVAL_S * 1.5
# A starved instance is still declared hung past this much silence.
STARVED_LIMIT_S = HEARTBEAT_EXPIRY_S * 3
# Under this share of one core while overdue (and runnable): starved.
STARVED_CPU_SHARE = 0.1
# After a flood the kernel hands freed heap back to the OS (glibc keeps it
# otherwise: 2.1 GB stayed resident after one, issue 12 #5). Checked this often,
# done when this many messages were handled since the last time.
_TRIM_EVERY_S = 10.0
_TRIM_AFTER_MESSAGES = 20_000


def _libc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        fn: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return fn
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim with


_malloc_trim = _libc_trim()


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Liveness:
    def __init__(self, router: Router, trim: Callable[[], None] = trim_heap):
        self._router = router
        self._trim = trim
        self._trimmed_at = (0.0, 0)  # (monotonic, messages handled) at the last heap trim
        self.stalls = Stalls()  # when the kernel's clock fell behind: its own stalls
        # Overdue instances: (when, their process's sample then); None where the host cannot say.
        self._overdue: dict[Instance, tuple[float, ProcSample | None]] = {}
        self._starved: set[Instance] = set()  # logged as starved in this silence

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            if now - last > TICK_S + HEARTBEAT_INTERVAL_S / 2:
                # The loop was busy (or not run) for that long: peers may miss
                # our heartbeats, and theirs still wait unread.
                log.warning("kernel.ticker_late", late_s=round(now - last - TICK_S, 3))
                self.stalls.note(last + TICK_S, now)
            last = now
            self.tick(now)

    def tick(self, now: float) -> None:
        r = self._router
        r.replies.end_tick()
        audit_refusals(r.keyring, r.guard)
        r.publish_audit()
        stalls = self.stalls
        for inst in list(r.registry.by_identity.values()):
            silent = now - inst.last_seen
            if silent > OVERDUE_S:
                silent = stalls.silence(now, inst.last_seen)
            if silent > HEARTBEAT_EXPIRY_S:
                if not self._starved_not_hung(inst, now, silent):
                    self._forget(inst)
                    r.instance_hung(inst)
                    continue
            elif silent > OVERDUE_S:
                if inst not in self._overdue:
                    self._overdue[inst] = (now, self._sample(inst))
            elif inst in self._overdue:
                self._forget(inst)
            if now - inst.last_ping >= HEARTBEAT_INTERVAL_S:
                inst.last_ping = now
                r.heartbeat(inst)
        for gone in [i for i in self._overdue if r.registry.by_identity.get(i.identity) is not i]:
            self._forget(gone)
        r.expire_waiting(now)
        # A client silent past the expiry while it has requests in flight is
        # gone (killed, or its host is): what it asked for is cancelled.
        silent_clients = [ident for ident, seen in r.clients_seen.items()
                          if now - seen > HEARTBEAT_EXPIRY_S and stalls.silence(now, seen) > HEARTBEAT_EXPIRY_S]
        for ident in silent_clients:
            r.client_gone(ident, "client stopped answering")
        self._trim_heap(now)

    def _sample(self, inst: Instance) -> ProcSample | None:
        children = self._router.children
        return children.sample(inst.name, inst.pid) if children is not None else None

    def _forget(self, inst: Instance) -> None:
        self._overdue.pop(inst, None)
        self._starved.discard(inst)

    def _starved_not_hung(self, inst: Instance, now: float, silent: float) -> bool:
        """Whether `inst`, silent past the expiry, is runnable and was not run
        since its heartbeats became overdue (and not silent for too long)."""
        if silent > STARVED_LIMIT_S:
            return False
        at, before = self._overdue.get(inst, (now, None))
        after = self._sample(inst) if before is not None else None
        if before is None or after is None or not after.runnable:
            return False
        ran = after.cpu_s - before.cpu_s
        if ran > STARVED_CPU_SHARE * max(now - at, TICK_S):
            return False  # it had the CPU and did not answer: spinning
        if inst not in self._starved:
            self._starved.add(inst)
            log.warning("kernel.instance_starved", instance=inst.name, pid=inst.pid, silent_s=round(silent, 2),
                        cpu_s=round(ran, 3), limit_s=STARVED_LIMIT_S)
        return True

    def _trim_heap(self, now: float) -> None:
        at, seen = self._trimmed_at
        c = self._router.counters
        handled = c.routed + c.rejected + c.queued
        if now - at >= _TRIM_EVERY_S and handled - seen >= _TRIM_AFTER_MESSAGES and not self._router.waiting:
            self._trimmed_at = (now, handled)
            self._trim()


__all__ = ["Liveness", "OVERDUE_S", "STARVED_LIMIT_S", "TICK_S", "trim_heap"]
