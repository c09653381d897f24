"""`MemoryManager`: the memory server's state and its protocol, without I/O.

One method per request of `ipc.protocol.memory`, each taking the request
struct and returning the reply struct, so the service is one line per
handler. A request wrong as a whole raises an `ipc.errors` exception; a
failure that concerns one sequence of a batch is a value in the reply.
"""

from __future__ import annotations

from array import array

from ipc.errors import BadRequest, LlmosError, NotFound
from ipc.protocol.memory import (
    MAX_AHEAD,
    NO_LIMIT,
    DropPool,
    EvictCached,
    EvictReply,
    Fork,
    ForkReply,
    MemoryReply,
    MemoryRequest,
    MemoryStats,
    MemoryStatsReply,
    PoolReply,
    RegisterPool,
    Release,
    ReleaseReply,
    Reregister,
    ReregisterReply,
    Reserve,
    ReserveReply,
    SeqBlocks,
    SeqFailure,
    SeqReserve,
    SeqSwap,
    SetBlockQuota,
    SwapIn,
    SwapInReply,
    SwapOut,
    SwapOutReply,
    TenantBlocks,
)
from services.memory import _allocator, _swapping
from services.memory._hashing import root_key, token_array
from services.memory._pool import BlockPool
from services.memory._recovery import adopt
from services.memory._sequence import Sequence
from services.memory._stats import all_tenants, pool_stats, tenant_blocks
from services.memory._tenants import TenantLedger
from common.config.memory import MemoryConfig


class MemoryManager:
    """Block pools (one per driver instance), sequences and tenant quotas."""

    def __init__(self, config: MemoryConfig | None = None):
        config = config or MemoryConfig()
        self._ledger = TenantLedger(config.default_tenant_blocks, config.tenant_blocks)
        self._pools: dict[str, BlockPool] = {}
        self._seqs: dict[int, Sequence] = {}

    def register_pool(self, req: RegisterPool) -> PoolReply:
        if req.num_blocks <= 0 or req.block_size <= 0 or req.swap_slots < 0:
            raise BadRequest(f"pool {req.pool!r}: num_blocks and block_size must be positive, "
                             "swap_slots not negative")
        lost = self._drop(req.pool) if req.pool in self._pools else []
        self._pools[req.pool] = BlockPool(req.pool, req.num_blocks, req.block_size,
                                          req.swap_slots, self._ledger)
        return PoolReply(req.pool, lost)

    def drop_pool(self, req: DropPool) -> PoolReply:
        self._pool(req.pool)
        return PoolReply(req.pool, self._drop(req.pool))

    def _drop(self, pool_id: str) -> list[int]:
        pool = self._pools.pop(pool_id)
        lost = [sid for sid, seq in self._seqs.items() if seq.pool is pool]
        for sid in lost:
            del self._seqs[sid]
        pool.release_all()
        return lost

    def reserve(self, req: Reserve) -> ReserveReply:
        freed, failures = self._release(req.release, True)
        if req.discard:
            more, lost = self._release(req.discard, False)
            freed += more
            failures += lost
        out: list[SeqBlocks] = []
        for item in req.seqs:
            try:
                out.append(self._reserve_one(item))
            except LlmosError as e:
                out.append(SeqBlocks(item.seq_id, error=e.to_wire()))
        return ReserveReply(out, freed, failures)

    def _reserve_one(self, item: SeqReserve) -> SeqBlocks:
        if item.num_new < 0:
            raise BadRequest(f"sequence {item.seq_id!r}: num_new must not be negative")
        if not 0 <= item.ahead <= MAX_AHEAD:
            raise BadRequest(f"sequence {item.seq_id!r}: ahead must be within [0, {MAX_AHEAD}], "
                             f"not {item.ahead}", detail={"seq_id": item.seq_id, "field": "ahead"})
        if item.computed < -1:
            raise BadRequest(f"sequence {item.seq_id!r}: computed must be >= -1, not {item.computed}",
                             detail={"seq_id": item.seq_id, "field": "computed"})
        tokens = _tokens(item.seq_id, item.tokens)
        seq = self._seqs.get(item.seq_id)
        if seq is None:
            if item.start:
                raise NotFound(f"unknown sequence {item.seq_id!r} (released, lost with its "
                               "pool, or the memory server restarted: re-register it)",
                               detail={"seq_id": item.seq_id})
            seq = Sequence(item.seq_id, item.tenant, self._pool(item.pool),
                           root_key(item.tenant, item.cache_salt), array("q"))
            reply = _allocator.reserve(seq, tokens, item.num_new, self._ledger, item.ahead, item.computed)
            self._seqs[item.seq_id] = seq
            return reply
        if item.start != len(seq.tokens):
            raise BadRequest(f"sequence {item.seq_id!r} has {len(seq.tokens)} tokens, "
                             f"not {item.start}", detail={"seq_id": item.seq_id})
        if item.tenant and item.tenant != seq.tenant:
            raise BadRequest(f"sequence {item.seq_id!r} belongs to another tenant",
                             detail={"seq_id": item.seq_id})
        if item.pool and item.pool != seq.pool.pool_id:
            raise BadRequest(f"sequence {item.seq_id!r} lives in pool {seq.pool.pool_id!r}, "
                             f"not {item.pool!r}", detail={"seq_id": item.seq_id})
        return _allocator.reserve(seq, tokens, item.num_new, self._ledger, item.ahead, item.computed)

    def release(self, req: Release) -> ReleaseReply:
        return ReleaseReply(*self._release(req.seq_ids, req.computed))

    def _release(self, seq_ids: list[int], computed: bool) -> tuple[int, list[SeqFailure]]:
        freed = 0
        failures: list[SeqFailure] = []
        for sid in seq_ids:
            seq = self._seqs.pop(sid, None)
            if seq is None:
                failures.append(SeqFailure(sid, _unknown(sid).to_wire()))
            else:
                freed += _allocator.release(seq, computed)
        return freed, failures

    def fork(self, req: Fork) -> ForkReply:
        failures: list[SeqFailure] = []
        for pair in req.pairs:
            try:
                parent = self._seq(pair.parent)
                if pair.child in self._seqs:
                    raise BadRequest(f"sequence {pair.child!r} already exists",
                                     detail={"seq_id": pair.child})
                self._seqs[pair.child] = _allocator.fork(parent, pair.child)
            except LlmosError as e:
                failures.append(SeqFailure(pair.child, e.to_wire()))
        return ForkReply(failures)

    def swap_out(self, req: SwapOut) -> SwapOutReply:
        moves: dict[str, dict[int, int]] = {}
        out: list[SeqSwap] = []
        for sid in req.seq_ids:
            try:
                seq = self._seq(sid)
                out.append(_swapping.swap_out(seq, moves.setdefault(seq.pool.pool_id, {})))
            except LlmosError as e:
                out.append(SeqSwap(sid, error=e.to_wire()))
        return SwapOutReply(out)

    def swap_in(self, req: SwapIn) -> SwapInReply:
        moves: dict[str, dict[int, int]] = {}
        out: list[SeqSwap] = []
        for sid in req.seq_ids:
            try:
                seq = self._seq(sid)
                out.append(_swapping.swap_in(seq, moves.setdefault(seq.pool.pool_id, {}),
                                             self._ledger))
            except LlmosError as e:
                out.append(SeqSwap(sid, error=e.to_wire()))
        return SwapInReply(out)

    def reregister(self, req: Reregister) -> ReregisterReply:
        # What is released here is released as not computed: its last
        # reserved slots may never have been written (a scheduler killed
        # between a step's Reserve and its Execute), so only the blocks
        # already keyed under a `computed` the caller reported stay in the
        # prefix cache; a listed sequence's own claim re-keys what it holds.
        released: list[int] = []
        if req.replace:
            listed = {s.seq_id for s in req.seqs}
            for sid, seq in list(self._seqs.items()):
                _allocator.release(seq, computed=False)
                del self._seqs[sid]
                if sid not in listed:
                    released.append(sid)
        failures: list[SeqFailure] = []
        for st in req.seqs:
            try:
                pool = self._pool(st.pool)
                tokens = _tokens(st.seq_id, st.tokens)
                old = self._seqs.pop(st.seq_id, None)
                if old is not None:
                    _allocator.release(old, computed=False)
                seq = Sequence(st.seq_id, st.tenant, pool, root_key(st.tenant, st.cache_salt),
                               tokens)
                if st.blocks or st.num_computed:
                    adopt(seq, st.blocks, st.num_computed, self._ledger)
                self._seqs[st.seq_id] = seq
            except LlmosError as e:
                failures.append(SeqFailure(st.seq_id, e.to_wire()))
        return ReregisterReply(released, failures)

    def set_block_quota(self, req: SetBlockQuota) -> TenantBlocks:
        # Kept even when NO_LIMIT: it then lifts the default limit for this tenant.
        self._ledger.limits[req.tenant] = max(req.max_blocks, NO_LIMIT)
        return tenant_blocks(self._ledger, req.tenant)

    def evict_cached(self, req: EvictCached) -> EvictReply:
        pools = [self._pool(req.pool)] if req.pool else list(self._pools.values())
        n = 0
        for pool in pools:
            n += pool.evict(req.max_blocks - n if req.max_blocks >= 0 else -1)
        return EvictReply(n)

    def stats(self, req: MemoryStats) -> MemoryStatsReply:
        pools = [self._pool(req.pool)] if req.pool else list(self._pools.values())
        seqs = self._seqs.values()
        return MemoryStatsReply([pool_stats(p, seqs) for p in pools], all_tenants(self._ledger))

    def handle(self, req: MemoryRequest) -> MemoryReply:
        """Dispatch any memory request (for in-process callers and tests)."""
        match req:
            case Reserve():
                return self.reserve(req)
            case Release():
                return self.release(req)
            case Fork():
                return self.fork(req)
            case SwapOut():
                return self.swap_out(req)
            case SwapIn():
                return self.swap_in(req)
            case RegisterPool():
                return self.register_pool(req)
            case DropPool():
                return self.drop_pool(req)
            case Reregister():
                return self.reregister(req)
            case SetBlockQuota():
                return self.set_block_quota(req)
            case EvictCached():
                return self.evict_cached(req)
            case MemoryStats():
                return self.stats(req)
        raise BadRequest(f"the memory server does not serve {type(req).__name__}")

    def pool(self, pool_id: str) -> BlockPool:
        return self._pool(pool_id)

    def sequence(self, seq_id: int) -> Sequence:
        return self._seq(seq_id)

    def _pool(self, pool_id: str) -> BlockPool:
        pool = self._pools.get(pool_id)
        if pool is None:
            raise NotFound(f"unknown pool {pool_id!r} (its driver is not registered)",
                           detail={"pool": pool_id})
        return pool

    def _seq(self, seq_id: int) -> Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise _unknown(seq_id)
        return seq


def _unknown(seq_id: int) -> NotFound:
    return NotFound(f"unknown sequence {seq_id!r}", detail={"seq_id": seq_id})


def _tokens(seq_id: int, tokens: list[int]) -> array:
    try:
        return token_array(tokens)
    except (OverflowError, TypeError):
        raise BadRequest(f"sequence {seq_id!r}: token ids must be 64-bit integers",
                         detail={"seq_id": seq_id}) from None
