"""Step 3 of the engine loop: the plan's memory work, in one round trip
when nothing is swapped.

The KV to release (finished, cancelled, preempted sequences) rides on the
step's `Reserve`, which the memory server applies first: one call frees a
sequence that ended in the last step and gives its blocks to this one. A
`Release` of its own goes only when no `Reserve` follows (an idle engine
still frees blocks at once), or before a swap-in, which needs the freed
blocks first.
"""

from __future__ import annotations

from services.scheduler._execute import Work, reserve, reserve_refused
from services.scheduler._kv_quota import KvQuotas
from services.scheduler._overlap import take_covered
from services.scheduler._request import Seq
from services.scheduler._sessions import SessionTable
from services.scheduler._state import EngineState
from services.scheduler._swap import swap_in, swap_out
from services.scheduler.planner import StepPlan


async def reserve_plan(state: EngineState, sessions: SessionTable, kv: KvQuotas, p: StepPlan, victims: list[Seq],
                       incarnations: dict[str, int]) -> tuple[list[Work], list[tuple[Seq, str]]]:
    """Swap out the plan's swap victims, swap in the swapped sequences it
    runs, and reserve its slots (with the releases). Returns the work that
    got slots, and the sequences that must start over, with why (each
    counts a failure); no work when the step is abandoned. The decodes whose
    slots were reserved while the last step ran (_overlap.py) need no call:
    when they are all the plan runs, the releases wait for the Reserve that
    overlaps this step."""
    if victims:
        # Before any Reserve: the plan gave their device blocks away.
        await swap_out(state, victims)
    if state.memory_down:
        return [], []
    covered, scheduled = take_covered(state, p.scheduled, incarnations)
    if not scheduled:
        if not covered:
            await state.flush_releases()  # no Reserve to carry them: free the blocks now
        return covered, []
    swapped = [seq for seq, _ in scheduled if seq.swapped]
    if swapped:
        # A swap-in needs the released blocks before the Reserve.
        if not await state.flush_releases():
            return [], []
        later = set(await swap_in(state, swapped))
        for seq in swapped:
            if not seq.swapped and seq.mem_known:
                # Back on device blocks: running from now on, whatever its
                # Reserve says, so every plan counts those blocks.
                state.start(seq)
        if later:  # fewer free blocks than the plan thought: they wait
            p.scheduled = [(seq, n) for seq, n in p.scheduled if seq not in later]
            scheduled = [(seq, n) for seq, n in scheduled if seq not in later]
        if state.memory_down:
            return [], []
        # A failed swap-in dropped KV: its release rides on the Reserve,
        # applied before the id is reserved again from token 0.
    work, refused = await reserve(state, scheduled)
    if state.memory_down:
        return [], []  # abandoned; the covered decodes keep their slots for the next try
    failed = []
    for seq, error in refused:
        why = reserve_refused(state, sessions, kv, seq, error)
        if why:
            failed.append((seq, why))
    return covered + work, failed


__all__ = ["reserve_plan"]
