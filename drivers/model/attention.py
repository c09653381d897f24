"""Paged attention over the block pool, for a step that mixes decodes and
prefill chunks.

Decodes (one new token) are attended in groups of sequences with similar
context lengths, padded to the longest in the group. Two kernels:

- "bag" (CPU default, every dtype): keys and values are read straight from the pool with
  `embedding_bag`, which sums weighted rows picked by index. For values the
  rows are value vectors weighted by the attention probabilities; for keys
  (stored transposed, see kv_cache.py) the rows are one head dimension of a
  block's keys weighted by that query component, which sums to the scores.
  Nothing is gathered, so the pool is read once per layer: decoding is bound
  by memory bandwidth, and a gather would double the traffic.
- "gather": blocks are gathered into a contiguous buffer and multiplied with
  grouped (GQA) batched matmuls. Works for every device and dtype.

Prefill chunks are attended one sequence at a time (gather, then torch's
fused scaled_dot_product_attention), with the causal mask offset by the
chunk's start position.

Query head h reads key/value head h // group (the repeat_kv convention of
Llama checkpoints); the grouped matmuls never materialise repeated heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from drivers.model.kv_cache import KVCache

DecodeKernel = Literal["bag", "gather"]

# Padding a decode group costs at most this fraction of its reads.
_GROUP_SLACK = 0.75


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    start: int              # token rows [start, stop), one per sequence
    stop: int
    width: int              # blocks per sequence after padding
    blocks: torch.Tensor    # [n, width] block ids; padding -> the zero block
    pad: torch.Tensor       # [n, 1, 1, width * block_size] True past the context
    k_rows: torch.Tensor | None      # "bag" kernel indices (None for "gather")
    k_offsets: torch.Tensor | None
    v_rows: torch.Tensor | None
    v_offsets: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    start: int              # token rows [start, stop)
    stop: int
    first_pos: int          # position of row `start`
    blocks: torch.Tensor    # [ceil(context / block_size)] block ids
    allowed: torch.Tensor   # [stop - start, context] True where a query sees a key

    @property
    def context(self) -> int:
        return self.allowed.shape[1]


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    decodes: list[DecodeGroup]
    prefills: list[PrefillSeq]


def group_decodes(num_blocks: list[int]) -> list[list[int]]:
    """Split decode sequences (given their block counts) into groups of
    indices whose padding to the group's widest wastes little; widest first."""
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and num_blocks[i] >= _GROUP_SLACK * num_blocks[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class PagedAttention:
    """Plans and runs attention for one model over one `KVCache`."""

    def __init__(self, cache: KVCache, num_heads: int, kernel: DecodeKernel):
        self.cache = cache
        self.kernel = kernel
        self.kv_heads = cache.k.shape[2]
        self.head_dim = cache.k.shape[3]
        self.group = num_heads // self.kv_heads
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.device = cache.k.device
        self._scratch: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reusable scratch tensor: decode temporaries scale with batch x
        context (megabytes per layer), so they are allocated once and regrown
        only when a step needs more."""
        numel = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                              dtype=dtype or self.cache.k.dtype, device=self.device)
            self._scratch[name] = buf
        return buf[:numel].view(shape)

    # -- planning (once per step, shared by every layer) --------------------

    def decode_group(self, start: int, tables: list[list[int]], contexts: list[int],
                     width: int) -> DecodeGroup:
        bs, zero = self.cache.block_size, self.cache.zero_block
        n, heads, dim, group = len(tables), self.kv_heads, self.head_dim, self.group
        padded = [t[:width] + [zero] * (width - len(t[:width])) for t in tables]
        blocks = torch.tensor(padded, dtype=torch.long, device=self.device)
        ctx = torch.tensor(contexts, dtype=torch.long, device=self.device)
        span = width * bs
        valid = torch.arange(span, device=self.device)[None, :] < ctx[:, None]
        pad = (~valid).view(n, 1, 1, span)
        if self.kernel == "gather":
            return DecodeGroup(start, start + n, width, blocks, pad, None, None, None, None)
        # Row indices for embedding_bag, in int32 where they fit: half the
        # bytes to build and to read in every layer.
        rows_max = (self.cache.zero_block + 1) * heads * max(dim, bs)
        itype = torch.int32 if rows_max < 2**31 else torch.long
        h = torch.arange(heads, device=self.device, dtype=itype)
        base = (blocks.to(itype) * heads)[:, None, :] + h[None, :, None]    # [n, heads, width]
        # Keys: bag (seq, head, group, block) sums the head_dim rows of the
        # block's transposed keys.
        k_rows = torch.empty(n, heads, group, width, dim, dtype=itype, device=self.device)
        torch.add((base * dim)[:, :, None, :, None].expand(n, heads, group, width, 1),
                  torch.arange(dim, device=self.device, dtype=itype), out=k_rows)
        k_rows = k_rows.view(-1)
        k_offsets = torch.arange(0, k_rows.numel(), dim, device=self.device, dtype=itype)
        # Values: bag (seq, head, group) sums one row per position; positions
        # past the context read the zero block.
        slot_base = torch.where(valid[:, None, :], (base * bs).repeat_interleave(bs, dim=2),
                                (zero * heads + h[None, :, None]) * bs)
        s = (torch.arange(span, device=self.device, dtype=itype) % bs)
        v_rows = torch.empty(n, heads, group, span, dtype=itype, device=self.device)
        torch.add(slot_base[:, :, None, :].expand(n, heads, group, span), s, out=v_rows)
        v_rows = v_rows.view(-1)
        v_offsets = torch.arange(0, v_rows.numel(), span, device=self.device, dtype=itype)
        return DecodeGroup(start, start + n, width, blocks, pad, k_rows, k_offsets, v_rows, v_offsets)

    def prefill_seq(self, start: int, first_pos: int, length: int, table: list[int]) -> PrefillSeq:
        context = first_pos + length
        nb = -(-context // self.cache.block_size)
        blocks = torch.tensor(table[:nb], dtype=torch.long, device=self.device)
        keys = torch.arange(context, device=self.device)
        queries = torch.arange(first_pos, context, device=self.device)
        allowed = keys[None, :] <= queries[:, None]
        return PrefillSeq(start, start + length, first_pos, blocks, allowed)

    # -- execution (once per layer) -----------------------------------------

    def forward(self, layer: int, plan: AttentionPlan, q: torch.Tensor, out: torch.Tensor) -> None:
        """Attend queries `q` [tokens, heads * head_dim] (already rotated, and
        this step's keys/values already written to the cache) into `out`."""
        for g in plan.decodes:
            if self.kernel == "bag":
                self._decode_bag(layer, g, q[g.start:g.stop], out[g.start:g.stop])
            else:
                self._decode_gather(layer, g, q[g.start:g.stop], out[g.start:g.stop])
        for p in plan.prefills:
            self._prefill(layer, p, q[p.start:p.stop], out[p.start:p.stop])

    def _decode_bag(self, layer: int, g: DecodeGroup, q: torch.Tensor, out: torch.Tensor) -> None:
        assert g.k_rows is not None and g.k_offsets is not None
        assert g.v_rows is not None and g.v_offsets is not None
        n, heads, group, dim = g.stop - g.start, self.kv_heads, self.group, self.head_dim
        bs = self.cache.block_size
        # One weight per (query head, block, head dim): the query component.
        weights = self._buffer("weights", n, heads, group, g.width, dim)
        torch.mul(q.view(n, heads, group, 1, dim).expand(n, heads, group, g.width, dim),
                  self.scale, out=weights)
        keys = self.cache.k[layer].view(-1, bs)
        scores = F.embedding_bag(g.k_rows, keys, g.k_offsets, mode="sum",
                                 per_sample_weights=weights.view(-1))
        scores = scores.view(n, heads, group, g.width * bs).masked_fill_(g.pad, -math.inf)
        probs = _softmax(scores)
        values = self.cache.v[layer].view(-1, dim)
        o = F.embedding_bag(g.v_rows, values, g.v_offsets, mode="sum",
                            per_sample_weights=probs.view(-1))
        out.copy_(o.view(n, -1))

    def _decode_gather(self, layer: int, g: DecodeGroup, q: torch.Tensor, out: torch.Tensor) -> None:
        n, heads, group, dim = g.stop - g.start, self.kv_heads, self.group, self.head_dim
        bs, span = self.cache.block_size, g.width * self.cache.block_size
        flat = g.blocks.view(-1)
        gathered = self._buffer("gathered", n * g.width, heads, dim, bs)
        torch.index_select(self.cache.k[layer], 0, flat, out=gathered)
        keys = self._buffer("keys", n, heads, dim, g.width, bs)
        keys.copy_(gathered.view(n, g.width, heads, dim, bs).permute(0, 2, 3, 1, 4))
        keys = keys.view(n * heads, dim, span)
        gathered = gathered.view(n * g.width, heads, bs, dim)
        torch.index_select(self.cache.v[layer], 0, flat, out=gathered)
        values = self._buffer("values", n, heads, g.width, bs, dim)
        values.copy_(gathered.view(n, g.width, heads, bs, dim).transpose(1, 2))
        values = values.view(n, heads, span, dim)
        # Stale slots past the context may hold anything (NaN from a failed
        # sequence); a zero probability times NaN is still NaN.
        values.masked_fill_(g.pad.view(n, 1, span, 1), 0.0)
        qs = torch.mul(q.reshape(n * heads, group, dim), self.scale)
        scores = torch.bmm(qs, keys).view(n, heads, group, span).masked_fill_(g.pad, -math.inf)
        probs = _softmax(scores)
        o = torch.bmm(probs.view(n * heads, group, span), values.view(n * heads, span, dim))
        out.copy_(o.view(n, -1))

    def _prefill(self, layer: int, p: PrefillSeq, q: torch.Tensor, out: torch.Tensor) -> None:
        heads, dim, bs = self.kv_heads, self.head_dim, self.cache.block_size
        length, context, nb = p.stop - p.start, p.context, p.blocks.numel()
        keys = self.cache.k[layer].index_select(0, p.blocks)          # [nb, heads, dim, bs]
        keys = keys.permute(1, 0, 3, 2).reshape(heads, nb * bs, dim)[:, :context]
        values = self.cache.v[layer].index_select(0, p.blocks)        # [nb, heads, bs, dim]
        values = values.transpose(0, 1).reshape(heads, nb * bs, dim)[:, :context]
        # torch's fused CPU/GPU attention: tiled (no [length, context] score
        # matrix per head) and GQA-aware without repeating key/value heads.
        o = F.scaled_dot_product_attention(
            q.view(length, self.num_heads, dim).transpose(0, 1)[None], keys[None], values[None],
            attn_mask=p.allowed, scale=self.scale, enable_gqa=True)
        out.view(length, self.num_heads, dim).copy_(o[0].transpose(0, 1))


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension computed in float32 (a 16-bit sum over
    hundreds of positions loses the small probabilities), returned in the
    scores' dtype for the value product."""
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
