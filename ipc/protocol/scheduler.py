"""The scheduler's protocol: text generation requests (service ``"scheduler"``).

A `Submit` is a streaming request: while the request runs the scheduler
emits at most one `TokenDelta` per step (EVENTs), and the final REPLY is
`Finished`, which carries the last tokens and text too. Token offsets count
generated tokens from 0, so a client can check that deltas are contiguous.

Exactly-once across a scheduler restart: the client re-submits with the same
`request_id` and `resume_from` = the number of generated tokens it holds
(and, better, those ids in `resume_ids`, so the scheduler prefills them
instead of regenerating them). The stream then continues at token
`resume_from`; no token is repeated or missing. Text deltas are a pure
function of the token ids, so the text continues where the client's ends.

Deadlines: a request whose `deadline_ns` passes before its first token is
answered `deadline_exceeded`; one that has started finishes with reason
``deadline`` and the text so far.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from ipc.errors import BadRequest
from ipc.protocol.base import Message, Request
from ipc.protocol.sampling import SamplingParams

SCHEDULER = "scheduler"

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_REQUEST_ID_LEN = 128
# Bounds on the integers a client sends, checked when the body is decoded
# (a refusal names the field): nothing downstream sees a 2**64.
MAX_TOKENS_LIMIT = 1 << 20
MAX_PRIORITY = 1000
MAX_TIME_NS = 2**63 - 1

NonNegative = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME_NS)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
PriorityLevel = Annotated[int, msgspec.Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
# Id lists are bounded as they decode: unbounded, 8M prompt ids per Submit
# were looped over before any length check (the scheduler missed heartbeats
# and was killed) and 1.6M stop ids became a 135 MB frozenset per request.
MAX_PROMPT_IDS = 1 << 20  # past any context we serve; the model's own bound is checked next
MAX_STOP_IDS = 64
MAX_FORK_SIZE = 256  # choices of one prompt (`Submit.fork_group`)
PromptIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_PROMPT_IDS)]


class FinishReason(StrEnum):
    STOP = "stop"  # an EOS / stop token id, or a stop string
    LENGTH = "length"  # max_tokens, or the model's context length
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"  # the step failed for this request (see Finished.error)


class Usage(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    preemptions: int = 0
    queue_s: float = 0.0  # arrival to first scheduled step
    ttft_s: float = 0.0  # arrival to first token
    total_s: float = 0.0
    # A session's turn (ipc/protocol/sessions.py): prompt tokens that came from
    # its history (system included), and what this turn evicted from it.
    history_tokens: int = 0
    evicted_turns: int = 0
    evicted_tokens: int = 0
    slo: str = ""  # "met" or "missed" its objectives ("": not judged)
    # n > 1: prompt tokens this choice took from its fork group's prefix,
    # computed once for the group (not counted in cached_tokens).
    forked_tokens: int = 0


class Submit(Request["Finished"]):
    """Generate text. Give the prompt as `prompt` text or as `prompt_ids`."""

    prompt: str = ""
    prompt_ids: PromptIds = []
    params: SamplingParams = SamplingParams()
    max_tokens: MaxTokens = 256
    stop: list[str] = []
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_IDS)] = []
    ignore_eos: bool = False
    # Lower runs first (policy "priority"); ignored by the other policies.
    # Below 0 (ahead of everyone's default) only as a `PrioritySubmit`, the
    # op the `priority` right covers.
    priority: PriorityLevel = 0
    deadline_ns: NonNegative = 0  # unix ns; 0 = none
    # A turn of this principal's conversation: the prompt is the new text only,
    # the history is the scheduler's (ipc/protocol/sessions.py).
    session: str = ""
    # Idempotency key, scoped to the principal: a Submit with the id of a
    # live or recently finished request re-attaches to it.
    request_id: str = ""
    resume_from: NonNegative = 0
    resume_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS_LIMIT)] = []
    add_special_tokens: bool = True
    # The client's submission attempt, for its logs only: whether a Submit
    # re-attaches (no admission, no charge) is decided from the scheduler's
    # own state (a live or remembered request of this principal with this
    # id), never from what a client claims.
    attempt: NonNegative = 0
    # Seconds the request runs on once its requester is gone (a killed gateway), for a re-attach; 0: cancelled.
    linger_s: Annotated[float, msgspec.Meta(ge=0.0, le=300.0)] = 0.0
    # n > 1: the `fork_size` choices of one prompt, one Submit each (own
    # request_id and seed) naming the same `fork_group`: the prompt's KV is
    # computed once and the choices fork its blocks (copy-on-write).
    fork_group: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID_LEN)] = ""
    fork_size: Annotated[int, msgspec.Meta(ge=0, le=MAX_FORK_SIZE)] = 0

    def validate(self) -> None:
        """Raise `BadRequest` naming the first field that is wrong."""
        if bool(self.prompt) == bool(self.prompt_ids):
            raise BadRequest("give exactly one of prompt (text) and prompt_ids", detail={"field": "prompt"})
        self.params.validate()
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise BadRequest(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}",
                             detail={"field": "max_tokens"})
        if not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise BadRequest(f"priority must be in [{-MAX_PRIORITY}, {MAX_PRIORITY}], got {self.priority}",
                             detail={"field": "priority"})
        if len(self.prompt_ids) > MAX_PROMPT_IDS or len(self.stop_token_ids) > MAX_STOP_IDS:
            raise BadRequest(f"at most {MAX_PROMPT_IDS} prompt_ids and {MAX_STOP_IDS} stop_token_ids",
                             detail={"field": "prompt_ids" if self.prompt_ids else "stop_token_ids"})
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LEN for s in self.stop):
            raise BadRequest(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most "
                             f"{MAX_STOP_LEN} characters", detail={"field": "stop"})
        if len(self.request_id) > MAX_REQUEST_ID_LEN:
            raise BadRequest(f"request_id longer than {MAX_REQUEST_ID_LEN} characters",
                             detail={"field": "request_id"})
        if len(self.session) > MAX_REQUEST_ID_LEN:
            raise BadRequest(f"session longer than {MAX_REQUEST_ID_LEN} characters", detail={"field": "session"})
        if self.resume_ids and len(self.resume_ids) != self.resume_from:
            raise BadRequest(f"resume_ids holds {len(self.resume_ids)} ids but resume_from is "
                             f"{self.resume_from}", detail={"field": "resume_ids"})
        if self.resume_from and not self.request_id:
            raise BadRequest("resume_from needs the request_id of the request to resume",
                             detail={"field": "request_id"})
        if self.resume_from > self.max_tokens:
            raise BadRequest(f"resume_from {self.resume_from} exceeds max_tokens {self.max_tokens}",
                             detail={"field": "resume_from"})
        if self.fork_group and not 2 <= self.fork_size <= MAX_FORK_SIZE:
            raise BadRequest(f"fork_size must be in [2, {MAX_FORK_SIZE}] with a fork_group, got {self.fork_size}",
                             detail={"field": "fork_size"})
        if self.fork_group and self.session:
            raise BadRequest("a fork_group (n > 1) cannot run in a session", detail={"field": "fork_group"})


class PrioritySubmit(Submit):
    """A `Submit` that may run ahead of the default priority (`priority` < 0).
    Its own op, so the kernel checks the right: only the `priority` right (and
    `admin`) covers it; a plain `Submit` with a negative priority is
    `forbidden`. Priorities >= 0 (yielding to others) need no right."""


class TokenDelta(Message):
    """Generated tokens [offset, offset + len(token_ids)) and the text they
    completed. Text may lag the ids (an incomplete UTF-8 character, or text
    that may be the start of a stop string, is held back)."""

    request_id: str
    offset: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[float] = []
    # Per token, the `params.logprobs` most likely (token id, logprob), most likely first.
    top_logprobs: list[list[tuple[int, float]]] = []


class Finished(Message):
    """The final answer to a Submit: the tokens and text not yet sent (from
    `offset`), why it ended, and usage."""

    request_id: str
    finish_reason: FinishReason
    offset: int
    token_ids: list[int] = []
    text: str = ""
    logprobs: list[float] = []
    usage: Usage = Usage()
    error: str = ""
    top_logprobs: list[list[tuple[int, float]]] = []
    turn: int = 0  # the session turn this answer was appended as (1-based; 0: none)


class Cancel(Request["CancelReply"]):
    request_id: str


class CancelReply(Message):
    request_id: str
    # False: no such live request (unknown, or already finished).
    found: bool


class RequestStatus(Request["RequestInfo"]):
    request_id: str


class RequestInfo(Message):
    request_id: str
    state: str  # waiting | running | suspended | finished
    generated: int = 0
    prompt_tokens: int = 0
    queue_position: int = -1  # among waiting requests, 0 = next; -1 when not waiting
    driver: str = ""
    finish_reason: str = ""
    # Why a waiting request is not starting, when it is something other than
    # its turn: WAITING_ON_KV_QUOTA (its tenant's kv_blocks quota is in use).
    waiting_on: str = ""
    # A waiting request's predicted seconds to its first token at the current
    # load (the tuner's latency model); -1 when there is no estimate (not
    # waiting, tuner off or still learning).
    estimated_ttft_s: float = -1.0


# RequestInfo.waiting_on: the tenant's other sequences hold its KV-block quota.
WAITING_ON_KV_QUOTA = "kv_quota"


class SchedulerStats(Request["SchedulerStatsReply"]):
    pass


class DriverLoad(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    instance: str
    num_blocks: int
    free_blocks: int
    running: int


class QuotaWait(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A tenant's requests waiting on its KV-block quota: `held` blocks (the
    scheduler's count of what its live sequences hold) of `limit`."""

    tenant: str
    requests: int
    held: int
    limit: int


class SchedulerStatsReply(Message):
    policy: str
    waiting: int
    running: int
    token_budget: int
    max_num_seqs: int
    steps: int
    tokens_generated: int
    preemptions: int
    finished: int
    drivers: list[DriverLoad] = []
    last_step_s: float = 0.0
    sessions: int = 0
    suspended_sessions: int = 0
    pinned_blocks: int = 0  # device blocks held for idle sessions
    # Auto-tuning (0 when off): the per-token latency target and the smoothed
    # step time it is held against; token_budget / max_num_seqs above are
    # the values chosen.
    tpot_target_ms: float = 0.0
    step_ms: float = 0.0
    # Preemption: "recompute" or "swap", and sequences moved to / from the
    # host swap tier (by swap-mode preemption and by session suspend/resume).
    preemption: str = ""
    swapped_out: int = 0
    swapped_in: int = 0
    # Requests waiting for room under their tenant's kv_blocks quota, per
    # tenant; and requests refused because they could never fit theirs.
    quota_waits: list[QuotaWait] = []
    kv_quota_refused: int = 0
    # Kernel round trips the engine loop awaited since start (concurrent
    # Executes on several drivers count once), and the encoded bytes of
    # every Execute sent: per step, critical_rpcs / steps and
    # execute_bytes / steps (tools/bench/steps.py).
    critical_rpcs: int = 0
    execute_bytes: int = 0
    # Objectives (issue 19): requests that met both their TTFT and TPOT
    # objectives, missed one, or were refused early (predicted to miss);
    # met per second over the last minute; the default objective; the
    # prefill chunk in force; the tuner ("off", "learning", "fallback",
    # "configured", "tuned"), the changes it made and its model's resets.
    slo_met: int = 0
    slo_missed: int = 0
    slo_rejected: int = 0
    goodput_rps: float = 0.0
    ttft_objective_ms: float = 0.0
    tpot_objective_ms: float = 0.0
    prefill_chunk: int = 0
    tuner: str = ""
    tuner_changes: int = 0
    tuner_resets: int = 0
    # Async scheduling (issue 15): steps sent to the drivers before the step
    # before them came back (of `steps`).
    steps_ahead: int = 0
    # Steps the tuner planned with token budget left idle, to keep a running
    # stream within its per-token objective (issue 19's `Decision.held`).
    tuner_held_steps: int = 0
