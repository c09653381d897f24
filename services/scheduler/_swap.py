"""Moving sequences' KV between device blocks and their pools' host swap
tiers: the memory server decides (`SwapOut` / `SwapIn`: which blocks, which
slots), then each driver copies (`SwapBlocksOut` / `SwapBlocksIn`). Used by
swap-mode preemption and by a session's suspend / resume.

Whatever cannot be swapped (no swap tier, a full one, a failed copy) has its
KV dropped instead: the sequence is recomputed from its tokens later, so the
output is the same and only the work differs.
"""

from __future__ import annotations

from collections.abc import Callable

from ipc.errors import ErrorCode, LlmosError
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from common.logs import get_logger
from services.scheduler._request import Seq
from services.scheduler._state import EngineState

log = get_logger()


async def swap_out(state: EngineState, seqs: list[Seq]) -> list[Seq]:
    """Move `seqs`' KV to the swap tier in one memory call and one copy per
    driver; returns those now swapped. The others' KV is dropped."""
    todo = [s for s in seqs if s.mem_known and not s.swapped and s.pool in state.drivers]
    for s in seqs:
        if s not in todo and not s.swapped:
            state.drop_kv(s)
    if not todo:
        return []
    reply = await state.memory(state.backend.swap_out(mp.SwapOut([s.seq_id for s in todo])))
    if not isinstance(reply, mp.SwapOutReply):
        for s in todo:
            state.drop_kv(s)
        return []
    moved: list[tuple[Seq, mp.SeqSwap]] = []
    for seq, got in zip(todo, reply.seqs):
        if got.error is not None:
            log.info("scheduler.swap_out_refused", seq=seq.seq_id, error=got.error.message)
            state.drop_kv(seq)
        else:
            moved.append((seq, got))
    done = await _copy(state, moved, lambda d, h: dp.SwapBlocksOut(d, h), swapped=True)
    state.swapped_out += len(done)
    return done


async def swap_in(state: EngineState, seqs: list[Seq]) -> list[Seq]:
    """Bring `seqs`' KV back to device blocks (one memory call, one copy per
    driver); returns those that must wait for free blocks (still swapped).
    A sequence the memory server refuses for another reason, or whose copy
    fails, loses its KV and is recomputed."""
    if not seqs:
        return []
    reply = await state.memory(state.backend.swap_in(mp.SwapIn([s.seq_id for s in seqs])))
    if not isinstance(reply, mp.SwapInReply):
        return list(seqs)  # memory unreachable: a restart resets them, else retried
    later: list[Seq] = []
    moved: list[tuple[Seq, mp.SeqSwap]] = []
    for seq, got in zip(seqs, reply.seqs):
        if got.error is not None and got.error.code == ErrorCode.OVERLOADED:
            later.append(seq)  # out of device blocks: wait for some
        elif got.error is not None:
            log.warning("scheduler.swap_in_refused", seq=seq.seq_id, error=got.error.message)
            state.drop_kv(seq)
        else:
            moved.append((seq, got))
    # The memory server has given them device blocks: a failed copy drops
    # the sequence's KV with them.
    state.swapped_in += len(await _copy(state, moved, lambda d, h: dp.SwapBlocksIn(h, d), swapped=False))
    return later


async def _copy(state: EngineState, moved: list[tuple[Seq, mp.SeqSwap]],
                make: Callable[[list[int], list[int]], dp.SwapBlocksOut | dp.SwapBlocksIn],
                swapped: bool) -> list[Seq]:
    """Run the memory server's copy plan on each driver (`make(device blocks,
    swap slots)` is the driver's message). The sequences copied get their new
    table (slots, or device blocks) and `swapped`, and are returned; those
    whose copy failed have their KV dropped."""
    by_pool: dict[str, tuple[list[Seq], list[int], list[int]]] = {}
    for seq, got in moved:
        seqs, device, host = by_pool.setdefault(seq.pool or "", ([], [], []))
        seqs.append(seq)
        device.extend(got.device_blocks)
        host.extend(got.swap_slots)
    failed: set[Seq] = set()
    for pool, (seqs, device, host) in by_pool.items():
        if not device:
            continue  # every block was still cached on the device
        state.critical_rpcs += 1
        try:
            await state.backend.swap_blocks(pool, make(device, host))
        except LlmosError as exc:
            # The copy did not happen: what the slots (or blocks) hold is garbage.
            log.warning("scheduler.swap_copy_failed", driver=pool, seqs=len(seqs), error=str(exc))
            for seq in seqs:
                state.drop_kv(seq)
            failed.update(seqs)
    done = []
    for seq, got in moved:
        if seq not in failed:
            state.forget_on_driver(seq)  # its table is another now
            seq.block_table, seq.swapped = list(got.blocks), swapped
            done.append(seq)
    return done


__all__ = ["swap_in", "swap_out"]
