"""Text off the event loop: each step's generated ids become text (incremental
detokenization and stop strings, `TextStream`) in one worker-thread call.

Why a worker thread, per step, in the scheduler (and not the client side):
a stop string ends generation, so the text must be known where generation
is controlled, before the sequence's next token is planned; moving it to the
gateway or SDK would cost a token past every stop and a second round trip
to cancel. One `to_thread` call per step, not per token, keeps the cost to a
thread hop (~0.1 ms) per step whatever the batch, and while it runs the loop
keeps answering submits, heartbeats, cancels and memory events (with a
tokenizer that releases the GIL, the Rust `tokenizers`, it runs truly in
parallel). Prompts are tokenized in a worker thread too (service.py
`_tokenize`). tests/unit/test_text_off_loop.py fails if either comes back.

While the thread runs, nothing else may touch these requests' text: the
engine awaits it within its own step (cancels wait for the next step), and
a stream re-attached meanwhile sees ids whose text is not released yet,
which `Sink` already allows (text lags ids, never the other way).

Off the critical path too (`TextLater`): a request whose end the ids alone
decide (no stop strings, not a session's turn) and that did not end with
this step's id has its text fed, and its `TokenDelta` sent, while the next
step runs on the drivers (`execute_step`'s `beside`): the driver waits on
neither. Its stream sees the delta a plan later; nothing else changes. The
engine settles what is left before anything could end such a request
first (a cancel, a deadline, a recovery, a failed reservation) and before
it waits for work, so a request's text is always fed in order and complete
when it finishes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from services.scheduler._request import Request

if TYPE_CHECKING:
    from services.scheduler._execute import Produced


def _feed(batch: Sequence[tuple[Request, int]]) -> None:
    for req, token in batch:
        req.feed_text(token)


async def feed_step(batch: Sequence[tuple[Request, int]]) -> None:
    """Each request's text takes its new id (already `record`ed), in one
    worker-thread call; a request the id ends has its text finished too."""
    if batch:
        await anyio.to_thread.run_sync(_feed, batch)


class TextLater:
    """Step N's text for the requests that can wait for it (see above)."""

    def __init__(self) -> None:
        self.batch: list[tuple[Request, int]] = []
        self._deadline = 0  # the earliest deadline (deadline_ns) of a request in `batch`; 0: none

    def __bool__(self) -> bool:
        return bool(self.batch)

    def record(self, produced: Sequence[Produced]) -> tuple[list[tuple[Request, int]], int]:
        """One pass over a step's outputs: each live one's id recorded (on
        its sequence, and its request's `record`) and its text kept to feed
        later when it can wait; returns the ids whose text is fed now (those
        that end, or could end, by their text or with this id), and how many
        were recorded."""
        now = []
        later = self.batch
        deadline = self._deadline
        n = 0
        for out in produced:
            seq = out.seq
            req = seq.request
            if req.ended:
                continue
            token = out.token
            seq.tokens.append(token)
            req.record(token, out.logprob, out.top_logprobs)
            n += 1
            submit = req.submit
            if submit.stop or submit.session or req.end_reason(token) is not None:  # (a session's turn)
                now.append((req, token))
            else:
                later.append((req, token))
                d = submit.deadline_ns
                if d > 0 and (deadline == 0 or d < deadline):
                    deadline = d
        self._deadline = deadline
        return now, n

    def requests(self) -> set[int]:
        """The ids (`id()`) of the requests whose text waits."""
        return {id(req) for req, _ in self.batch}

    def due(self, urgent: bool) -> bool:
        """Text waits and must be fed before the step goes on: `urgent` (the
        engine is about to apply what could end a request), or a waiting
        request's deadline passed."""
        if not self.batch:
            return False
        return urgent or 0 < self._deadline <= time.time_ns()

    async def settle(self) -> None:
        """Feed what waits (in a worker thread) and send each request's delta."""
        batch, self.batch, self._deadline = self.batch, [], 0
        if not batch:
            return
        await feed_step(batch)
        for req, _ in batch:
            if not req.ended and req.sink is not None:
                req.sink.flush()
