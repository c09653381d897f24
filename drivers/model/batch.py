"""From a list of `StepSeq` (the driver wire's own struct) to one flattened forward batch.

`check_steps` (drivers/checks.py) finds the sequences whose step is invalid,
with a reason each; `build_batch` lays the valid ones out: decodes first (grouped by context
length for attention), then prefill chunks, every token with its position
and KV slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from drivers.model.attention import AttentionPlan, PagedAttention, group_decodes
from drivers.model.llama import ForwardBatch
from ipc.protocol.driver import StepSeq


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
