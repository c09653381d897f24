"""Text generation through the scheduler, exactly once across a scheduler restart.

`stream_generate` submits a request with a client-chosen request id. If the
scheduler dies mid-stream (the kernel answers `unavailable`), it re-submits
the same request with the token ids it already holds (`resume_from` /
`resume_ids`); the new scheduler prefills them and the stream continues at
the next token. Offsets are checked, so a repeated or missing token would be
an error, never silent.

A re-submission to a restarted scheduler is a new request there (admission
and quotas are the scheduler's own state, not the client's word), so it may
be answered `overloaded`: it is then tried again after `retry_after_s`,
within the same patience as a scheduler that does not come back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import msgspec

from ipc.errors import BadRequest, DeadlineExceeded, Internal, LlmosError, Overloaded, Unavailable
from ipc.protocol.base import Message, ReplyT, Request
from ipc.protocol.sampling import MAX_SEED, SamplingParams
from ipc.protocol.scheduler import (MAX_FORK_SIZE, SCHEDULER, Cancel, Finished, FinishReason, PrioritySubmit, Submit,
                                    TokenDelta, Usage)

# A request is given up on (`Unavailable` to the caller) only after this many
# re-submissions in a row without a new token AND this long without one: the
# recovery contract is that every accepted request finishes, so a scheduler
# killed again and again (or waiting for a driver to come back) is waited
# for; one that never serves it is not waited for forever. The supervisor's
# restart intensity bounds the rest: past it the kernel exits.
MAX_RESUBMITS = 5
RESUBMIT_PATIENCE_S = 120.0
# Pause before a re-submission that follows one without progress: doubles
# from this, at most RESUBMIT_BACKOFF_MAX_S (the request's deadline caps it).
RESUBMIT_BACKOFF_S = 0.05
RESUBMIT_BACKOFF_MAX_S = 2.0
# How long closing an unfinished stream waits for the scheduler to take its Cancel.
CANCEL_TIMEOUT_S = 5.0


class Chunk(msgspec.Struct, frozen=True):
    """A piece of a streamed generation: tokens [offset, offset + len(token_ids))
    and the text they completed. The last chunk has `finish_reason` and `usage`.
    (A frozen Struct, not a frozen dataclass: a stream makes one per event,
    and the dataclass's __init__, a Python setattr per field, was a tenth of
    a streaming client's CPU.)"""

    request_id: str
    offset: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str = ""
    # Per token: its log-probability, and (with `logprobs` N > 0) the N most likely (id, logprob).
    logprobs: list[float] = msgspec.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = msgspec.field(default_factory=list)


@dataclass(slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    error: str = ""
    chunks: int = field(default=0, repr=False)  # streamed pieces it arrived in
    logprobs: list[float] = field(default_factory=list, repr=False)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list, repr=False)


def build_submit(prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 params: SamplingParams | None = None, stop: Sequence[str] = (),
                 stop_token_ids: Sequence[int] = (), priority: int = 0, timeout: float | None = None,
                 session: str = "", request_id: str | None = None, ignore_eos: bool = False,
                 logprobs: int = 0) -> Submit:
    """The Submit for these options: a `PrioritySubmit` (the op the `priority`
    right covers) when `priority` < 0 asks to run ahead of the default.
    `logprobs` N > 0: each token's N most likely alternatives too."""
    if params is None:
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=logprobs)
    text, ids = (prompt, []) if isinstance(prompt, str) else ("", list(prompt))
    kind = PrioritySubmit if priority < 0 else Submit
    return kind(text, ids, params, max_tokens, list(stop), list(stop_token_ids), ignore_eos, priority,
                time.time_ns() + int(timeout * 1e9) if timeout else 0, session,
                request_id or uuid.uuid4().hex)


class RequestPath(Protocol):
    """What a generation sends through: `sdk.auth.Requester` (a client's one
    path, through the token refresh) or, in tests, an in-memory fake."""

    def stream(self, dst: str, msg: Message, *, timeout: float | None = None,
               trace_id: str = "") -> AsyncGenerator[Message, None]: ...

    async def call(self, dst: str, msg: Request[ReplyT], *, timeout: float | None = None,
                   trace_id: str = "") -> ReplyT: ...


class GenerationStream:
    """The chunks of one generation, as they are produced. Leaving it before
    the last chunk cancels the request at the scheduler (it stops generating
    and frees its KV), so nothing generates for a reader who is gone:

        async with client.stream_generate(prompt) as chunks:
            async for chunk in chunks:
                if enough(chunk):
                    break          # the request is cancelled on leaving the block

    `aclose()` does the same (so `contextlib.aclosing` works too). A stream
    that ended — its last chunk read, or an error from the request — has
    nothing to cancel."""

    def __init__(self, request_id: str, chunks: AsyncGenerator[Chunk, None],
                 cancel: Callable[[str], Awaitable[object]]):
        self.request_id = request_id
        self._chunks = chunks
        self._cancel = cancel
        self._started = False
        self._over = False
        self._closed = False

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._closed:
            raise StopAsyncIteration
        self._started = True
        try:
            chunk = await self._chunks.__anext__()
        except (StopAsyncIteration, LlmosError):
            # Refused, failed or past its deadline: the scheduler holds nothing more for it.
            self._over = True
            raise
        if chunk.finish_reason is not None:
            self._over = True
        return chunk

    async def aclose(self) -> None:
        """Stop reading; cancel the request unless it is over. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._chunks.aclose()
        finally:
            if self._started and not self._over:
                # Shielded: a caller leaving because its own scope was cancelled still cancels.
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT_S):
                    try:
                        await self._cancel(self.request_id)
                    except LlmosError:
                        pass  # it finished meanwhile, or the scheduler is gone (and the request with it)

    async def detach(self) -> None:
        """Stop reading without cancelling: the request runs on at the
        scheduler, where a Submit with its id may re-attach to it (the
        gateway, for a client that will come back for the rest)."""
        self._over = True
        await self.aclose()

    async def __aenter__(self) -> "GenerationStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def stream_generate(conn: RequestPath, submit: Submit, *, max_resubmits: int = MAX_RESUBMITS,
                    patience_s: float = RESUBMIT_PATIENCE_S, backoff_s: float = RESUBMIT_BACKOFF_S) -> GenerationStream:
    """Submit `submit` through `conn` and stream its chunks (see `GenerationStream`)."""

    async def cancel(request_id: str) -> object:
        return await conn.call(SCHEDULER, Cancel(request_id), timeout=CANCEL_TIMEOUT_S)

    return GenerationStream(submit.request_id, _chunks(conn, submit, max_resubmits, patience_s, backoff_s), cancel)


async def _chunks(conn: RequestPath, submit: Submit, max_resubmits: int, patience_s: float,
                  backoff_s: float) -> AsyncGenerator[Chunk, None]:
    # A caller resuming by count alone (an HTTP client holds text, not ids)
    # starts at `resume_from` without the ids before it.
    base = submit.resume_from if not submit.resume_ids else 0
    held: list[int] = list(submit.resume_ids)
    attempt = 0
    # Re-submissions since the last token arrived: a long request survives any
    # number of scheduler restarts as long as each one let it make progress.
    stalled = 0
    progress_at = 0
    progress_time = time.monotonic()
    while True:
        msg = msgspec.structs.replace(submit, resume_from=base + len(held), resume_ids=list(held) if not base else [],
                                      attempt=attempt)
        retry_after = 0.0
        try:
            async with aclosing(conn.stream(SCHEDULER, msg, trace_id=submit.request_id)) as events:
                async for ev in events:
                    if not isinstance(ev, (TokenDelta, Finished)):
                        raise Internal(f"the scheduler answered {type(ev).__name__} to Submit")
                    if ev.offset != base + len(held):
                        raise Internal(f"request {submit.request_id}: tokens from {ev.offset} arrived while "
                                       f"{base + len(held)} are held (a gap or a repeat)")
                    held.extend(ev.token_ids)
                    # The event's lists were decoded for this chunk alone: handed on, not copied.
                    if isinstance(ev, Finished):
                        yield Chunk(ev.request_id, ev.offset, ev.token_ids, ev.text, ev.finish_reason,
                                    ev.usage, ev.error, ev.logprobs, ev.top_logprobs)
                        return
                    yield Chunk(ev.request_id, ev.offset, ev.token_ids, ev.text, None, None, "", ev.logprobs,
                                ev.top_logprobs)
        except (Unavailable, Overloaded) as exc:
            if isinstance(exc, Overloaded):
                if not attempt:
                    raise  # the first submission: the caller decides
                # A restarted scheduler's queue is full: this request was
                # accepted once, so it waits its turn rather than fail.
                retry_after = float(exc.detail.get("retry_after_s", 0.0) or 0.0)
            # The scheduler died (or restarted) mid-request: resume it.
            attempt += 1
            now = time.monotonic()
            if len(held) > progress_at:
                stalled, progress_at, progress_time = 1, len(held), now
            else:
                stalled += 1
            if getattr(conn, "closed", False) or (stalled > max_resubmits and now - progress_time >= patience_s):
                raise  # our own connection is gone, or the system does not come back
            pause = min(backoff_s * 2 ** (stalled - 2), RESUBMIT_BACKOFF_MAX_S) if stalled > 1 else 0.0
            pause = max(pause, min(retry_after, RESUBMIT_BACKOFF_MAX_S))
            if submit.deadline_ns:
                left = (submit.deadline_ns - time.time_ns()) / 1e9
                if left <= 0:
                    raise DeadlineExceeded(f"request {submit.request_id!r} passed its deadline while the "
                                           "scheduler was restarting", detail={"request_id": submit.request_id}) from None
                pause = min(pause, left)
            await anyio.sleep(pause)  # also lets the loop run between attempts
            continue
        raise Internal("the scheduler's stream ended without Finished")


async def generate(conn: RequestPath, submit: Submit, *, max_resubmits: int = MAX_RESUBMITS,
                   patience_s: float = RESUBMIT_PATIENCE_S, backoff_s: float = RESUBMIT_BACKOFF_S) -> Completion:
    async with stream_generate(conn, submit, max_resubmits=max_resubmits, patience_s=patience_s,
                               backoff_s=backoff_s) as stream:
        return await collect(stream)


async def collect(stream: AsyncIterator[Chunk]) -> Completion:
    """Read a generation's chunks to the end, as one `Completion`."""
    text: list[str] = []
    ids: list[int] = []
    logprobs: list[float] = []
    tops: list[list[tuple[int, float]]] = []
    chunks = 0
    async for c in stream:
        chunks += 1
        text.append(c.text)
        ids.extend(c.token_ids)
        logprobs.extend(c.logprobs)
        tops.extend(c.top_logprobs)
        if c.finish_reason is not None:
            return Completion(c.request_id, "".join(text), ids, c.finish_reason, c.usage or Usage(), c.error,
                              chunks=chunks, logprobs=logprobs, top_logprobs=tops)
    raise Internal("the generation stream ended without a finish reason")


def fork_submits(submit: Submit, n: int) -> list[Submit]:
    """The `n` choices of `submit`, one Submit each: request ids
    ``<id>.<i>``, one `fork_group` (the scheduler computes the prompt once
    and the choices fork its KV), and with a seed, seed + i (repeatable,
    and distinct choices). n == 1: `submit` itself."""
    if n == 1:
        return [submit]
    if not 1 <= n <= MAX_FORK_SIZE:
        raise BadRequest(f"n must be in [1, {MAX_FORK_SIZE}], got {n}", detail={"field": "n"})
    seed = submit.params.seed

    def params(i: int) -> SamplingParams:
        return submit.params if seed is None else msgspec.structs.replace(submit.params, seed=(seed + i) % (MAX_SEED + 1))

    return [msgspec.structs.replace(submit, request_id=f"{submit.request_id}.{i}", fork_group=submit.request_id,
                                    fork_size=n, params=params(i)) for i in range(n)]


async def generate_n(conn: RequestPath, submit: Submit, n: int) -> list[Completion]:
    """`n` choices of one prompt, computed once and forked (`fork_submits`),
    in choice order."""
    subs = fork_submits(submit, n)
    out: list[Completion | None] = [None] * n

    async def one(i: int) -> None:
        out[i] = await generate(conn, subs[i])

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return [c for c in out if c is not None]


__all__ = ["Chunk", "Completion", "GenerationStream", "RequestPath", "build_submit", "collect", "fork_submits", "generate",
           "generate_n", "stream_generate"]
