"""From a list of `StepSeq` (the driver wire's own struct) to one flattened forward batch.

`check_steps` finds the sequences whose step is invalid, with a reason each;
`build_batch` lays the valid ones out: decodes first (grouped by context
length for attention), then prefill chunks, every token with its position
and KV slot.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from drivers.model.attention import AttentionPlan, PagedAttention, group_decodes
from drivers.model.llama import ForwardBatch
from ipc.errors import BadRequest
from ipc.protocol.driver import StepSeq


@dataclass(frozen=True, slots=True)
class Limits:
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int


def check_steps(steps: Sequence[StepSeq], limits: Limits) -> list[str | None]:
    """An error message for each invalid step, None for each valid one."""
    errors = [_check(s, limits) for s in steps]
    seen: dict[int, int] = {}
    written: dict[int, list[tuple[int, int, int]]] = {}   # block -> (step, lo, hi) offsets
    bs = limits.block_size
    for i, s in enumerate(steps):
        if errors[i] is not None:
            continue
        if s.seq_id in seen:
            errors[i] = f"seq_id {s.seq_id} appears more than once in this step"
            continue
        seen[s.seq_id] = i
        # Two sequences writing one slot (a missed copy-on-write) would
        # corrupt each other's cache.
        end = s.start_pos + len(s.token_ids)
        spans = [(s.block_table[b], max(s.start_pos, b * bs) - b * bs, min(end, (b + 1) * bs) - b * bs)
                 for b in range(s.start_pos // bs, (end - 1) // bs + 1)]
        clash = next((j for blk, lo, hi in spans for j, lo2, hi2 in written.get(blk, ())
                      if lo < hi2 and lo2 < hi), None)
        if clash is not None:
            errors[i] = (f"writes KV slots that seq_id {steps[clash].seq_id} also writes in this "
                         f"step (shared block without copy-on-write)")
            continue
        for blk, lo, hi in spans:
            written.setdefault(blk, []).append((i, lo, hi))
    return errors


def _check(s: StepSeq, lim: Limits) -> str | None:
    if not isinstance(s, StepSeq):
        return f"expected a StepSeq, got {type(s).__name__}"
    try:
        ids = [operator.index(t) for t in s.token_ids]
        table = [operator.index(b) for b in s.block_table]
        start = operator.index(s.start_pos)
        prior = ([operator.index(t) for t in s.prior_token_ids]
                 if s.params.repetition_penalty != 1.0 else [])
    except TypeError:
        return "token ids, block ids and start_pos must be integers"
    if not ids:
        return "empty token_ids: a step must carry at least one token"
    if start < 0:
        return f"start_pos {start} is negative"
    end = start + len(ids)
    if end > lim.max_model_len:
        return (f"sequence of {end} tokens exceeds the context window of "
                f"{lim.max_model_len} tokens")
    bad = next((t for t in ids if not 0 <= t < lim.vocab_size), None)
    if bad is not None:
        return f"token id {bad} is out of the vocabulary [0, {lim.vocab_size})"
    bad = next((b for b in table if not 0 <= b < lim.num_blocks), None)
    if bad is not None:
        return f"block id {bad} is not one of this driver's blocks [0, {lim.num_blocks})"
    needed = -(-end // lim.block_size)
    if len(table) < needed:
        return (f"block table has {len(table)} blocks; positions [0, {end}) need {needed} "
                f"of {lim.block_size} tokens")
    if len(set(table[:needed])) != needed:
        return "block table lists a block more than once"
    try:
        s.params.validate()
    except BadRequest as exc:
        return exc.message
    if s.params.repetition_penalty != 1.0 and s.sample:
        if len(prior) != start:
            return (f"repetition_penalty needs prior_token_ids for all {start} earlier "
                    f"positions, got {len(prior)}")
        bad = next((t for t in prior if not 0 <= t < lim.vocab_size), None)
        if bad is not None:
            return f"prior token id {bad} is out of the vocabulary [0, {lim.vocab_size})"
    return None


def build_batch(steps: Sequence[StepSeq], attention: PagedAttention,
                device: torch.device) -> tuple[ForwardBatch, list[int]]:
    """Flatten valid steps. Returns the batch and, for each logits row, the
    index in `steps` of the sequence it belongs to."""
    bs = attention.cache.block_size
    decodes = [i for i, s in enumerate(steps) if len(s.token_ids) == 1]
    prefills = [i for i, s in enumerate(steps) if len(s.token_ids) > 1]
    tokens: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    last_row: dict[int, int] = {}
    plan = AttentionPlan([], [])

    widths = [steps[i].start_pos // bs + 1 for i in decodes]
    for group in group_decodes(widths):
        members = [decodes[g] for g in group]
        start = len(tokens)
        for i in members:
            s = steps[i]
            pos = s.start_pos
            last_row[i] = len(tokens)
            tokens.append(int(s.token_ids[0]))
            positions.append(pos)
            slot_blocks.append(int(s.block_table[pos // bs]))
            slot_offsets.append(pos % bs)
        plan.decodes.append(attention.decode_group(
            start, [[int(b) for b in steps[i].block_table] for i in members],
            [steps[i].start_pos + 1 for i in members], widths[group[0]]))

    for i in prefills:
        s = steps[i]
        start, n = len(tokens), len(s.token_ids)
        table = [int(b) for b in s.block_table]
        span = range(s.start_pos, s.start_pos + n)
        tokens.extend(int(t) for t in s.token_ids)
        positions.extend(span)
        slot_blocks.extend(table[p // bs] for p in span)
        slot_offsets.extend(p % bs for p in span)
        last_row[i] = len(tokens) - 1
        plan.prefills.append(attention.prefill_seq(start, s.start_pos, n, table))

    sampled = [i for i, s in enumerate(steps) if s.sample]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    batch = ForwardBatch(
        tokens=tensor(tokens), positions=tensor(positions),
        kv_slots=attention.cache.slots(tensor(slot_blocks), tensor(slot_offsets)),
        attention=plan, logit_rows=tensor([last_row[i] for i in sampled]))
    return batch, sampled
