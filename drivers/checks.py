"""Whether each sequence of an `Execute` step is one a driver can run: the
checks every driver applies before it computes (a bad step fails alone, with
a reason; the others run). Torch-free, so a driver without a model (the null
driver) honours the same contract as the model runner.

A step made whole from what the driver kept of its sequence
(drivers/seq_table.py) comes with a `Trust`: what an earlier check already
found good in it (its kept block table's prefix, its sampling parameters,
its history), so only what is new is checked again: a steady decode costs
O(new tokens and blocks), not O(context). Every error a full check would
report is still reported, in the same words."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from ipc.errors import BadRequest
from ipc.protocol.driver import StepSeq

__all__ = ["Limits", "Trust", "check_steps"]


# What an earlier check vouches for in a step made whole from a kept copy:
# (block_table entries known to be in range, positions [0, pos) whose blocks
# were found distinct, prior_token_ids known to be in the vocabulary or not
# read: no repetition penalty). Its sampling parameters were validated then.
Trust = tuple[int, int, bool]


@dataclass(frozen=True, slots=True)
class Limits:
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int


def check_steps(steps: Sequence[StepSeq], limits: Limits,
                trust: Sequence[Trust | None] | None = None) -> list[str | None]:
    """An error message for each invalid step, None for each valid one;
    `trust[i]`: what is already known good in `steps[i]` (None: nothing)."""
    if trust is None:
        errors = [_check(s, limits, None) for s in steps]
    elif len(trust) != len(steps):
        raise ValueError(f"{len(trust)} trusts for {len(steps)} steps")
    else:
        errors = _check_trusted(steps, limits, trust)
    bs = limits.block_size
    valid = [s for s, e in zip(steps, errors) if e is None]
    # The usual step: distinct ids, and no block written by two of them
    # (one C-level set each). Otherwise find who clashes, in order.
    if len({s.seq_id for s in valid}) == len(valid):
        touched = [b for s in valid
                   for b in s.block_table[s.start_pos // bs:(s.start_pos + len(s.token_ids) - 1) // bs + 1]]
        if len(set(touched)) == len(touched):
            return errors
    return _clashes(steps, errors, bs)


def _check_trusted(steps: Sequence[StepSeq], lim: Limits, trust: Sequence[Trust | None]) -> list[str | None]:
    """`_check` of each step; those with a `Trust` in bulk: a few scans in C
    over all of them together, and `_check` one by one only for a step a
    scan cannot clear alone (a block to find distinct, a history to check),
    or for all of them when a scan finds something wrong."""
    errors: list[str | None] = [None] * len(steps)
    kept: list[tuple[int, StepSeq, Trust]] = []
    for i, (s, t) in enumerate(zip(steps, trust)):
        if t is None:
            errors[i] = _check(s, lim, None)
        else:
            kept.append((i, s, t))
    if not kept:
        return errors
    bs = lim.block_size
    ends: list[int] = []
    try:
        lens = [len(s.token_ids) for _, s, _ in kept]
        ids = list(map(operator.index, [x for _, s, _ in kept for x in s.token_ids]))
        starts = list(map(operator.index, [s.start_pos for _, s, _ in kept]))
        new_blocks = list(map(operator.index, [b for _, s, t in kept for b in s.block_table[t[0]:]]))
    except TypeError:
        pass
    else:
        ends = list(map(operator.add, starts, lens))
    if (not ends or min(lens) < 1 or min(starts) < 0 or max(ends) > lim.max_model_len
            or _outside(ids, lim.vocab_size) is not None or _outside(new_blocks, lim.num_blocks) is not None):
        for i, s, t in kept:  # something is wrong: which step, in _check's words
            errors[i] = _check(s, lim, t)
        return errors
    # A step a scan cannot clear alone: blocks past those known distinct
    # (a decode that starts a block), a table too short, a history unchecked.
    closer = [k for k, end in zip(kept, ends)
              if (n := -(-end // bs)) > k[2][0] or n > -(-k[2][1] // bs) or len(k[1].block_table) < n
              or not k[2][2] and k[1].sample]
    for i, s, t in closer:
        errors[i] = _check(s, lim, t)
    return errors


def _clashes(steps: Sequence[StepSeq], errors: list[str | None], bs: int) -> list[str | None]:
    """Fail each step whose seq_id an earlier valid step has, or which writes
    a KV slot an earlier valid step writes."""
    seen: dict[int, int] = {}
    written: dict[int, list[tuple[int, int, int]]] = {}   # block -> (step, lo, hi) offsets
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


def _check(s: StepSeq, lim: Limits, trust: Trust | None) -> str | None:
    # Every scan is a builtin over a whole list (map, min, max, set): run on
    # every sequence of every step, a Python loop per id or block cost a
    # driver 5 ms a step at 256 sequences. With `trust`, only the new part.
    if not isinstance(s, StepSeq):
        return f"expected a StepSeq, got {type(s).__name__}"
    table_ok, distinct_pos, prior_ok = trust or (0, 0, False)
    penalised = s.params.repetition_penalty != 1.0
    try:
        ids = list(map(operator.index, s.token_ids))
        table = s.block_table
        new_blocks = list(map(operator.index, table[table_ok:] if table_ok else table))
        start = operator.index(s.start_pos)
        prior = (list(map(operator.index, s.prior_token_ids))
                 if penalised and not prior_ok else [])
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
    bad = _outside(new_blocks, lim.num_blocks)
    if bad is not None:
        return f"block id {bad} is not one of this driver's blocks [0, {lim.num_blocks})"
    bs = lim.block_size
    needed = -(-end // bs)
    if len(table) < needed:
        return (f"block table has {len(table)} blocks; positions [0, {end}) need {needed} "
                f"of {bs} tokens")
    # The first min(table_ok, blocks of distinct_pos) entries are known
    # distinct; any other entry up to `needed` means a scan (in C), which
    # a decode does once per block it fills.
    if needed > min(table_ok, -(-distinct_pos // bs)) and len(set(table[:needed])) != needed:
        return "block table lists a block more than once"
    if trust is None:
        try:
            s.params.validate()
        except BadRequest as exc:
            return exc.message
    if penalised and s.sample:
        if len(s.prior_token_ids) != start:
            return (f"repetition_penalty needs prior_token_ids for all {start} earlier "
                    f"positions, got {len(s.prior_token_ids)}")
        bad = _outside(prior, lim.vocab_size)
        if bad is not None:
            return f"prior token id {bad} is out of the vocabulary [0, {lim.vocab_size})"
    return None


def _outside(xs: list[int], hi: int) -> int | None:
    """The first of `xs` not in [0, hi), or None."""
    if not xs or (min(xs) >= 0 and max(xs) < hi):
        return None
    return next(x for x in xs if not 0 <= x < hi)
