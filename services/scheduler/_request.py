"""A generation request and its sequence.

`Request` is the request as its client sees it: the tokens and text produced
so far, why it ended, and the client stream(s) attached to it. A request may
be attached to a new stream (`Sink`) when its client re-submits it (same
request id): the new stream resumes at the token count the client says it
holds, and the old one is told it was superseded.

`Seq` is the same request as the planner and the memory server see it:
tokens, KV progress, placement and policy bookkeeping. Each request owns one
sequence and the sequence links back (`Seq.request`), typed both ways; the
two live in one module so that link needs no import cycle.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import anyio

from ipc.errors import Cancelled, LlmosError
from ipc.protocol.base import Message
from ipc.protocol.scheduler import Finished, FinishReason, Submit, TokenDelta, Usage
from text.stream import TextStream

Emit = Callable[[Message], None]

_tickets = itertools.count()


def next_ticket() -> int:
    """A place at the back of a line (monotonic over the process)."""
    return next(_tickets)


@dataclass(frozen=True, slots=True)
class Ahead:
    """Slots reserved ahead: for the steps after the one that samples its
    token, on `pool`'s driver `incarnation`, after the block `copies`; the
    memory server holds slots for positions [0, `until`)."""

    pool: str
    incarnation: int
    copies: tuple[tuple[int, int], ...] = ()
    until: int = 0


@dataclass(eq=False, slots=True)
class Seq:
    # The sequence's id on both wires (the driver's `StepSeq.seq_id`, the
    # memory server's `seq_id`); unique in this scheduler, and the same over
    # the sequence's whole life, so a recompute samples as the first run did.
    seq_id: int
    tokens: list[int]  # prompt, then generated ids
    num_prompt: int
    tenant: str = ""
    priority: int = 0
    arrival: float = 0.0  # monotonic seconds
    max_len: int = 0  # positions it may reach (prompt + max tokens; 0: unknown)
    # KV state. `mem_known`: tokens the memory server holds for `seq_id`;
    # `num_computed`: positions whose KV the driver has written. While
    # `swapped`, the KV is in its pool's host swap tier and `block_table`
    # names swap slots, not device blocks.
    num_computed: int = 0
    mem_known: int = 0
    block_table: list[int] = field(default_factory=list)
    pool: str | None = None
    swapped: bool = False
    # What its driver keeps of it (drivers/seq_table.py): sent in full to
    # this (pool, incarnation), positions [0, driver_pos) and the first
    # `table_synced` entries of block_table; None: send it in full next.
    driver_key: tuple[str, int] | None = None
    driver_pos: int = 0
    table_synced: int = 0
    # Reserved while a step ran (the overlap, _overlap.py): the memory server
    # holds slots up to `ahead.until`, past `mem_known`, good for the next
    # steps on this driver incarnation; None: the next step reserves as usual.
    ahead: Ahead | None = None
    # A session turn that ended: its final token's KV is computed without
    # sampling, for its pin (_session_epilogue.py).
    epilogue: bool = False
    # Policy state.
    ticket: int = field(default_factory=next_ticket)
    quantum_used: int = 0
    level: int = 0
    boost_epoch: int = 0
    served: int = 0  # tokens computed for this sequence, recompute included
    high_water: int = 0  # most positions ever computed (recompute stays below it)
    preemptions: int = 0
    # The request this sequence serves; set by `Request` (the planner's
    # tests build sequences without one and never read it).
    request: Request = field(init=False, repr=False)

    @property
    def remaining(self) -> int:
        """Tokens whose KV must still be computed (1 for a decoding sequence)."""
        return len(self.tokens) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    def reset(self, *, keep_pool: bool) -> None:
        """Forget the KV (preemption by recompute, or the KV was lost): the
        sequence starts over from its tokens. The caller releases the old KV
        first (`EngineState.drop_kv`): the memory server must not hold
        `seq_id` when it is reserved again from token 0."""
        self.num_computed = 0
        self.mem_known = 0
        self.block_table = []
        self.swapped = False
        self.driver_key = None
        self.ahead = None
        if not keep_pool:
            self.pool = None


class State(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    SUSPENDED = "suspended"  # its session was switched out
    FINISHED = "finished"


class Sink:
    """One client stream of a request: what it has been sent."""

    def __init__(self, request: "Request", emit: Emit, resume_from: int):
        self.request = request
        self.emit = emit
        self.sent = resume_from  # generated tokens the client holds
        # Released text the client holds; known once the request has
        # (re)produced `sent` tokens.
        self.sent_text: int | None = None
        self.superseded = False
        # Re-attached to a request this scheduler already had (admitted and
        # charged when it arrived).
        self.attached = False
        self.changed = anyio.Event()

    def flush(self) -> None:
        """Send what the client lacks as one `TokenDelta` (nothing if it lacks nothing)."""
        r = self.request
        generated, sent = r.generated, self.sent
        if self.superseded or len(generated) <= sent:
            return
        start = self.sent_text
        if start is None:
            start = self._text_start()
            if start is None:
                return
        text = r.text.text
        tops = r.top_logprobs
        delta = TokenDelta(r.request_id, sent, generated[sent:], text[start:], r.logprobs[sent:],
                           tops[sent:] if tops else [])
        self.sent = len(generated)
        self.sent_text = len(text)
        self.emit(delta)

    def _text_start(self) -> int | None:
        if self.sent_text is None:
            r = self.request
            if len(r.text_at) < self.sent:
                return None
            self.sent_text = r.text_at[self.sent - 1] if self.sent else 0
        return self.sent_text

    def final(self) -> Finished:
        """The reply that ends this stream: everything not sent yet."""
        r = self.request
        assert r.finish_reason is not None
        start = self._text_start()
        offset = min(self.sent, len(r.generated))
        text = r.text.text[start:] if start is not None else ""
        return Finished(r.request_id, r.finish_reason, offset, r.generated[offset:], text,
                        r.logprobs[offset:], r.usage(), r.error_message, r.top_logprobs[offset:], turn=r.turn)

    async def wait(self) -> Finished:
        while True:
            if self.superseded:
                raise Cancelled("superseded: the request was re-submitted on another stream",
                                detail={"request_id": self.request.request_id})
            if self.request.done.is_set():
                if self.request.error is not None:
                    raise self.request.error
                return self.final()
            await self.changed.wait()
            self.changed = anyio.Event()

    def wake(self) -> None:
        self.changed.set()


class Request:
    def __init__(self, key: tuple[str, str], submit: Submit, prompt_ids: list[int], seq: Seq,
                 text: TextStream, stop_ids: frozenset[int], max_total: int):
        self.key = key
        self.request_id = key[1]
        self.submit = submit
        self.seq = seq
        seq.request = self
        self.prompt_ids = prompt_ids
        self.text = text
        self.stop_ids = stop_ids
        self.max_total = max_total  # prompt + generated tokens allowed
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per token, when params.logprobs > 0
        self.text_at: list[int] = []  # released text length after each generated token
        self.text_done = False  # the text was finished with the id that ended it (feed_text)
        self.state = State.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: LlmosError | None = None  # answered as an error instead of `Finished`
        self.error_message = ""
        self.done = anyio.Event()
        self.ended = False  # done.is_set(), as a plain attribute (read per sequence per step)
        self.sink: Sink | None = None
        self.arrived = time.monotonic()
        self.first_scheduled = 0.0
        self.first_token = 0.0
        self.finished_at = 0.0
        self.cached_tokens = 0
        self.forked_tokens = 0  # prompt tokens taken from a fork group's prefix (_fanout.py)
        # A session's turn: prompt tokens from its history, what binding it evicted
        # (turns, tokens), and the turn number it was appended as (_sessions.py).
        self.history_len = 0
        self.evicted = (0, 0)
        self.turn = 0
        self.failures = 0
        self.slo = ""  # "met" or "missed" its objectives, once judged (_slo.py)
        # Why it waits beyond its turn (sp.WAITING_ON_KV_QUOTA, or ""), and
        # whether that was logged (once per request).
        self.waiting_on = ""
        self.quota_logged = False
        # Called once when it finishes (a quota charge held for its lifetime,
        # whichever stream is attached).
        self.on_finish: list[Callable[[], None]] = []

    @property
    def session(self) -> tuple[str, str] | None:
        return (self.key[0], self.submit.session) if self.submit.session else None

    def attach(self, emit: Emit, resume_from: int) -> Sink:
        if self.sink is not None:
            self.sink.superseded = True
            self.sink.wake()
        self.sink = Sink(self, emit, resume_from)
        return self.sink

    def reattach(self, emit: Emit, resume_from: int) -> Sink:
        """A re-submission of this request: a new stream, caught up now
        rather than at the next token."""
        sink = self.attach(emit, resume_from)
        sink.attached = True
        if not self.done.is_set():
            sink.flush()
        return sink

    def replay(self, ids: list[int]) -> bool:
        """The client holds these generated ids: take them (text state
        included) so they are prefilled with the prompt rather than generated
        again; True when the request ended with them."""
        for token in ids:
            self.seq.tokens.append(token)
            reason = self.add_token(token)
            if reason is not None:
                self.finish(reason)
                return True
        return False

    def add_token(self, token: int, logprob: float = 0.0,
                  top: list[tuple[int, float]] | None = None) -> FinishReason | None:
        """Record a generated id and its text on this thread (a replay); return
        why the request must end now, if it must. The engine's steps split
        this: `record` on the loop, `feed_text` in a worker (_text.py)."""
        self.record(token, logprob, top)
        self.feed_text(token)
        return self.end_reason(token)

    def record(self, token: int, logprob: float = 0.0, top: list[tuple[int, float]] | None = None) -> None:
        if not self.first_token:
            self.first_token = time.monotonic()
        self.generated.append(token)
        self.logprobs.append(logprob)
        if self.submit.params.logprobs:
            self.top_logprobs.append(top or [])

    def feed_text(self, token: int) -> None:
        """The recorded id's text (detokenizing: off the event loop); the
        text is finished here too when the id ends the request."""
        if token not in self.stop_ids:
            self.text.feed(token)
        self.text_at.append(len(self.text.text))
        if self.end_reason(token) is not None and not self.text.stopped:
            self.text.finish()
            self.text_done = True

    def end_reason(self, token: int) -> FinishReason | None:
        """Why the request must end after the recorded and fed id `token`."""
        if token in self.stop_ids or self.text.stopped:
            return FinishReason.STOP
        if self.history_len + len(self.prompt_ids) + len(self.generated) >= self.max_total:
            return FinishReason.LENGTH
        return None

    def finish(self, reason: FinishReason, *, error: LlmosError | None = None, message: str = "") -> None:
        if self.done.is_set():
            return
        if not self.text_done and (reason != FinishReason.STOP or not self.text.stopped):
            self.text.finish()  # (an end not caused by an id: a window of a few ids)
        self.finish_reason = reason
        self.error = error
        self.error_message = message
        self.state = State.FINISHED
        self.finished_at = time.monotonic()
        self.ended = True
        self.done.set()
        if self.sink is not None:
            self.sink.wake()
        callbacks, self.on_finish = self.on_finish, []
        for fn in callbacks:
            fn()

    def usage(self) -> Usage:
        end = self.finished_at or time.monotonic()
        return Usage(self.history_len + len(self.prompt_ids), len(self.generated), self.cached_tokens,
                     self.seq.preemptions,
                     max(0.0, self.first_scheduled - self.arrived) if self.first_scheduled else 0.0,
                     max(0.0, self.first_token - self.arrived) if self.first_token else 0.0,
                     end - self.arrived, self.history_len, *self.evicted, slo=self.slo,
                     forked_tokens=self.forked_tokens)
