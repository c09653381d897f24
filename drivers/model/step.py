"""What `ModelRunner.execute` returns, per sequence.

The runner takes the driver wire's own `ipc.protocol.driver.StepSeq` (one
sequence's share of a step), so a driver hands an `Execute` message's steps
to it untouched. The runner keeps no per-sequence state between steps (a
restarted driver serves the next step of any sequence whose KV blocks the
memory server re-created), so everything a step needs is in its `StepSeq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SeqResult:
    """The outcome for one `StepSeq`, in the order the steps were given.

    token: the sampled next token (None when the step did not sample or
        failed). logprob: its log-probability under the model's raw
        distribution (None when no token). top_logprobs: the
        params.logprobs most likely (token, logprob) pairs, most likely first.
    error: why this sequence failed; the other sequences of the step are
        unaffected. A step rejected as invalid wrote nothing to the KV cache;
        one whose logits came out non-finite did write its slots, and the
        sequence should be dropped.
    """

    seq_id: int
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
