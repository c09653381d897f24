"""A finished session turn's epilogue (issue 18): the KV of its final token.

A turn's last sampled token is never fed to the model, so when the turn
ends its KV covers every position but that one, and the next turn would
compute it again. When a turn ends with stop or length on a live driver,
its pinned sequence runs one more position in the next step: its final
token, without sampling (`StepSeq.sample=False`: no logits, no token). The
client's `Finished` does not wait for it. The session's next turn does:
it starts (and so forks the pin, _session_fork.py) only once the
epilogue's step is over, so every position of the history is reused.

An epilogue rides beside the planned work (one position each, outside the
token budget and the sequence cap: at most one per turn that ended in the
last step). It is skipped, the pin staying as it was (all but the last
token), when it would need a block its pool or its tenant's quota does not
have now, or the pin is no longer on the device (a suspended session's pin
is armed again when it comes back). A step abandoned before its memory
call (the memory server down) tries again, up to `MAX_TRIES` steps. When
its step reserved the slot but did not run it (refused, failed, the driver
lost), the pin is released as never computed (a slot without KV is never
offered to the prefix cache) or was already dropped with the KV; the next
turn recomputes what is missing, and its `cached_tokens` shows it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.scheduler._request import Seq
from services.scheduler.planner import BlockLedger, StepPlan

if TYPE_CHECKING:
    from services.scheduler._sessions import Session, SessionTable

# Steps an epilogue may be planned in whose memory call never got through.
MAX_TRIES = 3


def wants_epilogue(table: SessionTable, seq: Seq) -> bool:
    """Its final token has no KV yet, and the rest is on a live driver."""
    return (seq.pool in table.state.drivers and not seq.swapped
            and 0 < seq.mem_known == seq.num_computed == len(seq.tokens) - 1)


def epilogue_blocks(table: SessionTable, seq: Seq, limit: int) -> int:
    """Blocks `seq` holds as a pin: with the block its epilogue may add when
    that is within `limit` (the pin budget; else the epilogue finds out in
    its step whether the pool has it)."""
    held = len(set(seq.block_table))
    d = table.state.drivers.get(seq.pool or "")
    if d is None or not wants_epilogue(table, seq):
        return held
    after = max(held, -(-len(seq.tokens) // d.shape.block_size))
    return after if after <= limit else held


def arm(table: SessionTable, s: Session, seq: Seq, tries: int = 0) -> None:
    """`seq` is now `s`'s pin: its epilogue runs in the next step, if it needs one."""
    seq.epilogue = wants_epilogue(table, seq)
    if seq.epilogue and not any(x is seq for _, x, _ in table.epilogues):
        table.epilogues.append((s, seq, tries))


def in_flight(table: SessionTable, seq: Seq) -> bool:
    """A step may be writing its final token's KV right now."""
    return any(x is seq for _, x, _ in table.flying)


def schedule_epilogues(table: SessionTable, p: StepPlan, ledger: BlockLedger) -> None:
    """Put the pending epilogues in this step's plan, after the planner
    (whose `ledger` they take their blocks from)."""
    pending, table.epilogues = table.epilogues, []
    for s, seq, tries in pending:
        pool = seq.pool or ""
        need = ledger.needed(seq, 1, pool) if pool in ledger.shapes else 0
        if (s.pinned is not seq or not seq.epilogue or not wants_epilogue(table, seq)
                or need > ledger.free[pool] or not ledger.quota_allows(seq.tenant, need)):
            seq.epilogue = False  # skipped: the pin stays as it is, or went meanwhile
            _resume(table, s)
            continue
        ledger.take(pool, need, seq.tenant)
        p.scheduled.append((seq, 1))
        table.flying.append((s, seq, tries + 1))


def settle_epilogues(table: SessionTable) -> None:
    """After the epilogues' step (at the top of the next, before any pin is
    forked): keep what was computed, and let each session's next turn start."""
    flying, table.flying = table.flying, []
    for s, seq, tries in flying:
        seq.epilogue = False
        if s.pinned is seq and (not seq.mem_known or seq.num_computed < seq.mem_known):
            # Its step failed (the KV was dropped) or never ran on the slot it reserved.
            table.state.release(seq, computed=False)
            s.pinned = None
        elif s.pinned is seq and tries < MAX_TRIES and wants_epilogue(table, seq):
            arm(table, s, seq, tries)  # its step never reached the memory server: next step
            continue
        _resume(table, s)


def _resume(table: SessionTable, s: Session) -> None:
    if table.by_key.get(s.key) is s:  # (a forgotten session's key may name a new one)
        table.next(s)


__all__ = ["MAX_TRIES", "arm", "epilogue_blocks", "in_flight", "schedule_epilogues", "settle_epilogues", "wants_epilogue"]
