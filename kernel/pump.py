"""The kernel's socket pump: the event loop's reader callback for both
ROUTER sockets, draining them in bounded batches into the inbox.

Running as a callback, not a task, saves a task switch per wake-up; the work
per call is bounded (messages per batch, rounds, a time slice), then
continued at the next turn of the loop. While a continuation is due,
wake-ups leave the work to it, so a flood costs one slice per turn and the
timers run every turn (with a continuation per wake-up they multiplied turn
after turn, and the heartbeat timer fell seconds behind).
"""

from __future__ import annotations

import asyncio
import time

import zmq

from common.logs import get_logger
from ipc.sockets import Channel
from kernel.inbox import Inbox

log = get_logger()

_PUMP_ROUNDS = 32
# Messages per drain: the slice clock is read between batches, so a batch of
# slow messages must stay short.
_PUMP_BATCH = 128
# A pump call also stops after this long, so the heartbeat timer gets a turn
# every ~50 ms under any flood: 16 rounds of malformed frames (each logged and
# answered, ~0.1-0.2 ms apiece) could hold the loop for seconds.
_PUMP_SLICE_S = 0.05


class Pump:
    def __init__(self, inbox: Inbox, front: zmq.Socket[bytes], back: zmq.Socket[bytes]):
        """Owns the two sockets from here on (`close`)."""
        self._inbox = inbox
        self._loop = asyncio.get_running_loop()
        self.front = Channel(front, on_readable=self.run, reader_reschedules=True)
        self.back = Channel(back, on_readable=self.run, reader_reschedules=True)
        self.continues = False  # a continuation is scheduled
        self._closed = False

    def run(self) -> None:
        """Drain both sockets, one slice of work; schedule the rest."""
        if self._closed or self.continues:
            return  # (a continuation will drain what this wake-up is about)
        front, back = self.front, self.back
        on_front, on_back = self._inbox.on_front, self._inbox.on_back
        until = time.monotonic() + _PUMP_SLICE_S
        # Every way out below either found no input pending or schedules the
        # continuation, so the answers sent meanwhile need not look for input.
        # A socket is drained only when it has input: most rounds find one or
        # both empty, and the zmq.Again of a recv on nothing costs about twice
        # the check (its construction is Python).
        with front.reading(), back.reading():
            for _ in range(_PUMP_ROUNDS):
                from_front = front.drain(_PUMP_BATCH) if front.pending_input() else []
                from_back = back.drain(_PUMP_BATCH) if back.pending_input() else []
                if not from_front and not from_back:
                    return
                for frames in from_front:
                    try:
                        on_front(frames)
                    except Exception:
                        self._failed("front")
                for frames in from_back:
                    try:
                        on_back(frames)
                    except Exception:
                        self._failed("back")
                if time.monotonic() > until:
                    break
        if not self.continues:
            self.continues = True
            self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        self.continues = False
        self.run()

    def _failed(self, side: str) -> None:
        """No input may crash the kernel: a bug on one message costs that message."""
        self._inbox.router.counters.rejected += 1
        log.exception("kernel.message_failed", socket=side)

    def close(self) -> None:
        self._closed = True
        self.front.close()
        self.back.close()


__all__ = ["Pump"]
