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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ipc.protocol import driver as dp
from ipc.protocol.sampling import SamplingParams


@dataclass(slots=True)
class Kept:
    table: list[int]
    pos: int  # positions [0, pos) are in the table's blocks
    params: SamplingParams
    # Every token up to pos, kept only when a repetition penalty reads it.
    history: list[int] = field(default_factory=list)


class SeqTable:
    def __init__(self) -> None:
        self.epoch = ""
        self.seqs: dict[int, Kept] = {}

    def __len__(self) -> int:
        return len(self.seqs)

    def expand(self, msg: dp.Execute) -> tuple[list[dp.StepSeq], list[dp.SeqOutput]]:
        """The step's sequences in full (`msg.steps`, then the deltas made
        whole from the kept copies), and a `resend` answer for each delta
        that cannot be made whole."""
        if msg.epoch != self.epoch:
            self.seqs.clear()  # another scheduler: its ids are not the old one's
            self.epoch = msg.epoch
        for seq_id in msg.drop:
            self.seqs.pop(seq_id, None)
        steps = list(msg.steps)
        resend: list[dp.SeqOutput] = []
        full = {s.seq_id for s in msg.steps}
        for d in msg.deltas:
            kept = self.seqs.get(d.seq_id) if d.seq_id not in full else None
            why = _misfit(d, kept)
            if why:
                self.seqs.pop(d.seq_id, None)
                resend.append(dp.SeqOutput(d.seq_id, error=why, resend=True))
                continue
            assert kept is not None
            table = kept.table[:d.table_start] + d.blocks if d.blocks or d.table_start < len(kept.table) \
                else kept.table
            prior = kept.history if kept.params.repetition_penalty != 1.0 else []
            steps.append(dp.StepSeq(d.seq_id, d.token_ids, d.start_pos, table, d.sample, kept.params, prior))
        return steps, resend

    def record(self, steps: Sequence[dp.StepSeq], errors: Sequence[str | None]) -> None:
        """After the step: keep each sequence that ran, forget each that
        failed (its next step comes in full)."""
        for s, error in zip(steps, errors):
            if error:
                self.seqs.pop(s.seq_id, None)
                continue
            history: list[int] = []
            if s.params.repetition_penalty != 1.0:
                kept = self.seqs.get(s.seq_id)
                if kept is not None and s.prior_token_ids is kept.history:
                    history = kept.history  # a delta: built on the kept copy
                    history.extend(s.token_ids)
                else:
                    history = [*s.prior_token_ids, *s.token_ids]
            # The step's own lists (decoded for it, or built by `expand`).
            self.seqs[s.seq_id] = Kept(s.block_table, s.start_pos + len(s.token_ids), s.params, history)


def _misfit(d: dp.StepDelta, kept: Kept | None) -> str:
    if kept is None:
        return f"seq_id {d.seq_id} is not held here (this driver restarted, or never got it): send it in full"
    if d.start_pos != kept.pos:
        return (f"seq_id {d.seq_id}: the delta starts at position {d.start_pos}, this driver's copy "
                f"ends at {kept.pos}: send it in full")
    if not 0 <= d.table_start <= len(kept.table):
        return (f"seq_id {d.seq_id}: table_start {d.table_start} is outside this driver's copy of "
                f"{len(kept.table)} blocks: send it in full")
    return ""


__all__ = ["Kept", "SeqTable"]
