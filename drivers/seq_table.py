"""What a driver keeps of each running sequence between steps, so the
scheduler sends a sequence in full once (`StepSeq`) and then only what
changed (`StepDelta`: new tokens, new block ids).

Torch-free: every driver (the model driver, the null driver) turns an
`Execute` into full `StepSeq`s with `expand`, runs them, and `record`s
the outcome. The table lives in the driver process, so a restarted driver
starts empty: a delta for a sequence it does not hold, or one that does
not fit its copy, is answered `resend` (nothing ran) and the scheduler
sends that sequence in full next step. A sequence whose step failed is
forgotten, so its next step comes in full too.

A kept copy is one that ran, so it passed the driver's checks
(drivers/checks.py): `expand_trusted` says so for each step it makes whole
(`Trust`), and the checks then look only at what the delta added.

Async scheduling: the scheduler sends step N+1 before step N's reply, so a
decode's N+1 delta is a `chain` one with no tokens; its input is the token
this driver sampled for it in step N (`Kept.last`, from `record`'s
`tokens`). A driver runs its Executes one at a time in arrival order, so N
is recorded before N+1 is made whole; a chain delta that meets no sampled
token (N failed, or ran elsewhere) is answered `resend`, like any misfit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.checks import Trust
from ipc.protocol import driver as dp
from ipc.protocol.sampling import SamplingParams


@dataclass(slots=True)
class Kept:
    table: list[int]
    pos: int  # positions [0, pos) are in the table's blocks
    params: SamplingParams
    # Every token up to pos, kept only when a repetition penalty reads it.
    history: list[int] = field(default_factory=list)
    history_checked: bool = False  # found in the vocabulary by a check
    # The token its last step sampled (-1: none): the input of a `chain`
    # delta, sent before the scheduler knew it (async scheduling).
    last: int = -1


class SeqTable:
    def __init__(self) -> None:
        self.epoch = ""
        self.seqs: dict[int, Kept] = {}
        self._made: dict[int, Kept] = {}  # the last expand's deltas: seq_id -> the copy made whole

    def __len__(self) -> int:
        return len(self.seqs)

    def expand(self, msg: dp.Execute) -> tuple[list[dp.StepSeq], list[dp.SeqOutput]]:
        """The step's sequences in full (`msg.steps`, then the deltas made
        whole from the kept copies), and a `resend` answer for each delta
        that cannot be made whole."""
        steps, _, resend = self.expand_trusted(msg)
        return steps, resend

    def expand_trusted(self, msg: dp.Execute) -> tuple[list[dp.StepSeq], list[Trust | None], list[dp.SeqOutput]]:
        """`expand`, with what the checks already vouch for in each step
        (`check_steps`' `trust`: None for a step sent in full)."""
        if msg.epoch != self.epoch:
            self.seqs.clear()  # another scheduler: its ids are not the old one's
            self.epoch = msg.epoch
        seqs = self.seqs
        for seq_id in msg.drop:
            seqs.pop(seq_id, None)
        steps = list(msg.steps)
        trust: list[Trust | None] = [None] * len(steps)
        resend: list[dp.SeqOutput] = []
        full = {s.seq_id for s in msg.steps} if msg.steps else ()
        made = self._made = {}
        for d in msg.deltas:
            seq_id = d.seq_id
            kept = seqs.get(seq_id) if seq_id not in full else None
            if (kept is None or d.start_pos != kept.pos or not 0 <= d.table_start <= len(kept.table)
                    or (d.chain and (kept.last < 0 or d.token_ids))):
                seqs.pop(seq_id, None)
                resend.append(dp.SeqOutput(seq_id, error=_misfit(d, kept), resend=True))
                continue
            token_ids = [kept.last] if d.chain else d.token_ids
            kept_table = kept.table
            table = kept_table[:d.table_start] + d.blocks if d.blocks or d.table_start < len(kept_table) \
                else kept_table
            penalised = kept.params.repetition_penalty != 1.0
            steps.append(dp.StepSeq(seq_id, token_ids, d.start_pos, table, d.sample, kept.params,
                                    kept.history if penalised else []))
            trust.append((d.table_start, kept.pos, kept.history_checked or not penalised))
            made[seq_id] = kept
        return steps, trust, resend

    def record(self, steps: Sequence[dp.StepSeq], errors: Sequence[str | None],
               tokens: Sequence[int | None] = ()) -> None:
        """After the step: keep each sequence that ran, forget each that
        failed (its next step comes in full). `tokens`: what each step
        sampled (None or -1: nothing), the input of its next `chain` delta;
        not given, no sequence can be chained."""
        made, self._made = self._made, {}
        seqs = self.seqs
        sampled = list(tokens) + [None] * (len(steps) - len(tokens))
        for s, error, token in zip(steps, errors, sampled):
            seq_id = s.seq_id
            if error:
                seqs.pop(seq_id, None)
                continue
            end = s.start_pos + len(s.token_ids)
            last = token if token is not None and token >= 0 and s.sample else -1
            kept = made.get(seq_id)
            if kept is not None and seqs.get(seq_id) is kept:
                # Made whole from this copy: it moves on in place (a
                # penalised history grows by the step's checked tokens).
                kept.table = s.block_table
                kept.pos = end
                kept.last = last
                if kept.params.repetition_penalty != 1.0:
                    kept.history.extend(s.token_ids)
                    kept.history_checked = kept.history_checked or s.sample
                continue
            history: list[int] = []
            penalised = s.params.repetition_penalty != 1.0
            if penalised:
                history = [*s.prior_token_ids, *s.token_ids]
            # The step's own lists (decoded for it). Its history was checked
            # when the step sampled (drivers/checks.py).
            seqs[seq_id] = Kept(s.block_table, end, s.params, history, penalised and s.sample, last)


def _misfit(d: dp.StepDelta, kept: Kept | None) -> str:
    if kept is None:
        return f"seq_id {d.seq_id} is not held here (this driver restarted, or never got it): send it in full"
    if d.start_pos != kept.pos:
        return (f"seq_id {d.seq_id}: the delta starts at position {d.start_pos}, this driver's copy "
                f"ends at {kept.pos}: send it in full")
    if not 0 <= d.table_start <= len(kept.table):
        return (f"seq_id {d.seq_id}: table_start {d.table_start} is outside this driver's copy of "
                f"{len(kept.table)} blocks: send it in full")
    if d.chain and d.token_ids:
        return f"seq_id {d.seq_id}: a chain delta carries no tokens (its input is the one sampled here)"
    if d.chain:
        return (f"seq_id {d.seq_id}: a chain delta, but this driver's last step of it sampled no token: "
                "send it in full")
    return ""


__all__ = ["Kept", "SeqTable"]
