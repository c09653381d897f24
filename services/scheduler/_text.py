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
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from services.scheduler._request import Request


def _feed(batch: Sequence[tuple[Request, int]]) -> None:
    for req, token in batch:
        req.feed_text(token)


async def feed_step(batch: Sequence[tuple[Request, int]]) -> None:
    """Each request's text takes its new id (already `record`ed), in one
    worker-thread call; a request the id ends has its text finished too."""
    if batch:
        await anyio.to_thread.run_sync(_feed, batch)
