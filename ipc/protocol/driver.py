"""Messages to a device driver (service ``"driver"``, instances like ``cpu-0``).

A driver holds the model and the physical KV blocks; the memory server decides
which blocks a sequence owns and the scheduler sends one `Execute` per step.
"""

from __future__ import annotations

import msgspec

from ipc.protocol.base import Message, Request
from ipc.protocol.sampling import SamplingParams

DRIVER = "driver"


class StepSeq(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sequence's share of a step, in full (untagged: its place in
    `Execute.steps` says what it is); the model runner consumes it as it
    arrives (drivers/model/runner.py `execute`). The driver keeps it
    (drivers/seq_table.py) so later steps of the sequence come as a
    `StepDelta`.

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
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool = True
    params: SamplingParams = SamplingParams()
    prior_token_ids: list[int] = []


class StepDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The next step of a sequence the driver holds (it got a `StepSeq`
    earlier from this scheduler): only what changed, so a steady decode's
    share does not grow with its context.

    token_ids: the new tokens, at positions start_pos, ...; start_pos must
        be where the driver's copy of the sequence ends.
    table_start, blocks: the block table becomes table[:table_start] +
        blocks (new blocks appended; a copy-on-write replaces the last).
    The sampling parameters, and the history a repetition penalty reads,
    are the driver's copy.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    table_start: int
    blocks: list[int] = []
    sample: bool = True
    # Async scheduling (docs/scheduler.md, "Async steps"): sent before the
    # step that samples its input returned, so `token_ids` is empty and the
    # input is the token this driver sampled for the sequence in its last
    # step (drivers/seq_table.py `Kept.last`); no such token: `resend`.
    chain: bool = False


class Execute(Request["Executed"]):
    """Run one batched step: `steps` in full (sequences new to this driver,
    or sent again), `deltas` for those it holds. `drop`: sequences to
    forget first (ended, preempted, moved). `epoch`: the scheduler's; a
    driver that sees a new one forgets every sequence (a restarted
    scheduler reuses ids). `copies` are (src, dst) block copies the memory
    server asked for (copy-on-write), done before the forward pass."""

    steps: list[StepSeq] = []
    copies: list[tuple[int, int]] = []
    deltas: list[StepDelta] = []
    drop: list[int] = []
    epoch: str = ""


class SeqOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    seq_id: int
    token: int = -1  # -1: no token (a non-final prefill chunk, or an error)
    logprob: float = 0.0
    top_logprobs: list[tuple[int, float]] = []
    error: str = ""
    # The driver holds no copy of the sequence a delta named (it restarted,
    # or never got it, or the delta does not fit its copy): nothing ran;
    # send the sequence in full (`StepSeq`) next step.
    resend: bool = False


class Executed(Message):
    outputs: list[SeqOutput]
    step_s: float = 0.0


class SwapBlocksOut(Request["Swapped"]):
    """Copy device blocks into host-tier slots (block_ids[i] → slots[i])."""

    block_ids: list[int]
    slots: list[int]


class SwapBlocksIn(Request["Swapped"]):
    """Copy host-tier slots back into device blocks (slots[i] → block_ids[i])."""

    slots: list[int]
    block_ids: list[int]


class Swapped(Message):
    blocks: int


class DescribeModel(Request["ModelDescription"]):
    pass


class ModelDescription(Message):
    name: str
    architecture: str
    path: str
    vocab_size: int
    sampleable_vocab: int
    max_model_len: int
    num_blocks: int
    block_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    dtype: str
    device: str
    num_params: int
    host_slots: int
    # What the scheduler and gateway need of the model's tokenizer, carried
    # here so they never read `path` (no shared filesystem): file name ->
    # contents, for tokenizer.json, tokenizer_config.json (special tokens,
    # the chat template) or the byte tokenizer's llmos_tokenizer.json
    # (text/shipped.py, bounded by MAX_TOKENIZER_BYTES there).
    tokenizer_files: dict[str, str] = {}


class DriverHealth(Request["DriverHealthReply"]):
    pass


class DriverHealthReply(Message):
    """ok: the model runner still computes (the last step did not fail, and
    an idle device answered a probe); `detail` says why not."""

    ok: bool
    busy: bool
    steps: int
    tokens: int
    last_step_s: float
    detail: str = ""
