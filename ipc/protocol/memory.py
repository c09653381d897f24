"""The memory server's protocol: the KV cache as virtual memory.

A *pool* is one driver instance's KV cache (keyed by the driver's instance
id): `num_blocks` device blocks of `block_size` token slots, plus
`swap_slots` blocks in the driver's host tier. A sequence's *block table*
maps its logical blocks (slot i lives in logical block i // block_size) to
physical ones. The memory server owns every table; the driver only does the
copies it is told to and reads the tables the scheduler sends it.

Every call is batched (one per scheduler step). A failure that concerns one
sequence comes back as a value in the reply and leaves that sequence as it
was; only a request that is wrong as a whole raises.

Copies (copy-on-write, swap out, swap in) must be done by the pool's driver
before the forward pass that follows, in the order the replies were issued:
every destination block was free when it was named, so issue order is safe.

Slots run at most `ahead` slots past the tokens: after a Reserve a sequence
has ``min(slots before + num_new, max(slots before, tokens known + ahead))``
slots, where for a sequence's first allocation "slots before" is
`num_cached`. The KV of those slots is assumed written once the step runs;
its full blocks become shareable (prefix cache) at the sequence's next
Reserve (within its `computed`), SwapOut, Fork or Release.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from ipc.errors import Error
from ipc.protocol.base import Message, Request

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
NO_LIMIT = -1
# `detail["quota"]` of the `overloaded` a Reserve / SwapIn gets when the
# tenant's KV-block quota (not the pool) is what is short.
KV_BLOCKS = "kv_blocks"


class Item(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """An entry in a batched request or reply (untagged: its place says what it is).

    `seq_id` is the scheduler's sequence id, the same int the driver's
    `StepSeq.seq_id` carries. The scheduler releases a sequence's KV before
    it reserves the same id from token 0 again (after a preemption or a
    loss), so one id never names two live KV states here."""


class SeqFailure(Item):
    seq_id: int
    error: Error


class RegisterPool(Request["PoolReply"]):
    """A driver instance's KV cache came up. Registering an id that exists
    means that driver restarted: the old pool and its sequences are dropped."""

    pool: str
    num_blocks: Positive
    block_size: Positive
    swap_slots: NonNegative = 0


class DropPool(Request["PoolReply"]):
    """The driver instance died: its blocks (device and swap) are gone."""

    pool: str


class PoolReply(Message):
    pool: str
    # Sequences that lost their KV with the pool; they must be recomputed.
    lost: list[int] = []


class SeqReserve(Item):
    seq_id: int
    # How many tokens the sequence had before `tokens`: 0 registers a new
    # sequence; otherwise it must match, so a desynchronised caller gets an
    # error rather than a corrupted prefix cache.
    start: NonNegative
    # Token ids learned since the last Reserve (a new sequence: its prompt).
    tokens: list[int]
    # Slots to reserve for the tokens whose KV this step computes, counted
    # after any prefix-cache hit.
    num_new: NonNegative
    # Needed for a new sequence; afterwards, when given, they must match.
    tenant: str = ""
    pool: str = ""
    cache_salt: str = ""
    # Slots may run this many tokens past those known (at most MAX_AHEAD): a
    # decode's next slot reserved while the step that samples its token still
    # runs (the scheduler's overlap); the token comes with the next Reserve.
    ahead: NonNegative = 0
    # Positions whose KV the caller knows is written (-1: every slot reserved
    # before this call). While a step may still run on the last slots, only
    # the blocks within `computed` are offered to the prefix cache.
    computed: int = -1


# The most slots a SeqReserve may reserve past the tokens known.
MAX_AHEAD = 8


class Reserve(Request["ReserveReply"]):
    """Reserve slots for a step, after releasing `release` (their last
    reserved step ran: its full blocks go to the prefix cache) and `discard`
    (released too, but their last reserved step never ran: the blocks it
    filled hold no KV). Releases are applied first, so one call frees a
    finished sequence and lets another reuse its blocks, or re-reserves a
    released id from token 0; the engine's one memory round trip per step."""

    seqs: list[SeqReserve]
    release: list[int] = []
    discard: list[int] = []


class SeqBlocks(Item):
    """One sequence's block-table delta: the table becomes
    ``table[:table_start] + blocks``."""

    seq_id: int
    table_start: int = 0
    blocks: list[int] = []
    # Prompt tokens found in the prefix cache (first allocation only).
    num_cached: int = 0
    # Copy-on-write: copy block cow_src into cow_dst (it replaced cow_src).
    cow_src: int = -1
    cow_dst: int = -1
    error: Error | None = None


class ReserveReply(Message):
    seqs: list[SeqBlocks]  # one per requested sequence, in request order
    # What the releases did (as `ReleaseReply`): an unknown id fails alone.
    num_freed: int = 0
    release_failures: list[SeqFailure] = []


class Release(Request["ReleaseReply"]):
    """The sequences finished or were preempted for recompute. Their full
    blocks stay in the prefix cache until evicted."""

    seq_ids: list[int]
    # False when their last reserved step never ran: the blocks it filled
    # hold no KV and must not be offered to the prefix cache.
    computed: bool = True


class ReleaseReply(Message):
    num_freed: int = 0  # device blocks no sequence holds any more
    failures: list[SeqFailure] = []


class ForkItem(Item):
    parent: int
    child: int


class Fork(Request["ForkReply"]):
    """Children share their parent's blocks; the first write into a shared
    partial block copies it (see `SeqBlocks.cow_src`)."""

    pairs: list[ForkItem]


class ForkReply(Message):
    failures: list[SeqFailure] = []


class SwapOut(Request["SwapOutReply"]):
    """Move sequences' blocks to their pool's swap tier. Sequences that share
    blocks (forks) and go out together keep sharing them."""

    seq_ids: list[int]


class SwapIn(Request["SwapInReply"]):
    seq_ids: list[int]


class SeqSwap(Item):
    seq_id: int
    # The sequence's whole table afterwards: swap slots after SwapOut,
    # device blocks after SwapIn.
    blocks: list[int] = []
    # Pairs to copy (device_blocks[i] <-> swap_slots[i]); device to host for
    # SwapOut, host to device for SwapIn. Blocks still in the prefix cache
    # come back without a copy.
    device_blocks: list[int] = []
    swap_slots: list[int] = []
    error: Error | None = None


class SwapOutReply(Message):
    seqs: list[SeqSwap]


class SwapInReply(Message):
    seqs: list[SeqSwap]


class SeqState(Item):
    seq_id: int
    tenant: str
    pool: str
    tokens: list[int]
    cache_salt: str = ""
    # KV already on the driver, when the driver outlived the memory server:
    # the sequence's block table and how many slots of it hold computed KV.
    # Empty: the sequence holds nothing and is recomputed from its tokens.
    blocks: list[int] = []
    num_computed: NonNegative = 0


class Reregister(Request["ReregisterReply"]):
    """Tell a (restarted) memory server which sequences are live. Each listed
    sequence replaces any of the same id; one that fails is left unknown
    (recompute it). With `replace`, every other sequence is released (a
    restarted scheduler starts from a clean slate). What is released here
    offers the prefix cache only blocks already known computed: the slots of
    a dead scheduler's last Reserve may never have been written."""

    seqs: list[SeqState]
    replace: bool = False


class ReregisterReply(Message):
    released: list[int] = []
    failures: list[SeqFailure] = []


class SetBlockQuota(Request["TenantBlocks"]):
    """Cap the device blocks a tenant may hold, over all pools (NO_LIMIT: none).
    Lowering it below current use refuses new blocks; it takes none away."""

    tenant: str
    max_blocks: int = NO_LIMIT


class TenantBlocks(Message):
    tenant: str
    blocks: int  # device blocks held
    swapped: int = 0  # swap slots held
    limit: int = NO_LIMIT


class EvictCached(Request["EvictReply"]):
    """Drop cached blocks no sequence holds, least recently used first."""

    pool: str = ""  # "" = every pool
    max_blocks: int = NO_LIMIT


class EvictReply(Message):
    num_evicted: int


class MemoryStats(Request["MemoryStatsReply"]):
    pool: str = ""  # "" = every pool


class PoolStats(Item):
    pool: str
    num_blocks: int
    block_size: int
    swap_slots: int
    used: int  # held by at least one sequence
    free: int  # holding nothing reusable
    cached: int  # held by no sequence but still in the prefix cache
    swap_used: int
    num_seqs: int  # sequences on the device
    num_swapped_seqs: int
    utilisation: float  # used / num_blocks
    waste_slots: int  # slots in used blocks holding no token
    waste_pct: float  # waste_slots / slots in used blocks, in %
    prompt_tokens: int  # prompt tokens looked up in the prefix cache
    hit_tokens: int
    hit_rate: float  # hit_tokens / prompt_tokens
    evictions: int
    swapped_out: int  # blocks copied device -> host
    swapped_in: int  # blocks copied host -> device
    cow_copies: int


class MemoryStatsReply(Message):
    pools: list[PoolStats]
    tenants: list[TenantBlocks]


MemoryRequest = (RegisterPool | DropPool | Reserve | Release | Fork | SwapOut | SwapIn
                 | Reregister | SetBlockQuota | EvictCached | MemoryStats)
MemoryReply = (PoolReply | ReserveReply | ReleaseReply | ForkReply | SwapOutReply | SwapInReply
               | ReregisterReply | TenantBlocks | EvictReply | MemoryStatsReply)


MEMORY_TOPIC = "memory.events"


class MemoryRestarted(Message):
    """Published once at start: the memory server holds no sequence, so every
    live one must be re-registered (`Reregister`) or recomputed."""

    pid: int
    pools: list[str] = []


class PoolLost(Message):
    """A driver's pool is gone (the driver died or restarted): `seq_ids` lost
    their KV and must be recomputed."""

    pool: str
    seq_ids: list[int]
    reason: str = ""


class ListPools(Request["PoolList"]):
    pass


class PoolList(Message):
    pools: list[str]
