"""The kernel's clock: every quarter heartbeat interval, heartbeats go out,
instances silent past the expiry are declared hung, clients silent past it
while they have work in flight are gone, expired waiters are answered, the
refusals and kernel ops queued for the audit are flushed, and after a flood
freed heap goes back to the OS. `tick` is plain code over the router (unit
tests call it with their own `now`); `run` is the task that calls it."""

from __future__ import annotations

import time
from typing import Callable

import anyio

from common.logs import get_logger
from ipc.heartbeat import HEARTBEAT_EXPIRY_S, HEARTBEAT_INTERVAL_S
from kernel.keys import audit_refusals
from kernel.routing import Router

log = get_logger()

TICK_S = HEARTBEAT_INTERVAL_S / 4
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

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(TICK_S)
            now = time.monotonic()
            if now - last > TICK_S + HEARTBEAT_INTERVAL_S / 2:
                # The loop was busy for that long: peers may miss our heartbeats.
                log.warning("kernel.ticker_late", late_s=round(now - last - TICK_S, 3))
            last = now
            self.tick(now)

    def tick(self, now: float) -> None:
        r = self._router
        r.replies.end_tick()
        audit_refusals(r.keyring, r.guard)
        r.publish_audit()
        for inst in list(r.registry.by_identity.values()):
            if now - inst.last_seen > HEARTBEAT_EXPIRY_S:
                r.instance_hung(inst)
            elif now - inst.last_ping >= HEARTBEAT_INTERVAL_S:
                inst.last_ping = now
                r.heartbeat(inst)
        r.expire_waiting(now)
        # A client silent past the expiry while it has requests in flight is
        # gone (killed, or its host is): what it asked for is cancelled.
        silent = [ident for ident, seen in r.clients_seen.items() if now - seen > HEARTBEAT_EXPIRY_S]
        for ident in silent:
            r.client_gone(ident, "client stopped answering")
        self._trim_heap(now)

    def _trim_heap(self, now: float) -> None:
        at, seen = self._trimmed_at
        c = self._router.counters
        handled = c.routed + c.rejected + c.queued
        if now - at >= _TRIM_EVERY_S and handled - seen >= _TRIM_AFTER_MESSAGES and not self._router.waiting:
            self._trimmed_at = (now, handled)
            self._trim()


__all__ = ["Liveness", "TICK_S", "trim_heap"]
