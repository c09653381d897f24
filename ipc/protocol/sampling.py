"""Per-request sampling parameters, shared by the gateway, scheduler and
drivers.

Randomness is keyed by (seed, position): the token a sequence samples at a
position does not depend on its batch-mates or on a driver restart. A request
without a seed gets a per-driver random one, so set a seed when replays must
match. Parallel samples of one prompt need distinct seeds.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from ipc.errors import BadRequest
from ipc.protocol.base import Message

MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1


class SamplingParams(Message, frozen=True):
    """How to pick each next token.

    temperature 0 means greedy. top_k 0 and top_p 1 switch those filters off;
    min_p drops tokens whose probability is below min_p times the most likely
    one's. repetition_penalty > 1 discourages every token already in the
    sequence (prompt and generated), as in the CTRL paper. logprobs N > 0
    returns the chosen token's log-probability and the N most likely tokens'.
    """

    temperature: float = 1.0
    # Integer bounds are checked when a body is decoded (the refusal names the field).
    top_k: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)] = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)] | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] = 0

    def validate(self) -> None:
        """Raise `BadRequest` naming the first field out of range."""
        # Checked on every step of every sequence: messages are only
        # formatted on failure.
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            _fail("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            _fail("top_k", f"must be in [0, {MAX_TOP_K}] (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            _fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            _fail("min_p", f"must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 100.0):
            _fail("repetition_penalty", f"must be in (0, 100], got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            _fail("seed", f"must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _fail(field: str, why: str) -> None:
    raise BadRequest(f"sampling parameter {field} {why}", detail={"field": field})
