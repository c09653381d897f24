"""A session's next turn takes the pinned KV of its last one by copy-on-write
(issue 18). Without this, the pin is released as the new turn reserves its
blocks and the turn finds only the history's FULL blocks in the prefix cache
(up to a block's worth recomputed). With it, the new turn's sequence is
forked from the pinned one (memory `Fork`: the blocks are shared, the partly
filled last block is copied on first write) before the step is planned, so
every position the last turn computed is reused: the turn's
`cached_tokens` is the whole history, its last generated token included
(the turn's epilogue computed its KV, _session_epilogue.py). Only when the
history is unchanged in front of the pin (no eviction) and the pin is on
the device; otherwise, and when the memory server refuses the fork, the
turn goes the prefix-cache way."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.protocol import memory as mp

if TYPE_CHECKING:
    from services.scheduler._sessions import SessionTable


async def adopt_pins(table: SessionTable) -> None:
    state = table.state
    waiting = {id(w) for w in state.waiting}
    pairs = []
    for s in table.by_key.values():
        req, pin = s.active, s.pinned
        if req is None or pin is None or s.suspended or pin.swapped or not pin.mem_known or pin.epilogue:
            continue
        seq = req.seq
        n = pin.num_computed
        if (id(seq) not in waiting or seq.mem_known or seq.num_computed or pin.pool not in state.drivers
                or n != pin.mem_known or n >= len(seq.tokens) or seq.tokens[:n] != pin.tokens[:n]):
            continue
        pairs.append((s, pin, seq))
    if not pairs:
        return
    reply = await state.memory(state.backend.fork(mp.Fork([mp.ForkItem(p.seq_id, q.seq_id) for _, p, q in pairs])))
    if not isinstance(reply, mp.ForkReply):
        return
    failed = {f.seq_id for f in reply.failures}
    for s, pin, seq in pairs:
        if seq.seq_id in failed or s.pinned is not pin:
            continue
        seq.pool = pin.pool
        seq.block_table = list(pin.block_table)
        seq.num_computed = seq.mem_known = pin.num_computed
        seq.served = seq.high_water = pin.num_computed
        seq.request.cached_tokens = pin.num_computed
        s.pinned = None
        state.release(pin)  # the child holds the blocks now


__all__ = ["adopt_pins"]
