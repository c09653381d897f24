"""What `ModelRunner.execute` takes and returns, per sequence.

Plain Python values: the driver translates its wire messages into these and
back. The runner keeps no per-sequence state between steps (a restarted
driver serves the next step of any sequence whose KV blocks the memory
server re-created), so everything a step needs is in its `SeqStep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ipc.protocol.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class SeqStep:
    """One sequence's share of a step.

    token_ids: the new tokens, at positions start_pos, start_pos + 1, ...: a
        prefill chunk, or the one token sampled last step.
    block_table: physical KV blocks covering positions [0, start_pos +
        len(token_ids)), in order (position p lives in block
        block_table[p // block_size] at offset p % block_size). The keys and
        values of positions below start_pos must already be in those blocks.
    sample: False for a prefill chunk that is not the prompt's last; then no
        token is produced (and no logits computed).
    prior_token_ids: the tokens at positions [0, start_pos); read only when
        params.repetition_penalty != 1, which then requires all of them.
    """

    seq_id: int
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    sample: bool = True
    params: SamplingParams = field(default_factory=SamplingParams)
    prior_token_ids: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class SeqResult:
    """The outcome for one `SeqStep`, in the order the steps were given.

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
