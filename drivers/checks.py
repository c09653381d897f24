"""Whether each sequence of an `Execute` step is one a driver can run: the
checks every driver applies before it computes (a bad step fails alone, with
a reason; the others run). Torch-free, so a driver without a model (the null
driver) honours the same contract as the model runner."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

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
    # Every scan is a builtin over the whole list (map, min, max, set): run
    # on every sequence of every step, a Python loop per id or block cost a
    # driver 5 ms a step at 256 sequences.
    if not isinstance(s, StepSeq):
        return f"expected a StepSeq, got {type(s).__name__}"
    try:
        ids = list(map(operator.index, s.token_ids))
        table = list(map(operator.index, s.block_table))
        start = operator.index(s.start_pos)
        prior = (list(map(operator.index, s.prior_token_ids))
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
    bad = _outside(ids, lim.vocab_size)
    if bad is not None:
        return f"token id {bad} is out of the vocabulary [0, {lim.vocab_size})"
    bad = _outside(table, lim.num_blocks)
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
        bad = _outside(prior, lim.vocab_size)
        if bad is not None:
            return f"prior token id {bad} is out of the vocabulary [0, {lim.vocab_size})"
    return None


def _outside(xs: list[int], hi: int) -> int | None:
    """The first of `xs` not in [0, hi), or None."""
    if not xs or (min(xs) >= 0 and max(xs) < hi):
        return None
    return next(x for x in xs if not 0 <= x < hi)
