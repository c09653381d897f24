"""The paged KV cache: a pool of fixed-size blocks per layer.

The memory server owns block placement; this module only stores what the
runner writes and copies blocks around on request.

Layout (all layers in one tensor each, so copy and swap are one op):

    k: [layers, num_blocks + 1, kv_heads, head_dim, block_size]
    v: [layers, num_blocks + 1, kv_heads, block_size, head_dim]

K is stored transposed inside a block so that a row of `block_size` keys at
one head dimension is contiguous: decode attention reads keys straight from
the pool with `embedding_bag` (see attention.py) instead of gathering them.
The extra last block (id `num_blocks`) is never written and stays zero:
padding in a decode batch points there, so stale values in freed blocks
(even NaN from a failed sequence) can never leak into another sequence.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from drivers.model.config import ModelConfig
from drivers.model.errors import InvalidStep


def block_nbytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.kv_size * block_size * item


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype, device: torch.device):
        if num_blocks < 1:
            raise InvalidStep("the KV cache needs at least one block")
        layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.zero_block = num_blocks
        self.block_nbytes = block_nbytes(config, block_size, dtype)
        self.k = torch.zeros(layers, num_blocks + 1, heads, dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(layers, num_blocks + 1, heads, block_size, dim, dtype=dtype, device=device)

    def slots(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the new tokens' keys and values go, computed once per step:
        element indices into a layer's flat K ([tokens, kv_heads, head_dim])
        and row indices into its V rows ([tokens, kv_heads])."""
        heads, dim, bs = self.k.shape[2], self.k.shape[3], self.block_size
        h = torch.arange(heads, device=blocks.device)
        d = torch.arange(dim, device=blocks.device)
        base = blocks[:, None] * heads + h                           # [tokens, heads]
        k_idx = (base[:, :, None] * dim + d) * bs + offsets[:, None, None]
        v_idx = base * bs + offsets[:, None]
        return k_idx, v_idx

    def write(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor],
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys and values [tokens, kv_heads, head_dim] at `slots`."""
        k_idx, v_idx = slots
        # index_put_ reads the strided k/v views as they are (no copies).
        self.k[layer].view(-1).index_put_((k_idx,), k)
        self.v[layer].view(-1, v.shape[-1]).index_put_((v_idx,), v)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst (copy-on-write). All sources are read
        before any destination is written."""
        if not pairs:
            return
        src = self._ids([s for s, _ in pairs], "copy source")
        dst_list = [d for _, d in pairs]
        if len(set(dst_list)) != len(dst_list):
            raise InvalidStep("copy_blocks: a destination block appears twice")
        dst = self._ids(dst_list, "copy destination")
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))

    def read_blocks(self, block_ids: Sequence[int]) -> np.ndarray:
        """A host copy of whole blocks: uint8 [len(block_ids), block_nbytes],
        each row the block's keys then values for every layer."""
        ids = self._ids(block_ids, "swap-out")
        n = len(block_ids)
        k = self.k.index_select(1, ids).transpose(0, 1).reshape(n, -1)
        v = self.v.index_select(1, ids).transpose(0, 1).reshape(n, -1)
        rows = torch.cat([k, v], dim=1).cpu().contiguous()
        return rows.view(torch.uint8).numpy()

    def write_blocks(self, block_ids: Sequence[int], data: np.ndarray | bytes | memoryview) -> None:
        """The inverse of `read_blocks`."""
        ids = self._ids(block_ids, "swap-in")
        if len(set(block_ids)) != len(block_ids):
            raise InvalidStep("swap_in: a block id appears twice")
        n = len(block_ids)
        raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if raw.size != n * self.block_nbytes:
            raise InvalidStep(f"swap_in: {raw.size} bytes for {n} blocks, expected "
                              f"{n * self.block_nbytes} ({self.block_nbytes} per block)")
        if not raw.flags.writeable:
            raw = raw.copy()    # torch refuses to wrap read-only memory
        rows = torch.from_numpy(np.ascontiguousarray(raw).reshape(n, self.block_nbytes))
        rows = rows.view(self.k.dtype).to(self.k.device)
        half = rows.shape[1] // 2
        k_shape = (n, self.k.shape[0], *self.k.shape[2:])
        v_shape = (n, self.v.shape[0], *self.v.shape[2:])
        self.k.index_copy_(1, ids, rows[:, :half].reshape(k_shape).transpose(0, 1))
        self.v.index_copy_(1, ids, rows[:, half:].reshape(v_shape).transpose(0, 1))

    def _ids(self, block_ids: Sequence[int], what: str) -> torch.Tensor:
        ids = []
        for b in block_ids:
            try:
                i = operator.index(b)
            except TypeError:
                i = -1
            if not 0 <= i < self.num_blocks:
                raise InvalidStep(f"{what}: block id {b!r} is not in [0, {self.num_blocks})")
            ids.append(i)
        return torch.tensor(ids, dtype=torch.long, device=self.k.device)
