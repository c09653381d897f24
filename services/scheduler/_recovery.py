"""Recovery (DESIGN §6) as the engine applies it at the top of a step.

* A driver died (or a restarted one answered, or the memory server dropped
  sequences with its pool): the KV is gone, so its sequences go back to the
  waiting line — their place kept — to be recomputed here or elsewhere.
* The memory server restarted empty: the engine tells it which sequences
  live and which blocks their drivers still hold (`Reregister`), so no KV
  that survived on a driver is computed again.
"""

from __future__ import annotations

from ipc.protocol import memory as mp
from common.logs import get_logger
from services.scheduler._request import Seq
from services.scheduler._sessions import SessionTable
from services.scheduler._state import DriverState, EngineState
from services.scheduler.planner import PoolShape

log = get_logger()


class Recovery:
    """What was lost since the last step (drivers, sequences the memory
    server dropped, the memory server itself), recovered at the top of the
    next one."""

    def __init__(self, state: EngineState, sessions: SessionTable):
        self.state = state
        self.sessions = sessions
        self._incarnations = iter(range(1, 2**62))
        self._lost_pools: set[str] = set()
        self._lost_seqs: set[tuple[str, int]] = set()  # (pool, seq id) the memory server dropped
        self._reregister = False

    @property
    def pending(self) -> bool:
        return bool(self._lost_pools or self._lost_seqs or self._reregister)

    def driver_up(self, instance: str, shape: PoolShape, chains: bool = True) -> None:
        if instance in self.state.drivers:
            # A restart we did not see die: whatever it held is gone.
            self._lost_pools.add(instance)
        self.state.drivers[instance] = DriverState(shape, next(self._incarnations), chains)
        self.state.wake()

    def driver_down(self, instance: str) -> None:
        d = self.state.drivers.pop(instance, None)
        if d is None:
            return
        self._lost_pools.add(instance)
        for scope in d.scopes:
            scope.cancel()
        self.state.wake()

    def pools_lost(self, pools: set[str]) -> None:
        """Their KV is no longer trusted (the driver restarted mid-step)."""
        self._lost_pools |= pools

    def seqs_lost(self, pool: str, seq_ids: list[int]) -> None:
        self._lost_seqs.update((pool, i) for i in seq_ids)
        self.state.wake()

    def memory_restarted(self) -> None:
        self.state.memory_down = False
        self.state.memory_generation += 1
        self._reregister = True
        self.state.wake()

    async def apply(self) -> None:
        if self._lost_pools or self._lost_seqs:
            pools, self._lost_pools = self._lost_pools, set()
            seqs, self._lost_seqs = self._lost_seqs, set()
            requeue_lost(self.state, self.sessions, pools, seqs)
        if self._reregister and not self.state.memory_down:
            self._reregister = not await reregister_live(self.state, self.sessions)


def requeue_lost(state: EngineState, sessions: SessionTable, pools: set[str], lost: set[tuple[str, int]]) -> None:
    """Sequences on these lost pools, or that the memory server dropped
    with a pool (`lost`: (pool, seq id)), start over."""
    for seq in [*state.running, *state.waiting]:
        if seq.pool in pools or (seq.mem_known and (seq.pool, seq.seq_id) in lost):
            # The KV is gone (or no longer trusted). Releasing is harmless
            # when the memory server already dropped the pool.
            state.release(seq)
            seq.reset(keep_pool=seq.pool in state.drivers)
            state.requeue(seq)
    sessions.kv_lost(pools, lost)


async def reregister_live(state: EngineState, sessions: SessionTable) -> bool:
    """The memory server restarted empty: tell it which sequences live
    (running ones, and idle sessions' pinned ones) and which blocks their
    drivers still hold, so no KV is recomputed. What was in the swap tier
    is recomputed: its slots' bookkeeping died with the server. False: the
    memory server went down again (retry when it is back)."""
    state.forget_releases()
    generation = state.memory_generation
    states: list[mp.SeqState] = []
    by_id: dict[int, Seq] = {}
    pinned = set(sessions.pinned())
    for seq in [*state.running, *pinned]:
        if seq.mem_known == 0 or seq.pool not in state.drivers:
            continue
        bs = state.drivers[seq.pool].shape.block_size
        blocks = seq.block_table[:-(-seq.num_computed // bs)]
        # Its tokens up to what was computed at least: a step may have run on
        # a slot reserved ahead (_overlap.py) before its token was sent.
        known = max(seq.mem_known, seq.num_computed)
        states.append(mp.SeqState(seq.seq_id, seq.tenant, seq.pool, seq.tokens[:known], "",
                                  blocks, seq.num_computed))
        by_id[seq.seq_id] = seq
    for seq in state.waiting:
        if seq.mem_known:
            seq.reset(keep_pool=True)
    sessions.memory_restarted()
    reply = await state.memory(state.backend.reregister(mp.Reregister(states, replace=True)))
    # (Restarted again while the call was out: the next one re-registers.)
    done = isinstance(reply, mp.ReregisterReply) and generation == state.memory_generation
    if done:
        state.memory_synced = generation
    if isinstance(reply, mp.ReregisterReply):
        for f in reply.failures:
            log.warning("scheduler.reregister_failed", seq=f.seq_id, error=f.error.message)
        failed = [by_id.pop(f.seq_id) for f in reply.failures]
    else:
        failed, by_id = list(by_id.values()), {}
    sessions.drop_pins([seq for seq in failed if seq in pinned])
    for seq in failed:
        if seq not in pinned:
            seq.reset(keep_pool=True)  # the memory server does not hold it: nothing to release
            state.requeue(seq)
    for seq in by_id.values():
        bs = state.drivers[seq.pool or ""].shape.block_size
        del seq.block_table[-(-seq.num_computed // bs):]
        seq.mem_known = max(seq.mem_known, seq.num_computed)
        seq.ahead = None  # a slot reserved ahead died with the old server
        state.forget_on_driver(seq)  # sent in full again (its table was cut)
    log.info("scheduler.reregistered", seqs=len(states), failed=len(failed))
    return done


__all__ = ["Recovery", "requeue_lost", "reregister_live"]
