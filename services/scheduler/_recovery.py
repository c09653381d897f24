"""Recovery (DESIGN §6) as the engine applies it at the top of a step.

* A driver died (or a restarted one answered, or the memory server dropped
  sequences with its pool): the KV is gone, so its sequences go back to the
  waiting line — their place kept — to be recomputed here or elsewhere.
* The memory server restarted empty: the engine tells it which sequences
  live and which blocks their drivers still hold (`Reregister`), so no KV
  that survived on a driver is computed again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc.protocol import memory as mp
from common.logs import get_logger
from services.scheduler._seq import Seq

if TYPE_CHECKING:
    from services.scheduler.engine import Engine

log = get_logger()


def requeue_lost(engine: "Engine", pools: set[str], mem_ids: set[str]) -> None:
    """Sequences on these lost pools, or with these lost memory ids, start over."""
    for seq in [*engine.running, *engine.waiting]:
        if seq.pool in pools or (seq.mem_known and seq.mem_id in mem_ids):
            # The KV is gone (or no longer trusted). Releasing is harmless
            # when the memory server already dropped the pool.
            if seq.mem_known:
                engine._to_release.append(seq.mem_id)
            seq.reset(keep_pool=seq.pool in engine.drivers)
            engine._to_waiting(seq)
    engine.sessions.kv_lost(pools, mem_ids)


async def reregister_live(engine: "Engine") -> None:
    """The memory server restarted empty: tell it which sequences live
    (running ones, and idle sessions' pinned ones) and which blocks their
    drivers still hold, so no KV is recomputed. What was in the swap tier
    is recomputed: its slots' bookkeeping died with the server."""
    engine._to_release.clear()  # it holds nothing of ours any more
    states: list[mp.SeqState] = []
    by_id: dict[str, Seq] = {}
    pinned = set(engine.sessions.pinned())
    for seq in [*engine.running, *pinned]:
        if seq.mem_known == 0 or seq.pool not in engine.drivers:
            continue
        bs = engine.drivers[seq.pool].shape.block_size
        blocks = seq.block_table[:-(-seq.num_computed // bs)]
        states.append(mp.SeqState(seq.mem_id, seq.tenant, seq.pool, seq.tokens[:seq.mem_known], "",
                                  blocks, seq.num_computed))
        by_id[seq.mem_id] = seq
    for seq in engine.waiting:
        if seq.mem_known:
            seq.reset(keep_pool=True)
    engine.sessions.memory_restarted()
    reply = await engine._memory(engine.backend.reregister(mp.Reregister(states, replace=True)))
    if isinstance(reply, mp.ReregisterReply):
        for f in reply.failures:
            log.warning("scheduler.reregister_failed", seq=f.seq_id, error=f.error.message)
        failed = [by_id.pop(f.seq_id) for f in reply.failures]
    else:
        engine._reregister = True  # memory went down again: retried when it is back
        failed, by_id = list(by_id.values()), {}
    engine.sessions.drop_pins([seq for seq in failed if seq in pinned])
    for seq in failed:
        if seq not in pinned:
            seq.reset(keep_pool=True)
            engine._to_waiting(seq)
    for seq in by_id.values():
        bs = engine.drivers[seq.pool or ""].shape.block_size
        del seq.block_table[-(-seq.num_computed // bs):]
    log.info("scheduler.reregistered", seqs=len(states), failed=len(failed))


__all__ = ["requeue_lost", "reregister_live"]
